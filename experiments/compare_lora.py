"""LoRA RL against full fine-tuning on the quick-start, the same SFT start, side by side (issue #31).

  python -m experiments.compare_lora --out experiments/results/lora          # ~15 min on 2 cores

Both rows run the shipped quick-start (`gin_configs/quickstart.gin`) through the gin launcher; the LoRA row adds
`gin_configs/lora.gin` with the rank, alpha and learning rate given here (LoRA wants about 10x full fine-tuning's
rate). The LoRA run reuses the full run's SFT model (copied), so both start from the same weights. Each finished run
is cached (result.json). Writes results.json and results.md: held-out Pass@1 / Pass@8 / entropy before and after,
wall time, the run's peak RSS (the launcher process, `os.wait4`), and the trained parameters of each.
"""

from __future__ import annotations

import argparse
import os

from experiments.quickstart_runs import ROOT, run_cached, write_results
QUICK = os.path.join(ROOT, "gin_configs", "quickstart.gin")
LORA = os.path.join(ROOT, "gin_configs", "lora.gin")
SHOWN = ("eval/pass@1", "eval/pass@8", "eval/entropy", "eval/distinct_correct")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", default="experiments/results/lora")
    args = ap.parse_args(argv)
    full = run_cached(os.path.join(args.out, "full"), [QUICK])
    lora = run_cached(os.path.join(args.out, f"lora_r{args.rank}"), [QUICK, LORA],
               [f"experiment.lora=(('rank', {args.rank}), ('alpha', {args.alpha}))", f"OptimConfig.lr={args.lr}"],
               sft_from=os.path.join(args.out, "full"))
    rows = []
    for name, r in (("full fine-tuning (lr 1e-4)", full), (f"LoRA r {args.rank}, alpha {args.alpha:g}, "
                                                           f"lr {args.lr:g}", lora)):
        row = {"run": name}
        for k in SHOWN:
            row[k.replace("eval/", "")] = f"{r['before'][k]:.3f} -> {r['after'][k]:.3f}"
        row["wall"] = f"{r['wall_s'] / 60:.1f} min"
        row["peak RSS"] = f"{r['peak_rss_gb']:.2f} GB"
        rows.append(row)
    write_results(args.out, {"args": vars(args), "full": full, "lora": lora}, rows)


if __name__ == "__main__":
    main()
