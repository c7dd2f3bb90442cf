"""Model families. `build_model`, `init_cache` and `cache_axes` pick the family from the config, so the policy,
sampler and learner never name one: dense Qwen2/Qwen3/Llama (`qwen2.py`) or DeepSeek-V2/V3 MLA + MoE
(`deepseek.py`)."""

from __future__ import annotations

from typing import Optional

from flax import nnx

from arm_jax.config import ModelConfig


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
