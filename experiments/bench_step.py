"""Time per RL step split by stage (rollout, rewards, log-probs, update, checkpoint) and tokens/s per device.

  python -m experiments.bench_step --shape tiny                      # the quick-start size on CPU
  python -m experiments.bench_step --shape 0.5b --dtype bfloat16 --max_new_tokens 512 --out step_05b.json  # GPU
  python -m experiments.bench_step --modes budget,trimmed --max_new_tokens 512   # the passes at the budget vs trimmed
Random weights; prompts from the countdown task (valid ids for any vocabulary); the first step (compiles) is not
counted. --modes runs the same steps (same seeds, same samples) once per mode in one process: 'trimmed' (the run's
behaviour: log-prob and learner passes over Tp + bucket(longest answer) columns) and 'budget' (over Tp + the whole
budget, as before fixed shapes); its JSON holds the per-mode tables, the losses of each and `speedup_vs_budget`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np

import arm_jax as aj
from arm_jax.models import num_params
from arm_jax.data import countdown
from arm_jax.rewards.registry import RewardSpec, register_reward
from arm_jax.rewards.tasks import make_task
from arm_jax.rollout.sampler import Rollout
from arm_jax.train.loop import RLConfig, RLRun
from experiments.bench_common import model_config, report


@register_reward("bench_parity")
def _parity(completions, examples, context):
    """1 for answers of even length: a random policy's groups are mixed, so the losses compared are not zero."""
    return [float(len(c) % 2 == 0) for c in completions]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny", choices=["tiny", "small", "0.5b", "1.5b"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=26)
    ap.add_argument("--micro_batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--modes", default="trimmed", help="comma list of 'trimmed' (default) and 'budget'")
    ap.add_argument("--out", default="bench_step.json")
    args = ap.parse_args()
    results = {mode: _bench(args, mode) for mode in args.modes.split(",")}
    for mode, (table, _) in results.items():
        report(f"RL step ({mode}): {args.shape}, P={args.prompts} x G={args.group}, max_new_tokens="
               f"{args.max_new_tokens}", table, args.out.replace(".json", f"_{mode}.json"),
               extra={"args": vars(args), "mode": mode})
    if len(results) > 1 and "budget" in results and "trimmed" in results:
        total = {m: t[-1]["s/step"] for m, (t, _) in results.items()}
        passes = {m: sum(r["s/step"] for r in t if r["stage"] in ("logprobs", "update")) for m, (t, _) in
                  results.items()}
        losses = {m: h for m, (_, h) in results.items()}
        summary = {"speedup_vs_budget": total["budget"] / total["trimmed"],
                   "passes_speedup_vs_budget": passes["budget"] / passes["trimmed"], "losses": losses,
                   "max_loss_diff": float(np.max(np.abs(np.subtract(losses["budget"], losses["trimmed"]))))}
        print(json.dumps(summary, indent=1))
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), **summary, "tables": {m: t for m, (t, _) in results.items()}}, f,
                      indent=1)


def _bench(args, mode: str):
    """(the stage table, the per-step losses) of `args.steps` steps in `mode`."""
    if mode not in ("trimmed", "budget"):
        raise SystemExit(f"--modes: unknown mode {mode!r} (trimmed, budget)")
    trimmed = Rollout.trimmed
    if mode == "budget":
        Rollout.trimmed = lambda self: self  # the passes over the whole budget, as before fixed shapes
    try:
        return _steps(args)
    finally:
        Rollout.trimmed = trimmed


def _steps(args):
    cfg = (countdown.tiny_model_config(mlp=256, act="relu", arch="starcoder2").replace(max_position_embeddings=4096)
           if args.shape == "tiny" else model_config(args.shape, args.dtype))  # tiny: quickstart.gin's model
    policy = aj.init_policy(cfg, seed=0)
    task = make_task("countdown")
    task.rewards = [RewardSpec("bench_parity", accuracy=True)]  # mixed groups: non-zero advantages and losses
    rl = RLConfig(steps=args.steps + 1, prompts_per_step=args.prompts, group_size=args.group,
                  max_new_tokens=args.max_new_tokens, eval_every=0, checkpoint_every=10 ** 9,
                  micro_batch_size=args.micro_batch, remat=args.shape in ("0.5b", "1.5b"))
    with tempfile.TemporaryDirectory() as workdir:
        run = RLRun(policy, task, rl, workdir, log_to_console=False)
        run.rewards.start()
        rows = []
        for i in range(args.steps + 1):
            m = run.train_step()
            if i:
                rows.append(m)
        t = time.time()
        run.checkpoint()
        run.ckpt.wait()
        ckpt_s = time.time() - t
        run.ckpt.close()
    stages = ["rollout", "rewards", "logprobs", "update"]
    table = []
    for s in stages:
        secs = float(np.mean([r[f"time/{s}_s"] for r in rows]))
        tok = {"rollout": "tokens_per_s_per_device/rollout", "logprobs": "tokens_per_s_per_device/logprobs",
               "update": "tokens_per_s_per_device/update"}.get(s)
        table.append({"stage": s, "s/step": secs, "tok/s/device": float(np.mean([r[tok] for r in rows])) if tok
                      else ""})
    table.append({"stage": "checkpoint (save, waited)", "s/step": ckpt_s, "tok/s/device": ""})
    table.append({"stage": "total (excl. checkpoint)", "s/step": sum(r["s/step"] for r in table[:4]),
                  "tok/s/device": ""})
    mean_len = np.mean([r["response_len_mean"] for r in rows])
    print(f"{args.shape}: {num_params(cfg) / 1e6:.2f} M params; mean answer {mean_len:.1f} tokens, longest "
          f"{max(r['response_len_max'] for r in rows)}")
    return table, [float(r["loss"]) for r in rows]


if __name__ == "__main__":
    main()
