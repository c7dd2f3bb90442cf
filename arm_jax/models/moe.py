"""Mixture-of-experts layer: routing, expert-parallel dispatch and the grouped matmul, for every MoE family.

    y = shared(x) + sum_{e in top-k(x)} w_e(x) * expert_e(x),   expert_e(x) = down_e(act(gate_e x) * up_e x)

Routing (`route`) runs on the global, batch-sharded token list. The experts then run in one of two dispatches
(`MoEConfig.dispatch`):

  'expert_parallel' (the default under a mesh, as MaxText's and tunix's MoE): a `shard_map` over the whole mesh in
      which every device sorts its own (token, expert) pairs by expert, sends each to the devices holding its
      expert with a ragged all-to-all over the mesh axes the experts are sharded over ('expert'), computes its
      local experts on what it received (a grouped matmul over the local experts), sends the results back with the
      reverse all-to-all and combines them, weighted, into its own tokens. Tokens never leave their batch shard
      except as the routed pairs; expert weights are gathered over 'fsdp' at the shard_map's edge (ZeRO-3, as every
      other weight) and stay split over 'tensor' along the expert width, whose partial outputs are summed over
      it. Dropless: a device's receive buffer holds the worst case, every pair of its expert group (ep x n x k
      rows); `jax.lax.ragged_all_to_all` moves only the real rows.
  'global': the pairs of the global token list sorted and scattered by GSPMD (the layer before expert
      parallelism; for comparison: it replicates the routed activations on every device).

The all-to-all (`resolve_exchange`): `jax.lax.ragged_all_to_all` where XLA implements it (TPU, GPU); elsewhere
the same exchange as a dense `all_to_all` of per-destination blocks padded to the sender's pair count, then placed
at the receiver's offsets (identical results, ep x the bytes). The grouped matmul (`resolve_kernel`): JAX's
Pallas megablox `gmm` (its custom VJP uses the transposed `tgmm` for the weights' gradient, so the backward
costs the routed rows, not every expert on every row) when compiling for TPU, `jax.lax.ragged_dot` elsewhere.
Both are chosen in one place, by the platform compiled for, as attention is (`layers.resolve_attention_impl`).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from arm_jax.config import ConfigError, ModelConfig
from arm_jax.models import layers
from arm_jax.sharding import DEFAULT_RULES, target_platform

GMM_TILE = 128  # megablox's row / contraction / output tile


# ------------------------------------------------------------------------------------------------- routing


def _select(logits: jax.Array, bias: Optional[jax.Array], moe) -> tuple[jax.Array, jax.Array]:
    """Router logits [N, E] float32 -> (scores [N, E], this router's top-k expert ids [N, k] int32): softmax or
    sigmoid scores, the choice optionally biased (V3) and group-limited."""
    N, E = logits.shape
    scores = jax.nn.sigmoid(logits) if moe.scoring == "sigmoid" else jax.nn.softmax(logits, axis=-1)
    choice = scores + bias if (moe.topk_method == "noaux_tc" and bias is not None) else scores
    if moe.topk_method in ("group_limited_greedy", "noaux_tc") and moe.topk_group < moe.n_group:
        grouped = choice.reshape(N, moe.n_group, E // moe.n_group)
        if moe.topk_method == "noaux_tc":
            group_score = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)
        else:
            group_score = jnp.max(grouped, axis=-1)
        _, top_groups = jax.lax.top_k(group_score, moe.topk_group)
        keep = jnp.zeros((N, moe.n_group), bool).at[jnp.arange(N)[:, None], top_groups].set(True)
        keep = jnp.repeat(keep, E // moe.n_group, axis=1)
        choice = jnp.where(keep, choice, -jnp.inf if moe.topk_method == "noaux_tc" else 0.0)
    _, ids = jax.lax.top_k(choice, moe.experts_per_token)
    return scores, ids.astype(jnp.int32)


def _gate(scores: jax.Array, ids: jax.Array, moe) -> jax.Array:
    """The weights [N, k] float32 of experts `ids` [N, k]: their scores, renormalized, scaled."""
    weights = jnp.take_along_axis(scores, ids, axis=-1)
    if moe.norm_topk_prob:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return weights * moe.routed_scaling_factor


def route(logits: jax.Array, bias: Optional[jax.Array], moe, replay: Optional[jax.Array] = None,
          use_replay: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """Router logits [N, E] float32 -> (weights [N, k] float32, expert ids [N, k] int32), as DeepSeek and Qwen
    route (softmax or sigmoid scores, optionally group-limited, top-k, renormalized, scaled). Routing replay:
    where use_replay [N] is set, the experts are replay [N, k] (the sampler's) instead of this forward's top-k, and
    their weights are this forward's scores of those experts (so the router still gets gradients)."""
    scores, ids = _select(logits, bias, moe)
    if replay is not None:
        ids = jnp.where(use_replay[:, None], replay.astype(ids.dtype), ids)
    return _gate(scores, ids, moe), ids


# ------------------------------------------------------------------------------------ kernels, chosen here


def resolve_kernel(kernel: str) -> str:
    """'auto' -> 'gmm' (Pallas megablox) when compiling for TPU, 'ragged_dot' elsewhere."""
    if kernel != "auto":
        return kernel
    return "gmm" if target_platform() == "tpu" else "ragged_dot"


def resolve_exchange(exchange: str) -> str:
    """'auto' -> 'ragged' (`jax.lax.ragged_all_to_all`) on TPU and GPU, where XLA implements it; 'dense' (padded
    blocks through `all_to_all`, the same results) elsewhere."""
    if exchange != "auto":
        return exchange
    return "ragged" if target_platform() in ("tpu", "gpu") else "dense"


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, kernel: str) -> jax.Array:
    """x [M, K] rows sorted by group, w [G, K, N], group_sizes [G] (sum <= M) -> [M, N] in x's dtype: row r of
    group g is x[r] @ w[g]; rows past sum(group_sizes) are never read by the caller (ragged_dot zeroes them, gmm
    leaves them unwritten)."""
    if kernel == "ragged_dot":
        return jax.lax.ragged_dot(x, w, group_sizes)
    if kernel != "gmm":
        raise ConfigError(f"MoEConfig.kernel must be 'auto', 'ragged_dot' or 'gmm', got {kernel!r}")
    from jax.experimental.pallas.ops.tpu.megablox import ops
    M, K = x.shape
    N = w.shape[2]
    up = lambda n: -(-n // GMM_TILE) * GMM_TILE  # noqa: E731
    # megablox tiles every dimension by 128 (TPU blocks: (8, 128)-aligned): pad rows (in no group), the contraction
    # and the output width with zeros, exactly
    xp = jnp.pad(x, ((0, up(M) - M), (0, up(K) - K)))
    wp = jnp.pad(w, ((0, 0), (0, up(K) - K), (0, up(N) - N)))
    out = ops.gmm(xp, wp, group_sizes.astype(jnp.int32), jnp.float32, (GMM_TILE,) * 3, None, None, False,
                  target_platform() != "tpu")  # off TPU: Pallas' interpreter (tests only)
    return out[:M, :N].astype(x.dtype)


def _dense_exchange(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, axis, block):
    """`jax.lax.ragged_all_to_all`'s exchange through a dense `all_to_all`: the block for destination j is
    operand[input_offsets[j] : + send_sizes[j]] padded to `block` rows (a bound on every send size), sent with its
    output offset and size, and written at output[offset : + size] on j. recv_sizes is implied by the senders'."""
    del recv_sizes
    ep, M = send_sizes.shape[0], operand.shape[0]
    r = jnp.arange(block)
    valid = r[None, :] < send_sizes[:, None]  # [ep, block]
    blocks = jnp.take(operand, jnp.clip(input_offsets[:, None] + r[None, :], 0, M - 1), axis=0)
    blocks = jnp.where(valid.reshape(valid.shape + (1,) * (operand.ndim - 1)), blocks, 0)
    a2a = functools.partial(jax.lax.all_to_all, axis_name=axis, split_axis=0, concat_axis=0, tiled=True)
    blocks = a2a(blocks.reshape((ep * block,) + operand.shape[1:]))  # block i: what source i sent here
    offsets = a2a(output_offsets.astype(jnp.int32))  # [ep]: where source i's block goes here
    sizes = a2a(send_sizes.astype(jnp.int32))
    target = jnp.where(r[None, :] < sizes[:, None], offsets[:, None] + r[None, :], output.shape[0])
    return output.at[target.reshape(-1)].set(blocks, mode="drop")


def _exchange(kind: str, operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, axis, block):
    """The ragged all-to-all of `kind` ('ragged' | 'dense'); block: a bound on every send size (dense only)."""
    args = (operand, output, input_offsets.astype(jnp.int32), send_sizes.astype(jnp.int32),
            output_offsets.astype(jnp.int32), recv_sizes.astype(jnp.int32))
    if kind == "ragged":
        return jax.lax.ragged_all_to_all(*args, axis_name=axis)
    if kind == "dense":
        return _dense_exchange(*args, axis, block)
    raise ConfigError(f"MoEConfig.exchange must be 'auto', 'ragged' or 'dense', got {kind!r}")


def _exclusive_cumsum(x: jax.Array, axis: int = -1) -> jax.Array:
    return jnp.cumsum(x, axis=axis) - x


# ------------------------------------------------------------------------------------------------ experts


def _experts(rows, group_sizes, gate, up, down, act, kernel):
    """The SwiGLU experts on rows [M, D] sorted by expert (group_sizes [G]) -> [M, D]."""
    h = act(grouped_matmul(rows, gate, group_sizes, kernel)) * grouped_matmul(rows, up, group_sizes, kernel)
    return grouped_matmul(h, down, group_sizes, kernel)


def _local_moe(x, weights, ids, gate, up, down, *, act, kernel, exchange, ep_axes, tensor_axes, num_experts,
               capacity_factor=None):
    """One device's part of the expert-parallel layer (inside shard_map): x [B, T, D] its tokens, weights / ids
    [B, T, k] their routing, gate/up [E / ep, D, F'], down [E / ep, F', D] its experts (F' = F / tensor).
    capacity_factor: None = dropless (a receive buffer of ep x its pair count); c: a buffer of c x its pair count,
    each receiver taking its sources' blocks in source order, a block's later pairs (higher experts) dropped where
    it overflows (they add nothing to their token). Returns (y [B, T, D], [1, 2] float32: this device's dropped
    pairs, its pairs)."""
    B, T, D = x.shape
    k = ids.shape[-1]
    xf = x.reshape(B * T, D)
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # the pairs sorted by expert: contiguous per destination device
    token = order // k
    sorted_ids = flat[order]
    rows = xf[token]  # [n k, D]
    n_pairs = rows.shape[0]  # every device's pair count: a bound on any block it sends or receives
    E_local = gate.shape[0]
    dropped = jnp.zeros((), jnp.float32)
    if ep_axes:
        ep = num_experts // E_local
        me = jax.lax.axis_index(ep_axes)
        per_expert = jnp.bincount(flat, length=num_experts).astype(jnp.int32)  # [E] this device's pairs
        counts = jax.lax.all_gather(per_expert, ep_axes)  # [ep sources, E]
        sizes = counts.reshape(ep, ep, E_local).sum(-1)  # [source, destination] pairs
        R = ep * n_pairs  # dropless: all of the group's pairs could come here
        allowed = sizes
        if capacity_factor is not None:
            R = min(R, max(1, math.ceil(capacity_factor * n_pairs)))
            allowed = jnp.clip(R - _exclusive_cumsum(sizes, axis=0), 0, sizes)  # receivers fill in source order
            dropped = jnp.sum(sizes[me] - allowed[me]).astype(jnp.float32)
        send, recv = allowed[me], allowed[:, me]
        out_offsets = jnp.sum(jnp.where(jnp.arange(ep)[:, None] < me, allowed, 0), axis=0)  # my block's place on j
        received = _exchange(exchange, rows, jnp.zeros((R, D), rows.dtype), _exclusive_cumsum(sizes[me]), send,
                             out_offsets, recv, ep_axes, n_pairs)
        # received: source 0's block (its pairs for my experts, sorted by expert; the first recv[0]), then source 1's
        full = jax.lax.dynamic_slice_in_dim(counts, me * E_local, E_local, axis=1)  # [source, local expert]
        mine = jnp.clip(recv[:, None] - _exclusive_cumsum(full, axis=1), 0, full)  # of them, what arrived
        local_ids = jnp.repeat(jnp.tile(jnp.arange(E_local, dtype=jnp.int32), ep), mine.reshape(-1),
                               total_repeat_length=R)
        local_ids = jnp.where(jnp.arange(R) < jnp.sum(recv), local_ids, E_local)  # past the rows: no expert
        lorder = jnp.argsort(local_ids, stable=True)
        out = _experts(received[lorder], mine.sum(0), gate, up, down, act, kernel)
        out = jnp.zeros_like(out).at[lorder].set(out)  # back to the received order
        # the reverse exchange: source i's block returns from my offset for it to its own input offset for me
        their_offsets = _exclusive_cumsum(sizes, axis=1)[:, me]
        back = _exchange(exchange, out, jnp.zeros_like(rows), _exclusive_cumsum(recv), recv, their_offsets,
                         send, ep_axes, n_pairs)
    else:
        back = _experts(rows, jnp.bincount(sorted_ids, length=num_experts).astype(jnp.int32), gate, up, down,
                        act, kernel)
    y = jnp.zeros_like(xf).at[token].add(back * weights.reshape(-1)[order][:, None].astype(x.dtype))
    if tensor_axes:  # each tensor shard computed its slice of the expert width
        y = jax.lax.psum(y, tensor_axes)
    return y.reshape(B, T, D), jnp.stack([dropped, jnp.float32(n_pairs)])[None]


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry if isinstance(entry, tuple) else (entry,))


def expert_parallel(x, weights, ids, gate, up, down, *, act, kernel: str = "auto", exchange: str = "auto",
                    capacity_factor: Optional[float] = None, return_dropped: bool = False, rules=DEFAULT_RULES):
    """The expert-parallel layer under the current mesh (`jax.set_mesh`): x [B, T, D], weights / ids [B, T, k],
    gate / up [E, D, F], down [E, F, D] -> [B, T, D] (routed experts only). The expert axis E is split over the
    mesh axes of the 'expert' rule (ep ways); it must divide. capacity_factor: `_local_moe` (None: dropless);
    return_dropped: also return [2] float32 (pairs dropped, pairs) over every token shard."""
    mesh = jax.sharding.get_abstract_mesh()
    E = gate.shape[0]
    tokens = rules.spec(("batch", None, None), x.shape, mesh)
    w_in = rules.spec(("expert", None, "mlp"), gate.shape, mesh)
    w_out = rules.spec(("expert", "mlp", None), down.shape, mesh)
    ep_axes, tensor_axes = _axes(w_in[0]), _axes(w_in[2])
    wanted = tuple(a for a in rules.mesh_axes("expert") if dict(mesh.shape).get(a, 1) > 1)
    if ep_axes != wanted:
        sizes = {a: dict(mesh.shape)[a] for a in wanted}
        raise ConfigError(f"MoE: {E} routed experts (num_experts / n_routed_experts) do not divide over the expert "
                          f"axis {sizes}: choose an expert axis size that divides the expert count")
    local = functools.partial(_local_moe, act=act, kernel=resolve_kernel(kernel), exchange=resolve_exchange(exchange),
                              ep_axes=ep_axes, tensor_axes=tensor_axes, num_experts=E, capacity_factor=capacity_factor)
    # check_vma off: where the tokens do not divide over a batch axis they are replicated over it, and every copy
    # goes through the same exchange and comes back equal, which shard_map cannot infer
    y, dropped = jax.shard_map(local, mesh=mesh, in_specs=(tokens, tokens, tokens, w_in, w_in, w_out),
                               out_specs=(tokens, P(tokens[0], None)), check_vma=False)(x, weights, ids, gate, up,
                                                                                         down)
    return (y, jnp.sum(dropped, axis=0)) if return_dropped else y


def global_dispatch(x, weights, ids, gate, up, down, *, act, kernel: str = "auto") -> jax.Array:
    """The pairs of the global token list sorted by expert and scattered back (GSPMD partitions it as it can)."""
    return _local_moe(x, weights, ids, gate, up, down, act=act, kernel=resolve_kernel(kernel), exchange="dense",
                      ep_axes=(), tensor_axes=(), num_experts=gate.shape[0])[0]


def dense_experts(x, weights, ids, gate, up, down, *, act) -> jax.Array:
    """Every expert on every token, combined with the sparse [N, E] weight matrix (E/k x the FLOPs; debugging)."""
    B, T, D = x.shape
    xf = x.reshape(B * T, D)
    N, k = xf.shape[0], ids.shape[-1]
    combine = jnp.zeros((N, gate.shape[0]), jnp.float32).at[jnp.arange(N)[:, None], ids.reshape(N, k)].add(
        weights.reshape(N, k))
    h = act(jnp.einsum("nd,edf->enf", xf, gate)) * jnp.einsum("nd,edf->enf", xf, up)
    y = jnp.einsum("enf,efd->end", h, down)
    return jnp.einsum("end,ne->nd", y, combine.astype(x.dtype)).reshape(B, T, D)


# ------------------------------------------------------------------------------------------------- module


class MoE(nnx.Module):
    """The MoE block of every family: a float32 router [embed, expert] (and DeepSeek-V3's correction bias),
    stacked experts gate/up [expert, embed, mlp], down [expert, mlp, embed], and the always-on shared SwiGLU
    (`MoEConfig.shared_width`; Qwen2-MoE scales it by sigmoid(x . shared_gate), shared_gate [embed, 1])."""

    def __init__(self, cfg: ModelConfig, rngs: Optional[nnx.Rngs] = None):
        dt = jnp.dtype(cfg.param_dtype)
        moe, D = cfg.moe, cfg.hidden_size
        E, F = moe.num_experts, moe.expert_size
        init = layers.normal_init()
        self.router = layers.param(rngs, init, (D, E), ("embed", None), jnp.float32)
        if moe.topk_method == "noaux_tc":
            self.router_bias = layers.param(rngs, layers.zeros_init, (E,), (None,), jnp.float32)
        self.gate = layers.param(rngs, init, (E, D, F), ("expert", "embed", "mlp"), dt)
        self.up = layers.param(rngs, init, (E, D, F), ("expert", "embed", "mlp"), dt)
        self.down = layers.param(rngs, init, (E, F, D), ("expert", "mlp", "embed"), dt)
        if moe.shared_width:
            self.shared = layers.GatedMLP(D, moe.shared_width, cfg.mlp_bias, dt, rngs, act=cfg.hidden_act)
        if moe.shared_expert_gate:
            self.shared_gate = layers.param(rngs, init, (D, 1), ("embed", None), dt)
        self.cfg = cfg

    def __call__(self, x: jax.Array, replay: Optional[tuple[jax.Array, jax.Array]] = None
                 ) -> tuple[jax.Array, jax.Array]:
        """x [B, T, D] -> (y [B, T, D], (the experts this forward's router picks for each token [B, T, k] int32,
        whatever is replayed; [2] float32 pairs dropped by the capacity factor, pairs)). replay: (ids [B, T, k],
        use [B, T] bool): routing replay (`route`) at the positions `use` marks."""
        moe = self.cfg.moe
        B, T, D = x.shape
        logits = jnp.einsum("btd,de->bte", x.astype(jnp.float32), self.router[...]).reshape(B * T, -1)
        scores, fresh = _select(logits, self.router_bias[...] if moe.topk_method == "noaux_tc" else None, moe)
        ids = fresh if replay is None else jnp.where(replay[1].reshape(-1, 1), replay[0].reshape(B * T, -1), fresh)
        weights = _gate(scores, ids, moe)
        weights, ids, fresh = weights.reshape(B, T, -1), ids.reshape(B, T, -1), fresh.reshape(B, T, -1)
        experts = (self.gate[...], self.up[...], self.down[...])
        act = layers.ACTIVATIONS[self.cfg.hidden_act]
        mesh = jax.sharding.get_abstract_mesh()
        dropped = jnp.stack([jnp.float32(0), jnp.float32(ids.size)])  # (pairs dropped, pairs)
        if moe.impl == "dense":
            y = dense_experts(x, weights, ids, *experts, act=act)
        elif moe.dispatch == "expert_parallel" or (moe.dispatch == "auto" and mesh is not None and not mesh.empty):
            y, dropped = expert_parallel(x, weights, ids, *experts, act=act, kernel=moe.kernel,
                                         exchange=moe.exchange, capacity_factor=moe.capacity_factor,
                                         return_dropped=True)
        else:
            y = global_dispatch(x, weights, ids, *experts, act=act, kernel=moe.kernel)
        if moe.shared_width:
            shared = self.shared(x)
            if moe.shared_expert_gate:
                shared = jax.nn.sigmoid(x @ self.shared_gate[...].astype(x.dtype)) * shared
            y = y + shared
        return y, (fresh, dropped)


def routing_layout(cfg: ModelConfig) -> Optional[tuple[int, int, jnp.dtype]]:
    """How a rollout records the experts each token used (routing replay): (MoE layers, k, a compact dtype:
    uint8 for up to 256 experts, else int16), or None for a model without MoE layers."""
    if cfg.moe is None:
        return None
    layers_moe = sum(cfg.moe.is_moe_layer(i) for i in range(cfg.num_layers))
    if not layers_moe:
        return None
    return layers_moe, cfg.moe.experts_per_token, jnp.dtype(jnp.uint8 if cfg.moe.num_experts <= 256 else jnp.int16)


def alltoall_bytes_per_layer(tokens_per_device: int, experts_per_token: int, hidden: int, ep: int,
                             itemsize: int) -> float:
    """Bytes one device sends per MoE layer and direction with uniform routing: its routed pairs bound for the
    other ep - 1 expert shards (the ragged exchange moves only real rows; the return trip moves as many)."""
    return tokens_per_device * experts_per_token * hidden * itemsize * (ep - 1) / max(ep, 1) if ep > 1 else 0.0


