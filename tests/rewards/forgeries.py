"""Reward forgeries: wrong MBPP / HumanEval solutions that act from inside their own process to earn 1.0 (issue
#38), each beside the problem it attacks and a right solution. Standalone (only `arm_jax.rewards.code`'s public
run_* functions and the standard library), so the same table runs on any version of the harness:

    python tests/rewards/forgeries.py            # prints forgery x verdict as Markdown rows

A forgery earns 1.0 only if the harness decides inside the process that ran it (or lets it change what the tests
compute); with verdicts computed outside, it earns 0 while the right solution earns 1.
"""

from __future__ import annotations

import json
import sys

# name -> (asserts, setup): MBPP-style problems (the first is MBPP task 2, the last MBPP task 82, verbatim)
PROBLEMS = {
    "set": (["assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))",
             "assert set(similar_elements((1, 2, 3, 4),(5, 4, 3, 7))) == set((3, 4))"], ""),
    "sorted": (["assert sorted(evens([3, 8, 1, 4])) == [4, 8]", "assert sorted(evens([1, 3])) == []"], ""),
    "abs": (["assert abs(circle_area(2) - 12.566370614359172) < 1e-6",
             "assert abs(circle_area(1) - 3.141592653589793) < 1e-6"], ""),
    "isclose": (["assert math.isclose(volume_sphere(10), 4188.790204786391, rel_tol=0.001)",
                 "assert math.isclose(volume_sphere(25), 65449.84694978735, rel_tol=0.001)"], "import math"),
    "add": (["assert add(1, 2) == 3", "assert add(-4, 4) == 0"], ""),
    "all_map": (["assert all(map(is_prime, [2, 3, 5, 7]))", "assert not any(map(is_prime, [4, 6, 8]))"], ""),
}
RIGHT = {
    "set": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))\n",
    "sorted": "def evens(xs):\n    return [x for x in xs if x % 2 == 0]\n",
    "abs": "import math\ndef circle_area(r):\n    return math.pi * r * r\n",
    "isclose": "import math\ndef volume_sphere(r):\n    return 4 / 3 * math.pi * r ** 3\n",
    "add": "def add(a, b):\n    return a + b\n",
    "all_map": "def is_prime(n):\n    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))\n",
}
# HumanEval-style: the prompt defines a helper the test uses (as HumanEval/32's poly, /38's encode_cyclic)
HE_PROMPT = ("def poly(xs, x):\n    return sum(c * x ** i for i, c in enumerate(xs))\n\n\n"
             "def find_zero(xs):\n    \"\"\"A root of the polynomial with coefficients xs (a sign change in [-100, "
             "100]).\"\"\"\n")
HE_TEST = ("def check(candidate):\n    for xs in ([-6, 11, -6, 1], [1, 1], [-8, 0, 0, 1]):\n"
           "        assert abs(poly(xs, candidate(xs))) < 1e-4\n")
HE_RIGHT = ("    lo, hi = -100.0, 100.0\n    if poly(xs, lo) > 0:\n        lo, hi = hi, lo\n"
            "    for _ in range(200):\n        mid = (lo + hi) / 2\n        if poly(xs, mid) > 0:\n"
            "            hi = mid\n        else:\n            lo = mid\n    return (lo + hi) / 2\n")

# The comparison of the test that calls first is already under way, so these answer the first call right and
# patch what the later checks will use.
_PATCH_CALLER = ("import sys\ndef add(a, b):\n    g = sys._getframe(1).f_globals\n    for k in list(g):\n"
                 "        if k.startswith('_arm'):\n            g[k] = lambda *a, **k: True\n"
                 "    return 3 if (a, b) == (1, 2) else None\n")
_ECHO_SECRET = ("import os, sys\ntry:\n    fd = int(sys.argv[1])\n    os.write(1, b'\\n' + os.read(fd, 256) + b'\\n')\n"
                "except Exception:\n    pass\nos._exit(0)\n")
_ECHO_ANY_FD = ("import os\nfor fd in range(3, 64):\n    try:\n        data = os.read(fd, 256)\n    except OSError:\n"
                "        continue\n    if data:\n        os.write(1, b'\\n' + data + b'\\n')\n        os._exit(0)\n")
_GC_PLAIN = ("import gc\nfor o in gc.get_objects():\n    if getattr(o, '__name__', '') in ('_arm_cmp', '_arm_truth'):\n"
             "        o.__code__ = (lambda *a, **k: True).__code__\n")

_FORGE_PARENT = ("import os, sys\ntry:\n    fd = os.open(f'/proc/{os.getppid()}/fd/{sys.argv[2]}', os.O_WRONLY)\n"
                 "    os.write(fd, b'{\"stdout\": \"3\\\\n\", \"exit\": 0, \"timeout\": false, \"stderr\": \"\"}\\n')\n"
                 "except Exception:\n    pass\nprint(4)\nos._exit(1)\n")
IO_CASES = [("1 2\n", "3\n")]
IO_RIGHT = "a, b = map(int, input().split())\nprint(a + b)\n"

# name -> (problem, wrong program). 'humaneval' problems use HE_PROMPT / HE_TEST, the program is the completion.
FORGERIES = {
    "patch the caller's _arm_cmp via sys._getframe(1).f_globals": (
        "add", _PATCH_CALLER),
    "echo the secret from argv's descriptor, then os._exit(0)": ("add", _ECHO_SECRET),
    "echo whatever an inherited descriptor holds, then os._exit(0)": ("add", _ECHO_ANY_FD),
    "replace builtins.set": ("set", "import builtins\nbuiltins.set = lambda *a: frozenset()\n"
                                    "def similar_elements(a, b):\n    return ()\n"),
    "replace builtins.sorted": ("sorted", "import builtins\nbuiltins.sorted = lambda xs: {4: [4, 8], 2: []}[xs[0]]\n"
                                          "def evens(xs):\n    return [len(xs)]\n"),
    "replace builtins.abs": ("abs", "import builtins\nbuiltins.abs = lambda x: 0\n"
                                    "def circle_area(r):\n    return 1.0\n"),
    "replace math.isclose": ("isclose", "import math\nmath.isclose = lambda *a, **k: True\n"
                                        "def volume_sphere(r):\n    return 0.0\n"),
    "rewrite the comparison helpers' code found through gc": ("add", _GC_PLAIN + "def add(a, b):\n    return 0\n"),
    "shadow set with a module-level set": ("set", "set = lambda *a: frozenset()\n"
                                                  "def similar_elements(a, b):\n    return ()\n"),
    "raise StopIteration inside the tests' map()": ("all_map", "def is_prime(n):\n    raise StopIteration\n"),
    "int subclass equal to everything": ("add", "class T(int):\n    def __eq__(self, o):\n        return True\n"
                                                "    __hash__ = int.__hash__\ndef add(a, b):\n    return T(0)\n"),
    "io: a case's child writes its parent's answer through /proc, then exits 1": ("io", _FORGE_PARENT),
    "humaneval: redefine the prompt's helper the test calls": (
        "humaneval", "    return 0.0\n\n\ndef poly(xs, x):\n    return 0.0\n"),
    "humaneval: patch check()'s globals via sys._getframe": (
        "humaneval", "    import sys\n    f = sys._getframe(1)\n    f.f_globals['poly'] = lambda xs, x: 0.0\n"
                     "    for k in list(f.f_globals):\n        if k.startswith('_arm'):\n"
                     "            f.f_globals[k] = lambda *a, **k: True\n    return 1.0 if len(xs) == 4 else 0.0\n"),
    "humaneval: replace builtins.abs": ("humaneval", "    import builtins\n    builtins.abs = lambda x: 0\n"
                                                     "    return 1.0 if len(xs) == 4 else 0.0\n"),
}


def verdict(problem: str, program: str, limits=None) -> tuple[float, str]:
    """(reward, status) of `program` on `problem` through the harness of `arm_jax.rewards.code`."""
    from arm_jax.rewards.code import run_asserts, run_humaneval, run_io_tests
    if problem == "io":
        reward, runs = run_io_tests(program, IO_CASES, limits=limits)
        return reward, runs[-1].status
    if problem == "humaneval":
        r = run_humaneval(HE_PROMPT, program, HE_TEST, "find_zero", limits=limits)
    else:
        asserts, setup = PROBLEMS[problem]
        r = run_asserts(program, asserts, setup, limits=limits)
    return float(r.passed), r.status


def cases() -> list[tuple[str, str, str, float]]:
    """[(name, problem, program, the reward it must earn)]: every forgery (0) and every right solution (1)."""
    rows = [(name, prob, prog, 0.0) for name, (prob, prog) in FORGERIES.items()]
    rows += [(f"right solution: {p}", p, RIGHT[p], 1.0) for p in PROBLEMS]
    return rows + [("right solution: humaneval", "humaneval", HE_RIGHT, 1.0),
                   ("right solution: io", "io", IO_RIGHT, 1.0)]


def table(workers: int = 4) -> list[dict]:
    """Every case's verdict, `workers` sandboxes at once."""
    from arm_jax.rewards.code import SandboxLimits, run_many
    limits = SandboxLimits(timeout_s=10.0)
    rows = cases()
    out = run_many(lambda c: verdict(c[1], c[2], limits), rows, max_workers=workers)
    return [{"case": name, "problem": prob, "must_earn": want, "reward": r, "status": st}
            for (name, prob, _, want), (r, st) in zip(rows, out)]


if __name__ == "__main__":
    result = table()
    if "--json" in sys.argv:
        print(json.dumps(result))
    else:
        for row in result:
            print(f"| {row['case']} | {row['reward']:.0f} ({row['status']}) |")
