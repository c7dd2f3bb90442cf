"""Every loss mode against an independent NumPy reference; KL estimators against their formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arm_jax.algorithms import losses as L


def _data(seed=0, N=6, T=7, noise=0.4):
    rng = np.random.RandomState(seed)
    logp = -rng.rand(N, T).astype(np.float32) * 3
    logp_old = (logp + rng.randn(N, T) * noise).astype(np.float32)
    adv = np.repeat(rng.randn(N, 1), T, axis=1).astype(np.float32)
    mask = np.zeros((N, T), np.float32)
    for i, n in enumerate(rng.randint(1, T + 1, size=N)):
        mask[i, :n] = 1
    return logp, logp_old, adv, mask


def _np_ppo(logp, logp_old, adv, eps_low, eps_high, dual=None):
    r = np.exp(logp - logp_old)
    loss = np.maximum(-adv * r, -adv * np.clip(r, 1 - eps_low, 1 + eps_high))
    if dual is not None:
        loss = np.where(adv < 0, np.minimum(loss, -adv * dual), loss)
    return loss, (adv < 0) & (r < 1 - eps_low), (adv > 0) & (r > 1 + eps_high)


def _np_agg(loss, mask, mode, max_len=None):
    if mode == "token-mean":
        return (loss * mask).sum() / mask.sum()
    n = mask.sum(1)
    keep = n > 0
    if mode == "seq-mean-token-mean":
        return ((loss * mask).sum(1)[keep] / n[keep]).mean()
    return ((loss * mask).sum(1)[keep] / max_len).mean()


@pytest.mark.parametrize("mode", L.AGG_MODES)
@pytest.mark.parametrize("dual", [None, 3.0])
def test_ppo_clip_and_aggregation(mode, dual):
    logp, logp_old, adv, mask = _data(N=10, noise=1.0)
    cfg = L.LossConfig(agg_mode=mode, max_len=7, dual_clip_c=dual, eps_low=0.2, eps_high=0.28)
    loss, ind = L.ppo_clip(jnp.asarray(logp), jnp.asarray(logp_old), jnp.asarray(adv), jnp.asarray(mask), cfg)
    ref, lo, hi = _np_ppo(logp, logp_old, adv, 0.2, 0.28, dual)
    np.testing.assert_allclose(np.asarray(loss), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(ind["clip_low"]), lo)
    np.testing.assert_array_equal(np.asarray(ind["clip_high"]), hi)
    assert lo[mask > 0].any() and hi[mask > 0].any()  # the data exercises both sides
    assert ((adv < 0) & (np.exp(logp - logp_old) > 3.0) & (mask > 0)).any()  # and the dual clip
    agg = float(jnp.sum(L.token_weights(mask, mode, 7) * loss) / L.denominator(mask, mode))
    np.testing.assert_allclose(agg, _np_agg(ref, mask, mode, 7), rtol=1e-5)


def test_dual_clip_bounds_negative_advantages():
    loss, _ = L.ppo_clip(jnp.log(jnp.array([[10.0]])), jnp.zeros((1, 1)), jnp.array([[-1.0]]), jnp.ones((1, 1)),
                         L.LossConfig(dual_clip_c=3.0))
    assert float(loss[0, 0]) == pytest.approx(3.0)  # instead of 10


def test_gspo_value_and_gradient():
    logp, logp_old, adv, mask = _data(1)
    cfg = L.LossConfig(policy_loss="gspo", eps_low=3e-4, eps_high=4e-4, agg_mode="seq-mean-token-mean")
    s = np.exp(((logp - logp_old) * mask).sum(1) / mask.sum(1))[:, None]
    a = adv[:, :1]
    ref = np.maximum(-a * s, -a * np.clip(s, 1 - 3e-4, 1 + 4e-4)) * np.ones_like(logp)
    loss, _ = L.gspo(jnp.asarray(logp), jnp.asarray(logp_old), jnp.asarray(adv), jnp.asarray(mask), cfg)
    np.testing.assert_allclose(np.asarray(loss), ref, rtol=1e-5, atol=1e-6)

    # gradient w.r.t. token log-probs: unclipped sequences get -s_i A_i / n_i per token (seq-mean-token-mean)
    def total(lp):
        lt, _ = L.gspo(lp, jnp.asarray(logp_old), jnp.asarray(adv), jnp.asarray(mask), cfg)
        return jnp.sum(L.token_weights(mask, cfg.agg_mode) * lt) / L.denominator(mask, cfg.agg_mode)

    g = np.asarray(jax.grad(total)(jnp.asarray(logp)))
    unclipped = ((a > 0) & (s <= 1 + 4e-4)) | ((a < 0) & (s >= 1 - 3e-4))
    expected = np.where(unclipped, -s * a / mask.sum(1, keepdims=True), 0.0) * mask / mask.shape[0]
    np.testing.assert_allclose(g, expected, rtol=1e-4, atol=1e-7)


def _np_cov(logp, adv, mask):
    v = mask > 0
    return (logp - logp[v].mean()) * (adv - adv[v].mean())


def test_clip_cov_detaches_a_random_share_of_high_cov_tokens():
    logp, logp_old, adv, mask = _data(2, N=16, T=16)
    adv = adv * 4  # make covariances exceed the lower bound
    cfg = L.LossConfig(policy_loss="clip_cov", clip_cov_ratio=0.05, clip_cov_lb=0.5, clip_cov_ub=5.0)
    loss, ind = L.clip_cov(jnp.asarray(logp), jnp.asarray(logp_old), jnp.asarray(adv), jnp.asarray(mask), cfg,
                           jax.random.key(3))
    cov = _np_cov(logp, adv, mask)
    ratio = np.exp(logp - logp_old)
    ppo_clipped = -adv * np.clip(ratio, 0.8, 1.28) > -adv * ratio
    candidates = (mask > 0) & (cov > 0.5) & (cov < 5.0) & ~ppo_clipped
    chosen = np.asarray(ind["cov_selected"])
    budget = max(int(np.floor(0.05 * mask.sum())), 1)
    assert chosen.sum() == min(budget, candidates.sum()) and (chosen <= candidates).all()
    ref, _, _ = _np_ppo(logp, logp_old, adv, 0.2, 0.28)
    np.testing.assert_allclose(np.asarray(loss), np.where(chosen, 0.0, ref), rtol=1e-5, atol=1e-6)


def test_kl_cov_penalizes_top_cov_tokens():
    logp, logp_old, adv, mask = _data(3, N=16, T=16)
    cfg = L.LossConfig(policy_loss="kl_cov", kl_cov_ratio=0.02, kl_cov_coef=0.7)
    loss, ind = L.kl_cov(jnp.asarray(logp), jnp.asarray(logp_old), jnp.asarray(adv), jnp.asarray(mask), cfg)
    cov = np.where(mask > 0, _np_cov(logp, adv, mask), -np.inf)
    k = max(int(np.floor(0.02 * mask.sum())), 1)
    top = np.zeros(cov.size, bool)
    top[np.argsort(-cov.reshape(-1), kind="stable")[:k]] = True
    top = top.reshape(cov.shape)
    np.testing.assert_array_equal(np.asarray(ind["cov_selected"]), top)
    ref = -adv * np.exp(logp - logp_old) + np.where(top, 0.7 * np.abs(logp - logp_old), 0.0)
    np.testing.assert_allclose(np.asarray(loss), ref, rtol=1e-5, atol=1e-6)


def test_kl_estimators():
    logp = np.array([-1.0, -0.5, -2.0])
    ref = np.array([-1.5, -0.5, -0.2])
    d = ref - logp
    np.testing.assert_allclose(np.asarray(L.kl_penalty(logp, ref, "k1")), logp - ref, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(L.kl_penalty(logp, ref, "k2")), 0.5 * (logp - ref) ** 2, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(L.kl_penalty(logp, ref, "k3")), np.exp(d) - d - 1, rtol=1e-6)
    assert float(L.kl_penalty(jnp.array(-1.0), jnp.array(-1.0), "k3")) == 0.0


def test_dapo_extras_and_entropy_mask():
    from arm_jax.rewards.registry import overlong_penalty  # a reward term (RewardSpec('overlong')), not a loss
    np.testing.assert_allclose(np.asarray(overlong_penalty([10, 12, 14, 16, 17], max_len=16, cache_len=4)),
                               [0.0, 0.0, -0.5, -1.0, -1.0])
    m = L.truncation_mask(jnp.ones((3, 2)), jnp.array([False, True, False]))
    np.testing.assert_array_equal(np.asarray(m), [[1, 1], [0, 0], [1, 1]])
    ent = jnp.array([[0.1, 0.9, 0.5, 9.0], [0.3, 0.7, 0.2, 0.0]])
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]])
    kept = np.asarray(L.top_entropy_mask(ent, mask, 0.25))  # valid entropies: .1 .9 .5 .3 .7 .2 .0 -> top quarter
    np.testing.assert_array_equal(kept, [[0, 1, 0, 0], [0, 1, 0, 0]])


def test_top_entropy_quantile_is_the_fraction_kept():
    """TRL's meaning: top_entropy_quantile = the fraction of highest-entropy tokens trained on; 1.0 keeps all."""
    rng = np.random.RandomState(0)
    ent = rng.rand(16, 50).astype(np.float32)
    mask = (rng.rand(16, 50) < 0.7).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(L.top_entropy_mask(jnp.asarray(ent), jnp.asarray(mask), 1.0)), mask)
    for frac in (0.8, 0.2):
        kept = np.asarray(L.top_entropy_mask(jnp.asarray(ent), jnp.asarray(mask), frac))
        assert abs(kept.sum() / mask.sum() - frac) < 0.01, frac
        assert ent[kept > 0].min() >= ent[(mask > 0) & (kept == 0)].max()  # the highest-entropy ones
    # a global threshold (e.g. over every process's rows) overrides the local one
    thr = L.top_entropy_threshold(ent, mask, 0.2)
    half = np.asarray(L.top_entropy_mask(jnp.asarray(ent[:8]), jnp.asarray(mask[:8]), 0.2, threshold=thr))
    np.testing.assert_array_equal(half, np.asarray(L.top_entropy_mask(jnp.asarray(ent), jnp.asarray(mask), 0.2))[:8])
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        L.top_entropy_mask(jnp.asarray(ent), jnp.asarray(mask), 0.0)


def test_log_ratio_and_k3_are_clamped_like_verl():
    logp = jnp.array([[0.0, -50.0, -1.0]])
    old = jnp.array([[-30.0, 0.0, -1.0]])
    mask = jnp.ones((1, 3))
    _, ind = L.ppo_clip(logp, old, jnp.ones((1, 3)), mask, L.LossConfig())
    np.testing.assert_allclose(np.asarray(ind["ratio"]), [[np.exp(20.0), np.exp(-20.0), 1.0]], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(ind["ratio_clamped"]), [[True, True, False]])
    kl, clamped = L.kl_penalty(jnp.array([0.0, 0.0, -1.0]), jnp.array([-30.0, 5.0, -1.5]), "k3", return_clamped=True)
    d = np.array([-20.0, 5.0, -0.5])  # ref - logp, clamped to +-20
    np.testing.assert_allclose(np.asarray(kl), np.clip(np.exp(d) - d - 1, -10, 10), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(clamped), [True, True, False])  # exp(5) - 6 = 142 > 10
    assert np.isfinite(np.asarray(jax.grad(lambda x: L.kl_penalty(x, jnp.float32(-90.0)))(jnp.float32(0.0))))


def test_clip_cov_never_reselects_ppo_clipped_tokens():
    """verl's Clip-Cov: tokens whose clipped PPO term is already active are not candidates."""
    logp, logp_old, adv, mask = _data(5, N=16, T=16)
    adv = adv * 4
    logp = logp_old + np.where(np.arange(16)[None, :] % 2 == 0, 0.5, 0.0).astype(np.float32)  # ratio e^0.5 > 1.28
    cfg = L.LossConfig(policy_loss="clip_cov", clip_cov_ratio=0.5, clip_cov_lb=-1e9, clip_cov_ub=1e9)
    _, ind = L.clip_cov(jnp.asarray(logp), jnp.asarray(logp_old), jnp.asarray(adv), jnp.asarray(mask), cfg,
                        jax.random.key(0))
    ppo_clipped = (adv > 0) & (np.exp(logp - logp_old) > 1.28) & (mask > 0)
    assert ppo_clipped.sum() > 10
    chosen = np.asarray(ind["cov_selected"])
    assert chosen.sum() > 0 and not (chosen & ppo_clipped).any()
    assert L.LossConfig().kl_cov_ratio == 2e-4  # verl's default


def test_config_validation():
    with pytest.raises(ValueError, match="policy_loss='ppo'"):
        L.LossConfig(policy_loss="ppo")
    with pytest.raises(ValueError, match="max_len is required"):
        L.token_weights(np.ones((2, 3)), L.LossConfig(agg_mode="seq-mean-token-sum-norm").agg_mode, None)
