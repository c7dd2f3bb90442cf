"""Model families. `build_model`, `init_cache` and `cache_axes` pick the family from the config, so the policy,
sampler and learner never name one: dense Qwen2/Qwen3/Llama (`qwen2.py`) or DeepSeek-V2/V3 MLA + MoE
(`deepseek.py`)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from arm_jax.config import ModelConfig

# Parameters that stay float32 whatever `ModelConfig.dtype` / `param_dtype` say (DeepSeek routes in float32).
FLOAT32_PARAMS = frozenset({"router", "router_bias"})


def build_model(cfg: ModelConfig, rngs: Optional[nnx.Rngs] = None):
    from arm_jax.models import deepseek, qwen2
    return deepseek.DeepseekLM(cfg, rngs) if cfg.mla is not None else qwen2.DecoderLM(cfg, rngs)


def init_cache(cfg: ModelConfig, batch: int, length: int) -> list:
    """An empty per-layer cache for `length` slots (dense: k/v [B, K, S, Dh]; MLA: latent [B, S, r + rope])."""
    from arm_jax.models import deepseek, qwen2
    return (deepseek if cfg.mla is not None else qwen2).init_cache(cfg, batch, length)


def cache_axes(cfg: ModelConfig) -> dict:
    """{cache entry name: logical axes} of one layer's cache."""
    from arm_jax.models import deepseek, qwen2
    if cfg.mla is not None:
        return deepseek.CACHE_AXES
    return {"k": qwen2.CACHE_AXES, "v": qwen2.CACHE_AXES}


def compute_params(params: nnx.State, cfg: ModelConfig) -> nnx.State:
    """The copy of `params` a forward reads: every floating parameter cast to the compute dtype `cfg.dtype`,
    except FLOAT32_PARAMS. The identity when the parameters are already stored in it (`param_dtype == dtype`).

    Each jitted stage (rollout, log-prob passes, learner update) calls this once at its entry, so the cast runs
    once per call, on the parameter shards (ZeRO-3's all-gathers then move compute-dtype bytes), and no second
    copy of the weights persists between calls. Gradients taken through it arrive in the masters' dtype."""
    dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[cfg.dtype]
    if cfg.param_dtype == cfg.dtype:
        return params

    def cast(path, x):
        keep = any(getattr(k, "key", None) in FLOAT32_PARAMS for k in path)
        return x if keep or not jnp.issubdtype(x.dtype, jnp.floating) else x.astype(dt)

    return jax.tree_util.tree_map_with_path(cast, params)


def merge_for_compute(graphdef, params: nnx.State):
    """`nnx.merge(graphdef, compute_params(params, cfg))`: the model as every forward runs it (trace-time only)."""
    model = nnx.merge(graphdef, params)
    if model.cfg.param_dtype == model.cfg.dtype:
        return model
    return nnx.merge(graphdef, compute_params(params, model.cfg))
