"""Next-token sampling controls on float32 logits [R, V]: temperature, top-k, top-p, min-p.

Order (as transformers' logits warpers): temperature, then top-k, then top-p, then min-p, each on the distribution
left by the previous one. Which filters run is static (`SamplingFlags`, so an unused filter costs no sort); their
values are traced (changing them does not recompile). temperature == 0 is greedy (argmax of the raw logits).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingFlags:
    """Static switches: which filters are active (derived from the values by `flags_for`)."""

    top_k: bool = False
    top_p: bool = False
    min_p: bool = False


def flags_for(top_k: int, top_p: float, min_p: float) -> SamplingFlags:
    return SamplingFlags(top_k=top_k > 0, top_p=top_p < 1.0, min_p=min_p > 0.0)


def filtered_logits(logits: jax.Array, temperature, top_k, top_p, min_p, flags: SamplingFlags) -> jax.Array:
    """logits [R, V] float32 -> tempered logits with filtered-out tokens at -inf (the sampling distribution is
    their softmax). temperature must be > 0 here."""
    x = logits / temperature
    if flags.top_k:
        kth = jnp.sort(x, axis=-1)[:, ::-1]
        k = jnp.clip(top_k, 1, x.shape[-1])
        threshold = jnp.take_along_axis(kth, jnp.broadcast_to(k - 1, (x.shape[0],))[:, None], axis=-1)
        x = jnp.where(x >= threshold, x, NEG_INF)
    if flags.top_p:
        order = jnp.argsort(-x, axis=-1, stable=True)
        sorted_x = jnp.take_along_axis(x, order, axis=-1)
        probs = jax.nn.softmax(sorted_x, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = mass_before < top_p  # smallest prefix whose mass reaches top_p (the top token always kept)
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(x.shape[0])[:, None], order].set(keep_sorted)
        x = jnp.where(keep, x, NEG_INF)
    if flags.min_p:
        probs = jax.nn.softmax(x, axis=-1)
        x = jnp.where(probs >= min_p * jnp.max(probs, axis=-1, keepdims=True), x, NEG_INF)
    return x


def _inverse_cdf_sample(x: jax.Array, keys: jax.Array) -> jax.Array:
    """Exact categorical sampling from softmax(x) [R, V] with one uniform per row (inverse CDF): far cheaper than
    Gumbel-max, which draws V random numbers per row per step."""
    probs = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
    cdf = jnp.cumsum(probs, axis=-1)
    u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys) * cdf[:, -1]
    idx = jnp.sum(cdf <= u[:, None], axis=-1)  # first index whose cdf exceeds u
    # never land on a filtered-out token (float ties at the top of the cdf): fall back to the last allowed one
    last_allowed = x.shape[-1] - 1 - jnp.argmax(jnp.isfinite(x)[:, ::-1], axis=-1)
    return jnp.minimum(idx, last_allowed)


def sample_next(logits: jax.Array, keys: jax.Array, temperature, top_k, top_p, min_p, flags: SamplingFlags):
    """Samples one token per row. logits [R, V] float32, keys [R] (one PRNG key per row).

    Returns (tokens [R] int32, logp [R] under softmax(logits) (temperature 1: what the learner recomputes),
    logp_sampling [R] under the filtered, tempered distribution actually sampled from; 0 when greedy).
    """
    greedy = temperature <= 0
    safe_t = jnp.where(greedy, 1.0, temperature)
    x = filtered_logits(logits, safe_t, top_k, top_p, min_p, flags)
    sampled = _inverse_cdf_sample(x, keys)
    tokens = jnp.where(greedy, jnp.argmax(logits, axis=-1), sampled).astype(jnp.int32)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
    logp_s = jnp.take_along_axis(jax.nn.log_softmax(x, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens, logp, jnp.where(greedy, 0.0, logp_s)
