"""Graded rollout batches waiting for their update (one-step-off RL, `RLConfig.max_staleness`), saved beside each
checkpoint so that a run killed at any moment resumes with the same batches: their weights are gone by then (the
checkpoint holds the newer ones), so the samples are kept, not re-generated.

One file per checkpoint step and process, `<checkpoint dir>/pending/<step>.p<process>.npz`, written atomically
(a temporary name, then a rename) before the checkpoint itself is saved, so every checkpoint that can be restored
has its file. Local paths and bucket URLs (through etils' epath, as orbax writes them) alike.
"""

from __future__ import annotations

import io
import json

import jax
import numpy as np
from etils import epath

from arm_jax.train.rollout_batch import Sampled


def _dir(checkpoint_dir: str) -> epath.Path:
    return epath.Path(checkpoint_dir) / "pending"


def _name(step: int) -> str:
    return f"{step}.p{jax.process_index()}.npz"


def save(checkpoint_dir: str, step: int, batches: list[Sampled]) -> None:
    """Writes this process's waiting batches (oldest first) for checkpoint `step`."""
    arrays = {f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.arrays().items()}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    folder = _dir(checkpoint_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (_name(step) + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.rename(folder / _name(step))


def load(checkpoint_dir: str, step: int, count: int) -> list[dict]:
    """The `count` batches saved with checkpoint `step` as array dicts (`Sampled.from_arrays`' input), with
    'data_state' parsed. A missing file is an error naming it: the run could not resume exactly without it."""
    path = _dir(checkpoint_dir) / _name(step)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint {step} of a one-step-off run (RLConfig.max_staleness > 0) "
                                f"waits on {count} sampled batches, and their file is missing")
    with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as z:
        flat = {k: z[k] for k in z.files}
    items = [{k.split("/", 1)[1]: v for k, v in flat.items() if k.split("/", 1)[0] == str(i)} for i in range(count)]
    for item in items:
        item["data_state_parsed"] = json.loads(str(item["data_state"]))
    return items


def prune(checkpoint_dir: str, keep: set[int]) -> None:
    """Deletes this process's files of checkpoints no longer kept (orbax's max_to_keep)."""
    folder = _dir(checkpoint_dir)
    if not folder.exists():
        return
    suffix = f".p{jax.process_index()}.npz"
    for path in folder.iterdir():
        name = path.name
        if name.endswith(suffix) and name[:-len(suffix)].isdigit() and int(name[:-len(suffix)]) not in keep:
            path.unlink()
