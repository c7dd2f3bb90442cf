"""The trusted side of the code reward (`arm_jax.rewards.code_checks`): one sandbox per program and problem, values
crossing as data, the tests evaluated outside, per-test and whole-program limits, stop at the first failure or a
fraction. The forgeries themselves (as root and uid 65534, 200 trainer threads, 16 sandboxes at once) are
tests/rewards/test_sandbox_isolation.py."""

import time

import pytest

import arm_jax as aj
from arm_jax.rewards import sandbox_harness as wire
from arm_jax.rewards.code import SandboxLimits, run_asserts, run_humaneval, run_io_tests
from tests.rewards.sandbox_corpus import marked_processes, sandbox_dirs

# the program counts its runs in the sandbox's /tmp: 1, 2, 3 across cases means one sandbox served them all
COUNTER = ("import os\np = '/tmp/n'\nn = int(open(p).read()) + 1 if os.path.exists(p) else 1\n"
           "open(p, 'w').write(str(n))\ndata = open(0).read().split()\nprint(sum(map(int, data)), n)\n")


def test_values_cross_as_exact_builtin_data():
    for v in [None, True, 0, -7, 2 ** 80, 1.5, float("inf"), "é", b"\x00\xff", 1 + 2j, [1, (2, 3)], (), {1, 2},
              frozenset({"a"}), {(1, 2): [3], "k": {"n": None}}]:
        back = wire.decode(wire.encode(v))
        assert back == v and type(back) is type(v)
    assert wire.decode(wire.encode((1, [2]))) != [1, [2]]  # a tuple stays a tuple
    for bad in [iter([]), type("I", (int,), {})(3), object(), {1: object()}]:
        with pytest.raises(wire.NotData):
            wire.encode(bad)
    deep = []
    for _ in range(200):
        deep = [deep]
    with pytest.raises(wire.NotData):
        wire.encode(deep)
    for bad in [{"$": "tuple"}, {"$": "eval", "v": "1"}, {"$": "dict", "v": [[1]]}, {"a": 1},
                {"$": "set", "v": [[1]]}, {"$": "bytes", "v": "\u0100"}, [k * (2 ** 61 - 1) for k in range(1, 100)],
                wire.encode([complex(-1000003.0 * k, k) for k in range(1, 100)]),  # complex numbers hashing alike
                wire.encode([(k * (2 ** 61 - 1), 1) for k in range(1, 100)]),  # tuples of colliding ints
                [[]] * (wire.MAX_NODES + 1)]:
        with pytest.raises(wire.NotData):
            wire.decode(bad)


def test_stdin_stdout_one_sandbox_per_program_fresh_state_per_case():
    reward, runs = run_io_tests(COUNTER, [("1 2", "3 1"), ("5 5", "10 2"), ("0", "0 3")])
    assert reward == 1.0 and [r.status for r in runs] == ["ok"] * 3  # /tmp kept: one sandbox; each case from main
    state = "import sys\nseen = getattr(sys, 'seen', 0)\nsys.seen = seen + 1\nprint(sys.seen)\n"
    reward, _ = run_io_tests(state, [("", "1"), ("", "1")])
    assert reward == 1.0  # interpreter state does not carry from one case to the next
    buf = "import sys\nx = sys.stdin.buffer.read().split()\nsys.stdout.write(str(int(x[0]) * 2) + '\\n')\n"
    assert run_io_tests(buf, [("21", "42")])[0] == 1.0


def test_per_test_limit_stop_at_first_failure_and_fraction():
    slow = "import time\nx = int(input())\nif x == 2:\n    time.sleep(60)\nprint(x)\n"
    cases = [("1", "1"), ("2", "2"), ("3", "3"), ("4", "0")]
    limits = SandboxLimits(timeout_s=30.0, test_timeout_s=1.0)
    t = time.monotonic()
    reward, runs = run_io_tests(slow, cases, limits=limits)
    assert reward == 0.0 and [r.status for r in runs] == ["ok", "timeout"] and time.monotonic() - t < 10
    reward, runs = run_io_tests(slow, cases, limits=limits, fraction=True)
    assert reward == pytest.approx(2 / 4) and [r.status for r in runs] == ["ok", "timeout", "ok", "failed"]
    code = "def f(x):\n    while x == 2:\n        pass\n    return x\n"
    r = run_asserts(code, ["assert f(1) == 1", "assert f(2) == 2", "assert f(3) == 3"], limits=limits)
    assert (r.passed, r.status, r.passed_tests, r.num_tests) == (False, "timeout", 1, 3)
    r = run_asserts("def f(x):\n    return x if x != 2 else 0\n", ["assert f(1) == 1", "assert f(2) == 2",
                                                                   "assert f(3) == 3"], fraction=True)
    assert (r.passed, r.status, r.passed_tests, r.num_tests) == (False, "failed", 2, 3)


def test_whole_program_limit_across_tests():
    code = "import time\ndef f(x):\n    time.sleep(0.8)\n    return x\n"
    tests = [f"assert f({i}) == {i}" for i in range(6)]
    r = run_asserts(code, tests, limits=SandboxLimits(timeout_s=2.5, test_timeout_s=2.0))
    assert r.status == "timeout" and 2 <= r.passed_tests < 6  # each test within its limit, the program not


def test_function_tests_see_the_solution_as_python_would():
    # the solution's `import math` serves the test's math.isclose (the trusted side's own math module)
    r = run_asserts("import math\ndef v(r):\n    return 4 / 3 * math.pi * r ** 3\n",
                    ["assert math.isclose(v(10), 4188.790204786391, rel_tol=0.001)"])
    assert r.passed, r.stderr
    assert not run_asserts("def f():\n    return [1, 2]\n", ["assert f() == (1, 2)"]).passed  # list != tuple
    assert not run_asserts("def f():\n    return (x for x in [1])\n", ["assert list(f()) == [1]"]).passed
    assert run_asserts("K = 3\ndef f(x):\n    return x * K\n", ["assert f(K) == 9"]).passed  # data names cross
    # an exception the test expects, by its builtin type
    test = ("def check(candidate):\n    try:\n        candidate(-1)\n    except ValueError:\n        pass\n"
            "    else:\n        assert False\n    assert candidate(4) == 2\n")
    right = "    if x < 0:\n        raise ValueError('negative')\n    return int(x ** 0.5)\n"
    assert run_humaneval("def root(x):\n", right, test, "root").passed
    assert not run_humaneval("def root(x):\n", "    return int(abs(x) ** 0.5)\n", test, "root").passed


def test_a_test_that_cannot_cross_is_the_graders_error():
    r = run_asserts("def apply(f, x):\n    return f(x)\n", ["assert apply(lambda v: v + 1, 1) == 2"])
    assert (r.passed, r.status) == (False, "error")


@pytest.mark.parametrize("forged", [
    b'{"raised": 5}',                                   # a load answer of the wrong shape
    b'{"kinds": [], "values": []}',                      # a lookup answer of the wrong shape
    b'{"value": {"$": "set", "v": [[1]]}}',              # an unhashable set member
    b'{"value": {"$": "bytes", "v": "\\u0100"}}',        # bytes beyond latin-1
    b'[1, 2]',                                           # not an answer at all
    b'{"value": 3}\n{"value": 3}\n{"value": 3}',         # answers for requests not yet sent
])
def test_forged_answers_are_failed_runs_and_leave_nothing(forged):
    """The program writes answers itself on the answer pipe (its descriptor is argv[2]): whatever it writes is at
    most its own wrong answer; nothing escapes the check, no sandbox is left running, nothing stays on disk."""
    line = forged + b"\n"
    program = f"import os, sys\nos.write(int(sys.argv[2]), {line!r})\ndef add(a, b):\n    return 3\n"
    before = sandbox_dirs()
    r = run_asserts(program, ["assert add(1, 2) == 3", "assert add(2, 2) == 4"])
    assert not r.passed and r.status in ("failed", "timeout")
    assert sandbox_dirs() == before


def test_a_module_the_solution_names_is_never_imported_here():
    """A solution binding a test's name to a module of its choosing (`this`, `unittest.__main__`) makes the
    trusted side import nothing: only the solution's standard test modules (math, re, ...) are bound, ours."""
    import sys
    gone = [m for m in ("this", "unittest.__main__", "venv.__main__") if m not in sys.modules]
    for mod in gone:
        prog = f"import types\nadd = types.ModuleType({mod!r})\n"
        r = run_asserts(prog, ["assert add(1, 2) == 3"])
        assert not r.passed and mod not in sys.modules


def test_hash_flooded_answers_are_refused_quickly():
    """Ints that all hash alike would cost the trusted side's set() n^2: such an answer is not data."""
    prog = "def f():\n    return [k * (2 ** 61 - 1) for k in range(1, 150001)]\n"
    t = time.monotonic()
    r = run_asserts(prog, ["assert len(set(f())) == 150000"])
    assert not r.passed and time.monotonic() - t < 5.0
    assert run_asserts("def f():\n    return list(range(150000))\n", ["assert len(set(f())) == 150000"]).passed


def test_work_is_a_sized_tmpfs_not_the_trainers_disk():
    r = aj.run_code("for i in range(40):\n    open(f'f{i}', 'w').write('x' * 10**6)\n", timeout_s=10.0)
    assert (r.passed, r.status) == (False, "output_limit")  # 16 MB of /work, then ENOSPC


def test_fraction_continues_past_a_test_that_times_out():
    code = "def f(x):\n    while x == 2:\n        pass\n    return x\n"
    r = run_asserts(code, ["assert f(1) == 1", "assert f(2) == 2", "assert f(3) == 3", "assert f(4) == 4"],
                    limits=SandboxLimits(timeout_s=30.0, test_timeout_s=1.0), fraction=True)
    assert (r.passed, r.status, r.passed_tests, r.num_tests) == (False, "timeout", 3, 4)


def test_a_function_named_like_a_builtin():
    """Builtins the tests use stay the trusted side's (a solution's module-level `set` changes nothing) unless the
    problem names the function (`functions=`, e.g. MBPP's reference solution's own `def pow`)."""
    wrong, right = "def pow(a, b):\n    return 42\n", "def pow(a, b):\n    return a ** b\n"
    assert not run_asserts(wrong, ["assert pow(2, 3) == 8"], functions=("pow",)).passed
    assert run_asserts(right, ["assert pow(2, 3) == 8"], functions=("pow",)).passed
    assert not run_asserts("print(1)\n", ["assert pow(2, 3) == 8"], functions=("pow",)).passed  # never defined
    # the code reward names them from the record's reference solution
    from arm_jax.rewards.registry import RewardComposer, RewardSpec
    ex = {"question": "pow", "solution": right, "tests": '{"setup": "", "asserts": ["assert pow(2, 3) == 8"]}'}
    out = RewardComposer([RewardSpec("code", accuracy=True)]).start()(
        [f"```python\n{wrong}```", f"```python\n{right}```", "```python\nprint(1)\n```"], [ex] * 3)
    assert out["accuracy"].tolist() == [0.0, 1.0, 0.0]


def test_a_program_in_its_own_session_dies_with_its_sandbox():
    """A program that leaves its process group (setsid) and outlives its time: killing the sandbox kills the pid
    namespace's first process, so nothing of it is left (in mode 'root' setpriv's uid change drops unshare's
    parent-death signal, so killing the process group alone left it running)."""
    marker = "61.2718"
    prog = f"import os\nos.setsid()\nos.execv('/bin/sleep', ['sleep', '{marker}'])\n"
    r = run_asserts(prog, ["assert f(1) == 1"], limits=SandboxLimits(timeout_s=2.0))
    assert not r.passed and r.status == "timeout"
    time.sleep(0.5)
    assert marked_processes(marker) == 0


def test_a_program_that_stops_reading_cannot_block_the_trainer():
    """The program shrinks its request pipe to a page and stops reading; a request larger than that must end in
    the time limit, not block the calling thread forever."""
    prog = r"""
import fcntl, os, sys, time
req, resp = int(sys.argv[1]), int(sys.argv[2])
fcntl.fcntl(req, 1031, 4096)  # F_SETPIPE_SZ: one page
os.write(resp, b'{"ok": true}\n')  # answers the load itself,
buf = b""
while b"\n" not in buf:
    buf += os.read(req, 1)  # reads the lookup (the pipe is empty again: select says writable)
os.write(resp, b'{"kinds": {"f": "callable"}, "values": {}}\n')
time.sleep(60)  # and never reads again
"""
    t = time.monotonic()
    r = run_asserts(prog, ["assert f('x' * 100000) == 100000"], limits=SandboxLimits(timeout_s=3.0))
    assert not r.passed and time.monotonic() - t < 10


def test_the_programs_own_deep_answer_and_crash_output():
    """An answer nested as deep as decoding allows, passed back into the solution, is the program's failure, not the
    grader's 'error' (which counts toward stopping a run); a stdin/stdout case's MemoryError reaches its status."""
    deep = ("def f(x):\n    out = x\n    for _ in range(%d):\n        out = [out]\n    return out\n"
            "def g(x):\n    return 0\n" % wire.DECODE_DEPTH)
    r = run_asserts(deep, ["assert g([[f(1)]]) == 0"])  # the test nests the answer two levels more
    assert (r.passed, r.status) == (False, "failed")
    reward, runs = run_io_tests("x = bytearray(2 * 10**9)\n", [("", "")], limits=SandboxLimits(memory_mb=256))
    assert reward == 0.0 and runs[-1].status == "memory" and "MemoryError" in runs[-1].stderr


def test_no_tests_decide_nothing():
    assert run_asserts("def f():\n    return 1\n", []).status == "error"
    assert run_io_tests("print(1)\n", [])[1][-1].status == "error"
