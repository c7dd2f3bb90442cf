"""One quick-start run through the gin launcher in a subprocess, cached: what the comparison scripts
(`compare_staleness.py`, `compare_lora.py`) run for each of their rows."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from typing import Callable, Optional, Sequence

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def write_results(out: str, payload: dict, rows: list[dict]) -> None:
    """`out`/results.json (payload) and results.md (rows as a Markdown table), printed."""
    from arm_jax.eval import plots
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(payload, f, indent=1, default=str)
    table = plots.markdown_table(rows, list(rows[0]))
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table)
    print(table)


def copy_sft(src: str, dst: str) -> None:
    """A run's init_model and sft_model folders (the SFT start another run reuses)."""
    for sub in ("init_model", "sft_model"):
        shutil.copytree(os.path.join(src, sub), os.path.join(dst, sub))


def run_cached(workdir: str, gin_files: Sequence[str], params: Sequence[str] = (), sft_from: Optional[str] = None,
               extra: Optional[Callable[[list], dict]] = None) -> dict:
    """Launches `python -m arm_jax.launch` with the gin files and bindings in `workdir` (reusing `sft_from`'s SFT
    start when given and present), unless its result.json exists. Returns and caches {wall_s, peak_rss_gb (the
    launcher process, `os.wait4`), before / after (the first and last evaluation rows), params, **extra(the
    training rows of metrics.jsonl)}."""
    result = os.path.join(workdir, "result.json")
    if os.path.isfile(result):
        with open(result) as f:
            return json.load(f)
    os.makedirs(workdir, exist_ok=True)
    if sft_from and os.path.isdir(os.path.join(sft_from, "sft_model")) and \
            not os.path.isdir(os.path.join(workdir, "sft_model")):
        copy_sft(sft_from, workdir)
    cmd = [sys.executable, "-m", "arm_jax.launch", "--workdir", workdir]
    for f in gin_files:
        cmd += ["--gin_file", f]
    for p in params:
        cmd += ["--gin_param", p]
    t0 = time.time()
    with open(os.path.join(workdir, "log.txt"), "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise RuntimeError(f"{workdir}: the run failed (status {status}); see {workdir}/log.txt")
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    evals = [r for r in rows if "eval/pass@1" in r]
    out = {"wall_s": time.time() - t0, "peak_rss_gb": usage.ru_maxrss / 1024 ** 2, "before": evals[0],
           "after": evals[-1], "params": list(params)}
    out.update(extra([r for r in rows if "reward_mean" in r]) if extra else {})
    with open(result, "w") as f:
        json.dump(out, f, indent=1, default=str)
    return out
