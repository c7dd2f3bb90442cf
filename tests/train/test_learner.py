"""The learner step: exact under micro-batching and sharding, the plain policy gradient at ratio 1, a NaN guard."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arm_jax as aj
from arm_jax.algorithms.losses import LossConfig
from arm_jax.policy import logprobs_fn
from arm_jax.train.learner import Learner, OptimConfig, micro_batch_loss
from tests import hf_models

CFG = aj.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8, model_type="qwen2")
# eps 1e-4: Adam would otherwise turn float-rounding noise of ~0 gradients into full-size steps.
OPT = OptimConfig(lr=1e-2, weight_decay=0.0, max_grad_norm=None, eps=1e-4)


def _batch(policy, seed=0, noise=0.3):
    """8 sequences of 12 tokens: left-padded prompts, then a response of 2..6 tokens (right padding after)."""
    rng = np.random.RandomState(seed)
    tokens, attn = hf_models.padded_batch(CFG.vocab_size, lengths=(12, 9, 12, 8, 10, 12, 11, 12), seed=seed)
    loss_mask = np.zeros_like(attn)
    for i, n in enumerate(rng.randint(2, 7, size=8)):
        loss_mask[i, 12 - 6:12 - 6 + n] = 1
    attn = attn * ((np.arange(12)[None] < 6) | (loss_mask > 0))  # right padding after the response
    logp, _ = logprobs_fn(policy.graphdef, policy.params, jnp.asarray(tokens), jnp.asarray(attn))
    logp_old = np.asarray(logp) + noise * rng.randn(*tokens.shape).astype(np.float32) * loss_mask
    return {"tokens": tokens, "attention_mask": attn.astype(np.int32), "loss_mask": loss_mask.astype(np.float32),
            "advantages": rng.randn(8).astype(np.float32), "logp_old": logp_old.astype(np.float32),
            "ref_logp": (np.asarray(logp) - 0.1).astype(np.float32)}


def _params_np(state):
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def _run(policy, batch, loss_cfg, micro_batch_size=None, remat=False, steps=1):
    learner = Learner(policy, loss_cfg, OPT, micro_batch_size=micro_batch_size, remat=remat)
    state = learner.init_state()
    for i in range(steps):
        state, metrics = learner.step(state, batch, jax.random.key(i))
    return state, metrics


@pytest.fixture(scope="module")
def policy(mesh1):
    return aj.init_policy(CFG, seed=0, mesh=mesh1)


@pytest.mark.parametrize("loss_cfg", [
    LossConfig(agg_mode="token-mean", kl_coef=0.1, entropy_coef=0.01),
    LossConfig(agg_mode="seq-mean-token-mean", dual_clip_c=3.0),
    LossConfig(agg_mode="seq-mean-token-sum-norm", max_len=6),
    LossConfig(policy_loss="gspo", agg_mode="seq-mean-token-mean", eps_low=3e-4, eps_high=4e-4),
], ids=["token-mean+kl+ent", "seq-mean-token-mean", "seq-mean-token-sum-norm", "gspo"])
def test_micro_batching_is_exact(policy, loss_cfg):
    batch = _batch(policy)
    full, m_full = _run(policy, batch, loss_cfg, steps=2)
    micro, m_micro = _run(policy, batch, loss_cfg, micro_batch_size=2, steps=2)
    for a, b in zip(_params_np(full), _params_np(micro)):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5)
    for k in ("loss", "pg_loss", "kl", "entropy", "clip_frac_low", "clip_frac_high", "ratio_min", "ratio_max"):
        np.testing.assert_allclose(float(m_full[k]), float(m_micro[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    changed = max(float(np.abs(a - b).max()) for a, b in zip(_params_np(full), [np.asarray(x) for x in
                                                                                 jax.tree.leaves(policy.params)]))
    assert changed > 1e-3  # the update did something


def test_remat_gives_the_same_update(policy):
    batch = _batch(policy)
    a, _ = _run(policy, batch, LossConfig())
    b, _ = _run(policy, batch, LossConfig(), remat=True)
    for x, y in zip(_params_np(a), _params_np(b)):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_sharded_step_equals_single_device(policy):
    batch = _batch(policy)
    ref, m_ref = _run(policy, batch, LossConfig(), micro_batch_size=4)
    for shape in ((2, 2, 2), (1, 8, 1)):
        mesh = aj.make_mesh(shape)
        sharded = policy.replace(params=jax.device_put(policy.params, aj.policy_param_shardings(policy.params, mesh)),
                                 mesh=mesh)
        out, m = _run(sharded, batch, LossConfig(), micro_batch_size=4)
        q = out.params["layers"][0]["attn"]["q"][...]
        assert not q.sharding.is_fully_replicated
        for x, y in zip(_params_np(ref), _params_np(out)):
            np.testing.assert_allclose(x, y, atol=2e-6, rtol=1e-5)
        np.testing.assert_allclose(float(m["loss"]), float(m_ref["loss"]), rtol=1e-5)


def test_on_policy_gradient_is_plain_policy_gradient(policy):
    """At ratio 1 the clipped loss's gradient is -sum(A * grad logp) / N_tokens (token-mean)."""
    batch = {k: jnp.asarray(v) for k, v in _batch(policy, noise=0.0).items()}
    mask = batch["loss_mask"]
    g_ours = jax.grad(lambda p: micro_batch_loss(policy.graphdef, p, batch, jnp.sum(mask), LossConfig(), None, 1.0,
                                                 1024, False)[0])(policy.params)

    def plain(p):
        logp, _ = logprobs_fn(policy.graphdef, p, batch["tokens"], batch["attention_mask"])
        return -jnp.sum(batch["advantages"][:, None] * logp * mask) / jnp.sum(mask)

    g_ref = jax.grad(plain)(policy.params)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)
    assert max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g_ref)) > 1e-3


def test_non_finite_update_is_skipped(policy):
    batch = _batch(policy)
    batch["advantages"] = batch["advantages"].copy()
    batch["advantages"][3] = np.nan
    learner = Learner(policy, LossConfig(), OPT)
    state = learner.init_state()
    before = _params_np(state)
    opt_before = [np.asarray(x) for x in jax.tree.leaves(state.opt_state)]
    state, metrics = learner.step(state, batch, jax.random.key(0))
    assert int(metrics["skipped"]) == 1 and int(state.skipped) == 1 and int(state.step) == 0
    for a, b in zip(before, _params_np(state)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(opt_before, [np.asarray(x) for x in jax.tree.leaves(state.opt_state)]):
        np.testing.assert_array_equal(a, b)
    good = _batch(policy)
    state, metrics = learner.step(state, good, jax.random.key(1))
    assert int(metrics["skipped"]) == 0 and int(state.step) == 1


def test_multiple_iterations_and_minibatches(policy):
    """mu = 2 passes x 2 minibatches: 4 updates; after the first, the ratio moves off 1 and the clip can fire."""
    batch = _batch(policy, noise=0.0)
    learner = Learner(policy, LossConfig(eps_low=0.01, eps_high=0.01), OptimConfig(lr=3e-2, max_grad_norm=1.0))
    state, history = learner.update(learner.init_state(), batch, jax.random.key(0), num_iterations=2,
                                    num_minibatches=2)
    assert len(history) == 4 and int(state.step) == 4
    np.testing.assert_allclose([float(history[0]["ratio_min"]), float(history[0]["ratio_max"])], [1.0, 1.0],
                               atol=1e-5)
    late = history[2:]
    assert max(float(h["ratio_max"]) - float(h["ratio_min"]) for h in late) > 1e-3
    assert max(float(h["clip_frac_low"]) + float(h["clip_frac_high"]) for h in late) > 0
    np.testing.assert_allclose(float(history[0]["lr"]), 3e-2)
    with pytest.raises(ValueError, match="not divisible by micro_batch_size=3"):
        Learner(policy, micro_batch_size=3).step(learner.init_state(), batch, jax.random.key(0))


def test_schedules():
    from arm_jax.train.learner import make_schedule
    s = make_schedule(OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine", total_steps=14, min_lr_ratio=0.1))
    np.testing.assert_allclose([float(s(i)) for i in (0, 2, 4, 9, 14)], [0.0, 0.5, 1.0, 0.55, 0.1], atol=1e-6)
