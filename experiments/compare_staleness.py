"""Synchronous vs one-step-off RL on the quick-start, GRPO and ProGRPO, over seeds (issue #30).

  python -m experiments.compare_staleness --seeds 3 --out experiments/results/staleness     # ~55 min on 2 cores

Every run is the shipped quick-start (`gin_configs/quickstart.gin`, + `grpo.gin` for GRPO) launched through the gin
launcher; the one-step-off rows add `RLConfig.max_staleness=1` and a rollout correction. Each seed's runs share one
SFT warm start (the first run's, copied). A finished run is cached (result.json) and skipped on relaunch, so the
study resumes across sessions. Writes results.json and results.md: held-out Pass@1 / Pass@8 / entropy before and
after (mean ± 95 % CI over seeds), the mismatch metrics averaged over training, and the wall time of each run.
On this 2-core CPU box the sampler and the learner share the same cores, so one-step-off cannot be faster here:
the wall time column shows its cost, not the overlap's gain on separate devices.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from experiments.quickstart_runs import ROOT, copy_sft, run_cached, write_results

QUICK = os.path.join(ROOT, "gin_configs", "quickstart.gin")
GRPO = os.path.join(ROOT, "gin_configs", "grpo.gin")
OFF = ("RLConfig.max_staleness=1", "RLConfig.rollout_correction='tis'")
METHODS = {
    "GRPO": ((QUICK, GRPO), ()),
    "ProGRPO": ((QUICK,), ()),
    "GRPO one-step-off TIS": ((QUICK, GRPO), OFF),
    "ProGRPO one-step-off TIS": ((QUICK,), OFF),
}
SHOWN = ("eval/pass@1", "eval/pass@8", "eval/entropy")
GAP = ("mismatch/abs_logp_diff_mean", "mismatch/kl_k3", "mismatch/seq_ratio_p05", "mismatch/seq_ratio_p95",
       "correction/clipped_frac")


def ci95(values) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(1.96 * v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0)


def run_one(workdir: str, gin_files, params, seed: int, sft_dir: str) -> dict:
    """One quick-start run of `seed` (reusing the seed's SFT model when there is one); the first run of a seed
    leaves its SFT model in `sft_dir` for the others."""
    def gap(train: list) -> dict:  # the mismatch metrics averaged over training
        return {"seed": seed, "gap": {k: float(np.mean([r[k] for r in train if k in r]))
                                      for k in GAP if any(k in r for r in train)}}
    out = run_cached(workdir, gin_files, (f"experiment.seed={seed}", f"RLConfig.seed={seed}",
                                          f"RLConfig.data_seed={seed}") + tuple(params), sft_from=sft_dir, extra=gap)
    if not os.path.isdir(os.path.join(sft_dir, "sft_model")):
        copy_sft(workdir, sft_dir)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--only", default=None, help="comma list of method names")
    ap.add_argument("--out", default="experiments/results/staleness")
    args = ap.parse_args(argv)
    table = {k: v for k, v in METHODS.items() if not args.only or k in args.only.split(",")}
    results: dict[str, list[dict]] = {m: [] for m in table}
    for seed in range(args.seeds):
        sft_dir = os.path.join(args.out, f"seed{seed}", "_sft")
        for name, (gin_files, params) in table.items():
            workdir = os.path.join(args.out, f"seed{seed}", name.replace(" ", "_"))
            results[name].append(run_one(workdir, gin_files, params, seed, sft_dir))
    rows, summary = [], {}
    for name, runs in results.items():
        s = {f"{k} before": ci95([r["before"][k] for r in runs]) for k in SHOWN}
        s.update({f"{k} after": ci95([r["after"][k] for r in runs]) for k in SHOWN})
        s.update({k: ci95([r["gap"][k] for r in runs]) for k in GAP if all(k in r["gap"] for r in runs)})
        s["wall_s"] = ci95([r["wall_s"] for r in runs])
        summary[name] = s
        row = {"method": name}
        for k in SHOWN:
            (b, _), (a, h) = s[f"{k} before"], s[f"{k} after"]
            row[k.replace("eval/", "")] = f"{b:.3f} -> {a:.3f} ± {h:.3f}"
        for k in GAP:
            row[k.split("/")[1]] = f"{s[k][0]:.4f}" if k in s else "-"
        row["wall (s)"] = f"{s['wall_s'][0]:.0f}"
        rows.append(row)
    write_results(args.out, {"args": vars(args), "summary": summary, "runs": results}, rows)


if __name__ == "__main__":
    main()
