"""Grading you can see: a grader that cannot start is an error naming the cause (not workers replaced forever), the
reward composer counts each response's grading status, and only the grader's failures stop a run."""

import functools
import importlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from arm_jax.rewards.pool import WorkerPool, WorkerStartupError
from arm_jax.rewards.registry import Graded, RewardComposer, RewardSpec, grading_metrics, register_reward
from arm_jax.train.loop import RLConfig, check_grading

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_failed_warmup_is_a_named_error():
    failing = functools.partial(importlib.import_module, "no_such_grader_module")
    pool = WorkerPool(len, num_workers=1, warmup=failing, max_startup_failures=2, name="test grader")
    with pytest.raises(WorkerStartupError, match="test grader: 2 worker start-ups failed.*no_such_grader_module"):
        pool.wait_ready()


def test_script_grading_at_import_time_fails_instead_of_respawning(tmp_path):
    """Spawned workers re-import __main__: without an `if __name__ == "__main__":` guard each worker builds a pool
    itself and dies. Before, the pool replaced them forever (the script hung); now it stops with the cause."""
    script = tmp_path / "grade.py"
    script.write_text(textwrap.dedent("""
        import arm_jax as aj
        print(aj.math_reward(["\\\\boxed{1}"], ["1"]))
    """))
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)
    assert proc.returncode != 0
    assert "WorkerStartupError" in proc.stderr and 'if __name__ == "__main__":' in proc.stderr, proc.stderr[-2000:]


def test_composer_counts_statuses():
    comp = RewardComposer([RewardSpec("math", accuracy=True, kwargs=(("answer_format", "boxed"), ("workers", 1)))])
    comp.start()  # the grader's workers run before the first call
    assert len(comp.context["_math_grader"]) == 1
    try:
        out = comp(["\\boxed{4}", "no answer here", "\\boxed{5}", "\\boxed{" + "9" * 1200 + "}"],
                   [{"answer": "4"}] * 4, lengths=np.ones(4), max_len=8)
    finally:
        comp.close()
    np.testing.assert_array_equal(out["accuracy"], [1, 0, 0, 0])
    # timeout, error, no_answer, malformed (an answer too long to grade: the model's fault), graded
    assert out["grading"].tolist() == [0, 0, 1, 1, 4]


@register_reward("_test_statuses")
def _statuses(completions, examples, context):
    """Grades each completion with the status it names."""
    return Graded([0.0] * len(completions), list(completions))


def _grading(statuses):
    out = RewardComposer([RewardSpec("_test_statuses", accuracy=True)])(list(statuses), [{}] * len(statuses))
    return grading_metrics(out["grading"])


def test_statuses_say_whose_fault_and_only_the_graders_stop_a_run():
    """'no_answer' and 'malformed' are the model's (graded 0, counted, never an abort); 'error' and 'timeout' are
    the grader's: over their RLConfig fraction the run stops, naming the fraction and the option."""
    cfg = RLConfig()
    assert _grading(["ok", "malformed", "malformed", "no_answer"]) == {
        "reward/timeout_frac": 0.0, "reward/error_frac": 0.0, "reward/no_answer_frac": 0.25,
        "reward/malformed_frac": 0.5}
    check_grading(_grading(["malformed"] * 3 + ["no_answer"]), cfg, 0)  # all the model's: the run goes on
    check_grading(_grading(["timeout", "error", "ok", "ok"]), cfg, 0)  # half of each: not more than 0.5
    with pytest.raises(RuntimeError, match=r"step 4: 75% of the responses could not be graded.*"
                                           r"max_reward_error_frac=0.5: the reward is broken"):
        check_grading(_grading(["error"] * 3 + ["ok"]), cfg, 3)
    with pytest.raises(RuntimeError, match=r"step 1: the grader timed out on 75% of the responses.*"
                                           r"RLConfig.max_reward_timeout_frac=0.5"):
        check_grading(_grading(["timeout"] * 3 + ["malformed"]), cfg, 0)
    for off in (1.0, None):
        check_grading(_grading(["timeout"] * 4), RLConfig(max_reward_timeout_frac=off), 0)
    with pytest.raises(ValueError, match=r"RLConfig.max_reward_timeout_frac must be in \[0, 1\] or None, got 2"):
        RLConfig(max_reward_timeout_frac=2).validate(None)


def test_grading_counts_saved_before_malformed_resume():
    """A one-step-off checkpoint's waiting batches saved before 'malformed' was counted (4 counts) resume in
    today's layout; any other shape is an error naming the layout."""
    from arm_jax.rewards.registry import GRADING_STATUSES, upgrade_grading
    counts = dict(zip(GRADING_STATUSES + ("graded",), upgrade_grading(np.array([2, 1, 3, 16])).tolist()))
    assert counts == {"timeout": 2, "error": 1, "no_answer": 3, "malformed": 0, "graded": 16}
    today = np.arange(len(GRADING_STATUSES) + 1)
    assert upgrade_grading(today).tolist() == today.tolist()
    with pytest.raises(ValueError, match="malformed, graded"):
        upgrade_grading(np.zeros(3))
