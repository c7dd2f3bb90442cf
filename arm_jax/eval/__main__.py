"""`python -m arm_jax.eval --checkpoint=DIR --benchmark=math500 --n=32 --temperature=0.6 --top_p=0.95 --out=DIR`

Samples n responses per problem from an HF checkpoint folder, grades them (math-verify, or the sandbox for code
benchmarks), and writes `eval.json` (per-benchmark Pass@k for every power of two <= n and n, Avg@n, Maj@k, mean
token entropy, diversity: distinct-2, distinct answers / distinct correct per problem, mean pairwise similarity,
spread of answer confidence among correct responses, the grader's statuses `grading`: the share of responses per
status), `eval.md` (a Markdown table) and `pass_at_k.png`; with `--runs label=metrics.jsonl,...` also
`training_curves.png` (reward / entropy / length / confidence spread). A benchmark whose grader timed out or failed
on more responses than `--max_reward_timeout_frac` / `--max_reward_error_frac` (RLConfig's limits) is warned about
on stderr, in its `warnings` and in eval.md; the evaluation is never aborted for it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import numpy as np

from arm_jax.data.builders import load_split
from arm_jax.data.templates import dataset_format
from arm_jax.eval import diversity as D
from arm_jax.eval import plots
from arm_jax.eval.passk import pass_at_k_curve
from arm_jax.eval.sampled import grading_warning, sample_and_grade
from arm_jax.policy import load_policy
from arm_jax.data.tokenizers import default_stop_ids
from arm_jax.data.answers import extract_answer
from arm_jax.rewards.registry import RewardComposer, grading_metrics
from arm_jax.rewards.tasks import split_encoder, split_rewards
from arm_jax.rollout.sampler import EngineOptions
from arm_jax.train.rl_config import RLConfig


def evaluate_benchmark(policy, benchmark: str, records: list[dict], *, n: int, temperature: float, top_p: float,
                       max_new_tokens: int, seed: int = 0, chunk_rows: int = 256,
                       engine: EngineOptions = EngineOptions(), logprob_batch_size: Optional[int] = None,
                       max_error_frac: float = RLConfig.max_reward_error_frac,
                       max_timeout_frac: Optional[float] = RLConfig.max_reward_timeout_frac) -> dict:
    """Samples and grades `records` through the RL loop's evaluation pipeline (`arm_jax.eval.sampled`), each
    benchmark asked and graded in its own format (`arm_jax.data.templates.dataset_format`, as a task's held-out
    split is in the loop), with the tasks' stop ids (the tokenizer's and the checkpoint's eos ids), then adds
    Maj@k, the diversity metrics and the grader's statuses ('grading': {status: share of responses}); 'warnings'
    lists a grader that failed on more than max_error_frac ('error') or max_timeout_frac ('timeout') of them,
    also printed to stderr (never an abort)."""
    tok = policy.tokenizer
    fmt = dataset_format(benchmark)
    code = fmt.answer_format is None
    composer = RewardComposer(split_rewards(fmt)).start()
    encode = split_encoder(tok, fmt)
    try:
        graded = sample_and_grade(
            policy, records, encode=lambda r: encode(r)[0],
            decode=lambda ids: tok.decode(list(ids), skip_special_tokens=True),
            grade=lambda texts, ex, lengths, max_len: composer(texts, ex, lengths=lengths, max_len=max_len),
            stop_ids=sorted(set(default_stop_ids(tok)) | set(policy.config.eos_token_ids)), n=n,
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, chunk_rows=chunk_rows,
            engine=engine, logprob_batch_size=logprob_batch_size)
    finally:
        composer.close()
    per_problem = [{"correct": c.tolist(), "texts": t, "conf": f.tolist(),
                    "answers": [None if code else extract_answer(x, fmt.answer_format) for x in t]}
                   for c, t, f in zip(graded.correct, graded.texts, graded.confidence)]
    correct = np.array([p["correct"] for p in per_problem], dtype=np.int32)
    ks = sorted({2 ** i for i in range(int(np.log2(n)) + 1)} | {n})
    res = {"benchmark": benchmark, "problems": len(per_problem), "n": n, "temperature": temperature, "top_p": top_p,
           "pass_at_k": pass_at_k_curve(correct, ks), "avg@n": float(correct.mean()),
           "maj_at_k": {k: float(np.mean([D.maj_at_k(p["answers"], p["correct"], k) for p in per_problem]))
                        for k in ks},
           "entropy": graded.mean_token_entropy,
           "distinct_2": float(np.mean([D.distinct_n(p["texts"], 2) for p in per_problem])),
           "distinct_answers": float(np.mean([len({a for a in p["answers"] if a is not None})
                                              for p in per_problem])),
           "distinct_correct": float(np.mean([D.distinct_count(p["texts"], p["correct"]) for p in per_problem])),
           "pairwise_similarity": float(np.mean([D.mean_pairwise_similarity(p["texts"]) for p in per_problem])),
           "confidence_spread": float(np.mean([D.confidence_spread(p["conf"], p["correct"])
                                               for p in per_problem])),
           "grading": {k.split("/")[1][:-len("_frac")]: v for k, v in grading_metrics(graded.grading).items()},
           "warnings": []}
    warning = grading_warning(graded.grading, max_error_frac, max_timeout_frac)
    if warning:
        print(f"WARNING: {benchmark}: {warning}", file=sys.stderr, flush=True)
        res["warnings"].append(warning)
    return res


def main(argv=None) -> dict:
    """The command line: load the checkpoint, evaluate each benchmark, write eval.json, eval.md and plots."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="HF folder (config.json + safetensors + tokenizer)")
    ap.add_argument("--benchmark", default="math500", help="comma list: math500, gsm8k, aime24, aime25, amc23, "
                                                            "humaneval, mbpp, ...")
    ap.add_argument("--data_dir", default=None, help="folder with the benchmark files (manual dir)")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top_p", type=float, default=0.95)
    ap.add_argument("--max_new_tokens", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (the RL loop's evaluation uses seed + 7777)")
    ap.add_argument("--limit", type=int, default=None, help="first N problems only")
    ap.add_argument("--engine", default="refill", help="rollout engine: refill or lockstep (RLConfig.rollout_engine)")
    ap.add_argument("--slots", type=int, default=None, help="refill decode slots (RLConfig.rollout_slots): memory")
    ap.add_argument("--rows_per_pass", type=int, default=None, help="lockstep rows per pass: memory")
    ap.add_argument("--logprob_batch_size", type=int, default=None, help="rows per entropy/confidence pass: memory")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max_reward_error_frac", type=float, default=RLConfig.max_reward_error_frac,
                    help="warn when the grader fails (status 'error') on more of a benchmark's responses")
    ap.add_argument("--max_reward_timeout_frac", type=float, default=RLConfig.max_reward_timeout_frac,
                    help="warn when the grader times out (status 'timeout') on more of a benchmark's responses")
    ap.add_argument("--label", default=None, help="method name in plots (default: the checkpoint folder name)")
    ap.add_argument("--runs", default=None, help="label=metrics.jsonl,... for training-curve plots")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    out = plots.ensure_dir(args.out)
    policy = load_policy(args.checkpoint, dtype=args.dtype, param_dtype=args.dtype)  # inference only
    if policy.tokenizer is None:
        raise SystemExit(f"{args.checkpoint} has no tokenizer files; evaluation needs one")
    label = args.label or os.path.basename(os.path.normpath(args.checkpoint))
    results = []
    for bench in args.benchmark.split(","):
        records = list(load_split(bench, "test", args.data_dir))[:args.limit]
        results.append(evaluate_benchmark(policy, bench, records, n=args.n, temperature=args.temperature,
                                          top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                                          seed=args.seed, logprob_batch_size=args.logprob_batch_size,
                                          max_error_frac=args.max_reward_error_frac,
                                          max_timeout_frac=args.max_reward_timeout_frac,
                                          engine=EngineOptions(args.engine, args.slots,
                                                               rows_per_pass=args.rows_per_pass)))
    with open(os.path.join(out, "eval.json"), "w") as f:
        json.dump({"checkpoint": args.checkpoint, "label": label, "results": results}, f, indent=2)
    cols = ["benchmark", "problems", "n"] + [f"pass@{k}" for k in results[0]["pass_at_k"]] + [
        "maj@" + str(max(results[0]["maj_at_k"])), "entropy", "distinct_correct", "confidence_spread",
        "timeout_frac", "error_frac"]
    rows = [{**r, **{f"pass@{k}": v for k, v in r["pass_at_k"].items()},
             "maj@" + str(max(r["maj_at_k"])): r["maj_at_k"][max(r["maj_at_k"])],
             "timeout_frac": r["grading"]["timeout"], "error_frac": r["grading"]["error"]} for r in results]
    warnings = "".join(f"\n**WARNING** {r['benchmark']}: {w}\n" for r in results for w in r["warnings"])
    with open(os.path.join(out, "eval.md"), "w") as f:
        f.write(f"# {label}\n\n" + plots.markdown_table(rows, cols) + warnings)
    plots.pass_at_k_plot({f"{label} {r['benchmark']}": r["pass_at_k"] for r in results},
                         os.path.join(out, "pass_at_k.png"))
    if args.runs:
        runs = dict(item.split("=", 1) for item in args.runs.split(","))
        plots.training_curves_plot(runs, os.path.join(out, "training_curves.png"))
    print(open(os.path.join(out, "eval.md")).read())
    return {"results": results}


if __name__ == "__main__":
    main()
