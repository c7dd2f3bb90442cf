"""Next-token sampling controls on float32 logits [R, V]: temperature, top-k, top-p, min-p.

Order (as transformers' logits warpers): temperature, then top-k, then top-p, then min-p, each on the distribution
left by the previous one. Which filters run is static (`SamplingFlags`, so an unused filter costs no sort); their
values are traced (changing them does not recompile). temperature == 0 is greedy (argmax of the raw logits).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

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
    """The static filter switches implied by the values (top_k > 0, top_p < 1, min_p > 0)."""
    return SamplingFlags(top_k=top_k > 0, top_p=top_p < 1.0, min_p=min_p > 0.0)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """What the sampler draws from: temperature (0 = greedy), top_k (0 = off), top_p, min_p, and the stop ids
    that end a sample (the stop token is part of it)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    stop_ids: tuple = ()

    @property
    def flags(self) -> SamplingFlags:
        return flags_for(self.top_k, self.top_p, self.min_p)

    def traced(self) -> tuple:
        """(temperature, top_k, top_p, min_p, stop_ids [>= 1]) as device scalars (changing them never recompiles;
        no stop id is the id -1, which no token has)."""
        stop = jnp.asarray(self.stop_ids if self.stop_ids else (-1,), jnp.int32)
        return (jnp.float32(self.temperature), jnp.int32(self.top_k), jnp.float32(self.top_p),
                jnp.float32(self.min_p), stop)


CANDIDATES = 1024  # top-k / top-p look at the largest this many logits first (`filtered_logits`)


def _full_kth(x: jax.Array, k) -> jax.Array:
    """[R, 1]: the k-th largest of each row, by sorting the whole vocabulary."""
    kth = jnp.sort(x, axis=-1)[:, ::-1]
    return jnp.take_along_axis(kth, jnp.broadcast_to(k - 1, (x.shape[0],))[:, None], axis=-1)


def _nucleus(x: jax.Array, top_p) -> jax.Array:
    """[R, V] bool: the smallest prefix of the tokens by decreasing probability whose mass reaches top_p (the top
    token always kept), by sorting the whole vocabulary."""
    order = jnp.argsort(-x, axis=-1, stable=True)
    sorted_x = jnp.take_along_axis(x, order, axis=-1)
    probs = jax.nn.softmax(sorted_x, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    return jnp.zeros(x.shape, bool).at[jnp.arange(x.shape[0])[:, None], order].set(mass_before < top_p)


def filtered_logits(logits: jax.Array, temperature, top_k, top_p, min_p, flags: SamplingFlags,
                    candidates: Optional[int] = CANDIDATES) -> jax.Array:
    """logits [R, V] float32 -> tempered logits with filtered-out tokens at -inf (the sampling distribution is
    their softmax). temperature must be > 0 here.

    top-k and top-p first take the `candidates` largest logits of each row (`lax.top_k`, ties to the lower index
    as a stable sort; much cheaper than sorting a 152k vocabulary at every decode step): the k-th largest is read
    there when k <= candidates, and the nucleus is found there when the candidates' mass reaches top_p (then no
    token outside them can be in it). Otherwise (any row), or with candidates=None, the whole vocabulary is sorted,
    as before: the same kept tokens (up to float32 rounding of the running mass at the nucleus's edge)."""
    x = logits / temperature
    V = x.shape[-1]
    if candidates is None:  # the whole-vocabulary sorts
        if flags.top_k:
            x = jnp.where(x >= _full_kth(x, jnp.clip(top_k, 1, V)), x, NEG_INF)
        if flags.top_p:
            x = jnp.where(_nucleus(x, top_p), x, NEG_INF)
        return _min_p(x, min_p) if flags.min_p else x
    K = min(V, candidates)
    if flags.top_k or flags.top_p:
        vals, idx = jax.lax.top_k(x, K)  # [R, K], descending
    if flags.top_k:
        k = jnp.clip(top_k, 1, V)
        threshold = jax.lax.cond(
            k <= K, lambda: jnp.take_along_axis(vals, jnp.broadcast_to(jnp.minimum(k, K) - 1, (x.shape[0],))[:, None],
                                                axis=-1),
            lambda: _full_kth(x, k))
        x = jnp.where(x >= threshold, x, NEG_INF)
        vals = jnp.where(vals >= threshold, vals, NEG_INF)
    if flags.top_p:
        probs = jnp.exp(vals - jax.nn.logsumexp(x, axis=-1, keepdims=True))  # the candidates' probabilities
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        covered = jnp.all(jnp.sum(probs, axis=-1) >= top_p)  # the (K+1)-th token's mass before reaches top_p
        rows = jnp.arange(x.shape[0])[:, None]
        keep = jax.lax.cond(covered, lambda: jnp.zeros(x.shape, bool).at[rows, idx].set(mass_before < top_p),
                            lambda: _nucleus(x, top_p))
        x = jnp.where(keep, x, NEG_INF)
    return _min_p(x, min_p) if flags.min_p else x


def _min_p(x: jax.Array, min_p) -> jax.Array:
    """Keeps the tokens whose probability is at least min_p x the top token's."""
    probs = jax.nn.softmax(x, axis=-1)
    return jnp.where(probs >= min_p * jnp.max(probs, axis=-1, keepdims=True), x, NEG_INF)


BLOCK = 128  # vocabulary block of the two-level sampler


def _gumbel(key, n: int) -> jax.Array:
    """n standard Gumbel variates -log(-log(1 - v)) from 32 random bits each, with v = (bits + 1/2) / 2^32 kept in
    floating point, so the upper tail (what lets an unlikely token win) is resolved down to P ~ 1e-10 (g <= 22.9);
    jax.random.gumbel's 23-bit grid stops near g = 16."""
    bits = jax.random.bits(key, (n,), jnp.uint32)
    v = jnp.minimum((bits.astype(jnp.float32) + 0.5) * (2.0 ** -32), 1.0 - 2.0 ** -24)
    return -jnp.log(-jnp.log1p(-v))


def _exact_sample(x: jax.Array, keys: jax.Array) -> jax.Array:
    """A draw from softmax(x) [R, V] per row, every token reachable with its probability: Gumbel-max over the
    log-masses of vocabulary blocks of BLOCK tokens (log-sum-exp per block, so a block of tiny probabilities keeps
    its exact log-mass), then Gumbel-max inside the chosen block. Both levels are exact in log space; a float32
    inverse CDF in vocabulary order is not (a token whose probability is below half an ulp of the running sum,
    ~3e-8 near 1, is never drawn). Costs one exp per logit, as the CDF did, and nb + BLOCK random numbers per row."""
    R, V = x.shape
    B = min(BLOCK, V)
    nb = -(-V // B)
    xb = jnp.pad(x, ((0, 0), (0, nb * B - V)), constant_values=NEG_INF).reshape(R, nb, B)
    top = jnp.max(xb, axis=-1)
    safe_top = jnp.where(jnp.isfinite(top), top, 0.0)
    log_mass = safe_top + jnp.log(jnp.sum(jnp.exp(xb - safe_top[..., None]), axis=-1))  # [R, nb], -inf if empty
    k_block, k_token = jax.vmap(lambda k: jax.random.split(k, 2))(keys).T
    block = jnp.argmax(log_mass + jax.vmap(lambda k: _gumbel(k, nb))(k_block), axis=-1)
    inside = jnp.take_along_axis(xb, block[:, None, None], axis=1)[:, 0]  # [R, B]
    token = jnp.argmax(inside + jax.vmap(lambda k: _gumbel(k, B))(k_token), axis=-1)
    return (block * B + token).astype(jnp.int32)


def sample_next(logits: jax.Array, keys: jax.Array, temperature, top_k, top_p, min_p, flags: SamplingFlags):
    """Samples one token per row. logits [R, V] float32, keys [R] (one PRNG key per row).

    Returns (tokens [R] int32, logp [R] under softmax(logits) (temperature 1: what the learner recomputes),
    logp_sampling [R] under the filtered, tempered distribution actually sampled from; 0 when greedy).
    """
    greedy = temperature <= 0
    safe_t = jnp.where(greedy, 1.0, temperature)
    x = filtered_logits(logits, safe_t, top_k, top_p, min_p, flags)
    sampled = _exact_sample(x, keys)
    tokens = jnp.where(greedy, jnp.argmax(logits, axis=-1), sampled).astype(jnp.int32)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
    logp_s = jnp.take_along_axis(jax.nn.log_softmax(x, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens, logp, jnp.where(greedy, 0.0, logp_s)
