"""Orbax checkpoints of the whole run state: train state (params, optimizer state, step counters), the data
iterator's state, and the metric history. Saves are asynchronous and atomic (orbax writes to a temporary folder
and renames it), so a kill during a save leaves the previous checkpoint usable; restores place every array
directly in the current mesh's shardings, whatever mesh saved it.

The state is stored as a nested dict keyed by each leaf's path (`params/model/layers/0/attn/q/kernel/...`,
`opt_state/1/0/mu/...`, `step`), not by leaf position: a restore compares the checkpoint's keys, shapes and dtypes
with the tree it restores into and names the first difference (`CheckpointMismatch`) instead of loading equally
shaped arrays into each other. `restore_params` reads the parameters alone (export, evaluation).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointMismatch(ValueError):
    """The checkpoint's tree differs from the one restored into; the message names the first differing key."""


def _key(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def leaf_paths(tree) -> list[tuple[tuple[str, ...], Any]]:
    """[(path as string keys, leaf)] in the tree's leaf order."""
    return [(tuple(_key(k) for k in path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def keyed(tree) -> dict:
    """A pytree -> nested dict of its leaves keyed by path (orbax stores it regardless of the tree's node types:
    nnx.State with integer layer keys, optax's named tuples)."""
    out: dict = {}
    for path, leaf in leaf_paths(tree):
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return out


def _get(nested: dict, path: tuple[str, ...]):
    for k in path:
        nested = nested[k]
    return nested


def _abstract(tree) -> dict:
    return keyed(jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding), tree))


class Checkpointer:
    """Wraps `ocp.CheckpointManager(directory)` with keep-N and asynchronous saves. `directory` may be a local
    path or a bucket URL (gs://...), which orbax writes through tensorstore from every process."""

    def __init__(self, directory: str, max_to_keep: int = 3, async_save: bool = True):
        self.directory = directory if "://" in directory else os.path.abspath(directory)  # gs://, s3:// as given
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=async_save)
        self._mgr = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            "state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> Optional[int]:
        """The newest complete checkpoint's step, or None."""
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        """Every complete checkpoint's step, oldest first."""
        return sorted(self._mgr.all_steps())

    def save(self, step: int, state, meta: dict) -> None:
        """state: any pytree (the TrainState); meta: JSON-able (iterator state, metric history, config)."""
        self._mgr.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(keyed(state)),
                                                     meta=ocp.args.JsonSave(meta)))

    def _stored(self, step: int):
        """The metadata tree (shape, dtype per key) of checkpoint `step`'s state."""
        stored = self._mgr.item_metadata(step)["state"]
        if stored is None:
            raise CheckpointMismatch(f"{self.directory}/{step}: no state metadata (not an arm_jax checkpoint?)")
        return stored.tree if hasattr(stored, "tree") else stored

    def _check(self, step: int, abstract: dict, partial: bool) -> None:
        """Names the first key whose presence, shape or dtype differs between checkpoint `step` and `abstract`."""
        have = dict(leaf_paths(self._stored(step)))
        want = dict(leaf_paths(abstract))
        where = f"checkpoint {self.directory}/{step}"
        for path in sorted(set(want) | (set() if partial else set(have))):
            name = "/".join(path)
            if path not in have:
                raise CheckpointMismatch(f"{where} has no {name!r}, which the run's state has (a checkpoint of "
                                         f"another model, optimizer or arm_jax version)")
            if path not in want:
                raise CheckpointMismatch(f"{where} holds {name!r}, which the run's state does not have")
            if tuple(have[path].shape) != tuple(want[path].shape) or np.dtype(have[path].dtype) != want[path].dtype:
                raise CheckpointMismatch(f"{where}: {name!r} is {have[path].dtype}{list(have[path].shape)} there, "
                                         f"{want[path].dtype}{list(want[path].shape)} in the run's state")

    def _restore(self, step: int, abstract: dict, partial: bool, meta: bool):
        self._check(step, abstract, partial)
        items = dict(state=ocp.args.PyTreeRestore(abstract, ocp.checkpoint_utils.construct_restore_args(abstract),
                                                  partial_restore=partial))
        if meta:
            items["meta"] = ocp.args.JsonRestore()
        return self._mgr.restore(step, args=ocp.args.Composite(**items))

    def restore(self, step: int, like) -> tuple[Any, dict]:
        """Restores into the structure, dtypes and shardings of `like` (a pytree of arrays on the current mesh)."""
        out = self._restore(step, _abstract(like), partial=False, meta=True)
        leaves = [_get(out["state"], path) for path, _ in leaf_paths(like)]
        return jax.tree.unflatten(jax.tree.structure(like), leaves), out["meta"]

    def restore_params(self, step: int, like_params):
        """The parameters alone (the TrainState's `params` subtree) into the shardings of `like_params`."""
        out = self._restore(step, {"params": _abstract(like_params)}, partial=True, meta=False)
        leaves = [_get(out["state"]["params"], path) for path, _ in leaf_paths(like_params)]
        return jax.tree.unflatten(jax.tree.structure(like_params), leaves)

    def arrays(self, step: int) -> dict[str, np.ndarray]:
        """Every stored array of checkpoint `step` by its '/'-joined path, as numpy on one device, whatever mesh
        saved it (inspection and tests)."""
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=one),
                                self._stored(step))
        out = self._restore(step, abstract, partial=False, meta=False)["state"]
        return {"/".join(path): np.asarray(leaf) for path, leaf in leaf_paths(out)}

    def meta(self, step: int) -> dict:
        """The JSON metadata saved with checkpoint `step`."""
        return self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are written."""
        self._mgr.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and closes the manager."""
        self._mgr.wait_until_finished()
        self._mgr.close()
