"""What the decode programs read and compute for given answer lengths: the plan's model of the rollout schedule.

The decode cost depends on the answers' lengths, not on the budget alone: the refill engine runs about
rows x mean / slots decode steps, and each step of its chunks reads the cache's live window (the first W slots,
W = bucket(Tp + the furthest live slot + chunk), `rollout.refill`) of every slot it computes; lockstep runs each pass
until its longest answer ends and reads the whole cache every step. Answers are modelled as RL answers are (as
`experiments/bench_rollout.py` draws them): lognormal with sigma 0.75, clipped to [1, budget], with the median chosen
so that the clipped mean is `mean_response_tokens`; mean == budget is every answer at the budget (the plan's default,
as before this model). The schedule below replays the engine's host loop on those lengths: a prompt's G samples are
admitted together when G slots are free, a chunk returns early once max(G, slots / 8) slots are free while prompts
wait, and once no prompt waits the live slots are compacted to a power of two. It counts steps, slot-steps and the
window of each step exactly for that schedule; the device programs' costs per step then follow from the cache and
weight bytes.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from arm_jax.buckets import bucket_length

SIGMA = 0.75


def answer_lengths(rows: int, budget: int, mean: float, sigma: float = SIGMA, seed: int = 0) -> np.ndarray:
    """[rows] int: lognormal answer lengths clipped to [1, budget] whose mean is `mean` (to within a token)."""
    if not 1 <= mean <= budget:
        raise ValueError(f"mean answer length {mean} must lie in [1, budget={budget}]")
    if mean >= budget:
        return np.full((rows,), budget, np.int64)
    z = np.random.RandomState(seed).normal(0.0, sigma, rows)

    def clipped(log_median):
        return np.clip(np.round(np.exp(log_median + z)), 1, budget)

    lo, hi = 0.0, np.log(budget) + 4 * sigma
    for _ in range(60):  # the clipped mean grows with the median: bisect
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if clipped(mid).mean() < mean else (lo, mid)
    return clipped(hi).astype(np.int64)


@dataclasses.dataclass
class DecodeSchedule:
    """steps: decode steps run; calls: jitted decode calls (refill chunks or lockstep passes); slot_steps: rows x
    steps computed (idle slots included); kv_slot_reads: sum over steps of rows computed x key slots read, the
    KV-cache traffic in units of one cache slot of one row; generated: valid tokens."""

    steps: int
    calls: int
    slot_steps: int
    kv_slot_reads: float
    generated: int
    kv_row_reads: float = 0.0  # what a kernel bounded by each row's own length would read (live rows only)

    @property
    def mean_window(self) -> float:
        """Key slots read per row per step, on average."""
        return self.kv_slot_reads / max(self.slot_steps, 1)


def refill_schedule(lengths: np.ndarray, group: int, slots: int, chunk: int, prompt: int, budget: int,
                    prompt_tokens: Optional[float] = None) -> DecodeSchedule:
    """Replays the refill engine's loop (one process) on `lengths` (rows in prompt order, `group` per prompt);
    prompt: the prompt slots Tp; prompt_tokens: a prompt's real tokens (default Tp), what a row-bounded kernel
    reads of it."""
    real_prompt = prompt if prompt_tokens is None else prompt_tokens
    rows = len(lengths)
    waiting = list(range(0, rows, group))  # the first row of each prompt not yet admitted
    progress = np.zeros(slots, np.int64)
    target = np.zeros(slots, np.int64)
    live = np.zeros(slots, bool)
    steps = calls = slot_steps = 0
    kv = kv_rows = 0.0
    while waiting or live.any():
        while waiting and (~live).sum() >= group:  # admit whole prompts into free slots
            first = waiting.pop(0)
            free = np.nonzero(~live)[0][:group]
            target[free] = lengths[first:first + group]
            progress[free], live[free] = 0, True
        remaining = np.where(live, target - progress, 0)
        k = min(chunk, int(remaining[live].max()))
        if waiting:  # the chunk returns once max(G, slots / 8) slots are free (`refill.refill`'s exit_below)
            need = min(max(group, slots // 8) - int((~live).sum()), int(live.sum()))
            if need > 0:
                k = min(k, int(np.sort(remaining[live])[need - 1]))
        computed = slots if waiting else min(slots, 1 << max(int(live.sum()) - 1, 0).bit_length())
        window = min(prompt + budget, bucket_length(prompt + int(progress[live].max()) + k))
        steps, calls = steps + k, calls + 1
        slot_steps += computed * k
        kv += float(computed) * k * window
        run = np.minimum(k, remaining[live])  # each live row reads prompt + i keys at its step i
        kv_rows += float(np.sum(run * (real_prompt + progress[live]) + run * (run + 1) / 2))
        progress[live] += run
        live &= progress < target
    return DecodeSchedule(steps, calls, slot_steps, kv, int(lengths.sum()), kv_rows)


def lockstep_schedule(lengths: np.ndarray, rows_per_pass: int, prompt: int, budget: int,
                      prompt_tokens: Optional[float] = None) -> DecodeSchedule:
    """Lockstep passes of `rows_per_pass` rows: each runs to its longest answer, every step reading all Tp + N
    cache slots of every row (a row-bounded kernel: its prompt's real tokens and the tokens so far, a finished
    row its whole answer, until the pass ends)."""
    real_prompt = prompt if prompt_tokens is None else prompt_tokens
    steps = calls = slot_steps = 0
    kv = kv_rows = 0.0
    for start in range(0, len(lengths), rows_per_pass):
        ls = lengths[start:start + rows_per_pass].astype(np.float64)
        n = int(ls.max())
        steps, calls, slot_steps = steps + n, calls + 1, slot_steps + n * rows_per_pass
        kv += float(n) * rows_per_pass * (prompt + budget)
        kv_rows += float(np.sum(n * real_prompt + ls * (ls + 1) / 2 + (n - ls) * ls))
    return DecodeSchedule(steps, calls, slot_steps, kv, int(lengths.sum()), kv_rows)


def packed_rows(sequences: int, tokens_per_sequence: float, row_len: int, row_multiple: int) -> int:
    """Rows of `row_len` tokens that `sequences` sequences of `tokens_per_sequence` tokens on average pack into
    (ideal packing), bucketed and rounded up to `row_multiple` as `models.packing.pack` rounds them."""
    rows = int(np.ceil(sequences * tokens_per_sequence / row_len))
    rows = bucket_length(max(rows, 1), minimum=1)
    return -(-rows // row_multiple) * row_multiple
