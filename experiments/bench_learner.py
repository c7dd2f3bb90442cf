"""One learner update (fwd + bwd of float32 per-token log-probs on the completion + AdamW): tokens/s, MFU, memory.

Same workload as the peers' H100 learner baselines (B sequences of T tokens, the last C the completion), next to a
PyTorch / transformers step of the same loss on the same batch in the same run.

  python -m experiments.bench_learner --shape tiny --batch 8 --seq 160 --completion 128          # CPU trend
  python -m experiments.bench_learner --shape 1.5b --batch 16 --seq 640 --completion 512 --dtype bfloat16 \
      --remat both --out learner_15b.json                                                          # H100
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m experiments.bench_learner --shape ds-small \
      --mesh 1,2,1,4 --moe_dispatch global,expert_parallel --no_torch \
      --out experiments/results/bench_learner_moe.json      # MoE: the global layer vs expert-parallel, 8 CPU devices
  python -m experiments.bench_learner --shape small --layers 24 --batch 8 --seq 256 --completion 192 --remat on \
      --scan_layers both --no_torch --out experiments/results/bench_scan_layers.json   # unrolled vs scanned blocks
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m experiments.bench_learner --shape ds-small \
      --layers 12 --mesh 1,2,1,4 --batch 8 --seq 256 --completion 192 --remat on --scan_layers both --no_torch \
      --out experiments/results/bench_scan_layers_moe.json
MFU = model FLOPs / time / peak (peak: --peak_tflops, default 989 on an H100/H200, none on CPU); model FLOPs as
`python -m arm_jax.plan` counts them (`arm_jax/plan/flops.py`): 6 x the matrix parameters a token passes through (the
LM head, not the embedding table's lookup) x tokens + causal attention, forward and backward.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

import arm_jax as aj
from arm_jax.models import num_params
from arm_jax.plan import flops as F
from arm_jax.algorithms.losses import LossConfig
from arm_jax.train.learner import Learner, OptimConfig
from experiments.bench_common import (base_parser, model_config, peak_memory_gib, report, time_fn, time_torch,
                                      torch_model)

PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def make_batch(cfg, B, T, C, seed=0):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, cfg.vocab_size, size=(B, T)).astype(np.int32)
    loss_mask = np.zeros((B, T), np.float32)
    loss_mask[:, T - C:] = 1
    return {"tokens": tokens, "attention_mask": np.ones((B, T), np.int32), "loss_mask": loss_mask,
            "advantages": rng.randn(B).astype(np.float32), "logp_old": np.zeros((B, T), np.float32)}


def compiled_memory(learner, state, batch, rng) -> dict:
    """The compiler's own per-device account of the update (arguments, temporaries), in GiB, and the seconds the
    lowering and compilation took."""
    import time
    from arm_jax.policy import place_batch
    from arm_jax.train.learner import TrainBatch
    batch = TrainBatch.of(batch)
    batch = dataclasses.replace(batch, ref_logp=jax.numpy.zeros(batch.logp_old.shape, jax.numpy.float32))
    with jax.set_mesh(learner.policy.mesh):
        leaves, tree = jax.tree.flatten(batch)
        placed = jax.tree.unflatten(tree, place_batch(learner.policy, *leaves))
        t0 = time.perf_counter()
        mem = learner._step.lower(learner.policy.graphdef, learner.optimizer, state, placed, rng,
                                  num_micro_batches=learner.num_micro_batches(batch.size),
                                  **learner._opts).compile().memory_analysis()
        seconds = time.perf_counter() - t0
    return {"args GiB/device": mem.argument_size_in_bytes / 2 ** 30,
            "temp GiB/device": mem.temp_size_in_bytes / 2 ** 30, "compile s": seconds}


def bench_arm_jax(cfg, batch, remat, micro, iters, peak, mesh=None, scan_layers=None):
    """scan_layers: None (not compared: the default unrolled blocks) or the `RLConfig.scan_layers` of this row."""
    policy = aj.init_policy(cfg, seed=0, mesh=mesh)
    learner = Learner(policy, LossConfig(), OptimConfig(lr=1e-6), micro_batch_size=micro, remat=remat,
                      scan_layers=bool(scan_layers))
    state = learner.init_state()
    box = {"state": state}
    # logp_old = current log-probs, so the ratio is 1 as in the baseline's loss
    logp, _ = aj.token_logprobs(policy, batch["tokens"], batch["attention_mask"])
    batch = dict(batch, logp_old=np.asarray(logp))
    del policy

    def step():
        box["state"], m = learner.step(box["state"], batch, jax.random.key(0))
        box["last_loss"] = m["loss"]
        return m["loss"]

    t = time_fn(step, warmup=2, iters=iters)
    n_tok = batch["tokens"].size
    row = {"system": "arm_jax", "remat": remat, "tok/s": n_tok / t, "step ms": 1e3 * t,
           "peak GiB": peak_memory_gib(), "loss": float(box["last_loss"]) if "last_loss" in box else None}
    if cfg.moe is not None:
        row["system"] = f"arm_jax, MoE {cfg.moe.dispatch}"
    if scan_layers is not None:
        row["system"] += ", scanned blocks" if scan_layers else ", unrolled blocks"
    if cfg.moe is not None or scan_layers is not None:
        row.update(compiled_memory(learner, box["state"], batch, jax.random.key(0)))
    if peak:
        row["MFU %"] = mfu(cfg, batch["tokens"].shape, t, peak)
    return row


def mfu(cfg, shape, seconds: float, peak: float) -> float:
    """Model FLOPs utilization in % of one update over a [B, T] batch."""
    return 100 * F.model_flops(cfg, shape[0], shape[1]) / seconds / peak


def bench_torch(cfg, batch, remat, iters, peak):
    import torch
    model, device = torch_model(cfg, train=True)
    if remat:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0, fused=device == "cuda")
    ids = torch.tensor(batch["tokens"], device=device)
    adv = torch.tensor(batch["advantages"], device=device)
    C = int(batch["loss_mask"][0].sum())
    comp = ids[:, -C:]

    def step():
        logits = model(input_ids=ids, logits_to_keep=C + 1, use_cache=False).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, comp[..., None])[..., 0]
        loss = -(torch.exp(logp - logp.detach()) * adv[:, None]).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t, mem = time_torch(step, device, warmup=2, iters=iters)
    n_tok = ids.numel()
    row = {"system": "transformers", "remat": remat, "tok/s": n_tok / t, "step ms": 1e3 * t,
           "peak GiB": mem if mem is not None else ""}
    if peak:
        row["MFU %"] = mfu(cfg, tuple(ids.shape), t, peak)
    return row


def main():
    ap = base_parser(__doc__, "bench_learner.json", iters=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=160)
    ap.add_argument("--completion", type=int, default=128)
    ap.add_argument("--micro_batch", type=int, default=None)
    ap.add_argument("--remat", default="off", choices=["off", "on", "both"])
    ap.add_argument("--peak_tflops", type=float, default=None)
    ap.add_argument("--mesh", default=None, help="mesh shape, e.g. 1,2,1,4 (data, fsdp, tensor, expert)")
    ap.add_argument("--layers", type=int, default=None, help="override the shape's layer count")
    ap.add_argument("--scan_layers", default=None, choices=["off", "on", "both"],
                    help="rows with RLConfig.scan_layers off / on / both (with compile time and compiled memory)")
    ap.add_argument("--moe_dispatch", default="auto",
                    help="MoE shapes: comma-separated MoEConfig.dispatch values, each a row of the same run")
    args = ap.parse_args()
    cfg = model_config(args.shape, args.dtype, args.moe_impl)
    if args.layers:
        cfg = cfg.replace(num_layers=args.layers)
    mesh = aj.make_mesh(tuple(int(s) for s in args.mesh.split(","))) if args.mesh else None
    kind = jax.devices()[0].device_kind
    peak = args.peak_tflops * 1e12 if args.peak_tflops else next((v for k, v in PEAKS.items() if k in kind), None)
    batch = make_batch(cfg, args.batch, args.seq, args.completion)
    remats = {"off": [False], "on": [True], "both": [False, True]}[args.remat]
    cfgs = [cfg] if cfg.moe is None else [dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, dispatch=d))
                                          for d in args.moe_dispatch.split(",")]
    scans = {None: [None], "off": [False], "on": [True], "both": [False, True]}[args.scan_layers]
    rows = [bench_arm_jax(c, batch, r, args.micro_batch, args.iters, peak, mesh, s)
            for c in cfgs for r in remats for s in scans]
    if not args.no_torch:
        rows += [bench_torch(cfg, batch, r, args.iters, peak) for r in remats]
    report(f"learner update: {args.shape} ({num_params(cfg) / 1e6:.1f} M params), {args.batch} x {args.seq} tokens "
           f"({args.completion} completion), {args.dtype}, {kind} x {jax.device_count()}, "
           f"mesh {args.mesh or 'default'}",
           rows, args.out, extra={"args": vars(args)})


if __name__ == "__main__":
    main()
