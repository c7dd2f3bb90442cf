"""Sampling reaches every token with its probability, at the Qwen vocabulary size.

A float32 inverse CDF in vocabulary order cannot: once the running sum is near 1 its entries are ~6e-8 apart, so
a token whose probability is below that spacing gets an empty interval (never drawn) or a whole ulp (drawn too
often). The first test fails on the earlier sampler (0 of 20 tail draws outside the CDF-reachable set)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from arm_jax.rollout.sampling import SamplingFlags, sample_next

V = 151_936  # Qwen2/2.5's vocabulary
TIER2 = np.arange(1, 1001)  # 1000 tokens of 1e-4
P2, P3 = 1e-4, 2.9e-8  # tier 3: every other token, each under half an ulp of 1.0 in float32


def _probs():
    p = np.full(V, P3)
    p[TIER2] = P2
    p[0] = 1.0 - p[1:].sum()
    return p


def test_tokens_below_float32_cdf_resolution_are_drawn():
    """150,935 tail tokens of 1e-8 each: only 13,052 of them have a non-empty interval in a float32 CDF. The draws
    that land in the tail must be spread over all of them (11 of 12 outside that set), not only the reachable."""
    p = np.full(V, 1e-8)
    p[0] = 1.0 - p[1:].sum()
    x = jnp.broadcast_to(jnp.asarray(np.log(p), jnp.float32), (2048, V))
    cdf = np.asarray(jax.jit(lambda z: jnp.cumsum(jnp.exp(z - jnp.max(z, -1, keepdims=True)), -1))(x))[0]
    cdf_reachable = np.concatenate([[True], np.diff(cdf) > 0])
    assert cdf_reachable[1:].mean() < 0.2
    fn = jax.jit(lambda x, keys: sample_next(x, keys, 1.0, 0, 1.0, 0.0, SamplingFlags())[0])
    draws = np.concatenate([np.asarray(fn(x, jax.random.split(jax.random.key(c), 2048))) for c in range(8)])
    tail = draws[draws > 0]
    assert 5 <= tail.size <= 40, tail.size  # expected 16384 * 1.5e-3 = 24.6
    assert (~cdf_reachable[tail]).sum() >= tail.size // 2, (tail.size, (~cdf_reachable[tail]).sum())


def test_every_tier_is_drawn_at_its_probability():
    p = _probs()
    logits = jnp.asarray(np.log(p), jnp.float32)
    rows, calls = 2048, 4
    fn = jax.jit(lambda keys: sample_next(jnp.broadcast_to(logits, (rows, V)), keys, 1.0, 0, 1.0, 0.0,
                                          SamplingFlags())[0])
    draws = np.concatenate([np.asarray(fn(jax.random.split(jax.random.key(c), rows))) for c in range(calls)])
    n = draws.size
    tier = np.where(draws == 0, 0, np.where(draws <= 1000, 1, 2))
    observed = np.bincount(tier, minlength=3)
    expected = n * np.array([p[0], P2 * 1000, 1.0 - p[0] - P2 * 1000])  # 7337.6, 819.2, 35.2
    assert observed[2] > 10, observed  # the float32 CDF draws none of them
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert stats.chi2.sf(chi2, df=2) > 1e-4, (observed, expected)
    # inside tier 2 the draws are spread over its tokens (a few of 1000 per draw), not stuck on some
    assert len(np.unique(draws[tier == 1])) > 500


def test_exact_frequencies_on_a_small_vocabulary():
    """Frequencies match softmax(logits) by chi-square, with filtered (-inf) tokens never drawn."""
    logits = jnp.asarray(np.log([0.5, 0.2, 0.15, 0.1, 0.05, 1e-3]) + 3.0, jnp.float32).at[5].set(-jnp.inf)
    rows = 20000
    toks = np.asarray(jax.jit(lambda k: sample_next(jnp.broadcast_to(logits, (rows, 6)), k, 1.0, 0, 1.0, 0.0,
                                                    SamplingFlags())[0])(jax.random.split(jax.random.key(0), rows)))
    counts = np.bincount(toks, minlength=6)
    assert counts[5] == 0
    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05]) / 1.0
    assert stats.chisquare(counts[:5], rows * p).pvalue > 1e-4


@pytest.mark.parametrize("top_k, top_p, scale", [(5, 1.0, 3.0), (40, 1.0, 3.0), (0, 0.5, 3.0), (0, 0.999, 0.1),
                                                 (30, 0.9, 3.0), (0, 0.9, 3.0)])
def test_candidate_prefilter_equals_the_full_sort(top_k, top_p, scale):
    """top-k / top-p read the 16 largest logits first (CANDIDATES is 1024; 16 here so both paths run on 3000
    tokens): k <= 16 and a nucleus inside them come from the candidates, k = 40 and a flat distribution's nucleus
    (top_p 0.999) from the whole sort; the kept tokens equal the whole-vocabulary sorts' (candidates=None)."""
    from arm_jax.rollout.sampling import filtered_logits, flags_for
    x = jnp.asarray(np.random.RandomState(0).normal(size=(6, 3000)) * scale, jnp.float32)
    x = x.at[2, :4].set(x[2, 10])  # ties at the boundary break to the lower index, as the stable sort
    flags = flags_for(top_k, top_p, 0.0)
    args = (jnp.float32(0.8), jnp.int32(top_k), jnp.float32(top_p), jnp.float32(0.0), flags)
    fast = np.asarray(filtered_logits(x, *args, candidates=16))
    full = np.asarray(filtered_logits(x, *args, candidates=None))  # the whole-vocabulary sorts
    np.testing.assert_array_equal(np.isfinite(fast), np.isfinite(full))
    np.testing.assert_allclose(fast[np.isfinite(fast)], full[np.isfinite(full)])
    kept = np.isfinite(full).sum(axis=1)
    assert kept.min() >= 1
    if top_k == 40 or top_p == 0.999:  # the cases the candidates cannot decide
        assert kept.max() > 16
