"""PNG plots (matplotlib, Agg): Pass@k curves by method on a log-k axis, and training curves from metrics files."""

from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def pass_at_k_plot(curves: Mapping[str, Mapping[int, float]], path: str, title: str = "Pass@k") -> str:
    """curves: {method: {k: pass@k}} -> PNG with one line per method, k on a log2 axis."""
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for name, curve in curves.items():
        ks = sorted(int(k) for k in curve)
        ax.plot(ks, [curve[k] if k in curve else curve[str(k)] for k in ks], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def read_metrics(path: str) -> list[dict]:
    """The rows of a metrics.jsonl."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


TRAINING_KEYS = ("reward_mean", "entropy", "response_len_mean", "c_o_correct_group_std")


def training_curves_plot(runs: Mapping[str, str], path: str, keys: Sequence[str] = TRAINING_KEYS) -> str:
    """runs: {label: metrics.jsonl path}; one panel per metric, runs overlaid."""
    data = {label: read_metrics(p) for label, p in runs.items()}
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), dpi=110)
    for ax, key in zip(axes, keys):
        for label, rows in data.items():
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), label=label)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def over_training_plot(series: Mapping[str, Mapping[str, Mapping[int, tuple[float, float]]]], path: str,
                       keys: Sequence[str]) -> str:
    """series: {method: {metric: {step: (mean, ci half-width)}}}; one panel per metric, a line with a CI band per
    method (e.g. held-out Pass@k and entropy at each evaluation step, over seeds)."""
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), dpi=110, squeeze=False)
    for ax, key in zip(axes[0], keys):
        for method, metrics in series.items():
            pts = sorted(metrics.get(key, {}).items())
            if not pts:
                continue
            steps = [p[0] for p in pts]
            mean = [p[1][0] for p in pts]
            half = [p[1][1] for p in pts]
            ax.plot(steps, mean, marker="o", label=method)
            ax.fill_between(steps, [m - h for m, h in zip(mean, half)], [m + h for m, h in zip(mean, half)],
                            alpha=0.2)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str]) -> str:
    """A Markdown table of `rows` over `cols` (floats with 3 decimals)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, ""))
                                      for c in columns) + " |")
    return "\n".join(lines) + "\n"


def ensure_dir(path: str) -> str:
    """Creates the folder if needed and returns it."""
    os.makedirs(path, exist_ok=True)
    return path
