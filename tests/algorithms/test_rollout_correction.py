"""The rollout corrections on enumerable toys (docs/method.md §10): under a known sampler-learner mismatch, the
expected policy gradient each correction gives, computed exactly by enumerating every outcome weighted by the
sampler's probability, against the gradient it should give; and the mismatch metrics' known expectations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arm_jax.algorithms import losses as L
from arm_jax.algorithms import rollout_correction as RC

CFG = L.LossConfig(eps_low=0.2, eps_high=0.28)


def _expected_grad(theta, logp_fn, sampler_logp, adv, mask, mode, C):
    """E_mu[grad of the corrected PPO loss] at theta = theta_old, exactly: each outcome y (a row) weighted by
    mu(y) = exp(sum of its sampler log-probs). The loss is the learner's: w * ppo_clip(logp, logp_old, A)."""
    logp_old = jax.lax.stop_gradient(logp_fn(theta))
    w, keep, _ = RC.correction_weights(logp_old, sampler_logp, mask, mode, C)
    mu = jnp.exp(jnp.sum(sampler_logp * mask, axis=-1))

    def loss(th):
        pg, _ = L.ppo_clip(logp_fn(th), logp_old, adv, keep, CFG)
        return jnp.sum(mu[:, None] * w * pg * keep)

    return jax.grad(loss)(theta)


# ------------------------------------------------------------------------------------- a bandit (one token)

K = 5
THETA = jnp.asarray([0.3, -0.4, 1.1, 0.0, -1.0])
SAMPLER = jnp.asarray([0.9, 0.2, 0.4, -0.5, -0.2])  # another policy: a stale or differently computed one
REWARD = jnp.asarray([1.0, 0.0, 0.5, -1.0, 2.0])


def _bandit_logp(th):
    return jax.nn.log_softmax(th)[:, None]  # row y = arm y, one token


def _on_policy(theta, keep_arm=None):
    """-grad E_pi[A], the on-policy gradient of the loss (restricted to arms where keep_arm holds)."""
    keep = jnp.ones(K) if keep_arm is None else keep_arm
    return jax.grad(lambda th: -jnp.sum(jax.nn.softmax(th) * REWARD * keep))(theta)


def _bandit(mode, C):
    mu_logp = jax.nn.log_softmax(SAMPLER)[:, None]
    return _expected_grad(THETA, _bandit_logp, mu_logp, REWARD[:, None], jnp.ones((K, 1)), mode, C)


def test_without_a_correction_the_expected_gradient_is_the_samplers():
    got = _bandit("none", 2.0)
    mu_grad = jax.grad(lambda th: -jnp.sum(jax.nn.softmax(SAMPLER) * REWARD * jax.nn.log_softmax(th)))(THETA)
    np.testing.assert_allclose(got, mu_grad, atol=1e-6)
    assert np.abs(np.asarray(got - _on_policy(THETA))).max() > 0.05  # biased: not the learner's gradient


def test_tis_is_unbiased_untruncated_and_truncates_exactly():
    np.testing.assert_allclose(_bandit("tis", 1e6), _on_policy(THETA), atol=1e-6)
    pi, mu = jax.nn.softmax(THETA), jax.nn.softmax(SAMPLER)
    C = 1.5  # arms 2 and 3 have pi / mu > 1.5 here: their weight is cut to C
    assert 0 < int(jnp.sum(pi / mu > C)) < K
    want = jax.grad(lambda th: -jnp.sum(mu * jnp.minimum(pi / mu, C) * REWARD * jax.nn.log_softmax(th)))(THETA)
    np.testing.assert_allclose(_bandit("tis", C), want, atol=1e-6)
    assert np.abs(np.asarray(want - _on_policy(THETA))).max() > 1e-3  # truncation's bias is real


def test_icepop_keeps_the_on_policy_gradient_of_the_tokens_in_its_band():
    np.testing.assert_allclose(_bandit("icepop", 1e6), _on_policy(THETA), atol=1e-6)
    ratio = jax.nn.softmax(THETA) / jax.nn.softmax(SAMPLER)  # 0.57 0.57 2.08 1.70 0.46
    C = 1.9  # arms 2 and 4 leave [0.53, 1.9]
    inside = ((ratio >= 1 / C) & (ratio <= C)).astype(jnp.float32)
    assert 0 < int(inside.sum()) < K
    np.testing.assert_allclose(_bandit("icepop", C), _on_policy(THETA, inside), atol=1e-6)


# ------------------------------------------------------------------- sequences of 2 tokens over a 2-token vocabulary

SEQS = jnp.asarray([[a, b] for a in range(2) for b in range(2)])  # every outcome
SEQ_REWARD = jnp.asarray([1.0, -0.5, 0.25, 2.0])


def _seq_logp(th):
    """An autoregressive toy: pi(y1) = softmax(th[0]), pi(y2 | y1) = softmax(th[1 + y1]) -> [4, 2] token logps."""
    first = jax.nn.log_softmax(th[0])[SEQS[:, 0]]
    second = jax.nn.log_softmax(th[1:][SEQS[:, 0]], axis=-1)[jnp.arange(4), SEQS[:, 1]]
    return jnp.stack([first, second], axis=1)


SEQ_THETA = jnp.asarray([[0.2, -0.3], [1.0, -0.5], [-0.7, 0.4]])
SEQ_SAMPLER = jnp.asarray([[-0.4, 0.5], [0.1, 0.3], [0.6, -0.6]])


def _seq_on_policy(th, keep=None):
    keep = jnp.ones(4) if keep is None else keep
    return jax.grad(lambda t: -jnp.sum(jnp.exp(_seq_logp(t).sum(1)) * SEQ_REWARD * keep))(th)


@pytest.mark.parametrize("C", [1e6, 1.6])
def test_mis_gives_the_sequence_level_on_policy_gradient_of_the_sequences_it_keeps(C):
    mu_logp = _seq_logp(SEQ_SAMPLER)
    got = _expected_grad(SEQ_THETA, _seq_logp, mu_logp, jnp.broadcast_to(SEQ_REWARD[:, None], (4, 2)),
                         jnp.ones((4, 2)), "mis", C)
    rho = jnp.exp(_seq_logp(SEQ_THETA).sum(1) - mu_logp.sum(1))
    inside = ((rho >= 1 / C) & (rho <= C)).astype(jnp.float32)
    if C < 10:
        assert 0 < int(inside.sum()) < 4  # the band drops some sequences
    np.testing.assert_allclose(got, _seq_on_policy(SEQ_THETA, inside), atol=1e-6)
    # token-level TIS is not the sequence-level gradient here (the prefix's ratio is ignored)
    tis = _expected_grad(SEQ_THETA, _seq_logp, mu_logp, jnp.broadcast_to(SEQ_REWARD[:, None], (4, 2)),
                         jnp.ones((4, 2)), "tis", 1e6)
    assert np.abs(np.asarray(tis - _seq_on_policy(SEQ_THETA))).max() > 1e-3


def test_dropped_tokens_leave_the_mask_and_the_counts_name_them():
    logp_old = jnp.log(jnp.asarray([[0.5, 0.5, 0.1], [0.2, 0.2, 0.2]]))
    logp_mu = jnp.log(jnp.asarray([[0.5, 0.1, 0.1], [0.2, 0.2, 0.9]]))
    mask = jnp.asarray([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # the last token of row 0 is padding
    w, keep, c = RC.correction_weights(logp_old, logp_mu, mask, "icepop", 2.0)
    np.testing.assert_array_equal(keep, [[1, 0, 0], [1, 1, 0]])  # ratios 5 and 0.22 leave [0.5, 2]
    np.testing.assert_allclose(w, [[1, 0, 0], [1, 1, 0]], atol=1e-6)
    m = RC.correction_metrics(c)
    assert m["correction/masked_token_frac"] == pytest.approx(2 / 5)
    w, keep, c = RC.correction_weights(logp_old, logp_mu, mask, "tis", 2.0)
    np.testing.assert_allclose(w, [[1, 2, 0], [1, 1, 0.2 / 0.9]], atol=1e-6)
    assert RC.correction_metrics(c)["correction/clipped_frac"] == pytest.approx(1 / 5)
    w, keep, c = RC.correction_weights(logp_old, logp_mu, mask, "mis", 4.5)  # rho: 5 (dropped), 0.22 (kept)
    np.testing.assert_array_equal(keep, [[0, 0, 0], [1, 1, 1]])
    np.testing.assert_allclose(w[1], [0.2 / 0.9] * 3, atol=1e-6)
    assert RC.correction_metrics(c)["correction/masked_seq_frac"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="rollout_correction"):
        RC.correction_weights(logp_old, logp_mu, mask, "is", 2.0)


def test_top_p_truncation_shows_in_the_mean_ratio():
    """Sampling from the top-p nucleus S of pi, the token ratio pi / mu has mean pi(S) < 1 under mu (TRL #6789's
    bias); the metric over rows drawn in proportion to mu reads exactly that."""
    pi = np.asarray([0.45, 0.3, 0.15, 0.1])
    S = np.asarray([1, 1, 1, 0], bool)  # top-p 0.8: the first three
    mu = np.where(S, pi, 0) / pi[S].sum()
    rows = np.concatenate([[y] * int(round(mu[y] * 900)) for y in range(4) if S[y]])
    logp_old = np.log(pi[rows])[:, None]
    logp_mu = np.log(mu[rows])[:, None]
    m = RC.mismatch_metrics(logp_old, logp_mu, np.ones_like(logp_old))
    assert m["mismatch/ratio_mean"] == pytest.approx(pi[S].sum(), abs=1e-6)
    assert m["mismatch/abs_logp_diff_max"] == pytest.approx(-np.log(pi[S].sum()), abs=1e-6)
    assert m["mismatch/kl_k3"] == pytest.approx(np.mean(np.expm1(np.log(pi[S].sum())) - np.log(pi[S].sum())),
                                                abs=1e-6)
