"""The slot-refilling rollout engine: S decode slots that never wait for the longest answer.

RL on reasoning has long-tailed answer lengths; lockstep decoding keeps every row of a pass until its longest
stops. Here the rows are S slots (sharded over the batch axes like lockstep's rows, `steps.Slots`), and the host
drives three fixed-shape device programs (`rollout.steps`) until all P x n samples are done:

  admit    when a process has n free slots and a waiting prompt, the prompt is prefilled once (in a batch of the
           prompts admitted together, padded to a power of two so a few shapes cover every call) and its k/v,
           first logits, keys and budget copied into the slots of its n samples (`insert`);
  decode   a chunk of at most `chunk_steps` steps, each slot at its own step; it returns early once enough slots
           have finished for a prompt to be admitted;
  compact  when no prompt waits, each batch shard keeps only its live slots (rounded up to a power of two), so
           the tail is decoded by fewer slots instead of idle ones.

While a prompt waits (or the tail can still be compacted) the next chunk depends on which slots the last one freed,
so the host reads each chunk's results before dispatching the next (their device-to-host copies started together).
Once no prompt waits and a chunk that runs all its steps would be followed by the same one (nothing to compact, or
more than half of a power-of-two number of slots per shard still live), chunks are pipelined (`_pipelined`): the
next is dispatched before the last one's results are read, so the device does not wait for the host's copies and
bookkeeping; the schedule, tokens and counts are those of the blocking loop.

A sample's i-th token is drawn with fold_in(key of its row, i) (`sampler.row_keys`) and it sees exactly the cache
its lockstep row would (prompt at [0, Tp), new tokens at Tp + i), so the engine returns the tokens and log-probs of
the lockstep engine whatever the slotting. Device memory is bounded by S x (Tp + N) cache slots and the prefill of
at most S / n prompts, never by P x n; a prompt that does not fit waits for slots to free.

With several processes every process runs this loop over its own prompts and slots; the decisions that shape a
device call (prefill bucket, exit threshold, compaction) are taken from one all-gather of counts per chunk, so
every process makes the same calls.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from arm_jax import distributed
from arm_jax.models.moe import routing_layout
from arm_jax.policy import Policy, place_batch
from arm_jax.rollout import steps
from arm_jax.buckets import bucket_length
from arm_jax.sharding import batch_devices
from arm_jax.rollout.sampling import SamplingParams
from arm_jax.rollout.types import RolloutStats, Samples


def _pow2(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


def batch_shards(policy: Policy, rows: int) -> int:
    """How many blocks a [rows] array is split into over the mesh's batch axes; 0 when they do not all divide it
    (then the tail is not compacted: a smaller slot count could be split differently)."""
    full = batch_devices(policy.mesh, policy.rules)
    return full if rows % full == 0 else 0


def check_slots(slots: int, n: int, name: str = "slots") -> None:
    """Slots must divide over the processes and hold one prompt's n samples on each; the error names `name`."""
    procs = distributed.process_count()
    if slots % procs or slots // procs < n:
        raise ValueError(f"{name}={slots} must be a multiple of the {procs} processes and hold the n={n} samples "
                         f"of a prompt on each")


class _Host:
    """This process's bookkeeping: which row each local slot decodes and how far, and the rows' outputs."""

    def __init__(self, rows: int, N: int, slots: int, routing=None):
        self.slot_row = np.full((slots,), -1, np.int64)  # the row (b * n + j) a slot decodes, -1 = free
        self.slot_step = np.zeros((slots,), np.int64)  # tokens it has emitted
        self.tokens = np.zeros((rows, N), np.int32)
        self.mask = np.zeros((rows, N), bool)
        self.logp = np.zeros((rows, N), np.float32)
        self.logp_sampling = np.zeros((rows, N), np.float32)
        self.stopped = np.zeros((rows,), bool)
        # routing: (MoE layers, k, dtype) of `moe.routing_layout`, or None; the prompts' rows get theirs at admission
        self.routing = None if routing is None else np.zeros((rows, N) + tuple(routing[:2]), routing[2])
        self.prompt_routing = None

    def record(self, toks, emitted, lp, lps, stopped, live, routing=None):
        """One chunk's outputs [slots, K] (routing [slots, K, L_moe, k]) -> the rows' arrays; frees the slots
        whose sample finished."""
        occupied = self.slot_row >= 0
        K = toks.shape[1]
        sel = emitted & occupied[:, None]
        rows = np.broadcast_to(self.slot_row[:, None], sel.shape)[sel]
        cols = (self.slot_step[:, None] + np.arange(K)[None, :])[sel]
        self.tokens[rows, cols] = toks[sel]
        self.mask[rows, cols] = True
        self.logp[rows, cols] = lp[sel]
        self.logp_sampling[rows, cols] = lps[sel]
        if self.routing is not None:
            self.routing[rows, cols] = routing[sel]
        self.slot_step += emitted.sum(axis=1)
        finished = occupied & ~live
        self.stopped[self.slot_row[finished]] = stopped[finished]
        self.slot_row[finished] = -1

    def compaction(self, shards: int, per_shard: int) -> np.ndarray:
        """keep [shards, per_shard]: each local shard's live slots first (then free ones), and the remapped host
        arrays."""
        blocks = self.slot_row.reshape(shards, -1)
        keep = np.stack([np.argsort(b < 0, kind="stable")[:per_shard] for b in blocks]).astype(np.int32)
        self.slot_row = np.take_along_axis(blocks, keep, axis=1).reshape(-1)
        self.slot_step = np.take_along_axis(self.slot_step.reshape(shards, -1), keep, axis=1).reshape(-1)
        return keep


def _fetch(outs) -> list:
    """Device outputs -> this process's rows as NumPy (None stays None); every copy is started before the first
    is waited for."""
    for x in outs:
        for shard in [] if x is None else x.addressable_shards:
            shard.data.copy_to_host_async()
    return [None if x is None else distributed.to_local(x) for x in outs]


def _window(live_window: bool, Tp: int, N: int, furthest: int, chunk_steps: int):
    """The decode chunk's attention window: every slot writes below Tp + furthest + chunk_steps in this chunk, so
    it reads no further (a bucket of it, so a run compiles a few windows); None (the whole cache) when off."""
    return min(Tp + N, bucket_length(Tp + furthest + chunk_steps)) if live_window else None


def _pipelined(state, host: _Host, stats: RolloutStats, decode, *, exit_below: int, current: int, furthest: int,
               chunk_steps: int, window_of):
    """Chunks whose successor is known before they finish: no prompt waits, and either nothing can be compacted
    (exit_below = 0) or more than half of a power-of-two number of slots per shard are live (exit_below =
    current / 2: a chunk that runs all its steps leaves more than half live, too many to compact, and the same
    threshold follows). Chunk c + 1 is dispatched before chunk c's
    results are read, so the host's copies and bookkeeping overlap the device's work. furthest: the furthest live
    slot's step over all processes; a chunk advances it by at most chunk_steps, which bounds the next window (it
    may be a bucket above the blocking loop's when the furthest slot finished). Returns when a chunk ran fewer than
    chunk_steps steps (it hit the threshold or nothing was live; steps_run is the same global scalar on every
    process): the chunk dispatched after it ran zero steps (its threshold was already met), so the state is the
    one the blocking loop would hold, and the caller decides the next step. Zero-step chunks are not counted."""
    inflight = []
    while True:
        state, *out, steps_run = decode(state, exit_below, window_of(furthest))
        inflight.append((out, steps_run))
        furthest += chunk_steps
        if len(inflight) < 2:
            continue
        out, steps_run = inflight.pop(0)
        host.record(*_fetch(out))
        ran = int(steps_run)
        stats.add_chunk(ran, current)
        if ran < chunk_steps:
            return state


def refill(policy: Policy, params, tokens: np.ndarray, mask: np.ndarray, keys: np.ndarray, budgets: np.ndarray,
           n: int, sampling: SamplingParams, *, slots: int, chunk_steps: int = 32, live_window: bool = True,
           pipeline: bool = True) -> Samples:
    """The refill engine over this process's prompts tokens / mask [P, Tp] (left-padded), row keys [P * n, 2]
    (key data) and budgets [P * n]; `slots` S over all processes. live_window: each decode chunk's attention reads
    only the cache slots [0, W), W = bucket_length(Tp + the furthest live slot's step + chunk_steps) (<= Tp + N),
    not the whole budget's cache: decode reads grow with the answers, and a chunk compiles once per bucket.
    pipeline: where the next chunk is known, dispatch it before reading the last one's results (`_pipelined`);
    False waits for every chunk (the previous design; same results, for benchmarks). Returns the rows' `Samples`."""
    procs, me = distributed.process_count(), distributed.process_index()
    P, Tp = tokens.shape
    check_slots(slots, n)
    local = slots // procs
    if chunk_steps < 1:
        raise ValueError(f"chunk_steps must be >= 1, got {chunk_steps}")
    N = distributed.global_max(int(budgets.max()))
    shards = batch_shards(policy, slots)
    local_shards = max(shards // procs, 1)
    max_bucket = local // n  # prompts one process can admit at once
    # with several processes a global array must split over the batch axes: a prefill's rows are a multiple of
    # each process's share of them
    min_bucket = max(batch_devices(policy.mesh, policy.rules) // procs, 1) if procs > 1 else 1
    host = _Host(P * n, N, local, routing_layout(policy.config))
    stats = RolloutStats("refill", samples=P * n * procs, generated_tokens=0, slot_steps=0, decode_steps=0,
                         prefill_tokens=0)
    state = steps.empty_slots_jit(policy.graphdef, params, slots=slots, length=Tp + N)
    current, queue = slots, 0  # slots now (compaction shrinks them), next prompt to admit
    traced = sampling.traced()

    def decode(state, exit_below, window):
        return steps.decode_chunk_jit(policy.graphdef, params, state, jnp.int32(exit_below), *traced,
                                      prompt_slots=Tp, chunk=chunk_steps, flags=sampling.flags, window=window)

    window_of = functools.partial(_window, live_window, Tp, N, chunk_steps=chunk_steps)
    while True:
        free = np.flatnonzero(host.slot_row < 0)
        admit = min(len(free) // n, P - queue) if current == slots else 0
        live_by_shard = (host.slot_row >= 0).reshape(local_shards, -1).sum(axis=1)
        furthest = int(host.slot_step[host.slot_row >= 0].max(initial=0))
        counts = distributed.allgather(np.asarray([[admit, P - queue - admit, live_by_shard.sum(),
                                                    live_by_shard.max(), furthest]], np.int64))
        A, pending = int(counts[:, 0].max()), int(counts[:, 1].sum())
        live = int(counts[:, 2].sum() + counts[:, 0].sum() * n)
        if A:
            bucket = -(-min(_pow2(A), max_bucket) // min_bucket) * min_bucket
            rows = list(range(queue, queue + admit))
            batch = rows + [rows[0] if rows else 0] * (bucket - len(rows))  # padding rows are never read
            p_tokens, p_mask = place_batch(policy, tokens[batch], mask[batch])
            prefix, logits, prefix_routing = steps.prefill_jit(policy.graphdef, params, p_tokens, p_mask,
                                                               max_new_tokens=0)
            # the bucket's n samples per prompt: slot targets (global index; `slots` = none) and prefix rows
            targets = np.full((bucket * n,), slots, np.int32)
            sources = np.zeros((bucket * n,), np.int32)
            free_slots = free[:admit * n]
            sample_rows = (np.asarray(rows, np.int64)[:, None] * n + np.arange(n)[None, :]).reshape(-1)
            targets[:admit * n] = me * local + free_slots
            sources[:admit * n] = me * bucket + np.repeat(np.arange(admit), n)
            host.slot_row[free_slots], host.slot_step[free_slots] = sample_rows, 0
            new_keys = np.zeros((bucket * n, keys.shape[1]), np.uint32)
            new_budget = np.zeros((bucket * n,), np.int32)
            new_keys[:admit * n], new_budget[:admit * n] = keys[sample_rows], budgets[sample_rows]
            state = steps.insert_jit(state, prefix, logits, p_mask,
                                     *place_batch(policy, targets, sources, new_keys, new_budget), prefix_routing)
            if prefix_routing is not None:  # the prompts' own experts, for each of their n rows (routing replay)
                experts = distributed.to_local(prefix_routing)[:admit]
                if host.prompt_routing is None:
                    host.prompt_routing = np.zeros((P * n,) + experts.shape[1:], experts.dtype)
                host.prompt_routing[sample_rows] = np.repeat(experts, n, axis=0)
            queue += admit
            stats.prefill_calls += 1
            stats.prefill_tokens += bucket * procs * Tp
        if live == 0 and pending == 0:
            break
        if pending == 0 and not A and shards:  # the tail: shrink to the live slots of the fullest shard
            per_shard = _pow2(max(int(counts[:, 3].max()), 1))
            if per_shard * shards < current:
                keep = host.compaction(local_shards, per_shard)
                state = steps.compact_jit(state, *place_batch(policy, keep))
                current = per_shard * shards
        shrinkable = shards and current > shards
        if pending:
            exit_below = live - max(n, current // 8)  # enough slots free to admit a prompt somewhere
        elif shrinkable and live > current // 2:
            exit_below = current // 2  # then compact
        elif shrinkable:  # the shards are uneven: compact once more have finished
            exit_below = live - max(1, current // 8)
        else:
            exit_below = 0
        furthest = int(counts[:, 4].max())
        # the next chunk is known when no prompt waits and either nothing can be compacted or more than half the
        # slots are live in a power-of-two slot count per shard (a full chunk leaves too many live to compact)
        known = not shrinkable or (live > current // 2 and _pow2(current // shards) * shards == current)
        if pipeline and pending == 0 and known:
            state = _pipelined(state, host, stats, decode, exit_below=exit_below, current=current,
                               furthest=furthest, chunk_steps=chunk_steps, window_of=window_of)
            continue
        state, *out, steps_run = decode(state, exit_below, window_of(furthest))
        host.record(*_fetch(out))
        stats.add_chunk(int(steps_run), current)  # a chunk here runs >= 1 step: exit_below < live
    stats.generated_tokens = distributed.global_sum(int(host.mask.sum()))
    return Samples(host.tokens, host.mask, host.logp, host.logp_sampling, host.stopped, stats, host.routing,
                   host.prompt_routing)
