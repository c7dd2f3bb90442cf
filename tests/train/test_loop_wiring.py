"""Loop-level checks of what the algorithms' unit tests cannot see: ARM's inputs as RLRun builds them, dynamic
sampling's merge, DAPO's overlong mask and the top-entropy tokens in a real step, and KL against a reference."""

import dataclasses

import numpy as np
import pytest

import arm_jax as aj
from arm_jax.algorithms.confidence import answer_confidence, prompt_confidence
from arm_jax.algorithms.losses import LossConfig
from arm_jax.data import countdown
from arm_jax.rewards.registry import Graded, RewardComposer, RewardSpec, register_reward
from arm_jax.rewards.tasks import make_task
from arm_jax.policy import cast_policy
from arm_jax.train.learner import Learner, OptimConfig, make_schedule
from arm_jax.train.loop import RLConfig, RLRun


@pytest.fixture(scope="module")
def policy(mesh1):
    cfg = countdown.tiny_model_config(hidden=32, layers=1, heads=2, mlp=64, arch="starcoder2", act="relu")
    return aj.init_policy(cfg, seed=0, mesh=mesh1, init_std=0.06)


def _run(policy, tmp_path, ref=None, **overrides):
    task = make_task("countdown", format_weight=0.1)  # shaped rewards: the format bonus is not accuracy
    cfg = RLConfig(**{**dict(steps=2, prompts_per_step=4, group_size=4, max_new_tokens=12, eval_every=0,
                             checkpoint_every=100, samples_every=0, optim=OptimConfig(lr=1e-3)), **overrides})
    from arm_jax.eval.heldout import HeldOutEval
    return RLRun(policy, task, cfg, str(tmp_path), ref_policy=ref, log_to_console=False,
                 evaluator=HeldOutEval.from_rl_config(cfg))


def test_arm_inputs_as_the_loop_builds_them(policy, tmp_path):
    run = _run(policy, tmp_path)
    run.reset_stage_counters()
    rb = run._round(0)
    G, Tp = 4, rb.out.prompt_tokens.shape[1]
    tokens, attn, _ = rb.out.sequences()
    logp = np.asarray(aj.token_logprobs(policy, tokens, attn)[0])
    np.testing.assert_allclose(rb.logp, logp, atol=1e-6)
    # c(q): the question tokens of each prompt (left padding and BOS excluded), from the prompt's own log-probs
    for p, rec in enumerate(rb.records):
        ids, q = run.task.encode(rec)
        assert rb.qmask[p, Tp - len(ids):].tolist() == q and rb.qmask[p, :Tp - len(ids)].sum() == 0
    c_q = np.asarray(prompt_confidence(logp[::G, :Tp], rb.qmask))
    np.testing.assert_allclose(rb.arm["c_q"], c_q, rtol=1e-5)
    c_o = np.asarray(answer_confidence(logp[:, Tp:], rb.out.mask, 0.2)).reshape(-1, G)
    np.testing.assert_allclose(rb.arm["c_o"], c_o, rtol=1e-5)
    # the gate reads accuracy, not the shaped total: a group with format bonuses but no correct answer gets no term
    wrong = ~(rb.accuracy > 0).any(axis=1)
    assert np.all(rb.arm["term"][wrong] == 0)
    assert np.all(rb.arm["term"][~wrong] == pytest.approx((c_q[:, None] - c_o)[~wrong], rel=1e-5))


def test_dynamic_sampling_merge_keeps_rows_consistent(policy, tmp_path):
    run = _run(policy, tmp_path, advantage="grpo", dynamic_sampling=True, max_sampling_rounds=3)
    run.reset_stage_counters()
    rb, stats = run._collect(0)
    assert stats["groups_refilled"] >= 1  # a random tiny model gets most groups all-wrong
    keep = rb.informative()
    assert stats["uninformative_groups"] == int((~keep).sum())
    # every merged row's arrays belong together: logp_old recomputed on the merged sequences, rewards regraded
    tokens, attn, _ = rb.out.sequences()
    np.testing.assert_allclose(rb.logp, np.asarray(aj.token_logprobs(policy, tokens, attn)[0]), atol=1e-5)
    examples = [rb.records[i] for i in rb.out.prompt_index]
    regraded = run.rewards(rb.texts, examples, lengths=rb.out.lengths, max_len=12)
    np.testing.assert_allclose(regraded["total"].reshape(-1, 4), rb.rewards)
    np.testing.assert_allclose(np.asarray(aj.advantages("grpo", rb.rewards)), rb.adv, atol=1e-6)
    for p, rec in enumerate(rb.records):  # the prompt tokens are the record's
        ids = run.task.encode(rec)[0]
        assert rb.out.prompt_tokens[p * 4, -len(ids):].tolist() == ids


def test_masks_and_kl_in_a_real_step(policy, tmp_path):
    with pytest.raises(ValueError, match="needs a reference policy"):
        _run(policy, tmp_path / "a", loss=LossConfig(kl_coef=0.1))
    ref = cast_policy(policy, policy.config.dtype)
    run = _run(policy, tmp_path / "b", ref=ref, max_new_tokens=6, mask_truncated=True, top_entropy_quantile=0.5,
               loss=LossConfig(kl_coef=0.1), num_minibatches=2)
    m1 = run.train_step()
    assert m1["frac_truncated"] > 0
    # trained tokens = the top half by entropy of the non-truncated responses' tokens
    assert 0 < m1["frac_loss_tokens"] <= 0.5 * (1 - m1["frac_truncated"]) + 0.05
    assert m1["kl"] > 0 and m1["kl_clamped"] == 0.0  # the second mini-batch sees the updated policy
    m2 = run.train_step()
    assert m2["kl"] > m1["kl"] / 4
    # the reference really is the frozen start: its log-probs differ from the trained policy's now
    tokens = np.asarray([[1, 5, 6, 7, 8]], np.int32)
    diff = np.abs(np.asarray(aj.token_logprobs(ref, tokens)[0]) -
                  np.asarray(aj.token_logprobs(run.current_policy(), tokens)[0])).max()
    assert diff > 1e-4


def test_evaluation_entropy_is_at_the_evaluation_temperature(policy, tmp_path):
    """RLRun.evaluate and `python -m arm_jax.eval` share `sample_and_grade`, whose entropy and confidences are
    those of the distribution sampled from (temperature 0.5 here), not of the temperature-1 model."""
    from arm_jax.eval.sampled import sample_and_grade
    run = _run(policy, tmp_path, eval_temperature=0.5, eval_n=2, eval_prompts=6)
    recs = [run.task.eval[i] for i in range(6)]
    kwargs = dict(encode=lambda r: run.task.encode(r)[0], decode=run.task.decode, stop_ids=run.task.stop_ids,
                  grade=lambda t, e, lengths, max_len: run.rewards(t, e, lengths=lengths, max_len=max_len)["accuracy"],
                  n=2, max_new_tokens=12, temperature=0.5, seed=run.cfg.seed + 7777)
    res = sample_and_grade(policy, recs, **kwargs)
    out = aj.generate(policy, [run.task.encode(r)[0] for r in recs], max_new_tokens=12, temperature=0.5, n=2,
                      seed=run.cfg.seed + 7777, step=0, stop_ids=run.task.stop_ids)
    tokens, attn, _ = out.sequences()
    Tp = out.prompt_tokens.shape[1]
    ent_half = (np.asarray(aj.token_logprobs(policy, tokens, attn, temperature=0.5)[1])[:, Tp:] * out.mask).sum()
    ent_one = (np.asarray(aj.token_logprobs(policy, tokens, attn)[1])[:, Tp:] * out.mask).sum()
    assert res.mean_token_entropy == pytest.approx(ent_half / out.mask.sum(), rel=1e-5)
    assert abs(ent_one - ent_half) / ent_half > 0.05  # the two temperatures are distinguishable
    assert run.evaluate()["eval/entropy"] == pytest.approx(res.mean_token_entropy, rel=1e-5)


def test_evaluation_runs_with_the_runs_memory_levers(policy, tmp_path):
    """The held-out evaluation takes the run's engine, slots, rows per pass, parameter layout, top-p and log-prob
    batch size (a plan that fits the run fits its evaluation); the results are those of the default levers (the
    engines sample the same tokens, the passes give the same log-probs)."""
    from arm_jax.eval.heldout import HeldOutEval
    from arm_jax.rollout.sampler import EngineOptions
    run = _run(policy, tmp_path, eval_n=2, eval_prompts=6, rollout_engine="lockstep", rollout_rows_per_pass=8,
               logprob_batch_size=8, top_p=0.9)
    ev = HeldOutEval.from_rl_config(run.cfg)
    assert ev.engine == EngineOptions("lockstep", None, 32, 8, "train") and ev.logprob_batch_size == 8
    assert ev.top_p == 0.9 and ev.pack
    calls = []
    import arm_jax.eval.sampled as sampled
    generate = sampled.generate
    sampled.generate = lambda *a, **k: calls.append(k) or generate(*a, **k)
    try:
        levers = run.evaluate()
    finally:
        sampled.generate = generate
    assert calls and all(k["engine"] == "lockstep" and k["rows_per_pass"] == 8 and k["top_p"] == 0.9 for k in calls)
    defaults = dataclasses.replace(ev, engine=EngineOptions(), logprob_batch_size=None, pack=False)
    plain = defaults(run.current_policy(), run.task, run.eval_rewards)
    for k in ("eval/pass@1", "eval/pass@2", "eval/distinct_correct"):
        assert levers[k] == plain[k], k
    assert levers["eval/entropy"] == pytest.approx(plain["eval/entropy"], rel=1e-5)


def test_long_training_prompts_are_dropped_and_counted(policy, tmp_path):
    task = make_task("countdown")
    lengths = [len(task.encode(task.train[i])[0]) for i in range(len(task.train))]
    limit = int(np.median(lengths))
    run = _run(policy, tmp_path, max_prompt_tokens=limit)
    assert run.prompts_dropped == sum(n > limit for n in lengths) > 0
    for _ in range(3):
        assert all(len(run.task.encode(r)[0]) <= limit for r in next(run.data))
    # a restart reads the lengths back (prompt_lengths.json beside the checkpoints): only the two prompts of the
    # cache key are tokenized again, not every prompt on every host
    calls = []
    encode = run.task.encode
    run.task.encode = lambda r: calls.append(1) or encode(r)
    again = RLRun(policy, run.task, run.cfg, str(tmp_path), log_to_console=False, evaluator=run.evaluator)
    assert again.prompts_dropped == run.prompts_dropped and len(calls) == 2


@register_reward("_test_grader_down")
def _grader_down(completions, examples, context, value=0.0, status="error"):
    """A verifier whose every grading fails (status 'error'), or returns `value` (NaN: a broken reward)."""
    return Graded([value] * len(completions), [status] * len(completions))


def _with_reward(policy, tmp_path, spec, **overrides):
    run = _run(policy, tmp_path, **overrides)
    run.task = dataclasses.replace(run.task, rewards=[spec])
    run.rewards = RewardComposer(run.task.rewards)
    return run


def test_grading_statuses_are_metrics_and_a_broken_grader_stops_the_run(policy, tmp_path):
    m = _run(policy, tmp_path / "ok").train_step()
    assert m["reward/error_frac"] == m["reward/timeout_frac"] == m["reward/no_answer_frac"] == 0.0
    run = _with_reward(policy, tmp_path / "down", RewardSpec("_test_grader_down", accuracy=True))
    with pytest.raises(RuntimeError, match=r"100% of the responses could not be graded.*max_reward_error_frac=0.5"):
        run.train_step()
    run = _with_reward(policy, tmp_path / "tolerated", RewardSpec("_test_grader_down", accuracy=True),
                       max_reward_error_frac=1.0)
    assert run.train_step()["reward/error_frac"] == 1.0
    timeouts = RewardSpec("_test_grader_down", accuracy=True, kwargs=(("status", "timeout"),))
    with pytest.raises(RuntimeError, match=r"grader timed out on 100% of the responses.*max_reward_timeout_frac=0.5"):
        _with_reward(policy, tmp_path / "slow", timeouts).train_step()
    malformed = RewardSpec("_test_grader_down", accuracy=True, kwargs=(("status", "malformed"),))
    assert _with_reward(policy, tmp_path / "model", malformed).train_step()["reward/malformed_frac"] == 1.0


def test_overlong_term_reads_the_runs_response_budget(policy, tmp_path):
    """The task option overlong_buffer reaches the run's composer, which scores against RLConfig.max_new_tokens."""
    run = _run(policy, tmp_path)
    run.task = make_task("countdown", overlong_buffer=4, overlong_weight=0.5)
    run.rewards = RewardComposer(run.task.rewards)
    run.reset_stage_counters()
    s = run._sample(0)
    expected = np.clip((12 - 4 - s.out.lengths) / 4, -1, 0)  # max_new_tokens=12, buffer 4
    np.testing.assert_allclose(s.r["overlong"], expected, rtol=1e-6)
    np.testing.assert_allclose(s.r["total"], s.r["countdown"] + 0.5 * expected, rtol=1e-6)
    assert (s.out.lengths > 8).any() and (s.out.lengths <= 8).any()  # both zones of the penalty occur


def test_consecutive_skipped_updates_stop_the_run(policy, tmp_path):
    nan = RewardSpec("_test_grader_down", accuracy=True, kwargs=(("value", float("nan")), ("status", "ok")))
    run = _with_reward(policy, tmp_path / "nan", nan, num_minibatches=2, max_skipped_updates=3)
    assert run.train_step()["skipped_updates"] == 2  # 2 in a row: not yet
    with pytest.raises(RuntimeError, match=r"3 optimizer updates in a row were skipped.*max_skipped_updates=3"):
        run.train_step()


def test_minibatches_hold_whole_groups_and_warmup_counts_rl_steps(policy):
    with pytest.raises(ValueError, match="does not hold whole groups of G = 4.*num_minibatches=8"):
        RLConfig(prompts_per_step=4, group_size=4, num_minibatches=8).validate(policy.mesh)
    # the paper's 10 warm-up steps with 4 updates per RL step: full lr after 40 updates, not 10
    sched = make_schedule(OptimConfig(lr=1.0, warmup_steps=10), updates_per_step=4)
    assert [float(sched(n)) for n in (10, 20, 40)] == pytest.approx([0.25, 0.5, 1.0])
    run_lr = Learner(policy, optim_cfg=OptimConfig(lr=1.0, warmup_steps=10), updates_per_step=4).schedule
    assert float(run_lr(10)) == pytest.approx(0.25)


def test_no_silent_replication(caplog):
    """Slots and rows that do not divide over the batch devices would put a whole KV cache or batch on every
    chip: an error naming the option; a parameter dimension that falls back to replication is logged."""
    mesh = aj.make_mesh((1, 8, 1))
    for name, value in (("rollout_slots", 12), ("logprob_batch_size", 4), ("rollout_rows_per_pass", 4)):
        with pytest.raises(ValueError, match=f"RLConfig.{name}={value} does not divide over the mesh's batch axes"):
            RLConfig(prompts_per_step=4, group_size=4, **{name: value}).validate(mesh)
    RLConfig(prompts_per_step=4, group_size=4, rollout_slots=8, logprob_batch_size=8).validate(mesh)
    from arm_jax.sharding import DEFAULT_RULES
    with caplog.at_level("WARNING", logger="arm_jax.sharding"):
        spec = DEFAULT_RULES.spec(("kv_heads", "head_dim"), (3, 16), aj.make_mesh((1, 2, 4)))
    assert spec[0] is None and "'kv_heads' dimension of size 3 does not divide over mesh axis 'tensor'" in caplog.text
