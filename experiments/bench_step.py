"""Time per RL step split by stage (rollout, rewards, log-probs, update, checkpoint) and tokens/s per device.

  python -m experiments.bench_step --shape tiny                      # the quick-start size on CPU
  python -m experiments.bench_step --shape 0.5b --dtype bfloat16 --max_new_tokens 512 --out step_05b.json  # GPU
  python -m experiments.bench_step --modes budget,padded --max_new_tokens 512   # the passes at the budget vs trimmed
  python -m experiments.bench_step --lengths longtail --modes padded,packed --max_new_tokens 512 \
      --out experiments/results/bench_step_longtail.json                         # padded vs packed passes
Random weights; prompts from the countdown task (valid ids for any vocabulary); the first step (compiles) is not
counted, the medians over the others are (a step whose rows meet a new bucket compiles). --modes runs the same
steps (same seeds, same samples) once per mode in one process:
  'budget': padded log-prob and learner passes over Tp + the whole budget (as before fixed shapes);
  'padded' (alias 'trimmed'): padded rows over Tp + bucket(longest answer) columns (`RLConfig.pack_sequences=False`);
  'packed': the run's default, sequences packed into rows (`models.packing`).
--lengths: 'model', the random model's own answers (stop at EOS or the budget), or 'longtail': a synthetic rollout
(the rollout stage is replaced, its time ~0) of random tokens whose lengths are lognormal (median --median, sigma
--sigma, clipped to [8, budget], as bench_rollout's) with one answer per step at the budget, as RL answers are. Its
JSON holds the per-mode tables, the losses of each and `speedup_vs_padded` / `speedup_vs_budget` (whole step and
log-prob + update passes).
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time

import numpy as np

import arm_jax as aj
from arm_jax.models import num_params
from arm_jax.data import countdown
from arm_jax.rewards.registry import RewardSpec, register_reward
from arm_jax.rewards.tasks import make_task
from arm_jax.buckets import bucket_length
from arm_jax.rollout.sampler import Rollout
from arm_jax.rollout.types import RolloutStats
from arm_jax.train import loop
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
    ap.add_argument("--modes", default="packed", help="comma list of 'packed' (default), 'padded' ('trimmed'), "
                    "'budget'")
    ap.add_argument("--lengths", default="model", choices=["model", "longtail"])
    ap.add_argument("--median", type=int, default=96)
    ap.add_argument("--sigma", type=float, default=0.75)
    ap.add_argument("--out", default="bench_step.json")
    args = ap.parse_args()
    modes = [{"trimmed": "padded"}.get(m, m) for m in args.modes.split(",")]
    results = {mode: _bench(args, mode) for mode in modes}
    for mode, (table, _) in results.items():
        report(f"RL step ({mode}, {args.lengths} lengths): {args.shape}, P={args.prompts} x G={args.group}, "
               f"max_new_tokens={args.max_new_tokens}", table, args.out.replace(".json", f"_{mode}.json"),
               extra={"args": vars(args), "mode": mode})
    if len(results) > 1:
        total = {m: t[-1]["s/step"] for m, (t, _) in results.items()}
        passes = {m: sum(r["s/step"] for r in t if r["stage"] in ("logprobs", "update")) for m, (t, _) in
                  results.items()}
        losses = {m: h for m, (_, h) in results.items()}
        summary = {"losses": losses, "max_loss_diff": float(max(
            np.max(np.abs(np.subtract(losses[modes[0]], h))) for h in losses.values()))}
        for base, fast in (("padded", "packed"), ("budget", "padded"), ("budget", "packed")):
            if base in results and fast in results:
                summary[f"{fast}_speedup_vs_{base}"] = total[base] / total[fast]
                summary[f"{fast}_passes_speedup_vs_{base}"] = passes[base] / passes[fast]
        if "packed" in results and "padded" in results:
            summary["speedup_vs_padded"] = summary["packed_speedup_vs_padded"]
        print(json.dumps(summary, indent=1))
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), **summary, "tables": {m: t for m, (t, _) in results.items()}}, f,
                      indent=1)


def _bench(args, mode: str):
    """(the stage table, the per-step losses) of `args.steps` steps in `mode`."""
    if mode not in ("packed", "padded", "budget"):
        raise SystemExit(f"--modes: unknown mode {mode!r} (packed, padded / trimmed, budget)")
    trimmed, generate = Rollout.trimmed, loop.generate
    if mode == "budget":
        Rollout.trimmed = lambda self: self  # the passes over the whole budget, as before fixed shapes
    if args.lengths == "longtail":
        loop.generate = functools.partial(_longtail_rollout, median=args.median, sigma=args.sigma)
    try:
        return _steps(args, pack=mode == "packed")
    finally:
        Rollout.trimmed, loop.generate = trimmed, generate


def _longtail_rollout(policy, prompts, *, max_new_tokens, n, seed, step, stop_ids, median, sigma, **_):
    """A synthetic rollout: n answers per prompt of random tokens, lengths lognormal(log median, sigma) clipped to
    [8, max_new_tokens], the first at the budget (truncated), the others ending with a stop id."""
    rng = np.random.RandomState(seed * 100003 + step)
    R = len(prompts) * n
    lengths = np.clip(np.round(np.exp(rng.normal(np.log(median), sigma, R))), 8, max_new_tokens).astype(np.int64)
    lengths[0] = max_new_tokens
    mask = (np.arange(max_new_tokens)[None] < lengths[:, None]).astype(np.int32)
    tokens = rng.randint(3, policy.config.vocab_size, size=(R, max_new_tokens)).astype(np.int32)
    truncated = lengths >= max_new_tokens
    tokens[np.arange(R)[~truncated], lengths[~truncated] - 1] = stop_ids[0]
    tokens *= mask
    Tp = bucket_length(max(len(p) for p in prompts))
    prompt_tokens, prompt_mask = np.zeros((R, Tp), np.int32), np.zeros((R, Tp), np.int32)
    for b, p in enumerate(prompts):
        prompt_tokens[b * n:(b + 1) * n, Tp - len(p):] = p
        prompt_mask[b * n:(b + 1) * n, Tp - len(p):] = 1
    zeros = np.zeros(tokens.shape, np.float32)
    stats = RolloutStats("synthetic", R, int(lengths.sum()), int(lengths.sum()), int(lengths.max()), R * Tp)
    return Rollout(tokens, mask, zeros, zeros, lengths, truncated, prompt_tokens, prompt_mask,
                   np.repeat(np.arange(len(prompts)), n), stats)


def _steps(args, pack: bool):
    cfg = (countdown.tiny_model_config(mlp=256, act="relu", arch="starcoder2").replace(max_position_embeddings=4096)
           if args.shape == "tiny" else model_config(args.shape, args.dtype))  # tiny: quickstart.gin's model
    policy = aj.init_policy(cfg, seed=0)
    task = make_task("countdown")
    task.rewards = [RewardSpec("bench_parity", accuracy=True)]  # mixed groups: non-zero advantages and losses
    rl = RLConfig(steps=args.steps + 1, prompts_per_step=args.prompts, group_size=args.group,
                  max_new_tokens=args.max_new_tokens, eval_every=0, checkpoint_every=10 ** 9,
                  micro_batch_size=args.micro_batch, remat=args.shape in ("0.5b", "1.5b"), pack_sequences=pack)
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
        secs = float(np.median([r[f"time/{s}_s"] for r in rows]))  # a step that meets a new bucket compiles
        tok = {"rollout": "tokens_per_s_per_device/rollout", "logprobs": "tokens_per_s_per_device/logprobs",
               "update": "tokens_per_s_per_device/update"}.get(s)
        table.append({"stage": s, "s/step": secs, "tok/s/device": float(np.median([r[tok] for r in rows])) if tok
                      else "", "s per step": " ".join(f"{r[f'time/{s}_s']:.2f}" for r in rows)})
    table.append({"stage": "checkpoint (save, waited)", "s/step": ckpt_s, "tok/s/device": ""})
    table.append({"stage": "total (excl. checkpoint)", "s/step": sum(r["s/step"] for r in table[:4]),
                  "tok/s/device": ""})
    mean_len = np.mean([r["response_len_mean"] for r in rows])
    print(f"{args.shape}: {num_params(cfg) / 1e6:.2f} M params; mean answer {mean_len:.1f} tokens, longest "
          f"{max(r['response_len_max'] for r in rows)}")
    return table, [float(r["loss"]) for r in rows]


if __name__ == "__main__":
    main()
