"""TPU flash attention: Pallas splash attention (block-sparse, online softmax) for the learner, the log-prob passes
and the rollout's prefill, as MaxText and tunix run it.

The einsum path materializes [B, H, T, S] float32 scores: 182 GiB per chip for the paper's micro-batch of 64 x
10,240 tokens on v5p-32. Splash never builds them; forward and backward keep O(T * Dh) per head.

Semantics equal `layers.attention` with the causal-and-padding mask of a self-attention (queries are the slots
0..T-1 of the keys: the learner, the log-prob passes and the prefill, never a decode step): the padding mask is the
kernel's segment ids (real tokens 1, padding 0; packed rows: each sequence its own id), so a real query reads
exactly the real slots <= its own in its own sequence, as the einsum path; a padding query reads padding slots
instead (its output is never read). Grouped-query attention runs the MQA kernel once per kv head over its H / K
query heads. The sequence is padded to a multiple of 128 (the kernel's lane width) with padding slots.

Sharding: the kernel is a custom call GSPMD cannot partition, so under a mesh it runs in `jax.shard_map` with the
batch over the batch axes and the heads over the tensor axis (when both the query and the kv heads divide), each
device on its own block. Off TPU it runs in Pallas' interpreter (`interpret=True`): slow, for parity tests only;
`resolve_attention_impl('auto')` never picks it there.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec

from arm_jax.sharding import DEFAULT_RULES, target_platform

LANES = 128  # the kernel's key block must be a multiple of this


def _block(length: int) -> int:
    """The largest of 512 / 256 / 128 dividing `length` (a multiple of 128)."""
    return next(b for b in (512, 256, LANES) if length % b == 0)


def _kernel(length: int, group: int, window: Optional[int], interpret: bool):
    """The MQA splash kernel for `group` query heads over one kv head, sequences of `length` (multiple of 128)."""
    if window is None:
        head_mask = splash_mask.CausalMask((length, length))
    else:  # q - s < window, s <= q
        head_mask = splash_mask.LocalMask((length, length), window_size=(window - 1, 0), offset=0)
    b = _block(length)
    sizes = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                              block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    return splash.make_splash_mqa_single_device(splash_mask.MultiHeadMask([head_mask] * group), block_sizes=sizes,
                                                interpret=interpret)


def _local_attention(q, k, v, segments, *, scale: float, window: Optional[int], interpret: bool):
    """One device's block: q [b, H, T, Dh], k [b, K, T, Dh], v [b, K, T, Dv], segments [b, T] int32."""
    _, H, T, Dh = q.shape
    K = k.shape[1]
    pad = -T % LANES
    if pad:
        widths = ((0, 0), (0, 0), (0, pad), (0, 0))
        q, k, v = jnp.pad(q, widths), jnp.pad(k, widths), jnp.pad(v, widths)
        segments = jnp.pad(segments, ((0, 0), (0, pad)))
    L = T + pad
    kernel = _kernel(L, H // K, window, interpret)

    def one_row(qb, kb, vb, seg):  # [H, L, Dh], [K, L, Dh], [K, L, Dv], [L]
        ids = splash.SegmentIds(q=seg, kv=seg)
        qg = (qb.astype(jnp.float32) * scale).astype(qb.dtype).reshape(K, H // K, L, Dh)
        out = jax.vmap(lambda qq, kk, vv: kernel(qq, kk, vv, segment_ids=ids))(qg, kb, vb)
        return out.reshape(H, L, vb.shape[-1])

    out = jax.vmap(one_row)(q, k, v, segments)
    return out[:, :, :T]


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, *, scale: float,
                     window: Optional[int] = None) -> jax.Array:
    """Causal self-attention within segments: q [B, H, T, Dh], k [B, K, T, Dh], v [B, K, T, Dv], segments [B, T]
    int (query t is slot t; a padded row's segments are its 0/1 mask, a packed row's its segment ids, 0 =
    padding). Returns [B, H, T, Dv] in v's dtype (the kernel accumulates in float32)."""
    mesh = jax.sharding.get_abstract_mesh()
    interpret = target_platform() != "tpu"
    local = functools.partial(_local_attention, scale=scale, window=window, interpret=interpret)
    segments = segments.astype(jnp.int32)
    if mesh is None or mesh.empty:
        return local(q, k, v, segments)
    B, H, K = q.shape[0], q.shape[1], k.shape[1]
    batch = DEFAULT_RULES.spec(("batch",), (B,), mesh)[0]
    heads = DEFAULT_RULES.spec((None, "heads"), (B, H), mesh)[1]
    kv_heads = DEFAULT_RULES.spec((None, "kv_heads"), (B, K), mesh)[1]
    if heads != kv_heads:  # a shard must hold whole groups: keep the heads whole
        heads = None
    qkv = PartitionSpec(batch, heads, None, None)
    fn = jax.shard_map(local, in_specs=(qkv, qkv, qkv, PartitionSpec(batch, None)), out_specs=qkv,
                       check_vma=False)
    return fn(q, k, v, segments)
