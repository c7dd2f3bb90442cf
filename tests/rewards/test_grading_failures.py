"""Grading you can see: a grader that cannot start is an error naming the cause (not workers replaced forever), and
the reward composer counts each response's grading status."""

import functools
import importlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from arm_jax.rewards.pool import WorkerPool, WorkerStartupError
from arm_jax.rewards.registry import RewardComposer, RewardSpec, grading_metrics

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
    assert out["grading"].tolist() == [0, 1, 1, 4]  # timeout, error (answer too long), no_answer, graded
    assert grading_metrics(out["grading"]) == {"reward/timeout_frac": 0.0, "reward/error_frac": 0.25,
                                               "reward/no_answer_frac": 0.25}
