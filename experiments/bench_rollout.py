"""Rollout throughput: B prompts x P tokens -> N sampled tokens (temperature 1, full vocabulary, fixed length),
arm_jax's sampler next to transformers' `generate` on the same workload in the same run, and as a fraction of the
decode HBM roofline: (weight bytes + mean valid KV-cache bytes) read per decode step / measured copy bandwidth.

  python -m experiments.bench_rollout --shape tiny --batch 64 --prompt 128 --new 512          # CPU trend
  python -m experiments.bench_rollout --shape 0.5b --dtype bfloat16 --out rollout_05b.json    # H100 (B64 P128 N512)

Engines (`--lengths longtail | uniform`): P x G samples (32 x 8) whose lengths are fixed by per-prompt budgets and
no stop id, so the work is deterministic: lognormal (median --median, sigma --sigma, clipped to [8, --new]) or all
equal to the median. Runs, in the same process, the refill engine with --slots slots, lockstep with --slots rows
per pass (the same KV-cache memory) and lockstep with all rows at once, and reports wall-clock (warm, best of
--iters), the useful-token fraction (valid tokens / slot-steps computed), prefill tokens and decode steps.

  python -m experiments.bench_rollout --lengths longtail --out experiments/results/bench_rollout_longtail.json
  python -m experiments.bench_rollout --lengths uniform --out experiments/results/bench_rollout_uniform.json
  python -m experiments.bench_rollout --lengths longtail --new 2048 --hit_budget --engines refill,refill_full \
      --out experiments/results/bench_rollout_live_window.json   # decode over the live window vs the whole cache
  python -m experiments.bench_rollout --lengths longtail --slots 256 --engines refill,refill_blocking \
      --out experiments/results/bench_rollout_pipeline.json   # chunks dispatched ahead vs a blocking host loop
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import arm_jax as aj
from arm_jax.models import num_params
from experiments.bench_common import (base_parser, model_config, peak_memory_gib, report, time_fn, time_torch,
                                      torch_model)


def copy_bandwidth(nbytes: int = 1 << 28) -> float:
    """Measured device copy bandwidth in bytes/s (read + write)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a * 1.0000001)
    t = time_fn(lambda: f(x), warmup=2, iters=5)
    return 2 * nbytes / t


def decode_bytes_per_step(cfg, B, P, N) -> float:
    itemsize = 2 if cfg.dtype == "bfloat16" else 4
    weights = num_params(cfg) * itemsize
    if cfg.mla is not None:  # the latent cache: kv_lora_rank + rope dims per token and layer
        kv_per_token = cfg.num_layers * (cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim) * itemsize
    else:
        kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize
    return weights + B * (P + N / 2) * kv_per_token


def bench_arm_jax(cfg, prompts, N, iters):
    policy = aj.init_policy(cfg, seed=0)
    run = lambda: aj.generate(policy, prompts, max_new_tokens=N, temperature=1.0, stop_ids=[],  # noqa: E731
                              engine="lockstep").tokens
    t = time_fn(run, warmup=1, iters=iters)
    return t, peak_memory_gib()


def bench_torch(cfg, prompts, N, iters):
    import torch
    model, device = torch_model(cfg)
    ids = torch.tensor(np.asarray(prompts), device=device)

    def run():
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                  temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=N, min_new_tokens=N,
                                  pad_token_id=0)

    return time_torch(run, device, iters=iters)


def schedule(kind: str, prompts: int, median: int, sigma: float, longest: int, seed: int = 0) -> np.ndarray:
    """Per-prompt budgets [prompts]: 'longtail' lognormal(log median, sigma) clipped to [8, longest], 'uniform'
    all the median."""
    if kind == "uniform":
        return np.full((prompts,), median, np.int64)
    rng = np.random.RandomState(seed)
    return np.clip(np.round(np.exp(rng.normal(np.log(median), sigma, prompts))), 8, longest).astype(np.int64)


def bench_engines(args, cfg):
    policy = aj.init_policy(cfg, seed=0)
    rng = np.random.RandomState(0)
    prompts = rng.randint(0, cfg.vocab_size, size=(args.prompts, args.prompt)).tolist()
    budgets = schedule(args.lengths, args.prompts, args.median, args.sigma, args.new)
    if args.hit_budget:
        budgets[0] = args.new  # one prompt's answers run to the budget (the cache is sized for it, as in RL)
    kw = dict(max_new_tokens=budgets, n=args.group, temperature=1.0, stop_ids=[], seed=0)
    runs = {"refill": dict(engine="refill", slots=args.slots, chunk_steps=args.chunk),
            "refill, full-cache attention": dict(engine="refill", slots=args.slots, chunk_steps=args.chunk,
                                                 live_window=False),
            "refill, blocking host loop": dict(engine="refill", slots=args.slots, chunk_steps=args.chunk,
                                               pipeline=False),
            f"lockstep ({args.slots} rows/pass)": dict(engine="lockstep", rows_per_pass=args.slots),
            "lockstep (all rows)": dict(engine="lockstep")}
    names = {"refill": "refill", "refill_full": "refill, full-cache attention",
             "refill_blocking": "refill, blocking host loop",
             "lockstep": f"lockstep ({args.slots} rows/pass)", "lockstep_all": "lockstep (all rows)"}
    runs = {names[e]: runs[names[e]] for e in args.engines.split(",")}
    rows, outs = [], {}
    for name, opts in runs.items():
        out = None

        def run():
            nonlocal out
            out = aj.generate(policy, prompts, **kw, **opts)
            return out.tokens

        t = time_fn(run, warmup=1, iters=args.iters)
        outs[name] = out
        st = out.stats
        rows.append({"engine": name, "s": t, "tok/s": st.generated_tokens / t, "useful fraction": st.useful_fraction,
                     "slot-steps": st.slot_steps, "decode steps": st.decode_steps,
                     "prefill tokens": st.prefill_tokens, "calls": st.chunks + st.prefill_calls})
    base_name = names["lockstep"] if names["lockstep"] in runs else list(runs)[-1]
    base = next(r["s"] for r in rows if r["engine"] == base_name)
    for r in rows:
        r[f"x {base_name}"] = base / r["s"]
    same = all(np.array_equal(o.tokens, outs["refill"].tokens) for o in outs.values())
    print(f"identical tokens across engines: {same}")
    lengths = np.repeat(budgets, args.group)
    report(f"rollout engines: {args.shape}, {args.prompts} prompts x {args.group} samples, prompt {args.prompt}, "
           f"{args.lengths} lengths (median {np.median(lengths):.0f}, mean {lengths.mean():.0f}, max "
           f"{lengths.max()}, max/median {lengths.max() / np.median(lengths):.1f}), {args.slots} slots, chunks of "
           f"{args.chunk}, {jax.devices()[0].device_kind}", rows, args.out,
           extra={"args": vars(args), "budgets": budgets.tolist(), "identical_tokens": bool(same)})


def main():
    ap = base_parser(__doc__, "bench_rollout.json", iters=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=512)
    ap.add_argument("--lengths", choices=["fixed", "longtail", "uniform"], default="fixed",
                    help="fixed: the throughput bench above; longtail / uniform: the engines on per-prompt budgets")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--median", type=int, default=96)
    ap.add_argument("--sigma", type=float, default=0.75)
    ap.add_argument("--hit_budget", action="store_true", help="the first prompt's answers run to --new")
    ap.add_argument("--engines", default="refill,refill_full,lockstep,lockstep_all",
                    help="comma list of refill, refill_full (refill reading the whole cache), lockstep, lockstep_all")
    args = ap.parse_args()
    if args.lengths != "fixed":
        return bench_engines(args, model_config(args.shape, args.dtype, args.moe_impl))
    cfg = model_config(args.shape, args.dtype, args.moe_impl)
    rng = np.random.RandomState(0)
    prompts = rng.randint(0, cfg.vocab_size, size=(args.batch, args.prompt)).tolist()
    bw = copy_bandwidth()
    roofline = bw / decode_bytes_per_step(cfg, args.batch, args.prompt, args.new) * args.batch  # tokens/s
    rows = []
    t, mem = bench_arm_jax(cfg, prompts, args.new, args.iters)
    rows.append({"system": "arm_jax", "tok/s": args.batch * args.new / t, "s": t, "peak GiB": mem})
    if not args.no_torch:
        t, mem = bench_torch(cfg, prompts, args.new, args.iters)
        rows.append({"system": "transformers generate", "tok/s": args.batch * args.new / t, "s": t,
                     "peak GiB": mem if mem is not None else ""})
    for r in rows:
        r["% roofline"] = 100 * r["tok/s"] / roofline
    if len(rows) == 2:
        rows[0]["x transformers"] = rows[0]["tok/s"] / rows[1]["tok/s"]
    report(f"rollout: {args.shape} ({num_params(cfg) / 1e6:.1f} M params), {args.batch} x {args.prompt} -> "
           f"{args.new} tokens, {args.dtype}, {jax.devices()[0].device_kind}; copy bandwidth {bw / 1e9:.0f} GB/s, "
           f"roofline {roofline:,.0f} tok/s", rows, args.out,
           extra={"args": vars(args), "copy_bandwidth_Bps": bw, "roofline_tok_s": roofline})


if __name__ == "__main__":
    main()
