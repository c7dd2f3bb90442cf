"""Run outputs: metrics per step to JSONL and TensorBoard event files (tensorboardX, no TensorFlow), a console
progress line with ETA and the key numbers, and sampled completions with their rewards."""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import sys
import time
from typing import Optional

import numpy as np

KEY_METRICS = ("reward_mean", "accuracy", "entropy", "response_len_mean", "arm_term_mean", "loss")


@dataclasses.dataclass(frozen=True)
class Reduction:
    """How one learner metric combines: across micro-batches inside the jitted step ('sum', 'min', 'max'; the
    identity element starts the scan), whether the step divides it by the response tokens (a per-token mean), and
    across the updates of one RL step ('mean', 'min', 'max', 'sum')."""

    micro: str = "sum"
    per_token: bool = False
    updates: str = "mean"


# The one table the learner (micro-batch scan) and the loop (mu x num_minibatches updates) both read.
LEARNER_METRICS: dict[str, Reduction] = {
    "loss": Reduction(), "pg_loss": Reduction(),
    **{k: Reduction(per_token=True) for k in ("kl", "entropy", "clip_frac_low", "clip_frac_high", "ratio_mean",
                                              "ratio_clamped", "kl_clamped")},
    "ratio_min": Reduction("min", updates="min"), "ratio_max": Reduction("max", updates="max"),
    "tokens": Reduction(updates="mean"),  # response tokens of the update (the per-token denominators)
}
STEP_METRICS: dict[str, str] = {"grad_norm": "mean", "lr": "mean", "skipped": "sum",  # computed once per update
                                "pack_fill": "mean"}  # packed learner: real tokens / packed slots

_MICRO_IDENTITY = {"sum": 0.0, "min": np.inf, "max": -np.inf}
_UPDATES = {"mean": np.mean, "min": np.min, "max": np.max, "sum": np.sum}


def micro_identity(name: str) -> float:
    """The identity element that starts metric `name`'s micro-batch reduction (0, +inf or -inf)."""
    return _MICRO_IDENTITY[LEARNER_METRICS[name].micro]


def combine_micro(name: str, a, b, xp):
    """a (+) b for metric `name` with the array module xp (jax.numpy in the step)."""
    return {"sum": xp.add, "min": xp.minimum, "max": xp.maximum}[LEARNER_METRICS[name].micro](a, b)


def reduce_updates(updates: list[dict]) -> dict:
    """The metrics of the updates of one RL step -> one value each, by the table."""
    out = {}
    for k in updates[0]:
        how = LEARNER_METRICS[k].updates if k in LEARNER_METRICS else STEP_METRICS.get(k, "mean")
        value = _UPDATES[how]([float(u[k]) for u in updates])
        out[k] = int(value) if how == "sum" else float(value)
    return out


def to_python(x):
    """numpy / jax scalars -> float/int for JSON."""
    if isinstance(x, dict):
        return {k: to_python(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_python(v) for v in x]
    arr = np.asarray(x)
    if arr.ndim == 0:
        v = arr.item()
        return None if isinstance(v, float) and not math.isfinite(v) else v
    return arr.tolist()


def _keep_steps_upto(path: str, step: int) -> None:
    """Rewrites a JSON-lines log keeping only the rows of steps <= `step` (what the checkpoint being resumed saw), so
    a run killed after writing a step's rows but before checkpointing it does not log that step twice."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(rows)
    os.replace(tmp, path)


class MetricsWriter:
    """Writes `workdir/metrics.jsonl`, `workdir/tb/` events and `workdir/samples.jsonl` (process 0 only), and to W&B
    when given a `train.wandb_log.WandbLogger` (`wandb`)."""

    def __init__(self, workdir: str, total_steps: int, history: Optional[list[dict]] = None, enabled: bool = True,
                 tensorboard: bool = True, stream=sys.stdout, wandb=None):
        self.enabled = enabled
        self._wandb = wandb if enabled else None
        self.total_steps = total_steps
        self.history: list[dict] = list(history or [])
        self.stream = stream
        self._t0 = time.time()
        self._start_step = self.history[-1]["step"] if self.history else 0
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, "metrics.jsonl")
        # a resumed run rewrites the file from the checkpointed history: steps after it are replayed exactly
        with open(self.path, "w") as f:
            for row in self.history:
                f.write(json.dumps(row) + "\n")
        self.samples_path = os.path.join(workdir, "samples.jsonl")
        _keep_steps_upto(self.samples_path, self._start_step)  # rows of steps after the checkpoint are replayed
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter
            tb_dir = os.path.join(workdir, "tb")
            fresh = not glob.glob(os.path.join(tb_dir, "events.out.tfevents.*"))
            # events of steps after the checkpoint are hidden: the replayed steps write them again
            self._tb = SummaryWriter(tb_dir, flush_secs=10, purge_step=self._start_step + 1)
            if fresh:  # a relaunch on a fresh machine: the checkpointed history's curves, as the run drew them
                for row in self.history:
                    self._tb_row(row)

    def write(self, step: int, metrics: dict) -> None:
        """Appends one step's metrics to metrics.jsonl and TensorBoard, updates the progress line and the history."""
        row = {"step": step, **to_python(metrics)}
        self.history.append(row)
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            self._tb_row(row)
        if self._wandb is not None:
            self._wandb.log(step, row)
        self._progress(step, row)

    def _tb_row(self, row: dict) -> None:
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and v is not None:
                self._tb.add_scalar(k, v, row["step"])

    def _progress(self, step: int, row: dict) -> None:
        done = step - self._start_step
        elapsed = time.time() - self._t0
        eta = elapsed / max(done, 1) * (self.total_steps - step)
        width = 24
        filled = int(width * step / max(self.total_steps, 1))
        keys = " ".join(f"{k}={row[k]:.3g}" for k in KEY_METRICS if isinstance(row.get(k), (int, float)))
        print(f"[{'#' * filled}{'.' * (width - filled)}] step {step}/{self.total_steps} "
              f"eta {eta:5.0f}s {keys}", file=self.stream, flush=True)

    def samples(self, step: int, rows: list[dict]) -> None:
        """Appends sampled completions (prompt, completion, reward) of a step to samples.jsonl."""
        if not self.enabled:
            return
        with open(self.samples_path, "a") as f:
            for r in rows:
                f.write(json.dumps({"step": step, **to_python(r)}) + "\n")
        if self._wandb is not None:
            self._wandb.samples(step, [to_python(r) for r in rows])

    def close(self) -> None:
        """Flushes and closes the outputs."""
        if self.enabled and self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.close()
