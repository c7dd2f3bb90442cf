"""Sequence packing for the learner and the log-prob passes: several sequences per row, told apart by segment ids.

RL answers are long-tailed: in the padded layout `[N, L]` every sequence costs the longest one's L columns. Packed,
the sequences' real tokens are laid end to end in rows of `row_len` tokens (first-fit decreasing), each with its own
segment id (1, 2, ... within a row; 0 = padding) and positions restarting at 0, so a pass computes about the valid
tokens plus a little padding. Attention then reads only its own segment (`layers.AttentionMask` with segment ids:
splash's segment ids on TPU, a block-diagonal causal mask elsewhere), and the per-token outputs go back to the
padded layout through `index` (a gather, whose gradient is a scatter-add), so losses, metrics and ARM's
confidences are computed on exactly the arrays of the padded layout.

Shapes are fixed per bucket: `row_len` is a run option or the padded layout's width (itself a bucket), the row count
a bucket too (`buckets.bucket_length`), so a run compiles each pass once per (rows, row_len) bucket pair.

Layout of one packed batch of M micro-batches (the learner's interleaved micro-batches: sequence i belongs to
micro-batch i mod M): packed row k = r * M + m is row r of micro-batch m, so the learner's split (rows m, m + M, ...)
hands micro-batch m its own R rows, and with several processes every process packs its own sequences into its own
R_local rows of each micro-batch (the global micro-batch's rows are process-major, as its sequences are).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from arm_jax import distributed
from arm_jax.buckets import bucket_length
from arm_jax.sharding import DEFAULT_RULES, batch_devices


@dataclasses.dataclass
class Packed:
    """tokens, segment_ids, positions [M * R, C] int32 (row r * M + m = row r of micro-batch m; segment 0 =
    padding); index [N, L] int32: where each token of the padded layout lies in its micro-batch's flattened
    [R_global * C] buffer (R_global * C for columns without a token: the gather's zero slot).
    head_cols [M * R, H] int32 (packed with a loss mask): the columns of each row whose log-prob the loss reads (its
    loss tokens, a sequence's first token excepted), padded with column 1; the LM head then runs at those H
    positions per row only, and `index` points into the flattened [R_global * H] head buffer (loss tokens only)."""

    tokens: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    index: np.ndarray
    micro_batches: int = 1
    head_cols: Optional[np.ndarray] = None
    extras: dict = dataclasses.field(default_factory=dict)

    @property
    def rows_per_micro_batch(self) -> int:
        """R_local: this process's packed rows of each micro-batch."""
        return self.tokens.shape[0] // self.micro_batches

    @property
    def valid_fraction(self) -> float:
        """Real tokens / packed slots (1 = no padding)."""
        return float((self.segment_ids > 0).mean()) if self.segment_ids.size else 1.0


def row_multiple(mesh, rules=None) -> int:
    """What this process's packed row count must be a multiple of: its share of the batch devices (the global row
    count, processes x rows, then divides over the mesh's batch axes)."""
    return max(1, batch_devices(mesh, rules or DEFAULT_RULES) // distributed.process_count())


def seq_lengths(attention_mask: np.ndarray) -> np.ndarray:
    """[N, L] 0/1 -> [N] real tokens per sequence."""
    return np.asarray(attention_mask, bool).sum(axis=1)


def first_fit_decreasing(lengths: np.ndarray, row_len: int) -> list[list[int]]:
    """Bins of sequence indices, each summing to <= row_len tokens (longest first, each into the first row it
    fits). A sequence longer than row_len is an error."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = int(lengths[i])
        if n > row_len:
            raise ValueError(f"a sequence of {n} tokens does not fit a packed row of {row_len} tokens "
                             f"(RLConfig.pack_length)")
        for r, f in enumerate(free):
            if n <= f:
                rows[r].append(int(i))
                free[r] -= n
                break
        else:
            rows.append([int(i)])
            free.append(row_len - n)
    return rows


def pack_row_len(attention_mask: np.ndarray, row_len: Optional[int] = None) -> int:
    """The packed row length: `row_len` when given (every sequence must fit), else the padded layout's own width
    L (a bucket already: the prompt bucket + the trimmed answers' bucket, so packing adds no shape of its own)."""
    if row_len is None:
        return int(attention_mask.shape[1])
    longest = distributed.global_max(int(seq_lengths(attention_mask).max()) if attention_mask.size else 1)
    if longest > row_len:
        raise ValueError(f"a sequence of {longest} tokens does not fit a packed row of RLConfig.pack_length="
                         f"{row_len} tokens")
    return int(row_len)


def pack(tokens: np.ndarray, attention_mask: np.ndarray, num_micro_batches: int = 1,
         row_len: Optional[int] = None, row_multiple: int = 1, loss_mask: Optional[np.ndarray] = None,
         extras: Optional[dict] = None) -> Packed:
    """Packs this process's sequences `tokens` / `attention_mask` [N_local, L] into rows of C tokens, per
    micro-batch (sequence i -> micro-batch i mod M). Every micro-batch gets the same row count R_local, the bucket
    of the fullest one's, agreed over processes and rounded up to `row_multiple` (so the global R divides over the
    batch devices). A sequence's tokens are its mask-1 columns, in order. With `loss_mask` [N_local, L] the
    result carries `head_cols` (H = the bucket of the most loss tokens in a row, agreed over processes) and
    `index` addresses the head buffer (`Packed`). extras: per-token arrays {name: [N_local, L, ...]} (e.g. MoE
    routing replay) packed alongside the tokens into `Packed.extras` [M * R, C, ...] (zeros on padding)."""
    tokens, mask = np.asarray(tokens), np.asarray(attention_mask, bool)
    N, L = tokens.shape
    M = num_micro_batches
    if N % M:
        raise ValueError(f"{N} sequences do not split into {M} micro-batches")
    C = pack_row_len(mask, row_len)
    lengths = seq_lengths(mask)
    bins = [first_fit_decreasing(lengths[m::M], C) for m in range(M)]
    R = distributed.global_max(max(len(b) for b in bins))
    R = bucket_length(R, minimum=1)
    R = -(-R // row_multiple) * row_multiple
    procs, p = distributed.process_count(), distributed.process_index()
    out_tok = np.zeros((R * M, C), np.int32)
    out_seg = np.zeros((R * M, C), np.int32)
    out_pos = np.zeros((R * M, C), np.int32)
    index = np.full((N, L), procs * R * C, np.int32)
    extras = {k: np.asarray(v) for k, v in (extras or {}).items()}
    out_extra = {k: np.zeros((R * M, C) + v.shape[2:], v.dtype) for k, v in extras.items()}
    heads = []  # per sequence: (packed row, its first head slot, packed columns, padded row, padded columns)
    head_count = np.zeros(R * M, np.int64)  # head positions per packed row so far
    for m, rows in enumerate(bins):
        for r, members in enumerate(rows):
            k, start = r * M + m, 0
            for s, local_i in enumerate(members):
                i = m + M * local_i  # the sequence's row in the padded layout
                cols = np.nonzero(mask[i])[0]
                n = len(cols)
                out_tok[k, start:start + n] = tokens[i, cols]
                out_seg[k, start:start + n] = s + 1
                out_pos[k, start:start + n] = np.arange(n)
                for name, v in extras.items():
                    out_extra[name][k, start:start + n] = v[i, cols]
                if loss_mask is None:  # every token's place in the packed buffer
                    index[i, cols] = (p * R + r) * C + start + np.arange(n)
                else:  # the loss tokens' places in the head buffer (written below, once H is known)
                    trained = np.nonzero(np.asarray(loss_mask[i])[cols[1:]] > 0)[0] + 1  # never a first token
                    heads.append((k, head_count[k], start + trained, i, cols[trained]))
                    head_count[k] += len(trained)
                start += n
    if loss_mask is None:
        return Packed(out_tok, out_seg, out_pos, index, M, extras=out_extra)
    H = min(C, bucket_length(distributed.global_max(int(head_count.max(initial=1)))))  # >= 16
    head_cols = np.ones((R * M, H), np.int32)
    index = np.full((N, L), procs * R * H, np.int32)
    for k, first, packed_cols, i, padded_cols in heads:
        slots = first + np.arange(len(packed_cols))
        head_cols[k, slots] = packed_cols
        index[i, padded_cols] = (p * R + k // M) * H + slots
    return Packed(out_tok, out_seg, out_pos, index, M, head_cols, out_extra)


def unpack(values: jax.Array, index: jax.Array) -> jax.Array:
    """values [R, C] (one micro-batch's packed rows) -> [S, L] at `index` [S, L] (R * C: 0). Differentiable."""
    flat = jnp.concatenate([values.reshape(-1), jnp.zeros((1,), values.dtype)])
    return jnp.take(flat, index, axis=0, mode="clip")


def unpack_host(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """`unpack` in NumPy of one micro-batch on this process: values [R_local, C] its own packed rows, index [S, L]
    (process-global, as `pack` writes it) -> [S, L]."""
    values = np.asarray(values)
    local = index.astype(np.int64) - distributed.process_index() * values.size
    flat = np.concatenate([values.reshape(-1), np.zeros((1,), values.dtype)])
    return flat[np.where((local >= 0) & (local < values.size), local, values.size)]
