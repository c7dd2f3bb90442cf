"""Orbax checkpoints of the whole run state: train state (params, optimizer state, step counters), the data
iterator's state, and the metric history. Saves are asynchronous and atomic (orbax writes to a temporary folder
and renames it), so a kill during a save leaves the previous checkpoint usable; restores place every array
directly in the current mesh's shardings, whatever mesh saved it.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


def _leaves_dict(tree) -> dict[str, Any]:
    """A pytree -> {'00000': leaf, ...}: a flat, string-keyed tree orbax stores regardless of the tree's node
    types (nnx.State with integer layer keys, optax states)."""
    return {f"{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(tree))}


class Checkpointer:
    """Wraps `ocp.CheckpointManager(directory)` with keep-N and asynchronous saves. `directory` may be a local
    path or a bucket URL (gs://...), which orbax writes through tensorstore from every process."""

    def __init__(self, directory: str, max_to_keep: int = 3, async_save: bool = True):
        self.directory = directory if "://" in directory else os.path.abspath(directory)  # gs://, s3:// as given
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=async_save)
        self._mgr = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> Optional[int]:
        """The newest complete checkpoint's step, or None."""
        return self._mgr.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        """state: any pytree (the TrainState); meta: JSON-able (iterator state, metric history, config)."""
        self._mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_leaves_dict(state)),
                                                     meta=ocp.args.JsonSave(meta)))

    def restore(self, step: int, like) -> tuple[Any, dict]:
        """Restores into the structure, dtypes and shardings of `like` (a pytree of arrays on the current mesh)."""
        abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
                    for k, v in _leaves_dict(like).items()}
        out = self._mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                              meta=ocp.args.JsonRestore()))
        leaves = [out["state"][k] for k in sorted(out["state"])]
        return jax.tree.unflatten(jax.tree.structure(like), leaves), out["meta"]

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are written."""
        self._mgr.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and closes the manager."""
        self._mgr.wait_until_finished()
        self._mgr.close()
