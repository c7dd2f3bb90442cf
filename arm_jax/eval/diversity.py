"""Per-problem voting and diversity metrics on sampled responses (docs/method.md §6)."""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Optional, Sequence

import numpy as np


def maj_at_k(answers: Sequence[Optional[str]], correct: Sequence[bool], k: int) -> float:
    """Majority vote over the first k samples: 1.0 if the most frequent extracted answer is a correct one.
    Ties go to the answer that appears first among the k; samples without an answer (None) do not vote."""
    votes = [(a, c) for a, c in zip(answers[:k], correct[:k]) if a is not None]
    if not votes:
        return 0.0
    counts = Counter(a for a, _ in votes)
    best = max(counts.values())
    winner = next(a for a, _ in votes if counts[a] == best)
    return float(any(c for a, c in votes if a == winner))


def distinct_n(texts: Sequence[str], n: int = 2, tokenize=str.split) -> float:
    """Distinct-n (Li et al. 2016): unique n-grams / all n-grams over the responses (0 when there are none)."""
    grams = [tuple(toks[i:i + n]) for t in texts for toks in [tokenize(t)] for i in range(len(toks) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def normalize(text: str) -> str:
    """Whitespace-normalized text (what counts as the same response)."""
    return " ".join(text.split())


def distinct_count(texts: Sequence[str], mask: Optional[Sequence[bool]] = None) -> int:
    """Number of distinct responses (whitespace-normalized), optionally among those where mask is True."""
    return len({normalize(t) for i, t in enumerate(texts) if mask is None or mask[i]})


def mean_pairwise_similarity(texts: Sequence[str], tokenize=str.split) -> float:
    """Mean Jaccard similarity of the token sets over all pairs of responses (1 = identical; 0 for < 2)."""
    sets = [set(tokenize(t)) for t in texts]
    pairs = list(itertools.combinations(range(len(sets)), 2))
    if not pairs:
        return 0.0
    sims = [len(sets[i] & sets[j]) / max(len(sets[i] | sets[j]), 1) for i, j in pairs]
    return float(np.mean(sims))


def confidence_spread(confidences: Sequence[float], correct: Sequence[bool]) -> float:
    """Std of the answer confidence c(o|q) among the correct responses (0 with fewer than two)."""
    vals = [c for c, ok in zip(confidences, correct) if ok]
    return float(np.std(vals)) if len(vals) > 1 else 0.0
