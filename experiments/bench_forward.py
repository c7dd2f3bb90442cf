"""Forward and `token_logprobs` throughput and peak memory, arm_jax vs transformers (PyTorch) on the same batch.

  python experiments/bench_forward.py --shape tiny --batch 8 --seq 256            # CPU trend figures
  python experiments/bench_forward.py --shape 0.5b --batch 16 --seq 640 --dtype bfloat16 --out fwd_05b.json  # GPU
"""

from __future__ import annotations

import numpy as np

import arm_jax as aj
from arm_jax.models import num_params
from experiments.bench_common import (base_parser, model_config, peak_memory_gib, report, time_fn, time_torch,
                                      torch_model)


def bench_arm_jax(cfg, tokens, mask, iters):
    policy = aj.init_policy(cfg, seed=0)
    n = tokens.size
    t_fwd = time_fn(lambda: aj.forward_logits(policy, tokens, mask), iters=iters) if cfg.vocab_size * n < 2e9 \
        else float("nan")
    t_lp = time_fn(lambda: aj.token_logprobs(policy, tokens, mask), iters=iters)
    return [{"system": "arm_jax", "stage": "forward (full logits)", "tok/s": n / t_fwd, "ms": 1e3 * t_fwd},
            {"system": "arm_jax", "stage": "token_logprobs (chunked)", "tok/s": n / t_lp, "ms": 1e3 * t_lp,
             "peak GiB": peak_memory_gib()}]


def bench_torch(cfg, tokens, mask, iters):
    import torch
    model, device = torch_model(cfg)
    ids, am = torch.tensor(tokens, device=device), torch.tensor(mask, device=device)

    def fwd():
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=am).logits

    def logprobs():
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=am).logits[:, :-1].float()
            return torch.gather(logits.log_softmax(-1), 2, ids[:, 1:, None])

    rows = []
    for stage, fn in (("forward (full logits)", fwd), ("log-probs (log_softmax + gather)", logprobs)):
        t, peak = time_torch(fn, device, iters=iters)
        rows.append({"system": "transformers", "stage": stage, "tok/s": tokens.size / t, "ms": 1e3 * t,
                     "peak GiB": peak if peak is not None else ""})
    return rows


def main():
    ap = base_parser(__doc__, "bench_forward.json", iters=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()
    cfg = model_config(args.shape, args.dtype, args.moe_impl)
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, cfg.vocab_size, size=(args.batch, args.seq)).astype(np.int32)
    mask = np.ones_like(tokens)
    rows = bench_arm_jax(cfg, tokens, mask, args.iters)
    if not args.no_torch:
        rows += bench_torch(cfg, tokens, mask, args.iters)
    report(f"forward / log-probs: {args.shape} ({num_params(cfg) / 1e6:.1f} M params), batch {args.batch} x "
           f"{args.seq}, {args.dtype}", rows, args.out, extra={"args": vars(args)})


if __name__ == "__main__":
    main()
