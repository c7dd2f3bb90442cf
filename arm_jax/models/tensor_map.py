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
