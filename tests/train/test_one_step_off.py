"""One-step-off RL in the loop (`RLConfig.max_staleness`, docs/method.md §10): which weights sample which batch,
the first step equal to the synchronous loop's, exact resume with batches waiting, and the rollout correction and
mismatch metrics in a real step."""

import dataclasses

import jax
import numpy as np
import pytest

import arm_jax as aj
from arm_jax.data import countdown
from arm_jax.rollout.sampler import generate
from tests.rl_helpers import countdown_run, small_rl_config, steady


@pytest.fixture(scope="module")
def policy(mesh1):
    cfg = countdown.tiny_model_config(hidden=32, layers=1, heads=2, mlp=64, arch="starcoder2", act="relu")
    return aj.init_policy(cfg, seed=0, mesh=mesh1, init_std=0.06)


def _cfg(**overrides):
    return small_rl_config(**{"steps": 4, **overrides})


_run = countdown_run


def _params(run):
    return [np.asarray(x) for x in jax.tree.leaves(run.state.params)]


_steady = steady


def test_batch_t_plus_1_is_sampled_with_step_ts_weights(policy, tmp_path):
    sync = _run(policy, tmp_path / "sync", _cfg())
    off = _run(policy, tmp_path / "off", _cfg(max_staleness=1))
    theta0 = off.current_policy().params
    theta0 = jax.tree.map(lambda x: x.copy(), theta0)
    m_sync, m_off = sync.train_step(), off.train_step()
    # step 1: both learn from batch 0, sampled with the starting weights: the same update, bit for bit
    assert _steady(m_sync) == {k: v for k, v in _steady(m_off).items() if k in _steady(m_sync)}
    for a, b in zip(_params(sync), _params(off)):
        np.testing.assert_array_equal(a, b)
    assert m_off["async/staleness"] == 0 and "mismatch/kl_k3" in m_off and "mismatch/kl_k3" in m_sync
    # batch 1 is already sampled (during update 0) with the starting weights, not with step 1's
    (waiting,) = off.pending
    assert waiting.step == 0
    cfg = off.cfg
    prompts = [off.task.encode(r)[0] for r in waiting.records]
    want = generate(policy.replace(params=theta0), prompts, max_new_tokens=cfg.max_new_tokens,
                    temperature=cfg.temperature, n=cfg.group_size, seed=cfg.seed,
                    step=1 * (cfg.max_sampling_rounds + 1), stop_ids=off.task.stop_ids,
                    **cfg.engine_options.kwargs()).trimmed()
    np.testing.assert_array_equal(waiting.out.tokens, want.tokens)
    np.testing.assert_array_equal(waiting.out.logp_sampling, want.logp_sampling)
    m_sync, m_off = sync.train_step(), off.train_step()
    assert m_off["async/staleness"] == 1
    assert m_off["mismatch/abs_logp_diff_mean"] > 10 * m_sync["mismatch/abs_logp_diff_mean"]  # one step apart
    # the synchronous loop's batch 1 comes from step 1's weights: different samples
    assert m_sync["reward_mean"] != m_off["reward_mean"] or m_sync["entropy"] != m_off["entropy"]


@pytest.mark.parametrize("correction", ["tis", "mis"])
def test_resume_with_waiting_batches_is_exact(policy, tmp_path, correction):
    """Killed after step 2 (its checkpoint holds batch 3, sampled with step 2's weights) and resumed: the same
    parameters and metrics as the uninterrupted run."""
    cfg = _cfg(max_staleness=1, rollout_correction=correction, rollout_correction_threshold=1.5)
    straight = _run(policy, tmp_path / "straight", cfg)
    history = straight.run()
    first = _run(policy, tmp_path / "killed", cfg)
    for _ in range(2):
        m = first.train_step()
        first.metrics.write(first.step, m)
        first.checkpoint()
    first.ckpt.wait()
    del first
    resumed = _run(policy, tmp_path / "killed", cfg)
    assert resumed.step == 2 and len(resumed.pending) == 1
    hist2 = resumed.run()
    for a, b in zip(_params(straight), _params(resumed)):
        np.testing.assert_array_equal(a, b)
    assert [_steady(h) for h in history] == [_steady(h) for h in hist2]
    key = {"tis": "correction/clipped_frac", "mis": "correction/masked_seq_frac"}[correction]
    assert all(key in h for h in history[1:]) and any(h[key] > 0 for h in history[1:])


def test_a_missing_pending_file_is_an_error(policy, tmp_path):
    cfg = _cfg(max_staleness=1, steps=3)
    run = _run(policy, tmp_path, cfg)
    run.train_step()
    run.checkpoint()
    run.ckpt.wait()
    for p in (tmp_path / "checkpoints" / "pending").iterdir():
        p.unlink()
    with pytest.raises(FileNotFoundError, match="max_staleness"):
        _run(policy, tmp_path, cfg)


def test_bad_options_name_the_key(policy, tmp_path):
    for bad, match in ((dict(rollout_correction="is"), "rollout_correction"),
                       (dict(rollout_correction_threshold=1.0), "rollout_correction_threshold"),
                       (dict(rollout_correction="tis", temperature=0.0), "greedily"),
                       (dict(max_staleness=-1), "max_staleness")):
        with pytest.raises(ValueError, match=match):
            _run(policy, tmp_path, dataclasses.replace(_cfg(), **bad))


def test_two_steps_stale_with_dynamic_sampling(policy, tmp_path):
    """k = 2: the first step samples batches 0 and 1 with the starting weights, later batches lag two steps;
    dynamic sampling's extra rounds are sampled fresh (the loop runs, counts them and stays within k)."""
    run = _run(policy, tmp_path, _cfg(max_staleness=2, dynamic_sampling=True, max_sampling_rounds=1,
                                      advantage="grpo", advantage_kwargs=()))
    hist = [run.train_step() for _ in range(4)]
    assert [h["async/staleness"] for h in hist] == [0, 1, 2, 2]
    assert all("groups_refilled" in h for h in hist)
    assert [b.step for b in run.pending] == []  # steps 4 and 5 are past the run's 4 steps: never sampled
