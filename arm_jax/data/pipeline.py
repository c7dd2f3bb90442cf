"""The prompt input pipeline (grain): seeded shuffling per epoch, per-process sharding, batches of P records,
and an iterator state that restores exactly (checkpointed with the run)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import grain
import jax


class PromptBatches:
    """Iterates batches (lists) of `batch_size` records from a random-access `source`.

    Every process reads only its shard (records i with i % shard_count == shard_index; default: this JAX
    process), shuffled with `seed` anew each epoch; `num_epochs=None` repeats forever. `transform` maps each record
    (e.g. to a tokenized prompt). `get_state()` / `set_state()` save and restore the position exactly.
    """

    def __init__(self, source, batch_size: int, *, seed: int = 0, shard_index: Optional[int] = None,
                 shard_count: Optional[int] = None, num_epochs: Optional[int] = None,
                 transform: Optional[Callable[[dict], Any]] = None, drop_remainder: bool = True):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
        ds = grain.MapDataset.source(source)[shard_index::shard_count]
        if len(ds) < batch_size and drop_remainder:
            raise ValueError(f"shard {shard_index}/{shard_count} holds {len(ds)} records, fewer than one batch of "
                             f"{batch_size}")
        ds = ds.shuffle(seed=seed).repeat(num_epochs)
        if transform is not None:
            ds = ds.map(transform)
        ds = ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=list)
        self.records_per_epoch = len(grain.MapDataset.source(source)[shard_index::shard_count])
        self._iter = iter(ds.to_iter_dataset())

    def __iter__(self):
        return self

    def __next__(self) -> list:
        return next(self._iter)

    def get_state(self) -> dict:
        return self._iter.get_state()

    def set_state(self, state: dict) -> None:
        self._iter.set_state(state)
