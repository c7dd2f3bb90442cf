"""The prompt input pipeline (grain): seeded shuffling per epoch, per-process sharding, batches of P records,
and an iterator state that restores exactly (checkpointed with the run)."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Optional

import grain
import jax
import numpy as np
from etils import epath


class _ProcessRows:
    """Random access to this process's part of every global batch of a (shuffled, repeated) dataset: local row j
    is global position (j // per) * batch + shard_index * per + j % per, with per = batch / shard_count."""

    def __init__(self, ds, batch_size: int, shard_index: int, shard_count: int):
        self.ds, self.per, self.batch, self.shard = ds, batch_size // shard_count, batch_size, shard_index

    def __len__(self):
        return (len(self.ds) // self.batch) * self.per

    def __getitem__(self, j):
        return self.ds[(j // self.per) * self.batch + self.shard * self.per + j % self.per]


class Subset:
    """Random access to the records of `source` at `indices` (in that order)."""

    def __init__(self, source, indices):
        self.source, self.indices = source, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.source[self.indices[int(i)]]


def prompt_lengths(source, encode: Callable[[dict], list[int]], cache_path: Optional[str] = None) -> np.ndarray:
    """[len(source)] prompt lengths in tokens (chat template included). The processes split the work (each encodes
    every process_count-th record; the lengths are gathered), and with `cache_path` (a local path or bucket URL, e.g.
    in the checkpoint folder) a restart reads them back instead of tokenizing again; the cache is keyed by the
    record count and the first and last prompts' token ids, so another tokenizer, template or dataset recomputes."""
    from arm_jax import distributed
    n = len(source)
    key = hashlib.sha256(json.dumps([n, list(encode(source[0])), list(encode(source[n - 1]))]).encode()).hexdigest()
    path = epath.Path(cache_path) if cache_path else None
    if path is not None and path.exists():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return np.asarray(cached["lengths"], np.int64)
    procs, me = distributed.process_count(), distributed.process_index()
    per = -(-n // procs)
    mine = np.full(per, -1, np.int64)
    for j, i in enumerate(range(me, n, procs)):
        mine[j] = len(encode(source[i]))
    everyone = distributed.allgather(mine[None]).reshape(procs, per)
    lengths = np.asarray([everyone[i % procs, i // procs] for i in range(n)], np.int64)
    if path is not None and distributed.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / (path.name + ".tmp")
        tmp.write_text(json.dumps({"key": key, "lengths": lengths.tolist()}))
        tmp.rename(path)
    return lengths


def filter_long_prompts(source, lengths, max_tokens: int) -> tuple[Subset, list[int]]:
    """Drops the records whose prompt (as the task tokenizes it, template included; `prompt_lengths`) is longer than
    max_tokens, as verl's `filter_overlong_prompts`. lengths: [len(source)] ints, or a record -> length function.
    Returns (the kept records, indices of the dropped ones) so callers can report them; the same on every
    process."""
    if callable(lengths):
        lengths = [lengths(source[i]) for i in range(len(source))]
    kept = [i for i in range(len(source)) if lengths[i] <= max_tokens]
    dropped = [i for i in range(len(source)) if lengths[i] > max_tokens]
    if not kept:
        raise ValueError(f"every one of the {len(source)} prompts is longer than max_prompt_tokens={max_tokens}")
    return Subset(source, kept), dropped


class PromptBatches:
    """Iterates batches (lists) of records from a random-access `source`, `batch_size` records per global batch.

    The global order (shuffled with `seed` anew each epoch; `num_epochs=None` repeats forever) does not depend on
    the number of processes; each process reads only its block of batch_size / shard_count records of every global
    batch (default: this JAX process's block), so a multi-process run sees the same batches as a single process.
    `transform` maps each record (e.g. to a tokenized prompt). `get_state()` / `set_state()` save and restore the
    position exactly (the same state on every process).
    """

    def __init__(self, source, batch_size: int, *, seed: int = 0, shard_index: Optional[int] = None,
                 shard_count: Optional[int] = None, num_epochs: Optional[int] = None,
                 transform: Optional[Callable[[dict], Any]] = None, drop_remainder: bool = True):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
        if batch_size % shard_count:
            raise ValueError(f"batch_size={batch_size} prompts do not divide over {shard_count} processes")
        ds = grain.MapDataset.source(source)
        if len(ds) < batch_size and drop_remainder:
            raise ValueError(f"the source holds {len(ds)} records, fewer than one batch of {batch_size}")
        self.records_per_epoch = len(ds)
        ds = ds.shuffle(seed=seed).repeat(num_epochs)
        if shard_count > 1:
            ds = grain.MapDataset.source(_ProcessRows(ds, batch_size, shard_index, shard_count))
        if transform is not None:
            ds = ds.map(transform)
        ds = ds.batch(batch_size // shard_count, drop_remainder=drop_remainder, batch_fn=list)
        self._iter = iter(ds.to_iter_dataset())

    def __iter__(self):
        return self

    def __next__(self) -> list:
        return next(self._iter)

    def get_state(self) -> dict:
        """The iterator's state (JSON-able), saved in every checkpoint."""
        return self._iter.get_state()

    def set_state(self, state: dict) -> None:
        """Restores a state from `get_state`: the next batch is the one that would have followed."""
        self._iter.set_state(state)
