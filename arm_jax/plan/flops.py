"""Model FLOPs and minimum HBM traffic of each stage, counted from the architecture.

FLOPs follow the usual MFU accounting (as MaxText and PaLM count them): a forward costs 2 FLOPs per
multiply-accumulate of every matrix parameter a token passes through (routed experts: experts_per_token of
num_experts; the embedding lookup is free, the LM head is not) plus causal attention 2 * H * c * (Dqk + Dv) at
context c; a backward costs twice its forward; recomputation (remat, the checkpointed
LM-head chunks) adds its forward again.

Minimum HBM traffic per chip (`min_bytes`): every weight a chip computes with is read once per forward (and once
per backward / recomputation) in the compute dtype, divided only by the mesh axes that split the computation
(tensor, expert; ZeRO's 'fsdp' shards are gathered whole before use), each decode step reads the rows' KV cache at
its mean fill, the optimizer reads and writes float32 masters, Adam's moments and gradients (28 bytes per
parameter shard). Activations are left out, so it bounds time from below.

Why not the compiler's count: XLA's `cost_analysis` counts a while-loop or scan body once (the decode loop, the
micro-batch scan, the LM-head chunk loop, and the windowed collective matmuls XLA builds for ZeRO-3 all-gathers on
16+ chips, which made its FLOPs 4x too small on v5p-32) and a Pallas kernel (splash attention) not at all.
`arm_jax.plan` reports both; `tests/test_plan.py` checks this count against XLA's on a program without loops or
kernels.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from arm_jax.config import ModelConfig
from arm_jax.models import abstract_model


def active_matmul_params(cfg: ModelConfig) -> float:
    """Matrix parameters one token multiplies by: every kernel of rank >= 2 except the embedding table (a lookup,
    but counted once more as the LM head when tied); routed experts scaled by experts_per_token / num_experts."""
    _, state = abstract_model(cfg)
    total = 0.0
    for path, var in jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        shape = var.get_value().shape
        if len(shape) < 2 or keys[-1] in ("embed",):
            continue
        n = math.prod(shape)
        if cfg.moe is not None and len(shape) == 3 and shape[0] == cfg.moe.num_experts and "shared" not in keys:
            n *= cfg.moe.experts_per_token / cfg.moe.num_experts  # routed experts [E, ...]: k of E per token
        total += n
    if cfg.tie_word_embeddings:
        total += cfg.vocab_size * cfg.hidden_size
    return total


def _head_dims(cfg: ModelConfig) -> tuple[int, int]:
    if cfg.mla is not None:
        return cfg.mla.qk_head_dim, cfg.mla.v_head_dim
    return cfg.head_dim, cfg.head_dim


def attention_flops(cfg: ModelConfig, queries: float, context: float) -> float:
    """Forward FLOPs of `queries` query tokens each attending over `context` key slots, all layers."""
    dqk, dv = _head_dims(cfg)
    return 2.0 * cfg.num_layers * cfg.num_heads * queries * context * (dqk + dv)


def forward_flops(cfg: ModelConfig, rows: int, length: int) -> float:
    """A causal forward over rows x length tokens (mean context (length + 1) / 2)."""
    tokens = rows * length
    return 2.0 * active_matmul_params(cfg) * tokens + attention_flops(cfg, tokens, (length + 1) / 2)


def decode_flops(cfg: ModelConfig, rows: int, prompt: int, new_tokens: int) -> float:
    """new_tokens decode steps of `rows` rows after a prompt of `prompt` slots (context prompt + i at step i)."""
    mean_context = prompt + (new_tokens + 1) / 2
    return rows * new_tokens * (2.0 * active_matmul_params(cfg)) + attention_flops(cfg, rows * new_tokens,
                                                                                     mean_context)


def train_flops(cfg: ModelConfig, rows: int, length: int, remat: bool,
                head_positions: Optional[float] = None) -> float:
    """Forward + backward (2x forward) + recomputation: the LM head's forward once more (the chunked log-probs
    are checkpointed per chunk) and, under remat, the blocks' forward once more. head_positions: where the LM head
    runs (default every one of rows x length; the packed learner: the loss positions only)."""
    fwd = forward_flops(cfg, rows, length)
    head = 2.0 * cfg.vocab_size * cfg.hidden_size * rows * length
    head_used = head if head_positions is None else 2.0 * cfg.vocab_size * cfg.hidden_size * head_positions
    blocks = fwd - head
    return 3.0 * (blocks + head_used) + head_used + (blocks if remat else 0.0)


def model_flops(cfg: ModelConfig, rows: int, length: int) -> float:
    """The useful FLOPs of a training pass (6 per parameter per token + attention, no recomputation), the
    numerator of MFU."""
    return 3.0 * forward_flops(cfg, rows, length)


def compute_weight_bytes(params, cfg: ModelConfig, mesh) -> float:
    """Bytes of weights one chip reads per forward: each parameter in the compute dtype (routers float32),
    divided by the mesh axes other than 'data' / 'fsdp' it is sharded over (those are gathered before use)."""
    itemsize = 2 if cfg.dtype == "bfloat16" else 4
    sizes = dict(mesh.shape)
    total = 0.0
    for x in jax.tree.leaves(params):
        spec = x.sharding.spec if x.sharding is not None else ()
        split = 1
        for entry in spec:
            for axis in (entry if isinstance(entry, tuple) else (entry,)):
                if axis is not None and axis not in ("data", "fsdp"):
                    split *= sizes[axis]
        nbytes = 4 if x.dtype == jnp.float32 and cfg.dtype == "float32" else itemsize
        total += math.prod(x.shape) * nbytes / split
    return total
