"""Weights & Biases logging (optional: `pip install -e ".[wandb]"`), a sink of `MetricsWriter` beside metrics.jsonl and
TensorBoard, on process 0 only.

Every metric of the loop is logged at its RL step, the run's resolved gin configuration as the run config (key
'gin'), sampled completions as tables ('samples'), and each held-out evaluation's Pass@k curve as a W&B line plot
('eval/pass_at_k'). The run id rides in every checkpoint (and in `<workdir>/wandb_run_id` until the first one), so
a relaunch from the checkpoint continues the same W&B run (`resume='allow'`), on this machine or a fresh one; the
steps a resume replays were logged before with the same values (exact resume) and W&B keeps the first.
`WANDB_MODE=offline` writes the run under `<workdir>/wandb/` without a network (`wandb sync` uploads it later).
"""

from __future__ import annotations

import os
import secrets
from typing import Optional


def _import_wandb():
    try:
        import wandb
    except ImportError as e:
        raise ImportError("W&B logging (--wandb_project / experiment.wandb_project) needs the wandb package: "
                          "pip install -e \".[wandb]\"") from e
    return wandb


class WandbLogger:
    """One W&B run for one workdir. project: the W&B project; config_text: the resolved gin configuration;
    entity / name: W&B's (name defaults to the workdir's folder name)."""

    def __init__(self, project: str, workdir: str, config_text: str = "", entity: Optional[str] = None,
                 name: Optional[str] = None, run_id: Optional[str] = None):
        """run_id: the run to continue (the one the resumed checkpoint recorded); else the workdir's, else new."""
        wandb = _import_wandb()
        self._wandb = wandb
        os.makedirs(workdir, exist_ok=True)
        id_path = os.path.join(workdir, "wandb_run_id")
        if run_id is None and os.path.isfile(id_path):
            run_id = open(id_path).read().strip()
        run_id = run_id or secrets.token_hex(4)  # 8 lowercase characters, as W&B's own ids
        with open(id_path + ".tmp", "w") as f:
            f.write(run_id)
        os.replace(id_path + ".tmp", id_path)
        self.run_id = run_id
        self.run = wandb.init(project=project, entity=entity, name=name or os.path.basename(os.path.abspath(workdir)),
                              id=run_id, resume="allow", dir=workdir, config={"gin": config_text},
                              reinit="create_new")

    def log(self, step: int, row: dict) -> None:
        """The numeric metrics of one row; an evaluation row's Pass@k also as a line plot over k."""
        values = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and v is not None}
        passk = sorted((int(k.split("@")[1]), v) for k, v in values.items() if k.startswith("eval/pass@"))
        if passk:
            table = self._wandb.Table(data=[[k, v] for k, v in passk], columns=["k", "pass@k"])
            values["eval/pass_at_k"] = self._wandb.plot.line(table, "k", "pass@k",
                                                             title=f"held-out Pass@k at step {step}")
        self.run.log(values, step=step)

    def samples(self, step: int, rows: list[dict]) -> None:
        """Sampled completions as a table (the columns of the rows' keys)."""
        if not rows:
            return
        columns = list(rows[0])
        self.run.log({"samples": self._wandb.Table(columns=columns, data=[[r.get(c) for c in columns]
                                                                          for r in rows])}, step=step)

    def close(self) -> None:
        self.run.finish()
