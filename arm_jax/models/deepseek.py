"""DeepSeek-V2 / V3: multi-head latent attention (MLA) and a mixture of routed + shared experts (DeepSeekMoE).

Parameters (logical axes in brackets; HF tensor names in `hf.py`):
  attention  q [embed, heads, qk_head_dim]                         q_proj (no q_lora_rank)
             q_a [embed, q_lora], q_a_norm, q_b [q_lora, heads, qk_head_dim]
             kv_a [embed, kv_lora + rope_dim] (latent + the shared rope key), kv_a_norm [kv_lora]
             kv_b [kv_lora, heads, qk_nope + v_head_dim], o [heads, v_head_dim, embed]
  MoE layer  `models.moe.MoE`: router [embed, expert] (float32), e_score_correction_bias [expert] (V3, float32),
             experts.gate/up [expert, embed, mlp], experts.down [expert, mlp, embed], shared SwiGLU
  dense layer (the first `first_k_dense_replace`): SwiGLU of intermediate_size.

The KV cache is the compressed latent: per layer one array [B, S, kv_lora_rank + qk_rope_head_dim] holding the
normalized c_kv and the rotated shared key, (kv_lora + rope) / (2 * H * Dh) of a dense cache. With a cache, the
up-projection is absorbed into the query and the output (scores = (q_nope W_uk) . c_kv + q_rope . k_rope,
out = (p . c_kv) W_uv), so decoding never expands the cache to per-head keys; without one (learner, log-probs) and in a
prefill the latent is expanded once per head, which is cheaper when T == S, and attention is ordinary multi-head
attention (`layers.attention`, splash on TPUs).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from arm_jax.config import ModelConfig
from arm_jax.models import layers
from arm_jax.models import qwen2
from arm_jax.models.cache import KVCache, write_slots
from arm_jax.models.moe import MoE
from arm_jax.models.qwen2 import DecoderLM, jnp_dtype
from arm_jax.sharding import constrain

CACHE_AXES = {"latent": ("batch", "seq", None)}
CACHE_ENTRY_AXES = CACHE_AXES  # the family protocol of arm_jax.models


def mla_softmax_scale(cfg: ModelConfig) -> float:
    """qk_head_dim ** -0.5, times yarn_mscale(factor, mscale_all_dim) ** 2 under YaRN (DeepSeek's correction)."""
    scale = cfg.mla.qk_head_dim ** -0.5
    rope = cfg.rope
    if rope.rope_type == "yarn" and rope.mscale_all_dim:
        scale *= layers.yarn_mscale(rope.factor, rope.mscale_all_dim) ** 2
    return scale


def _deinterleave(x: jax.Array) -> jax.Array:
    """(x0, x1, x2, x3, ...) -> (x0, x2, ..., x1, x3, ...): adjacent RoPE pairs become rotate_half's halves. Applied
    to q and k alike, so dot products equal those of the interleaved rotation."""
    return jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


class MLAttention(nnx.Module):
    """Multi-head latent attention (DeepSeek-V2): a latent-only cache, absorbed into the queries when decoding."""
    def __init__(self, cfg: ModelConfig, rngs: Optional[nnx.Rngs] = None):
        dt = jnp_dtype(cfg.param_dtype)
        m, D, H = cfg.mla, cfg.hidden_size, cfg.num_heads
        init = layers.normal_init()
        if m.q_lora_rank:
            self.q_a = layers.param(rngs, init, (D, m.q_lora_rank), ("embed", None), dt)
            self.q_a_norm = layers.RMSNorm(m.q_lora_rank, 1e-6, dt, rngs)
            self.q_b = layers.param(rngs, init, (m.q_lora_rank, H, m.qk_head_dim), (None, "heads", "head_dim"), dt)
        else:
            self.q = layers.param(rngs, init, (D, H, m.qk_head_dim), ("embed", "heads", "head_dim"), dt)
        self.kv_a = layers.param(rngs, init, (D, m.kv_lora_rank + m.qk_rope_head_dim), ("embed", None), dt)
        self.kv_a_norm = layers.RMSNorm(m.kv_lora_rank, 1e-6, dt, rngs)
        self.kv_b = layers.param(rngs, init, (m.kv_lora_rank, H, m.qk_nope_head_dim + m.v_head_dim),
                                 (None, "heads", "head_dim"), dt)
        self.o = layers.param(rngs, init, (H, m.v_head_dim, D), ("heads", "head_dim", "embed"), dt)
        if m.attention_bias:
            if m.q_lora_rank:
                self.q_a_bias = layers.param(rngs, layers.zeros_init, (m.q_lora_rank,), (None,), dt)
            self.kv_a_bias = layers.param(rngs, layers.zeros_init, (m.kv_lora_rank + m.qk_rope_head_dim,),
                                          (None,), dt)
            self.o_bias = layers.param(rngs, layers.zeros_init, (D,), ("embed",), dt)
        self.cfg = cfg

    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None):
        """x [B, T, D]; cos/sin [B, T, rope_dim]; mask: `layers.AttentionMask` -> ([B, T, D], updated cache entry or
        None). A decode step reads the latent cache, absorbed; the learner and a prefill attend over their own
        tokens."""
        m = self.cfg.mla
        bias = m.attention_bias
        if m.q_lora_rank:
            qa = x @ self.q_a[...] + (self.q_a_bias[...] if bias else 0)
            q = jnp.einsum("btr,rhk->bhtk", self.q_a_norm(qa), self.q_b[...])
        else:
            q = jnp.einsum("btd,dhk->bhtk", x, self.q[...])
        q_nope, q_rope = q[..., :m.qk_nope_head_dim], q[..., m.qk_nope_head_dim:]
        kv = x @ self.kv_a[...] + (self.kv_a_bias[...] if bias else 0)
        c_kv, k_rope = self.kv_a_norm(kv[..., :m.kv_lora_rank]), kv[..., m.kv_lora_rank:]
        if m.rope_interleave:
            q_rope, k_rope = _deinterleave(q_rope), _deinterleave(k_rope)
        q_rope = layers.apply_rope(q_rope, cos, sin)
        k_rope = layers.apply_rope(k_rope[:, None], cos, sin)[:, 0]
        latent = jnp.concatenate([c_kv, k_rope], axis=-1)  # [B, T, kv_lora + rope]
        new_cache = None
        decode = cache is not None and not mask.self_attention  # a prefill attends over its own tokens only
        if cache is not None:
            latent_all = write_slots(cache["latent"], latent, cache_index, axis=1)
            new_cache = {"latent": constrain(latent_all, CACHE_AXES["latent"])}
            if decode:
                latent = new_cache["latent"][:, :mask.kv_valid.shape[1]]  # the live window (all slots by default)
        c_kv, k_rope = latent[..., :m.kv_lora_rank], latent[..., m.kv_lora_rank:]
        w_k, w_v = self.kv_b[...][..., :m.qk_nope_head_dim], self.kv_b[...][..., m.qk_nope_head_dim:]
        if decode:  # absorbed: never expand the cache per head
            f32 = jnp.float32
            q_lat = jnp.einsum("bhtk,rhk->bhtr", q_nope, w_k)
            scores = jnp.einsum("bhtk,bsk->bhts", q_rope, k_rope, preferred_element_type=f32)
            scores += jnp.einsum("bhtr,bsr->bhts", q_lat, c_kv, preferred_element_type=f32)
            scores = jnp.where(mask.dense[:, None], scores * mla_softmax_scale(self.cfg), layers.MASK_VALUE)
            probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
            out = jnp.einsum("bhtr,rhv->bhtv", jnp.einsum("bhts,bsr->bhtr", probs, c_kv), w_v)
        else:  # expanded per head: plain multi-head attention (splash on TPUs)
            k_nope = jnp.einsum("bsr,rhk->bhsk", c_kv, w_k)
            H = q_nope.shape[1]
            k_rope_h = jnp.broadcast_to(k_rope[:, None], (k_rope.shape[0], H) + k_rope.shape[1:])
            q_full = jnp.concatenate([q_nope, q_rope.astype(q_nope.dtype)], axis=-1)
            k_full = jnp.concatenate([k_nope, k_rope_h.astype(k_nope.dtype)], axis=-1)
            v = jnp.einsum("bsr,rhv->bhsv", c_kv, w_v)
            impl = mask.impl(self.cfg.attention_impl, q_full.dtype)
            out = layers.attention(q_full, k_full, v, mask, impl, scale=mla_softmax_scale(self.cfg))
        y = jnp.einsum("bhtv,hvd->btd", out, self.o[...])
        if bias:
            y = y + self.o_bias[...]
        return y, new_cache


def make_block(cfg: ModelConfig, index: int, rngs: Optional[nnx.Rngs] = None) -> qwen2.Block:
    """Layer `index`: the dense family's pre-norm block with MLA, and MoE (or, in the first
    `first_k_dense_replace` layers, the dense SwiGLU)."""
    moe = cfg.moe is not None and cfg.moe.is_moe_layer(index)
    return qwen2.Block(cfg, rngs, make_attn=MLAttention, make_mlp=MoE if moe else qwen2.dense_mlp)


def build(cfg: ModelConfig, rngs: Optional[nnx.Rngs] = None) -> DecoderLM:
    """The DeepSeek model: the dense family's decoder class (embedding, LM head, cache protocol) built from MLA +
    MoE blocks (a factory, not a class of its own)."""
    return DecoderLM(cfg, rngs, make_block=make_block)


def init_cache(cfg: ModelConfig, batch: int, length: int) -> KVCache:
    """Per layer {'latent': zeros [batch, length, kv_lora_rank + qk_rope_head_dim]} in the compute dtype."""
    shape = (batch, length, cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim)
    return KVCache.zeros(cfg.num_layers, {"latent": shape}, jnp_dtype(cfg.dtype), CACHE_AXES)
