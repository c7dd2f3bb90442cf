"""Dense-attention decoder family: Qwen2 / Qwen2.5 (q/k/v bias), Qwen3 (per-head q/k RMSNorm, explicit head_dim),
Llama architecture checkpoints (DeepSeek-R1-Distill-Llama, deepseek-llm; llama3 RoPE scaling), StarCoder2
(LayerNorm, plain MLP, biases everywhere, sliding-window attention; the quick-start's tiny model), and the MoE
variants Qwen2-MoE / Qwen3-MoE (the same attention; MoE layers through `models.moe.MoE`).

Parameters (logical axes in brackets; names mirror the HF tensors they are loaded from, see `hf.py`):
  embed                [vocab, embed]          model.embed_tokens.weight
  layers[i].attn.q     [embed, heads, head_dim]    q_proj.weight^T (+ q_bias [heads, head_dim])
  layers[i].attn.k/v   [embed, kv_heads, head_dim] k_proj / v_proj (+ bias)
  layers[i].attn.o     [heads, head_dim, embed]    o_proj.weight^T
  layers[i].mlp.*      gated: gate/up [embed, mlp], down [mlp, embed]; plain: up (c_fc), down (c_proj) (+ biases);
                       MoE layers: router [embed, expert], gate/up/down [expert, ...], shared (+ shared_gate)
  *_norm               weight [embed] (+ bias for LayerNorm)
  lm_head              [embed, vocab]          lm_head.weight^T (absent when tied)

The forward takes an explicit KV cache so the learner and the sampler share one implementation:
  no cache:   S == T, kv_valid = attention_mask, q_slots = arange(T);
  prefill:    a cache and kv_valid [B, T] over the T new tokens only (cache_index 0): their k/v are written at
              slots [0, T) of the cache and attention is the T x T self-attention over them, never over the
              empty slots after them (the einsum path would otherwise build [B, H, T, S] scores);
  decode:     kv_valid [B, W] over the cache's first W <= S slots (W = S: all of it; the refill engine passes the
              live window, a bucket above its rows' furthest slot): k/v of the new tokens are written at slots
              [cache_index, cache_index + T) and attention reads every valid slot <= the query's slot; cache_index
              is a scalar (every row at the same slot) or [B] (each row at its own slot: the refill engine).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from arm_jax.config import ModelConfig
from arm_jax.models import layers
from arm_jax.models.cache import KVCache, write_slots
from arm_jax.models.moe import MoE
from arm_jax.sharding import constrain

CACHE_AXES = ("batch", "kv_heads", "seq", "head_dim")
CACHE_ENTRY_AXES = {"k": CACHE_AXES, "v": CACHE_AXES}  # {cache entry: logical axes} of one layer


def jnp_dtype(name: str):
    """'float32' / 'bfloat16' -> the jnp dtype."""
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


class Attention(nnx.Module):
    """Grouped-query attention with RoPE, optional q/k/v and o biases and Qwen3's q/k norms; heads-major KV cache."""
    def __init__(self, cfg: ModelConfig, rngs: Optional[nnx.Rngs] = None):
        dt = jnp_dtype(cfg.param_dtype)
        D, H, K, Dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        init = layers.normal_init()
        self.q = layers.param(rngs, init, (D, H, Dh), ("embed", "heads", "head_dim"), dt)
        self.k = layers.param(rngs, init, (D, K, Dh), ("embed", "kv_heads", "head_dim"), dt)
        self.v = layers.param(rngs, init, (D, K, Dh), ("embed", "kv_heads", "head_dim"), dt)
        self.o = layers.param(rngs, init, (H, Dh, D), ("heads", "head_dim", "embed"), dt)
        for name, n_in in (("q", 1), ("k", 1), ("v", 1), ("o", 2)):  # adapters when cfg.lora targets them
            layers.add_lora(self, name, getattr(self, name), n_in, cfg.lora, rngs)
        if cfg.qkv_bias:
            self.q_bias = layers.param(rngs, layers.zeros_init, (H, Dh), ("heads", "head_dim"), dt)
            self.k_bias = layers.param(rngs, layers.zeros_init, (K, Dh), ("kv_heads", "head_dim"), dt)
            self.v_bias = layers.param(rngs, layers.zeros_init, (K, Dh), ("kv_heads", "head_dim"), dt)
        if cfg.o_bias:
            self.o_bias = layers.param(rngs, layers.zeros_init, (D,), ("embed",), dt)
        if cfg.qk_norm:
            self.q_norm = layers.RMSNorm(Dh, cfg.rms_norm_eps, dt, rngs)
            self.k_norm = layers.RMSNorm(Dh, cfg.rms_norm_eps, dt, rngs)
        self.cfg = cfg

    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None):
        """x [B, T, D] -> ([B, T, D], updated cache entry or None)."""
        cfg = self.cfg
        q, k, v = (jnp.einsum("btd,dhk->bhtk", x, getattr(self, n)[...])
                   + layers.lora_term(self, n, "btd,dhk->bhtk", x, cfg.lora) for n in ("q", "k", "v"))
        if cfg.qkv_bias:
            q = q + self.q_bias[...][None, :, None, :]
            k = k + self.k_bias[...][None, :, None, :]
            v = v + self.v_bias[...][None, :, None, :]
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
        new_cache = None
        if cache is not None:
            k_all = write_slots(cache["k"], k, cache_index, axis=2)
            v_all = write_slots(cache["v"], v, cache_index, axis=2)
            new_cache = {"k": constrain(k_all, CACHE_AXES), "v": constrain(v_all, CACHE_AXES)}
            if not mask.self_attention:  # decode: read the cache's first W slots (the live window); prefill: own k/v
                W = mask.kv_valid.shape[1]
                k, v = new_cache["k"][:, :, :W], new_cache["v"][:, :, :W]
        out = layers.attention(q, k, v, mask, mask.impl(cfg.attention_impl, q.dtype))
        y = jnp.einsum("bhtk,hkd->btd", out, self.o[...]) + layers.lora_term(self, "o", "bhtk,hkd->btd", out, cfg.lora)
        if cfg.o_bias:
            y = y + self.o_bias[...]
        return y, new_cache


def dense_mlp(cfg: ModelConfig, rngs: Optional[nnx.Rngs] = None):
    """The family's MLP (gated or plain, `cfg.mlp_type`) of width intermediate_size."""
    return layers.MLPS[cfg.mlp_type](cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, jnp_dtype(cfg.param_dtype),
                                     rngs, act=cfg.hidden_act, lora=cfg.lora)


def norm(cfg: ModelConfig, rngs: Optional[nnx.Rngs] = None):
    """The family's norm over the hidden size: RMSNorm or LayerNorm (`cfg.norm_type`)."""
    return layers.NORMS[cfg.norm_type](cfg.hidden_size, cfg.rms_norm_eps, jnp_dtype(cfg.param_dtype), rngs)


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x)). make_attn / make_mlp(cfg, rngs) build the
    two sublayers (default: GQA attention and the gated or plain MLP; DeepSeek passes MLA and MoE)."""

    def __init__(self, cfg: ModelConfig, rngs: Optional[nnx.Rngs] = None, make_attn=None, make_mlp=None):
        self.input_norm = norm(cfg, rngs)
        self.attn = (make_attn or Attention)(cfg, rngs)
        self.post_norm = norm(cfg, rngs)
        self.mlp = (make_mlp or dense_mlp)(cfg, rngs)

    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None, replay=None):
        """-> (x, the new cache entry, on a MoE layer (the experts its router picked [B, T, k], [2] dropped pairs
        and pairs), else None); replay:
        (ids [B, T, k], use [B, T]) for a MoE layer (routing replay, `models.moe.route`)."""
        # named scopes (attention / mla, gatedmlp / plainmlp / moe) make a profile of a step readable
        with jax.named_scope(type(self.attn).__name__.lower()):
            h, new_cache = self.attn(self.input_norm(x), cos, sin, mask, cache, cache_index)
        x = constrain(x + h, ("batch", "seq", None))
        experts = None
        with jax.named_scope(type(self.mlp).__name__.lower()):
            if isinstance(self.mlp, MoE):
                y, experts = self.mlp(self.post_norm(x), replay)
            else:
                y = self.mlp(self.post_norm(x))
            x = constrain(x + y, ("batch", "seq", None))
        return x, new_cache, experts


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Routing:
    """MoE routing replay for a forward: ids [B, T, L_moe, k] int (the experts the sampler used at each position,
    per MoE layer in order), use [B, T] bool (the positions whose recorded experts replace this forward's top-k;
    elsewhere, e.g. padding and the last answer token, routing is computed afresh)."""

    ids: jax.Array
    use: jax.Array

    def layers(self, start: int, stop: int) -> tuple[jax.Array, jax.Array]:
        """(ids [B, T, stop - start, k], use [B, T]) of MoE layers [start, stop) (counted over MoE layers)."""
        return self.ids[:, :, start:stop], self.use


def scan_blocks(blocks, x: jax.Array, consts: tuple, replay: Optional[tuple], remat: bool):
    """x [B, T, D] through `blocks` (identical structure: one graphdef) as one `lax.scan` over their parameters
    stacked on a new leading axis [n, ...]: the compiled program holds one block body instead of n (compile time
    and the compiler's memory no longer grow with depth, as MaxText's `scan_layers`). Same arithmetic as calling
    them in turn; the stacked copy of the parameters is made inside the jitted pass (in the compute dtype, as the
    cast) and the gradients flow back through it to each block's parameters.

    consts: (cos, sin, mask, cache_index), shared by every block (no KV cache here). replay: MoE routing replay
    (ids [B, T, n, k], use [B, T]) or None. remat: rematerialize each block in the backward (`jax.checkpoint` of
    the body: only the carried x [B, T, D] is saved per block, as `nnx.remat` of each block).
    Returns (x, None) for dense blocks; for MoE blocks (x, (ids [n, B, T, k], dropped [n, 2]))."""
    graphdef = nnx.graphdef(blocks[0])

    def stack(*variables):  # [n, ...], each layer's slice sharded as the parameter (its logical axes)
        x = jnp.stack([v.get_value() for v in variables])
        return variables[0].replace(constrain(x, (None,) + layers.logical_axes_of(variables[0])))

    stacked = jax.tree.map(stack, *[nnx.state(b) for b in blocks], is_leaf=lambda v: isinstance(v, nnx.Variable))
    cos, sin, mask, cache_index = consts

    def body(h, xs):
        state, ids = xs
        block = nnx.merge(graphdef, state)
        h, _, experts = block(h, cos, sin, mask, None, cache_index, None if ids is None else (ids, replay[1]))
        return h, experts

    ids = None if replay is None else jnp.moveaxis(replay[0], 2, 0)
    return jax.lax.scan(jax.checkpoint(body) if remat else body, x, (stacked, ids))


def make_dense_block(cfg: ModelConfig, index: int, rngs: Optional[nnx.Rngs] = None) -> Block:
    """Layer `index` of the family: GQA attention and the dense MLP, or on the MoE layers of a Qwen MoE checkpoint
    (`MoEConfig.is_moe_layer`) the MoE block (`models.moe`)."""
    moe = cfg.moe is not None and cfg.moe.is_moe_layer(index)
    return Block(cfg, rngs, make_mlp=MoE if moe else None)


class DecoderLM(nnx.Module):
    """Token embedding -> L blocks -> final norm; `logits()` applies the (possibly tied) LM head.

    make_block(cfg, layer_index, rngs) builds the blocks (default `make_dense_block`; DeepSeek passes its
    MLA/MoE block, `arm_jax.models.deepseek`). A block maps (x, cos, sin, mask, cache entry, cache_index) to
    (x, updated cache entry)."""

    def __init__(self, cfg: ModelConfig, rngs: Optional[nnx.Rngs] = None, make_block=None):
        dt = jnp_dtype(cfg.param_dtype)
        self.embed = layers.param(rngs, layers.normal_init(), (cfg.vocab_size, cfg.hidden_size),
                                  ("vocab", "embed"), dt)
        make_block = make_block or make_dense_block
        self.layers = nnx.List([make_block(cfg, i, rngs) for i in range(cfg.num_layers)])
        self.final_norm = norm(cfg, rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = layers.param(rngs, layers.normal_init(), (cfg.hidden_size, cfg.vocab_size),
                                        ("embed", "vocab"), dt)
        self.cfg = cfg

    def __call__(self, tokens: jax.Array, positions: jax.Array, kv_valid: jax.Array,
                 cache: Optional[KVCache] = None, cache_index: jax.Array | int = 0,
                 remat: bool = False, segment_ids: Optional[jax.Array] = None,
                 routing: Optional["Routing"] = None, return_routing: bool = False, scan_layers: bool = False):
        """tokens, positions [B, T] int32; kv_valid [B, S] bool: S == T without a cache and for a prefill (the
        new tokens at cache slots [0, T), cache_index 0), the cache length for a decode step (module docstring);
        cache_index: scalar or [B] int, the first cache slot of the new tokens; segment_ids [B, T] int32: packed
        rows without a cache (`models.packing`: each sequence its own id, positions restarting at 0 in each);
        routing: MoE routing replay (`Routing`: the experts to use at the positions it marks); scan_layers
        (without a cache): each run of identical consecutive blocks (`layer_runs`) is one `lax.scan` over its
        stacked parameters (`scan_blocks`), so the compiled program holds one block body per run instead of L.

        Returns the final-normed hidden states [B, T, D] and the updated cache (None without one); with
        return_routing also the experts each token's router picked on the MoE layers, [B, T, L_moe, k] int32, and
        [2] float32 (pairs the capacity factor dropped, pairs) summed over them (both None without MoE layers).
        """
        T = tokens.shape[1]
        self_attention = kv_valid.shape[1] == T
        if self_attention and cache is not None and not (isinstance(cache_index, int) and cache_index == 0):
            raise ValueError("a prefill (kv_valid over the T new tokens only) writes cache slots [0, T): "
                             "cache_index must be the literal 0")
        q_slots = jnp.asarray(cache_index)[..., None] + jnp.arange(T)  # [T], or [B, T] for per-row indices
        mask = layers.AttentionMask.build(q_slots, kv_valid, self.cfg.sliding_window, self_attention, segment_ids)
        rope_dim = self.cfg.mla.qk_rope_head_dim if self.cfg.family == "deepseek" else self.cfg.head_dim
        cos, sin = layers.rope_tables(positions, rope_dim, self.cfg.rope)
        x = jnp.take(self.embed[...], tokens, axis=0)
        x = constrain(x, ("batch", "seq", None))
        new_layers, used, dropped = [], [], []
        runs = self.layer_runs() if scan_layers and cache is None else [(i, i + 1) for i in range(len(self.layers))]
        for start, stop in runs:
            n_moe = sum(isinstance(b.mlp, MoE) for b in self.layers[start:stop])
            replay = None
            if routing is not None and n_moe:
                replay = routing.layers(len(used), len(used) + n_moe)
            if stop - start == 1:
                block = self.layers[start]
                call = nnx.remat(type(block).__call__) if remat else type(block).__call__
                replay = None if replay is None else (replay[0][:, :, 0], replay[1])
                with jax.named_scope(f"layer_{start}"):
                    x, layer_cache, experts = call(block, x, cos, sin, mask, None if cache is None else cache[start],
                                                   cache_index, replay)
                new_layers.append(layer_cache)
                experts = None if experts is None else (experts[0][None], experts[1][None])
            else:
                with jax.named_scope(f"layers_{start}_to_{stop - 1}"):
                    x, experts = scan_blocks(self.layers[start:stop], x, (cos, sin, mask, cache_index), replay,
                                             remat)
            if experts is not None:
                used.extend(experts[0])
                dropped.append(jnp.sum(experts[1], axis=0))
        out = self.final_norm(x), None if cache is None else cache.with_layers(new_layers)
        if return_routing:
            return out + ((jnp.stack(used, axis=2), sum(dropped)) if used else (None, None))
        return out

    def layer_runs(self) -> list[tuple[int, int]]:
        """[(start, stop), ...]: the blocks split into maximal runs of consecutive blocks with one structure
        (graphdef), e.g. DeepSeek's dense first layers, then its MoE layers; what `scan_layers` scans over."""
        defs = [nnx.graphdef(b) for b in self.layers]
        runs = []
        for i, d in enumerate(defs):
            if runs and defs[runs[-1][0]] == d:
                runs[-1] = (runs[-1][0], i + 1)
            else:
                runs.append((i, i + 1))
        return runs

    def head_kernel(self) -> tuple[jax.Array, str]:
        """The LM head as (array, einsum spec for hidden [..., D] -> logits [..., V])."""
        if self.cfg.tie_word_embeddings:
            return self.embed[...], "...d,vd->...v"
        return self.lm_head[...], "...d,dv->...v"

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., D] -> logits [..., V] float32 (accumulated in float32)."""
        w, spec = self.head_kernel()
        with jax.named_scope("lm_head"):
            return jnp.einsum(spec, hidden, w, preferred_element_type=jnp.float32)


def build(cfg: ModelConfig, rngs: Optional[nnx.Rngs] = None) -> DecoderLM:
    """The dense model (the family protocol of `arm_jax.models`: build, init_cache, CACHE_ENTRY_AXES)."""
    return DecoderLM(cfg, rngs)


def init_cache(cfg: ModelConfig, batch: int, length: int) -> KVCache:
    """An empty KV cache: per layer k, v zeros [batch, K, length, Dh] in the compute dtype `cfg.dtype` (logical axes
    CACHE_AXES, constrained under the current mesh)."""
    shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
    return KVCache.zeros(cfg.num_layers, {"k": shape, "v": shape}, jnp_dtype(cfg.dtype), CACHE_ENTRY_AXES)
