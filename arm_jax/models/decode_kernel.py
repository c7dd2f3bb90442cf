"""TPU decode attention bounded by each row's own length: a Pallas flash-decoding kernel over the heads-major KV
cache, reading only the cache blocks that hold a row's keys.

A decode step's query (one token per row) attends over its row's valid key slots. The einsum path reads every slot
of the window it is given (the refill engine's live window, `rollout.refill`: bounded by the furthest live row, so
a short answer beside a long one still reads the long one's window). Here the grid walks the key slots in blocks
of `block` per (row, kv head); scalar-prefetched per-row bounds [start, end) (the row's first and last valid slots
+ 1: a left-padded prompt then its generated tokens, contiguous in the cache) make each block outside them map to
the block already in VMEM (no DMA) and skip its compute, so a row reads about (end - start) slots of keys and values,
not the window. Online softmax in float32 (running max, sum and accumulator in VMEM), the G = H / K query heads of
a kv head computed together; a row with no valid key returns zeros (its output is never read).

Semantics equal `layers.attention` for a single-query step whose valid keys are contiguous (always the case for the
sampler's caches) and with no sliding window (a windowed model takes the einsum path). On CPU it runs in Pallas'
interpreter (tests only); `resolve_attention_impl('auto')` picks it for decode steps when compiling for TPU. Under a
mesh it runs in `jax.shard_map` with rows over the batch axes and kv heads over the tensor axis, as splash.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec

from arm_jax.sharding import DEFAULT_RULES, target_platform


def block_size(slots: int, largest: int = 512) -> int:
    """The largest power of two <= `largest` (and >= 8, the TPU sublane) dividing the cache length; 0: none."""
    b = largest
    while b >= 8:
        if slots % b == 0:
            return b
        b //= 2
    return 0


def _kernel(starts_ref, ends_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, acc_ref, *, block: int, scale: float):
    b, j = pl.program_id(0), pl.program_id(2)
    start, end = starts_ref[b], ends_ref[b]

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when((j * block < end) & ((j + 1) * block > start))
    def _compute():
        q = q_ref[...]  # [G, Dh]
        k = k_ref[...]  # [block, Dh]
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
        pos = j * block + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
        s = jnp.where((pos >= start) & (pos < end), s, -jnp.inf)  # [G, block]
        m_prev = m_ref[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - m_new)
        alpha = jnp.exp(m_prev - m_new)
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
        acc_ref[...] = alpha * acc_ref[...] + jax.lax.dot_general(
            p.astype(v_ref.dtype), v_ref[...], (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        m_ref[...] = m_new

    @pl.when(j == pl.num_programs(2) - 1)
    def _out():
        denom = l_ref[...]
        o_ref[...] = jnp.where(denom > 0, acc_ref[...] / jnp.where(denom > 0, denom, 1.0), 0.0).astype(o_ref.dtype)


def _local(q, k, v, starts, ends, *, scale: float, interpret: bool):
    """One device's rows: q [b, K, G, Dh], k [b, K, S, Dh], v [b, K, S, Dv], starts / ends [b] -> [b, K, G, Dv]."""
    B, K, G, Dh = q.shape
    S, Dv = k.shape[2], v.shape[3]
    block = block_size(S)

    def kv_index(b, h, j, starts, ends):  # blocks outside [start, end) map to the nearest one inside: no new DMA
        first = starts[b] // block
        last = jnp.maximum(ends[b] - 1, 0) // block
        return b, h, jnp.clip(j, first, jnp.maximum(first, last)), 0

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(B, K, S // block),
        in_specs=[pl.BlockSpec((None, None, G, Dh), lambda b, h, j, *_: (b, h, 0, 0)),
                  pl.BlockSpec((None, None, block, Dh), kv_index),
                  pl.BlockSpec((None, None, block, Dv), kv_index)],
        out_specs=pl.BlockSpec((None, None, G, Dv), lambda b, h, j, *_: (b, h, 0, 0)),
        scratch_shapes=[pltpu.VMEM((G, 1), jnp.float32), pltpu.VMEM((G, 1), jnp.float32),
                        pltpu.VMEM((G, Dv), jnp.float32)])
    return pl.pallas_call(functools.partial(_kernel, block=block, scale=scale), grid_spec=grid_spec,
                          out_shape=jax.ShapeDtypeStruct((B, K, G, Dv), v.dtype), interpret=interpret,
                          name="arm_jax_decode_attention")(starts, ends, q, k, v)


def row_bounds(kv_valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """kv_valid [B, S] bool -> (first valid slot, last valid slot + 1) [B] int32 ((0, 0) for a row with none)."""
    S = kv_valid.shape[1]
    any_valid = jnp.any(kv_valid, axis=1)
    start = jnp.argmax(kv_valid, axis=1).astype(jnp.int32)
    end = (S - jnp.argmax(kv_valid[:, ::-1], axis=1)).astype(jnp.int32)
    return jnp.where(any_valid, start, 0), jnp.where(any_valid, end, 0)


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_valid: jax.Array, *, scale: float) -> jax.Array:
    """One decode step's attention: q [B, H, 1, Dh], k [B, K, S, Dh], v [B, K, S, Dv] (the cache, heads-major),
    kv_valid [B, S] (a contiguous run of valid slots per row, the query's own slot included). Returns
    [B, H, 1, Dv] in v's dtype."""
    B, H, T, Dh = q.shape
    K = k.shape[1]
    if T != 1:
        raise ValueError(f"the decode kernel takes one query per row, got {T}")
    qg = q.reshape(B, K, H // K, Dh)
    starts, ends = row_bounds(kv_valid)
    local = functools.partial(_local, scale=scale, interpret=target_platform() != "tpu")
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        out = local(qg, k, v, starts, ends)
    else:
        batch = DEFAULT_RULES.spec(("batch",), (B,), mesh)[0]
        kv_heads = DEFAULT_RULES.spec((None, "kv_heads"), (B, K), mesh)[1]
        spec = PartitionSpec(batch, kv_heads, None, None)
        rows = PartitionSpec(batch)
        out = jax.shard_map(local, in_specs=(spec, spec, spec, rows, rows), out_specs=spec, check_vma=False)(
            qg, k, v, starts, ends)
    return out.reshape(B, H, 1, v.shape[-1])
