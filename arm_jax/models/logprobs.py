"""Per-token log-probs and entropy from hidden states, in chunks: `[B, T, V]` float32 logits never exist.

With Qwen's 151,936-token vocabulary, full float32 logits for 10k tokens are 6 GB. Here the sequence is processed
in chunks of C = chunk_size // (B / shards) positions of every row under `jax.checkpoint` (shards: the devices the
batch is split over, `sharding.batch_shards`), so each device holds one `[B / shards, C, V]` block of about
chunk_size tokens whatever the mesh (a global chunk would shrink to 64 tokens per chip on 16 chips: 16x more,
smaller LM-head matmuls), and the backward recomputes it per chunk; values and gradients equal the naive
log_softmax-and-gather.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from arm_jax.sharding import batch_shards

DEFAULT_CHUNK_SIZE = 1024


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """[B, T] 0/1 mask (left or right padding) -> RoPE positions [B, T]: 0 at the first real token (HF convention;
    padded slots get 0 and are never attended to)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)


@jax.named_scope("lm_head_logprobs")
def pair_logprobs(hidden: jax.Array, targets: jax.Array, head: jax.Array, head_spec: str,
                  temperature: jax.Array | float = 1.0,
                  chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[jax.Array, jax.Array]:
    """hidden [B, T, D] (final-normed), targets [B, T] -> (log p(targets[b, t] | hidden[b, t]), the entropy of that
    distribution) [B, T] float32 under softmax(hidden @ head / temperature), in chunks of chunk_size tokens per
    device (module docstring). head: the LM head, contracted by `head_spec` ('...d,dv->...v', or '...d,vd->...v'
    when tied)."""
    B, n, D = hidden.shape
    # chunks run along the sequence, every row in each: the batch axis stays sharded across devices (a chunk of
    # flattened rows would cut through the batch shards and make every device compute every chunk)
    per_row = max(1, min(n, chunk_size * batch_shards(B) // B))  # chunk_size tokens per device per chunk
    pad = -n % per_row
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(B, -1, per_row, D).swapaxes(0, 1)
    y = jnp.pad(targets, ((0, 0), (0, pad))).reshape(B, -1, per_row).swapaxes(0, 1)
    inv_t = 1.0 / jnp.asarray(temperature, jnp.float32)

    @jax.checkpoint
    def one_chunk(args):
        h_c, y_c = args  # [B, C, D], [B, C]
        logits = jnp.einsum(head_spec, h_c, head, preferred_element_type=jnp.float32) * inv_t  # [B, C, V]
        lse = jax.nn.logsumexp(logits, axis=-1)
        logp = jnp.take_along_axis(logits, y_c[..., None], axis=-1)[..., 0] - lse
        probs = jnp.exp(logits - lse[..., None])
        ent = lse - jnp.sum(probs * logits, axis=-1)
        return logp, ent

    logp, ent = jax.lax.map(one_chunk, (h, y))  # [chunks, B, C]
    return logp.swapaxes(0, 1).reshape(B, -1)[:, :n], ent.swapaxes(0, 1).reshape(B, -1)[:, :n]


def chunked_logprobs(hidden: jax.Array, head: jax.Array, head_spec: str, tokens: jax.Array,
                     attention_mask: jax.Array, temperature: jax.Array | float = 1.0,
                     chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[jax.Array, jax.Array]:
    """Log-prob and entropy of the next-token distribution softmax(logits / temperature) at every position.

    hidden: [B, T, D] final-normed hidden states; head, head_spec, chunk_size: as `pair_logprobs`; tokens: [B, T];
    attention_mask: [B, T] 0/1, or the segment ids of packed rows (`models.packing`; 0 = padding).
    Returns logp [B, T] with logp[b, t] = log p(tokens[b, t] | tokens[b, <t]) and ent [B, T] the entropy of that
    distribution, both float32; 0 at position 0, where mask[b, t] == 0, and where mask[b, t - 1] differs from it
    (the first real token of a left-padded row, or of a packed sequence, has no context).
    """
    B = hidden.shape[0]
    logp, ent = pair_logprobs(hidden[:, :-1], tokens[:, 1:], head, head_spec, temperature, chunk_size)
    seg = attention_mask.astype(jnp.int32)
    valid = (seg[:, 1:] > 0) & (seg[:, 1:] == seg[:, :-1])
    zero = jnp.zeros((B, 1), jnp.float32)
    logp = jnp.concatenate([zero, jnp.where(valid, logp, 0.0)], axis=1)
    ent = jnp.concatenate([zero, jnp.where(valid, ent, 0.0)], axis=1)
    return logp, ent
