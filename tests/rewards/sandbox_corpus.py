"""The hostile corpus and the reward exploits, run by a "trainer" process (root, or an unprivileged uid through
`setpriv`; see tests/rewards/test_sandbox_isolation.py). Standalone: it needs only `arm_jax.rewards.code` and the
standard library, so an unprivileged user can run it with a copied interpreter.

    python sandbox_corpus.py OUT.json      # with SECRET_TOKEN=hunter2 in the environment

The "trainer" holds 200 threads throughout and grades the forgeries of `forgeries.py` 16 sandboxes at once.
Each hostile program exits 0 exactly when its attack worked, so without the sandbox it would earn 1; the table
records reward, status and what was left behind (processes whose command line carries the program's marker,
sandbox folders, the file written outside). Each exploit of the reward harnesses is paired with a correct solution.
"""

import json
import os
import socket
import sys
import tempfile
import threading

from arm_jax.rewards.code import (SandboxLimits, _run, run_asserts, run_code, run_humaneval, run_io_tests,
                                  sandbox_capabilities)

MARKER = "ARMJAXHOSTILE"
LEAKS = ("environ of the trainer", "environ of any process", "signal the trainer", "0600 file of the trainer",
         "loopback network", "write outside the sandbox")  # harmless to run unisolated: the control rows


def hostile(pid: int, secret_file: str, port: int, outside: str) -> dict[str, str]:
    done = "\nimport os\nos._exit(0)\n"  # reached only when the attack above worked
    return {
        "environ of the trainer": f"d = open('/proc/{pid}/environ', 'rb').read()\nassert b'hunter2' in d" + done,
        "environ of any process": "import os\nfound = False\nfor p in os.listdir('/proc'):\n    try:\n"
                                  "        found |= b'hunter2' in open(f'/proc/{p}/environ', 'rb').read()\n"
                                  "    except Exception:\n        pass\nassert found" + done,
        "signal the trainer": f"import os\nos.kill({pid}, 0)" + done,
        "0600 file of the trainer": f"assert 'hunter2' in open({secret_file!r}).read()" + done,
        "loopback network": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)" + done,
        "write outside the sandbox": f"open({outside!r}, 'w').write('x')" + done,
        "daemon outliving its program": "import os, sys, time\nif os.fork() == 0:\n    os.setsid()\n"
                                        "    if os.fork() == 0:\n        os.execv(sys.executable, [sys.executable,"
                                        f" '-c', 'import time; time.sleep(60)', '{MARKER}'])\n    os._exit(0)\n"
                                        "time.sleep(0.5)\nraise SystemExit(1)  # its reward is not the point",
        "fork bomb": "import os, time\nkids = 0\nfor _ in range(2000):\n    if os.fork() == 0:\n"
                     "        time.sleep(60)\n        os._exit(0)\n    kids += 1\nassert kids == 2000" + done,
        "3 GB allocation": "x = bytearray(3 * 10**9)\nx[::4096] = b'1' * len(x[::4096])" + done,
        "2 GB of output": "import sys\nfor _ in range(2048):\n    sys.stdout.write('x' * 2**20)" + done,
        "infinite loop": "while True:\n    pass" + done,
    }


ADD = ["assert add(1, 2) == 3", "assert add(-4, 4) == 0"]
HE_PROMPT = "def add(a, b):\n    \"\"\"Sum of a and b.\"\"\"\n"
HE_TEST = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-4, 4) == 0\n"
ALWAYS_EQUAL = "class Any:\n    def __eq__(self, other):\n        return True\n    __hash__ = object.__hash__\n"
EXPLOITS = {  # name -> (harness, program, expected reward)
    "asserts: correct solution": ("asserts", "def add(a, b):\n    return a + b\n", 1.0),
    "asserts: os._exit(0)": ("asserts", "import os\nos._exit(0)\n", 0.0),
    "asserts: sys.exit(0)": ("asserts", "import sys\nsys.exit(0)\n", 0.0),
    "asserts: atexit hook exits 0": ("asserts", "import atexit, os\natexit.register(lambda: os._exit(0))\n"
                                     "def add(a, b):\n    return 0\n", 0.0),
    "asserts: always-equal object": ("asserts", ALWAYS_EQUAL + "def add(a, b):\n    return Any()\n", 0.0),
    "asserts: crash after partial output": ("asserts", "print('ARM_JAX_CHECKS_DONE_' + '0' * 32)\n"
                                            "raise RuntimeError\n", 0.0),
    "asserts: replaces builtins.exec": ("asserts", "import builtins\nbuiltins.exec = lambda *a, **k: None\n", 0.0),
    "asserts: prints its program files": ("asserts", "import os\nfor f in os.listdir('.'):\n"
                                          "    print(open(f).read()[-300:])\nos._exit(0)\n", 0.0),
    "humaneval: canonical": ("humaneval", "    return a + b\n", 1.0),
    "humaneval: always-equal object": ("humaneval", "    return Any()\n" + ALWAYS_EQUAL, 0.0),
    "humaneval: sys.exit(0) in the body": ("humaneval", "    import sys\n    sys.exit(0)\n", 0.0),
    "io: correct, ends with sys.exit(0)": ("io", "a, b = map(int, input().split())\nprint(a + b)\n"
                                           "import sys\nsys.exit(0)\n", 1.0),
    "io: right output then crash": ("io", "a, b = map(int, input().split())\nprint(a + b, flush=True)\n"
                                    "raise RuntimeError\n", 0.0),
    # stdin/stdout is graded by the output and the exit status, outside (as LiveCodeBench does): a program that
    # prints the right answer and leaves with os._exit(0) is correct
    "io: right output then os._exit(0)": ("io", "import os\na, b = map(int, input().split())\n"
                                          "print(a + b, flush=True)\nos._exit(0)\n", 1.0),
    "io: right output, never flushed, os._exit(0)": ("io", "import os\na, b = map(int, input().split())\n"
                                                     "print(a + b)\nos._exit(0)\n", 0.0),
}


def marked_processes(marker: str = MARKER) -> int:
    """How many processes carry `marker` in their command line."""
    n = 0
    for p in os.listdir("/proc"):
        try:
            n += marker.encode() in open(f"/proc/{p}/cmdline", "rb").read()
        except OSError:
            pass
    return n


def sandbox_dirs() -> set:
    """The sandbox folders in the temporary directory now."""
    tmp = tempfile.gettempdir()
    return {d for d in os.listdir(tmp) if d.startswith("arm_jax_sbx_")}


def _run_exploit(harness: str, program: str, limits: SandboxLimits) -> tuple[float, str]:
    if harness == "asserts":
        r = run_asserts(program, ADD, limits=limits)
    elif harness == "humaneval":
        r = run_humaneval(HE_PROMPT, program, HE_TEST, "add", limits=limits)
    else:
        reward, runs = run_io_tests(program, [("1 2\n", "3\n")], limits=limits)
        return reward, runs[-1].status
    return float(r.passed), r.status


def _hold_threads(n: int) -> threading.Event:
    """Starts n threads that wait until the returned event is set: the trainer as JAX makes it (17 threads on 2
    cores, hundreds on a TPU host), all of this uid."""
    release = threading.Event()
    for _ in range(n):
        threading.Thread(target=release.wait, daemon=True).start()
    return release


def _beside_fork_bombs(limits: SandboxLimits) -> list[dict]:
    """4 fork bombs holding every process they may while 12 right solutions run beside them, 16 sandboxes at once:
    a right solution must not pay for another sandbox's processes."""
    from arm_jax.rewards.code import run_many
    bomb = ("import os, time\nfor _ in range(2000):\n    try:\n        pid = os.fork()\n    except OSError:\n"
            "        time.sleep(2.5)\n        break\n    if pid == 0:\n        time.sleep(3)\n        os._exit(0)\n")
    jobs = [("bomb", None)] * 4 + [("right", None)] * 12
    slow = SandboxLimits(timeout_s=4.0, memory_mb=limits.memory_mb)

    def one(job):
        if job[0] == "bomb":
            return 0.0, run_code(bomb, limits=slow).status
        r = run_asserts("import time\ntime.sleep(0.5)\ndef add(a, b):\n    return a + b\n", ADD, limits=limits)
        return float(r.passed), r.status
    return [{"kind": "beside fork bombs", "program": f"{kind} #{i}", "reward": reward, "status": status,
             "expected": 0.0 if kind == "bomb" else 1.0, "left_behind": []}
            for i, ((kind, _), (reward, status)) in enumerate(zip(jobs, run_many(one, jobs, max_workers=16)))]


def main(out_path: str) -> None:
    assert os.environ.get("SECRET_TOKEN") == "hunter2", "run with SECRET_TOKEN=hunter2 (the trainer's secret)"
    release = _hold_threads(200)
    threads = threading.active_count()
    caps = sandbox_capabilities()
    home = tempfile.mkdtemp(prefix="arm_jax_trainer_")
    secret_file = os.path.join(home, "secret.txt")
    with open(secret_file, "w") as f:
        f.write("hunter2")
    os.chmod(secret_file, 0o600)
    outside = os.path.join(home, "written_from_the_sandbox.txt")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.05)
    limits = SandboxLimits(timeout_s=3.0, memory_mb=512)
    rows = []
    before = sandbox_dirs()
    for name, prog in hostile(os.getpid(), secret_file, listener.getsockname()[1], outside).items():
        res = run_code(prog, limits=limits)
        try:
            listener.accept()[0].close()
            connected = True
        except OSError:
            connected = False
        left = []
        if marked_processes():
            left.append("process")
        if os.path.exists(outside):
            left.append("file outside")
            os.remove(outside)
        if sandbox_dirs() - before:
            left.append("sandbox folder")
        if connected:
            left.append("a connection")
        rows.append({"kind": "hostile", "program": name, "reward": float(res.passed), "status": res.status,
                     "left_behind": left, "seconds": round(res.duration_s, 2)})
    for name, prog in hostile(os.getpid(), secret_file, listener.getsockname()[1], outside).items():
        if name in LEAKS:  # the same attacks without isolation succeed: the rows above can fail
            res = _run({"main.py": prog}, limits, None)
            rows.append({"kind": "control (unisolated)", "program": name, "reward": float(res.passed),
                         "status": res.status, "left_behind": []})
            if os.path.exists(outside):
                os.remove(outside)
            try:
                listener.accept()[0].close()
            except OSError:
                pass
    for name, (harness, prog, expected) in EXPLOITS.items():
        reward, status = _run_exploit(harness, prog, limits)
        rows.append({"kind": "exploit", "program": name, "reward": reward, "status": status, "expected": expected,
                     "left_behind": ["sandbox folder"] if sandbox_dirs() - before else []})
    from forgeries import table  # wrong solutions acting from inside their process, and right ones: 16 at once
    for row in table(workers=16):
        rows.append({"kind": "forgery" if row["must_earn"] == 0.0 else "right solution", "program": row["case"],
                     "reward": row["reward"], "status": row["status"], "expected": row["must_earn"],
                     "left_behind": ["sandbox folder"] if sandbox_dirs() - before else []})
    rows += _beside_fork_bombs(limits)
    nested = run_code("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                      "assert libc.unshare(0x10000000) == 0\nos._exit(0)\n", limits=limits)  # CLONE_NEWUSER
    rows.append({"kind": "nested user namespace", "program": "unshare(CLONE_NEWUSER) inside the sandbox",
                 "reward": float(nested.passed), "status": nested.status, "left_behind": []})
    listener.close()
    release.set()
    with open(out_path, "w") as f:
        json.dump({"uid": os.getuid(), "threads": threads, "capabilities": caps, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
