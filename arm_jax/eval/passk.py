"""Unbiased Pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code")."""

from __future__ import annotations

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n - c, k) / C(n, k) for n samples of which c are correct, in the stable product form
    1 - prod_{i = n - c + 1}^{n} (1 - k / i) (no large binomials)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def pass_at_k_curve(correct: np.ndarray, ks=None) -> dict[int, float]:
    """correct: [num_problems, n] 0/1 -> {k: mean over problems of pass@k} for k in ks (default powers of 2 <= n
    and n)."""
    correct = np.asarray(correct)
    n = correct.shape[1]
    ks = ks or sorted({2 ** i for i in range(int(np.log2(n)) + 1)} | {n})
    counts = correct.sum(axis=1).astype(int)
    return {k: float(np.mean([pass_at_k(n, int(c), k) for c in counts])) for k in ks}
