"""Next-token sampling at a real vocabulary: arm_jax's exact two-level Gumbel draw against the float32 inverse CDF
in vocabulary order (what arm_jax used before, and the common "cumsum + searchsorted" sampler), in one run.

Speed: median seconds per call for R rows x V logits on this machine. Exactness, on a peaked distribution (one
token of mass 1 - 1.5e-3, the rest 1e-8 each): the share of tail tokens a sampler can reach at all (the float32 CDF:
only those with a non-empty interval; the Gumbel draw: all) and the tail mass drawn in `draws` samples vs. the
expected 1.5e-3. The CDF-reachable set is computed by a separate float32 cumsum of the same logits (XLA may sum
in a slightly different order inside the baseline, so a few of its draws can fall outside it).

  python -m experiments.bench_sampling --rows 2048 --vocab 151936 --out bench_sampling.json

A second table times the top-k / top-p filters with their candidate prefilter against the whole-vocabulary sort.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from arm_jax.rollout.sampling import CANDIDATES, SamplingFlags, filtered_logits, flags_for, sample_next
from experiments.bench_common import report, time_fn


def float32_cdf_sample(x: jax.Array, keys: jax.Array) -> jax.Array:
    """The baseline: cumulative sum of exp(x - max) in vocabulary order, one float32 uniform per row."""
    probs = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
    cdf = jnp.cumsum(probs, axis=-1)
    u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys) * cdf[:, -1]
    return jnp.sum(cdf <= u[:, None], axis=-1).astype(jnp.int32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--draws", type=int, default=16_384, help="samples for the tail-mass check")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--out", default="bench_sampling.json")
    args = ap.parse_args()
    R, V = args.rows, args.vocab
    exact = jax.jit(lambda x, k: sample_next(x, k, 1.0, 0, 1.0, 0.0, SamplingFlags())[0])
    cdf = jax.jit(float32_cdf_sample)
    rand = jax.random.normal(jax.random.key(0), (R, V), jnp.float32) * 3.0
    keys = jax.random.split(jax.random.key(1), R)
    p = np.full(V, 1e-8)
    p[0] = 1.0 - p[1:].sum()
    peaked = jnp.broadcast_to(jnp.asarray(np.log(p), jnp.float32), (R, V))
    cdf_vals = np.asarray(jax.jit(lambda z: jnp.cumsum(jnp.exp(z - jnp.max(z, -1, keepdims=True)), -1))(peaked))[0]
    cdf_reachable = float(np.mean(np.diff(cdf_vals) > 0))
    rows = []
    for name, fn, reachable in (("exact two-level Gumbel (arm_jax)", exact, 1.0),
                                ("float32 inverse CDF (baseline)", cdf, cdf_reachable)):
        secs = time_fn(lambda: fn(rand, keys), iters=args.iters)
        draws = np.concatenate([np.asarray(fn(peaked, jax.random.split(jax.random.key(100 + c), R)))
                                for c in range(-(-args.draws // R))])
        tail = draws > 0
        rows.append({"sampler": name, "s / call": secs, "rows/s": R / secs,
                     "tail tokens reachable": reachable, "tail draws": int(tail.sum()),
                     "tail draws outside CDF-reachable set": int((~(np.diff(cdf_vals) > 0))[draws[tail] - 1].sum()),
                     "tail mass drawn": float(tail.mean()), "tail mass expected": float(1.0 - p[0])})
    report(f"next-token sampling, {R} rows x {V} logits ({jax.default_backend()})", rows, args.out,
           {"rows_per_call": R, "vocab": V, "draws": int(-(-args.draws // R) * R)})
    # an LM-like next-token distribution: a few dozen plausible tokens, a long flat tail (nucleus within 1024)
    boost = jax.random.uniform(jax.random.key(2), (R, 32), jnp.float32, 18.0, 26.0)
    lm_like = rand.at[:, :32].add(boost)
    report(f"top-k / top-p filters, {R} rows x {V} logits ({jax.default_backend()})",
           filter_rows({"LM-like (32 boosted tokens)": lm_like, "flat (normal x 3)": rand}, args.iters),
           args.out.replace(".json", "_filters.json"), {"rows_per_call": R, "vocab": V})


def filter_rows(inputs: dict, iters: int) -> list[dict]:
    """`filtered_logits` with its candidate prefilter (the largest CANDIDATES logits first) against the
    whole-vocabulary sorts (candidates=None, the previous code), same inputs, and whether they keep the same
    tokens."""
    rows = []
    for kind, x in inputs.items():
        for top_k, top_p in ((0, 0.95), (50, 0.95), (50, 1.0)):
            flags = flags_for(top_k, top_p, 0.0)
            args = (jnp.float32(1.0), jnp.int32(top_k), jnp.float32(top_p), jnp.float32(0.0))
            out = {}
            for name, cand in (("prefilter", CANDIDATES), ("full sort", None)):
                fn = jax.jit(lambda z, c=cand: filtered_logits(z, *args, flags, candidates=c))
                out[name] = (time_fn(lambda: fn(x), iters=iters), np.isfinite(np.asarray(fn(x))))
            rows.append({"logits": kind, "top_k": top_k, "top_p": top_p, "prefilter s": out["prefilter"][0],
                         "full sort s": out["full sort"][0], "speedup": out["full sort"][0] / out["prefilter"][0],
                         "same kept tokens": bool((out["prefilter"][1] == out["full sort"][1]).all())})
    return rows


if __name__ == "__main__":
    main()
