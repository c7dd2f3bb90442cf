"""Rollout throughput: B prompts x P tokens -> N sampled tokens (temperature 1, full vocabulary, fixed length),
arm_jax's sampler next to transformers' `generate` on the same workload in the same run, and as a fraction of the
decode HBM roofline: (weight bytes + mean valid KV-cache bytes) read per decode step / measured copy bandwidth.

  python -m experiments.bench_rollout --shape tiny --batch 64 --prompt 128 --new 512          # CPU trend
  python -m experiments.bench_rollout --shape 0.5b --dtype bfloat16 --out rollout_05b.json    # H100 (B64 P128 N512)
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
    run = lambda: aj.generate(policy, prompts, max_new_tokens=N, temperature=1.0, stop_ids=[]).tokens  # noqa
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


def main():
    ap = base_parser(__doc__, "bench_rollout.json", iters=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=512)
    args = ap.parse_args()
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
