"""The HF-tensor <-> arm_jax-parameter mapping record shared by the model families' checkpoint code."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One HF tensor <-> one arm_jax parameter (or, with `index`, the slice param[index] of a stacked parameter,
    e.g. one expert): `to_ours(hf_array)` and `to_hf(our_array)` are views/reshapes."""

    hf_name: str
    path: tuple
    hf_shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    index: Optional[int] = None


def identity(a):
    """The tensor as stored (no layout change)."""
    return a


def transpose(a):
    """torch Linear [out, in] <-> Flax kernel [in, out]."""
    return a.T


def swiglu_maps(prefix: str, path: tuple, D: int, F: int, bias: bool) -> list[TensorMap]:
    """gate/up/down_proj (+ biases) of a SwiGLU MLP ([F, D] / [D, F] on disk, transposed in arm_jax)."""
    maps = [TensorMap(prefix + "gate_proj.weight", path + ("gate",), (F, D), transpose, transpose),
            TensorMap(prefix + "up_proj.weight", path + ("up",), (F, D), transpose, transpose),
            TensorMap(prefix + "down_proj.weight", path + ("down",), (D, F), transpose, transpose)]
    if bias:
        maps += [TensorMap(prefix + f"{n}_proj.bias", path + (f"{n}_bias",), (s,), identity, identity)
                 for n, s in (("gate", F), ("up", F), ("down", D))]
    return maps


def plain_mlp_maps(prefix: str, path: tuple, D: int, F: int, bias: bool) -> list[TensorMap]:
    """c_fc / c_proj (+ biases) of StarCoder2's plain MLP -> up / down."""
    maps = [TensorMap(prefix + "c_fc.weight", path + ("up",), (F, D), transpose, transpose),
            TensorMap(prefix + "c_proj.weight", path + ("down",), (D, F), transpose, transpose)]
    if bias:
        maps += [TensorMap(prefix + "c_fc.bias", path + ("up_bias",), (F,), identity, identity),
                 TensorMap(prefix + "c_proj.bias", path + ("down_bias",), (D,), identity, identity)]
    return maps


def moe_maps(prefix: str, path: tuple, D: int, moe, shared_prefix: str, bias: bool) -> list[TensorMap]:
    """A MoE layer under `prefix` ('model.layers.{i}.mlp.'): the router `gate` [E, D] (DeepSeek-V3 adds
    `gate.e_score_correction_bias`), one gate/up/down_proj per expert on disk (`experts.{e}.`, stacked [E, ...]
    in arm_jax, slice `index`), the shared SwiGLU under `shared_prefix` (DeepSeek 'shared_experts.', Qwen2-MoE
    'shared_expert.') and Qwen2-MoE's `shared_expert_gate` [1, D]. moe: an `arm_jax.config.MoEConfig`."""
    E, Fe = moe.num_experts, moe.expert_size
    maps = [TensorMap(prefix + "gate.weight", path + ("router",), (E, D), transpose, transpose)]
    if moe.topk_method == "noaux_tc":
        maps.append(TensorMap(prefix + "gate.e_score_correction_bias", path + ("router_bias",), (E,), identity,
                              identity))
    for e in range(E):
        x = prefix + f"experts.{e}."
        maps += [TensorMap(x + "gate_proj.weight", path + ("gate",), (Fe, D), transpose, transpose, index=e),
                 TensorMap(x + "up_proj.weight", path + ("up",), (Fe, D), transpose, transpose, index=e),
                 TensorMap(x + "down_proj.weight", path + ("down",), (D, Fe), transpose, transpose, index=e)]
    if moe.shared_width:
        maps += swiglu_maps(prefix + shared_prefix, path + ("shared",), D, moe.shared_width, bias)
    if moe.shared_expert_gate:
        maps.append(TensorMap(prefix + "shared_expert_gate.weight", path + ("shared_gate",), (1, D), transpose,
                              transpose))
    return maps
