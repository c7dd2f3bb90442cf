"""LoRA's sampler: adapters applied unmerged (as the learner applies them) against folded into a merged copy, in
one run: decode throughput and the log-prob gap between the sampler and the learner.

  python -m experiments.bench_lora_sampler --shape small --dtype bfloat16

The adapters are set as after training (A as initialized, B ~ N(0, b_std)); the base is the learner's frozen copy
in the compute dtype. `gap` is the mean / max |log-prob| difference, on the sampled tokens, between the sampler's
`logp_sampling` (temperature 1, no truncation) and the learner's unmerged log-prob pass: what RLConfig's
`mismatch/*` metrics would log from the LoRA sampler alone.
"""

from __future__ import annotations

import time

import jax
import numpy as np

import arm_jax as aj
from arm_jax.config import LoRAConfig
from arm_jax.models import lora
from arm_jax.train.learner import Learner
from experiments.bench_common import base_parser, model_config, report


def main(argv=None):
    ap = base_parser(__doc__, "experiments/results/bench_lora_sampler.json", iters=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--b_std", type=float, default=2e-3)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--new_tokens", type=int, default=64)
    args = ap.parse_args(argv)
    cfg = model_config(args.shape, args.dtype)
    mesh = aj.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    policy = lora.add_lora(aj.init_policy(cfg, seed=0, mesh=mesh), LoRAConfig(rank=args.rank,
                                                                               alpha=2.0 * args.rank))
    adapters, _ = lora.split(policy.params)
    adapters = jax.tree.map(lambda x: x if x.shape[0] != args.rank else
                            args.b_std * jax.random.normal(jax.random.key(7), x.shape, x.dtype), adapters)
    learner = Learner(policy.replace(params=lora.merge(lora.split(policy.params)[1], adapters)))
    unmerged = policy.replace(params=learner.full_params(adapters))
    samplers = {"unmerged": unmerged, "merged": lora.merged_policy(unmerged)}
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, cfg.vocab_size, int(n))) for n in rng.integers(8, 32, args.rows)]
    rows = []
    for name, sampler in samplers.items():
        def run():
            return aj.generate(sampler, prompts, max_new_tokens=args.new_tokens, temperature=1.0, seed=1,
                               stop_ids=[])
        run()  # compile
        times = []
        for _ in range(args.iters):
            t = time.perf_counter()
            out = run()
            times.append(time.perf_counter() - t)
        tokens, attn, loss_mask = out.sequences()
        logp = np.asarray(aj.token_logprobs(unmerged, tokens, attn)[0])[:, out.prompt_tokens.shape[1]:]
        d = np.abs(logp - out.logp_sampling)[out.mask.astype(bool)]
        rows.append({"sampler": name, "decode_s": float(np.median(times)),
                     "tokens_per_s": float(out.mask.sum() / np.median(times)),
                     "gap_mean": float(d.mean()), "gap_max": float(d.max())})
    rows[1]["speedup_vs_unmerged"] = rows[0]["decode_s"] / rows[1]["decode_s"]
    report(f"LoRA sampler ({args.shape}, {args.dtype}, rank {args.rank}, {args.rows} rows x {args.new_tokens} "
           f"new tokens)", rows, args.out, extra={"args": vars(args)})


if __name__ == "__main__":
    main()
