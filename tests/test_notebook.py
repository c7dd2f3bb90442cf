"""experiments/quickstart_colab.ipynb runs headless (nbclient) on CPU: every cell must succeed."""

import os

import nbformat
from nbclient import NotebookClient

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def test_colab_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".jax_cache"))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    monkeypatch.setenv("PYTHONPATH", ROOT)
    nb = nbformat.read(os.path.join(ROOT, "experiments", "quickstart_colab.ipynb"), as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # the two inline plots
    text = "".join(o.get("text", "") for o in outputs)
    assert "pass@1:" in text and "token entropy" in text
    assert os.path.isfile(tmp_path / "runs" / "colab_quickstart" / "metrics.jsonl")
