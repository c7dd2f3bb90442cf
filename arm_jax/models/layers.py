"""Building blocks shared by the model families: parameters with logical axes, RMSNorm / LayerNorm, RoPE, attention,
gated and plain MLPs.

Conventions: `B` batch, `T` query length, `S` key/value length (the KV-cache length when decoding), `D` hidden,
`H` query heads, `K` kv heads, `Dh` head dim, `F` MLP width, `V` vocabulary. Statistics of norms, attention
softmax and everything downstream of the logits are float32 whatever the parameter dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arm_jax.config import RopeConfig
from arm_jax.sharding import target_platform

# Large finite negative used for masked attention scores: a fully masked row (a left-pad query) becomes a uniform
# average instead of NaN; such rows are never read.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def param(rngs: Optional[nnx.Rngs], init, shape: Sequence[int], axes: Sequence[Optional[str]],
          dtype) -> nnx.Param:
    """An `nnx.Param` annotated with logical axis names (resolved to mesh axes by `arm_jax.sharding`)."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {shape}")
    key = rngs.params() if rngs is not None else jax.random.key(0)
    return nnx.Param(init(key, tuple(shape), dtype), out_sharding=tuple(axes))


def add_lora(module: nnx.Module, name: str, kernel: nnx.Param, n_in: int, lora, rngs: Optional[nnx.Rngs]) -> None:
    """Gives `module` the LoRA pair of its kernel `name` (`config.LoRAConfig`) when `lora` targets it:
    `<name>_lora_a` [*in, r] uniform(+-1/sqrt(in)) (PEFT's default), `<name>_lora_b` [r, *out] zeros, both
    `nnx.LoRAParam`s sharded like the kernel's in / out axes (the rank axis over the ZeRO axes they leave free),
    in the kernel's dtype."""
    if lora is None or name not in lora.targets:
        return
    shape, axes = kernel.get_value().shape, logical_axes_of(kernel)
    dtype = kernel.get_value().dtype
    fan_in = int(np.prod(shape[:n_in]))
    key = rngs.params() if rngs is not None else jax.random.key(0)
    bound = 1.0 / np.sqrt(fan_in)
    a = jax.random.uniform(key, tuple(shape[:n_in]) + (lora.rank,), dtype, -bound, bound)
    # the rank axis takes the ZeRO axes the kernel's own axes leave free ('lora_rank' in `sharding.LogicalRules`)
    setattr(module, f"{name}_lora_a", nnx.LoRAParam(a, out_sharding=tuple(axes[:n_in]) + ("lora_rank",)))
    setattr(module, f"{name}_lora_b", nnx.LoRAParam(jnp.zeros((lora.rank,) + tuple(shape[n_in:]), dtype),
                                                    out_sharding=("lora_rank",) + tuple(axes[n_in:])))


def lora_term(module: nnx.Module, name: str, spec: str, x: jax.Array, lora):
    """The adapters' term of projection `name` whose base is `einsum(spec, x, W)`: scale * (x A) B, applied
    unmerged (the base stays frozen and exact); 0 without adapters. A contracts W's input letters (those of `spec`
    shared with x), B produces its output letters."""
    a = getattr(module, f"{name}_lora_a", None)
    if a is None:
        return 0.0
    inputs, out = spec.split("->")
    xs, ws = inputs.split(",")
    r = next(c for c in "zyxwvu" if c not in spec)
    w_in = "".join(c for c in ws if c in xs)
    w_out = "".join(c for c in ws if c not in xs)
    mid = "".join(c for c in xs if c not in w_in) + r
    xa = jnp.einsum(f"{xs},{w_in}{r}->{mid}", x, a[...])
    return lora.scale * jnp.einsum(f"{mid},{r}{w_out}->{out}", xa, getattr(module, f"{name}_lora_b")[...])


def normal_init(std: float = 0.02):
    """The kernels' initializer: normal(0, std) (HF's initializer_range 0.02)."""
    return nnx.initializers.normal(std)


zeros_init = nnx.initializers.zeros
ones_init = nnx.initializers.ones


def logical_axes_of(variable: nnx.Variable) -> tuple[Optional[str], ...]:
    """The logical axis names a parameter was annotated with (flax has spelled the key several ways)."""
    meta = variable.get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
        if meta.get(key) is not None:
            return tuple(meta[key])
    return (None,) * np.ndim(variable.get_value())


class RMSNorm(nnx.Module):
    """y = w * (x / sqrt(mean(x^2) + eps)); statistics in float32, result cast back to x's dtype before the scale
    (as HF's Qwen2/Llama RMSNorm)."""

    def __init__(self, dim: int, eps: float, dtype, rngs: Optional[nnx.Rngs] = None):
        self.weight = param(rngs, ones_init, (dim,), ("norm",), dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * y.astype(x.dtype)


class LayerNorm(nnx.Module):
    """y = w * (x - mean) / sqrt(var + eps) + b (StarCoder2's nn.LayerNorm); statistics in float32."""

    def __init__(self, dim: int, eps: float, dtype, rngs: Optional[nnx.Rngs] = None):
        self.weight = param(rngs, ones_init, (dim,), ("norm",), dtype)
        self.bias = param(rngs, zeros_init, (dim,), ("norm",), dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


NORMS = {"rms": RMSNorm, "layer": LayerNorm}  # ModelConfig.norm_type -> class


# ----------------------------------------------------------------------------------------------------- RoPE


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_attention_factor(rope: RopeConfig) -> float:
    """The factor cos/sin are multiplied by: 1, except YaRN's attention factor (HF's rule: given, else
    mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are set, else mscale(factor))."""
    if rope.rope_type != "yarn":
        return 1.0
    if rope.attention_factor is not None:
        return float(rope.attention_factor)
    if rope.mscale and rope.mscale_all_dim:
        return yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(rope.factor, rope.mscale_all_dim)
    return yarn_mscale(rope.factor)


def _yarn_inv_freq(inv_freq: np.ndarray, dim: int, rope: RopeConfig) -> np.ndarray:
    """Blend of interpolated (inv_freq / factor) and extrapolated frequencies with a linear ramp over the dims
    whose number of rotations in original_max_position_embeddings lies between beta_slow and beta_fast."""
    def correction_dim(rotations):
        return dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    return (inv_freq / rope.factor * (1 - extrapolation) + inv_freq * extrapolation).astype(np.float32)


def rope_inv_freq(head_dim: int, rope: RopeConfig) -> np.ndarray:
    """Inverse frequencies [Dh/2] (float32) for 'default', 'linear', 'llama3' and 'yarn' RoPE, as HF computes
    them."""
    inv_freq = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    inv_freq = inv_freq.astype(np.float32)
    if rope.rope_type == "yarn":
        inv_freq = _yarn_inv_freq(inv_freq, head_dim, rope)
    elif rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray, scale: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """positions [B, T] int -> cos, sin [B, T, Dh] float32 (the two halves repeat, HF's rotate_half layout), times
    `scale` (`rope_attention_factor`)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * scale, jnp.sin(emb) * scale


def rope_tables(positions: jax.Array, dim: int, rope: RopeConfig) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, dim] for `rope` (frequencies and attention factor)."""
    return rope_cos_sin(positions, rope_inv_freq(dim, rope), rope_attention_factor(rope))


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, N, T, Dh] (heads-major); cos/sin [B, T, Dh] -> x rotated (in float32, returned in x's dtype)."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, None, :, :] + rotated * sin[:, None, :, :]
    return out.astype(x.dtype)


# ----------------------------------------------------------------------------------------------- attention


def attention_mask(q_slots: jax.Array, kv_valid: jax.Array, window: Optional[int] = None) -> jax.Array:
    """Causal-and-padding mask [B, T, S] (bool): query t (at KV slot q_slots[t]) may read slot s iff s <= q_slots[t]
    and kv_valid[b, s], and with a sliding `window` also q_slots[t] - s < window (slots advance with positions, so
    this is HF's `q_idx - kv_idx < sliding_window`). q_slots: [T] int (every row) or [B, T] (per row);
    kv_valid: [B, S] bool."""
    S = kv_valid.shape[1]
    q = q_slots if q_slots.ndim == 2 else q_slots[None]  # [1 or B, T]
    slots = jnp.arange(S)[None, None, :]
    causal = slots <= q[:, :, None]  # [1 or B, T, S]
    if window is not None:
        causal = causal & (q[:, :, None] - slots < window)
    return causal & kv_valid[:, None, :].astype(bool)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AttentionMask:
    """Which key slots each query reads, in the two forms the attention paths need.

    dense: [B, T, S] bool, the causal-and-padding (and sliding-window) mask the einsum path applies
        (`attention_mask`); kv_valid: [B, S] bool, the real key slots;
    self_attention (static): the queries are the slots 0..T-1 of the keys themselves (T == S): the learner, the
        log-prob passes and the prefill, the case a block-sparse kernel (splash) handles from segment ids alone;
    window (static): the sliding window, or None;
    segment_ids: [B, S] int32 or None: packed rows (`models.packing`), several sequences per row, segment 0 =
        padding; a query reads only keys of its own segment (the dense form is block-diagonal causal). None: one
        sequence per row (the segments are kv_valid itself).
    """

    dense: jax.Array
    kv_valid: jax.Array
    self_attention: bool = dataclasses.field(default=False, metadata=dict(static=True))
    window: Optional[int] = dataclasses.field(default=None, metadata=dict(static=True))
    segment_ids: Optional[jax.Array] = None

    @classmethod
    def build(cls, q_slots: jax.Array, kv_valid: jax.Array, window: Optional[int] = None,
              self_attention: bool = False, segment_ids: Optional[jax.Array] = None) -> "AttentionMask":
        """The mask of queries at `q_slots` [T] or [B, T] over the slots `kv_valid` [B, S] marks real (and, for a
        packed self-attention, within the query's segment of `segment_ids` [B, S])."""
        dense = attention_mask(q_slots, kv_valid, window)
        if segment_ids is not None:
            if not self_attention:
                raise ValueError("segment_ids are for a self-attention over packed rows (no KV cache)")
            dense = dense & (segment_ids[:, :, None] == segment_ids[:, None, :])
        return cls(dense, kv_valid.astype(bool), self_attention, window, segment_ids)

    def impl(self, attention_impl: str, dtype) -> str:
        """The attention implementation for this mask (`resolve_attention_impl` with its phase and packing)."""
        return resolve_attention_impl(attention_impl, dtype, self.self_attention, self.segment_ids is not None)

    def segments(self) -> jax.Array:
        """[B, S] int32 segment ids (kv_valid as 0/1 when the rows are not packed)."""
        return self.kv_valid.astype(jnp.int32) if self.segment_ids is None else self.segment_ids.astype(jnp.int32)


def resolve_attention_impl(impl: str, dtype=None, self_attention: bool = True, packed: bool = False) -> str:
    """The one place where 'auto' becomes a concrete implementation, by the platform the code is compiled for
    (`arm_jax.sharding.target_platform`, so an ahead-of-time compile for a TPU topology picks the TPU kernel), the
    compute dtype and the phase: on TPUs Pallas splash attention for self-attention (learner, log-prob passes,
    prefill; packed rows through its segment ids) and the Pallas decode kernel bounded by each row's length for
    decode steps (`models.decode_kernel`); on GPUs cuDNN only for a bf16 / fp16 self-attention over
    unpacked rows (the prefill, unpacked learner rows), given as causal + sequence lengths over each row's real
    tokens (`_compacted_causal_attention`), never as a dense mask: JAX's cuDNN kernel rejects float32, a decode
    step's single query gains nothing from it, and JAX's public `dot_product_attention` takes no segment ids, so
    packed rows (`packed`: the learner and log-prob passes) take the einsum path with the block-diagonal mask
    rather than a dense mask turned into a bias; the XLA einsum everywhere else, decode steps off TPU included
    (their scores are only [B, H, 1, S])."""
    if impl != "auto":
        return impl
    platform = target_platform()
    if platform == "tpu":  # splash for self-attention, the length-bounded decode kernel for decode steps
        return "splash" if self_attention else "pallas_decode"
    half = dtype is not None and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if platform == "gpu" and self_attention and half and not packed:
        return "cudnn"
    return "xla"


_LOGGED: set = set()


def _log_once(message: str) -> None:
    """A warning logged once per distinct message (at trace time: once per compiled shape)."""
    if message not in _LOGGED:
        _LOGGED.add(message)
        logging.getLogger(__name__).warning(message)


def _compacted_causal_attention(q, k, v, kv_valid, scale, window, implementation) -> jax.Array:
    """A self-attention over unpacked rows as a fused kernel wants it (cuDNN: causal plus sequence lengths, never a
    dense mask turned into a bias): each row's real tokens (kv_valid [B, T]) are gathered to the front in order, the
    kernel runs causal with query / key lengths = their count, and the outputs go back to their slots (zeros at
    padding). Equals the einsum path for any padding; with a sliding window for rows whose real tokens are one
    contiguous span (left-padded prompts, prompt + response: every unpacked row arm_jax builds), as distances are
    counted in the compacted order. q, k: [B, H, T, Dh], [B, K, T, Dh]; v: [B, K, T, Dv] -> [B, H, T, Dv]; the
    scale is passed explicitly, so zero-padding the smaller head size to the larger changes nothing."""
    Dh, Dv = q.shape[-1], v.shape[-1]
    if Dh != Dv:  # the kernel takes one head size (MLA: 192 for q/k, 128 for v): zero-pad the smaller, exactly
        pad = lambda x, d: jnp.pad(x, [(0, 0)] * 3 + [(0, d - x.shape[-1])])  # noqa: E731
        q, k, v = (pad(q, Dv), pad(k, Dv), v) if Dh < Dv else (q, k, pad(v, Dh))
    valid = kv_valid.astype(bool)
    order = jnp.argsort(~valid, axis=1, stable=True)  # [B, T]: real slots first, in order
    length = jnp.sum(valid, axis=1).astype(jnp.int32)
    front = lambda x: jnp.take_along_axis(x, order[:, None, :, None], axis=2).transpose(0, 2, 1, 3)  # noqa: E731
    out = jax.nn.dot_product_attention(
        front(q), front(k), front(v), scale=scale, is_causal=True, query_seq_lengths=length,
        key_value_seq_lengths=length, local_window_size=None if window is None else (window - 1, 0),
        implementation=implementation).transpose(0, 2, 1, 3)
    back = jnp.argsort(order, axis=1)  # slot t's row in the compacted order
    out = jnp.take_along_axis(out[..., :Dv], back[:, None, :, None], axis=2)
    return jnp.where(valid[:, None, :, None], out, jnp.zeros((), out.dtype))


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: "AttentionMask | jax.Array", impl: str = "xla",
              scale: Optional[float] = None) -> jax.Array:
    """Grouped-query attention in the heads-major layout (the KV cache's layout, so decoding never transposes it).

    q, k: [B, H, T, Dh], [B, K, S, Dh]; v: [B, K, S, Dv]; H % K == 0; mask: an `AttentionMask` (or its dense
    [B, T, S] bool form); scale: the softmax scale (default Dh ** -0.5). Returns [B, H, T, Dv].
    'xla': scores and softmax in float32, probabilities cast to v's dtype for the value product (as HF eager).
    'cudnn' / 'jax' (JAX's choice): `jax.nn.dot_product_attention`, the fused kernel on GPUs; an unpacked
        self-attention as causal + sequence lengths over each row's real tokens (`_compacted_causal_attention`),
        anything else with the dense mask (logged: JAX turns it into a bias).
    'splash': Pallas splash attention (`arm_jax.models.flash`) for a self-attention; a decode step (queries over
        a cache) takes the einsum path, whose scores are only [B, H, 1, S].
    'pallas_decode': a single-query decode step without a sliding window through `models.decode_kernel` (reads
        each row's own keys only); a self-attention as 'splash'; anything else the einsum path.
    """
    B, H, T, Dh = q.shape
    K = k.shape[1]
    scale = 1.0 / math.sqrt(Dh) if scale is None else scale
    structured = isinstance(mask, AttentionMask)
    dense = mask.dense if structured else mask
    if impl in ("splash", "pallas_decode") and structured and mask.self_attention:
        from arm_jax.models.flash import splash_attention
        return splash_attention(q, k, v, mask.segments(), scale=scale, window=mask.window)
    if impl == "pallas_decode" and structured:
        from arm_jax.models.decode_kernel import block_size, decode_attention
        if T == 1 and mask.window is None and block_size(k.shape[2]):
            return decode_attention(q, k, v, mask.kv_valid, scale=scale)
        _log_once(f"attention: the decode kernel takes one query per row, no sliding window and a cache length "
                  f"divisible by 8; this step (T={T}, window={mask.window}, cache {k.shape[2]}) reads the whole "
                  f"window through the einsum path")
    if impl not in ("xla", "splash", "pallas_decode"):
        implementation = None if impl == "jax" else impl
        if structured and mask.self_attention and mask.segment_ids is None:
            return _compacted_causal_attention(q, k, v, mask.kv_valid, scale, mask.window, implementation)
        _log_once(f"attention: '{impl}' is given a dense [B, T, S] mask (a decode step or packed rows), which "
                  f"JAX turns into a bias; 'auto' takes the einsum path there")
        out = jax.nn.dot_product_attention(
            q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask=dense[:, None, :, :],
            scale=scale, implementation=implementation)
        return out.transpose(0, 2, 1, 3)
    qg = q.reshape(B, K, H // K, T, Dh)
    scores = jnp.einsum("bkgtd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(dense[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, v)
    return out.reshape(B, H, T, v.shape[-1])


# ----------------------------------------------------------------------------------------------------- MLP


ACTIVATIONS = {  # HF `hidden_act` names (transformers ACT2FN)
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


class GatedMLP(nnx.Module):
    """down(act(x @ gate) * (x @ up)) (SwiGLU with act = silu); kernels gate/up [D, F] ('embed', 'mlp'), down
    [F, D] ('mlp', 'embed')."""

    def __init__(self, dim: int, hidden: int, bias: bool, dtype, rngs: Optional[nnx.Rngs] = None,
                 act: str = "silu", lora=None):
        init = normal_init()
        self.act = act
        self.lora = lora
        self.gate = param(rngs, init, (dim, hidden), ("embed", "mlp"), dtype)
        self.up = param(rngs, init, (dim, hidden), ("embed", "mlp"), dtype)
        self.down = param(rngs, init, (hidden, dim), ("mlp", "embed"), dtype)
        for name in ("gate", "up", "down"):
            add_lora(self, name, getattr(self, name), 1, lora, rngs)
        if bias:
            self.gate_bias = param(rngs, zeros_init, (hidden,), ("mlp",), dtype)
            self.up_bias = param(rngs, zeros_init, (hidden,), ("mlp",), dtype)
            self.down_bias = param(rngs, zeros_init, (dim,), ("embed",), dtype)
        self.bias = bias

    def __call__(self, x: jax.Array) -> jax.Array:
        g = x @ self.gate[...] + lora_term(self, "gate", "...d,df->...f", x, self.lora)
        u = x @ self.up[...] + lora_term(self, "up", "...d,df->...f", x, self.lora)
        if self.bias:
            g, u = g + self.gate_bias[...], u + self.up_bias[...]
        h = ACTIVATIONS[self.act](g) * u
        y = h @ self.down[...] + lora_term(self, "down", "...f,fd->...d", h, self.lora)
        if self.bias:
            y = y + self.down_bias[...]
        return y


class PlainMLP(nnx.Module):
    """down(act(x @ up + up_bias)) + down_bias (StarCoder2's c_fc / c_proj); kernels up [D, F] ('embed', 'mlp'),
    down [F, D] ('mlp', 'embed')."""

    def __init__(self, dim: int, hidden: int, bias: bool, dtype, rngs: Optional[nnx.Rngs] = None,
                 act: str = "gelu_pytorch_tanh", lora=None):
        init = normal_init()
        self.act = act
        self.lora = lora
        self.up = param(rngs, init, (dim, hidden), ("embed", "mlp"), dtype)
        self.down = param(rngs, init, (hidden, dim), ("mlp", "embed"), dtype)
        for name in ("up", "down"):
            add_lora(self, name, getattr(self, name), 1, lora, rngs)
        if bias:
            self.up_bias = param(rngs, zeros_init, (hidden,), ("mlp",), dtype)
            self.down_bias = param(rngs, zeros_init, (dim,), ("embed",), dtype)
        self.bias = bias

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x @ self.up[...] + lora_term(self, "up", "...d,df->...f", x, self.lora)
        if self.bias:
            h = h + self.up_bias[...]
        h = ACTIVATIONS[self.act](h)
        y = h @ self.down[...] + lora_term(self, "down", "...f,fd->...d", h, self.lora)
        if self.bias:
            y = y + self.down_bias[...]
        return y


MLPS = {"gated": GatedMLP, "plain": PlainMLP}  # ModelConfig.mlp_type -> class
