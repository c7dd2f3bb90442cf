"""Model families and what every stage needs of a model. `build_model`, `init_cache` and `cache_axes` pick the
family through `ModelConfig.family` (the one place that decides), so the policy, sampler and learner never name
one: dense Qwen2/Qwen3/Llama/StarCoder2 (`qwen2.py`) or DeepSeek-V2/V3 MLA + MoE (`deepseek.py`). Also here:
the abstract model and its shardings, the compute-dtype view of the parameters, and the parameter count."""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from arm_jax.config import ModelConfig
from arm_jax.sharding import DEFAULT_RULES, LogicalRules

# Parameters that stay float32 whatever `ModelConfig.dtype` / `param_dtype` say (DeepSeek routes in float32).
FLOAT32_PARAMS = frozenset({"router", "router_bias"})


def family(cfg: ModelConfig):
    """The module of the config's model family (`ModelConfig.family`): each provides build(cfg, rngs),
    init_cache(cfg, batch, length) and CACHE_ENTRY_AXES."""
    from arm_jax.models import deepseek, qwen2
    return {"dense": qwen2, "deepseek": deepseek}[cfg.family]


def build_model(cfg: ModelConfig, rngs: Optional[nnx.Rngs] = None):
    """The NNX model of the config's family."""
    return family(cfg).build(cfg, rngs)


def init_cache(cfg: ModelConfig, batch: int, length: int):
    """An empty `KVCache` (models/cache.py) for `length` slots (dense: k/v [B, K, S, Dh]; MLA: latent
    [B, S, r + rope])."""
    return family(cfg).init_cache(cfg, batch, length)


def cache_axes(cfg: ModelConfig) -> dict:
    """{cache entry name: logical axes} of one layer's cache."""
    return family(cfg).CACHE_ENTRY_AXES


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, abstract state of ShapeDtypeStructs) without allocating parameters."""
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0)))
    return nnx.split(model)


def param_shardings(state: nnx.State, mesh, rules: LogicalRules = DEFAULT_RULES):
    """A pytree like `state` of NamedShardings, from each parameter's logical axes (`LogicalRules`)."""
    from arm_jax.models.layers import logical_axes_of
    return jax.tree.map(lambda v: rules.sharding(logical_axes_of(v), v.get_value().shape, mesh), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


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


@functools.partial(jax.jit, static_argnums=1)
def compute_copy(params: nnx.State, cfg: ModelConfig) -> nnx.State:
    """`compute_params` as new buffers, never the arrays themselves (which an update may donate), sharded as
    `params`: a sampler's copy of step t's weights, LoRA's frozen base (2 bytes per parameter in bf16)."""
    return jax.tree.map(jnp.copy, compute_params(params, cfg))


def merge_for_compute(graphdef, params: nnx.State):
    """`nnx.merge(graphdef, compute_params(params, cfg))`: the model as every forward runs it (trace-time only)."""
    model = nnx.merge(graphdef, params)
    if model.cfg.param_dtype == model.cfg.dtype:
        return model
    return nnx.merge(graphdef, compute_params(params, model.cfg))


def num_params(cfg: ModelConfig) -> int:
    """Parameter count as transformers counts it (the embedding once when tied)."""
    if cfg.family == "deepseek" or cfg.moe is not None:
        from arm_jax.models.hf import tensor_maps
        return sum(math.prod(m.hf_shape) for m in tensor_maps(cfg))
    D, F, H, K, Dh, V = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                         cfg.vocab_size)
    attn = D * (H + 2 * K) * Dh + H * Dh * D
    if cfg.qkv_bias:
        attn += (H + 2 * K) * Dh
    if cfg.o_bias:
        attn += D
    if cfg.qk_norm:
        attn += 2 * Dh
    n_in = 2 if cfg.mlp_type == "gated" else 1  # gate + up, or up
    mlp = (n_in + 1) * D * F + (n_in * F + D if cfg.mlp_bias else 0)
    norm = D if cfg.norm_type == "rms" else 2 * D
    per_layer = attn + mlp + 2 * norm
    head = 0 if cfg.tie_word_embeddings else D * V
    return V * D + cfg.num_layers * per_layer + norm + head
