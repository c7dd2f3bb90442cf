"""The MoE layer's forward + backward compiled for a TPU topology (ahead of time, from this CPU host): XLA's own
FLOP count and temporaries for `jax.lax.ragged_dot` against the Pallas megablox grouped matmul, beside the
routed-pair FLOPs (6 x pairs x 3 matrices) and the dense FLOPs (every expert on every token). Compiler figures,
not measurements.

  python -m experiments.moe_kernel_flops --out experiments/results/moe_kernel_flops.json

Default: DeepSeek-V2-Lite's expert shapes (D 2048, F 1408, 64 experts, top-6), 16384 tokens per device, one
v5p chip (the kernel choice, not the dispatch, is what is measured; the expert-parallel layer runs the same
grouped matmul per device).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from arm_jax.models import moe
from arm_jax.plan.chips import make_target
from experiments.bench_common import report


def compile_layer(kernel: str, mesh, N: int, D: int, F: int, E: int, k: int) -> dict:
    sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=jax.sharding.NamedSharding(  # noqa: E731
        mesh, jax.sharding.PartitionSpec()))
    x = sds((1, N, D), jnp.bfloat16)
    w, ids = sds((1, N, k), jnp.float32), sds((1, N, k), jnp.int32)
    gate, up, down = sds((E, D, F), jnp.bfloat16), sds((E, D, F), jnp.bfloat16), sds((E, F, D), jnp.bfloat16)

    def loss(x, w, gate, up, down, ids):
        y = moe.global_dispatch(x, w, ids, gate, up, down, act=jax.nn.silu, kernel=kernel)
        return jnp.sum(y.astype(jnp.float32) ** 2)

    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(x, w, gate, up, down, ids).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    pairs = N * k
    return {"kernel": kernel, "XLA TFLOP (fwd+bwd)": cost.get("flops", 0.0) / 1e12,
            "routed TFLOP (6 x pairs x 3 matmuls)": 6 * pairs * 3 * D * F / 1e12,
            "dense TFLOP (every expert, every token)": 6 * N * E * 3 * D * F / 1e12,
            "temp GiB (compiler)": mem.temp_size_in_bytes / 2 ** 30}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topology", default="v5p-8")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--expert_size", type=int, default=1408)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top_k", type=int, default=6)
    ap.add_argument("--out", default="moe_kernel_flops.json")
    args = ap.parse_args()
    target = make_target(args.topology)
    mesh = jax.sharding.Mesh([target.devices[0]], ("fsdp",))
    rows = [compile_layer(kern, mesh, args.tokens, args.hidden, args.expert_size, args.experts, args.top_k)
            for kern in ("ragged_dot", "gmm")]
    report(f"MoE layer fwd+bwd compiled for {target.label}: {args.tokens} tokens, {args.experts} experts top-"
           f"{args.top_k}, D {args.hidden}, F {args.expert_size}, bf16 (XLA's TPU compiler; not a measurement)",
           rows, args.out, extra={"args": vars(args)})


if __name__ == "__main__":
    main()
