"""GRPO vs DAPO (Clip-Higher + dynamic sampling) vs ProGRPO (ARM) on mini-Countdown, equal compute, several seeds.

  python -m experiments.compare_arm_grpo --seeds 3 --out experiments/results/compare      # ~45 min on 2 cores

Each seed shares one SFT warm start across methods (common random numbers for evaluation too); every run logs the
ARM diagnostics of docs/method.md §1. Rows also include the group-mean anchor ablation and ARM at a 5x learning rate.
Writes results.json, results.md (mean ± 95 % CI over seeds of the final held-out Pass@1/4/8/16/32, entropy,
distinct correct answers), over_training.md and pass_at_k_over_training.png (the same at every evaluation step,
`--eval_every`, with 95 % CI bands), paired_vs_grpo.md (each method minus GRPO on the same seed at every evaluation
step), pass_at_k.png and training_curves.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil

import numpy as np

from arm_jax.algorithms.losses import LossConfig
from arm_jax.eval import plots
from arm_jax.launch import experiment
from arm_jax.train.learner import OptimConfig
from arm_jax.train.loop import RLConfig

ARM = (("alpha", 1.0), ("rho", 0.2))


def methods(base: RLConfig) -> dict[str, RLConfig]:
    token_mean = LossConfig(eps_low=0.2, eps_high=0.28, agg_mode="token-mean")
    return {
        "GRPO": dataclasses.replace(base, advantage="grpo", advantage_kwargs=(),
                                    loss=LossConfig(eps_low=0.2, eps_high=0.2, agg_mode="seq-mean-token-mean")),
        "DAPO": dataclasses.replace(base, advantage="grpo", advantage_kwargs=(), loss=token_mean,
                                    dynamic_sampling=True),
        "ProGRPO": dataclasses.replace(base, advantage="arm", advantage_kwargs=ARM, loss=token_mean),
        "ProGRPO group_mean": dataclasses.replace(base, advantage="arm", loss=token_mean,
                                                  advantage_kwargs=ARM + (("anchor", "group_mean"),)),
        # offset-free: c(q) over the same lowest-rho fraction of question tokens as c(o|q)
        "ProGRPO low_frac": dataclasses.replace(base, advantage="arm", loss=token_mean,
                                                advantage_kwargs=ARM + (("prompt_conf_mode", "low_frac"),)),
        "ProGRPO lr x5": dataclasses.replace(base, advantage="arm", advantage_kwargs=ARM, loss=token_mean,
                                             optim=dataclasses.replace(base.optim, lr=base.optim.lr * 5)),
    }


def ci95(values) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    half = 1.96 * v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0
    return float(v.mean()), float(half)


def _over_training(evals: dict, keys: list[str]) -> dict:
    """{method: {metric: {step: (mean, 95 % CI half-width over seeds)}}} at every evaluation step all seeds share."""
    out = {}
    for name, by_seed in evals.items():
        per_seed = list(by_seed.values())
        steps = sorted(set.intersection(*[{r["step"] for r in rows} for rows in per_seed]))
        at = [{r["step"]: r for r in rows} for rows in per_seed]
        out[name] = {k: {s: ci95([a[s][k] for a in at]) for s in steps} for k in keys}
    return out


def _paired(evals: dict, base: str, keys: list[str]) -> list[dict]:
    """Rows of (method - base) per seed at every shared evaluation step, mean ± 95 % CI over the seeds both ran:
    with common random numbers (one SFT start and one evaluation key per seed) the paired CI is the sharper test."""
    rows = []
    for name in evals:
        if name == base:
            continue
        common = sorted(evals[name].keys() & evals[base].keys())
        at = {m: {sd: {r["step"]: r for r in evals[m][sd]} for sd in common} for m in (name, base)}
        steps = sorted(set.intersection(*[set(at[m][sd]) for m in at for sd in common])) if common else []
        for step in steps:
            diff = {k: ci95([at[name][sd][step][k] - at[base][sd][step][k] for sd in common]) for k in keys}
            rows.append({"method": f"{name} - {base}", "step": step, "seeds": len(common),
                         **{k.replace("eval/", "Δ"): f"{m:+.3f} ± {h:.3f}" for k, (m, h) in diff.items()}})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--sft_steps", type=int, default=600)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--eval_n", type=int, default=32)
    ap.add_argument("--eval_prompts", type=int, default=200)
    ap.add_argument("--eval_every", type=int, default=None, help="held-out eval every N steps (default: before "
                                                                  "and after only)")
    ap.add_argument("--only", default=None, help="comma list of method names")
    ap.add_argument("--seed_list", default=None, help="comma list of seeds to run now (default: 0..seeds-1); the "
                                                      "summary covers every seed with a cached result")
    ap.add_argument("--out", default="experiments/results/compare")
    args = ap.parse_args(argv)
    base = RLConfig(steps=args.steps, prompts_per_step=args.prompts, group_size=8, max_new_tokens=26,
                    optim=OptimConfig(lr=1e-4, weight_decay=0.0), eval_every=args.eval_every or args.steps,
                    eval_n=args.eval_n, eval_prompts=args.eval_prompts, checkpoint_every=args.steps)
    table = methods(base)
    if args.only:
        table = {k: v for k, v in table.items() if k in args.only.split(",")}
    finals: dict[str, list[dict]] = {m: [] for m in table}
    evals: dict[str, dict[int, list[dict]]] = {m: {} for m in table}  # per method, per seed: the eval rows
    metric_files: dict[int, dict[str, str]] = {}  # per seed: {method: its metrics.jsonl}
    for seed in (map(int, args.seed_list.split(",")) if args.seed_list else range(args.seeds)):
        sft_dir = os.path.join(args.out, f"seed{seed}", "_sft")
        for name, cfg in table.items():
            workdir = os.path.join(args.out, f"seed{seed}", name.replace(" ", "_"))
            if os.path.isfile(os.path.join(workdir, "result.json")):
                continue  # cached: the run finished in an earlier invocation (or session)
            if os.path.isdir(os.path.join(sft_dir, "sft_model")) and not os.path.isdir(os.path.join(workdir,
                                                                                                    "sft_model")):
                os.makedirs(workdir, exist_ok=True)
                for sub in ("init_model", "sft_model"):
                    shutil.copytree(os.path.join(sft_dir, sub), os.path.join(workdir, sub))
            hist = experiment(workdir=workdir, task="countdown", mesh_shape=(1, 1, 1), sft_steps=args.sft_steps,
                              tiny_model=(("hidden", 64), ("layers", 2), ("heads", 4), ("mlp", 160)),
                              rl=dataclasses.replace(cfg, seed=seed, data_seed=seed), seed=seed)
            if not os.path.isdir(os.path.join(sft_dir, "sft_model")):
                os.makedirs(sft_dir, exist_ok=True)
                for sub in ("init_model", "sft_model"):
                    shutil.copytree(os.path.join(workdir, sub), os.path.join(sft_dir, sub))
            with open(os.path.join(workdir, "result.json"), "w") as f:  # the per-seed result the summary reads
                json.dump({"method": name, "seed": seed, "final": hist[-1],
                           "evals": [h for h in hist if "eval/pass@1" in h]}, f, indent=1, default=str)
    for name in table:  # every cached seed of every method
        for seed in range(args.seeds):
            workdir = os.path.join(args.out, f"seed{seed}", name.replace(" ", "_"))
            if not os.path.isfile(os.path.join(workdir, "result.json")):
                continue
            with open(os.path.join(workdir, "result.json")) as f:
                res = json.load(f)
            finals[name].append(res["final"])
            evals[name][seed] = res["evals"]
            metric_files.setdefault(seed, {})[name] = os.path.join(workdir, "metrics.jsonl")
    table = {k: v for k, v in table.items() if finals[k]}
    finals, evals = {k: finals[k] for k in table}, {k: evals[k] for k in table}
    keys = [k for k in finals[next(iter(finals))][0] if k.startswith("eval/pass@")] + ["eval/entropy",
                                                                                       "eval/distinct_correct"]
    rows, summary = [], {}
    for name, runs in finals.items():
        stats = {k: ci95([r[k] for r in runs]) for k in keys}
        summary[name] = stats
        rows.append({"method": name, **{k.replace("eval/", ""): f"{m:.3f} ± {h:.3f}" for k, (m, h) in stats.items()}})
    over = _over_training(evals, keys)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "summary": summary, "finals": finals, "over_training": over}, f, indent=2,
                  default=str)
    rows_t = [{"method": m, "step": step, **{k.replace("eval/", ""): f"{v[step][0]:.3f} ± {v[step][1]:.3f}"
                                            for k, v in metrics.items()}}
              for m, metrics in over.items() for step in sorted(next(iter(metrics.values())))]
    with open(os.path.join(args.out, "over_training.md"), "w") as f:
        f.write(plots.markdown_table(rows_t, list(rows_t[0])))
    plot_keys = [k for k in ("eval/pass@1", "eval/pass@8", "eval/pass@32", "eval/entropy") if k in keys]
    if "GRPO" in evals and len(evals) > 1:
        paired = _paired(evals, "GRPO", plot_keys)
        with open(os.path.join(args.out, "paired_vs_grpo.md"), "w") as f:
            f.write(plots.markdown_table(paired, list(paired[0])))
    plots.over_training_plot(over, os.path.join(args.out, "pass_at_k_over_training.png"), plot_keys)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(plots.markdown_table(rows, list(rows[0])))
    curves = {name: {int(k.split("@")[1]): m for k, (m, _) in s.items() if k.startswith("eval/pass@")}
              for name, s in summary.items()}
    plots.pass_at_k_plot(curves, os.path.join(args.out, "pass_at_k.png"), "held-out Pass@k (mean over seeds)")
    # training curves of one seed: the first whose metrics.jsonl files are all here (they are not kept in git)
    shown = [sd for sd in sorted(metric_files) if all(map(os.path.isfile, metric_files[sd].values()))]
    if shown:
        plots.training_curves_plot({f"{m} (seed {shown[0]})": p for m, p in metric_files[shown[0]].items()},
                                   os.path.join(args.out, "training_curves.png"))
    print(open(os.path.join(args.out, "results.md")).read())


if __name__ == "__main__":
    main()
