"""Math answer extraction and grading (docs/method.md §5).

Extraction: the last `\\boxed{...}` or `\\fbox{...}` (brace-balanced, nested braces kept), or GSM8K's `#### N`, with an
optional fallback (`'last_number'`). Grading: math-verify (`verify(parse(gold), parse(pred))`, gold first) in a pool of
worker processes with a per-item timeout and worker recycling, so a pathological expression costs that item reward 0
and status 'timeout', never a stuck trainer. Identical normalized strings are accepted without a worker.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from typing import Optional, Sequence

from arm_jax.data.answers import extract_answer, extract_boxed, extract_gsm8k  # noqa: F401 - re-exported
from arm_jax.rewards.pool import WorkerPool

MAX_ANSWER_CHARS = 1000


@dataclasses.dataclass(frozen=True)
class GradeResult:
    """reward in {0, 1}; extracted: the answer string found (None if none); status: 'ok', 'no_answer', 'timeout'
    or 'error' (detail in `detail`)."""

    reward: float
    extracted: Optional[str]
    status: str
    detail: str = ""


def _normalize(s: str) -> str:
    return re.sub(r"\s+", "", s).strip("$").replace("\\!", "").replace("dfrac", "frac").replace("tfrac", "frac")


def _warmup() -> None:
    """A worker's start-up: import math-verify and grade once (its first call builds its parsers)."""
    _verify(("1", "1"))


def _verify(payload: tuple[str, str]) -> bool:
    """Runs in a worker process: math-verify with gold and prediction both parsed from a \\boxed{} wrapper."""
    import logging
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # we bound time ourselves (the pool kills workers)
    from math_verify import parse, verify
    gold, pred = payload
    g = parse("\\boxed{" + gold + "}", parsing_timeout=None)
    p = parse("\\boxed{" + pred + "}", parsing_timeout=None)
    if not g or not p:
        return False
    return bool(verify(g, p, timeout_seconds=None))


class MathGrader:
    """Grades completions against gold answers in `num_workers` processes, `timeout_s` per item."""

    def __init__(self, num_workers: int = 2, timeout_s: float = 5.0, mode: str = "boxed", fallback: str = "none"):
        self.mode, self.fallback = mode, fallback
        self._pool = WorkerPool(_verify, num_workers=num_workers, timeout_s=timeout_s, warmup=_warmup)

    def grade(self, completions: Sequence[str], golds: Sequence[str]) -> list[GradeResult]:
        """Grades completions against gold answers: one GradeResult per completion (reward 0 for no answer, a timeout or
        an error)."""
        if len(completions) != len(golds):
            raise ValueError(f"{len(completions)} completions but {len(golds)} gold answers")
        results: list[Optional[GradeResult]] = [None] * len(completions)
        jobs, where = [], []
        for i, (text, gold) in enumerate(zip(completions, golds)):
            ans = extract_answer(text, self.mode, self.fallback)
            if ans is None or not ans.strip():
                results[i] = GradeResult(0.0, ans, "no_answer")
            elif len(ans) > MAX_ANSWER_CHARS:
                results[i] = GradeResult(0.0, ans[:80] + "...", "error", f"answer longer than {MAX_ANSWER_CHARS}")
            elif _normalize(ans) == _normalize(str(gold)):
                results[i] = GradeResult(1.0, ans, "ok")
            else:
                jobs.append((str(gold), ans))
                where.append(i)
        for i, (_, ans), (status, value) in zip(where, jobs, self._pool.map(jobs)):
            if status == "ok":
                results[i] = GradeResult(float(bool(value)), ans, "ok")
            else:
                results[i] = GradeResult(0.0, ans, status, str(value or ""))
        return results  # type: ignore[return-value]

    def close(self):
        """Stops the grader's worker processes."""
        self._pool.close()


_DEFAULT: Optional[MathGrader] = None
_LOCK = threading.Lock()


def math_reward(completions: Sequence[str], golds: Sequence[str]) -> list[float]:
    """Public API (docs/method.md §9): list[str], list[str] -> list[float] in {0, 1}, graded by a shared MathGrader."""
    global _DEFAULT
    with _LOCK:
        if _DEFAULT is None:
            _DEFAULT = MathGrader()
    return [r.reward for r in _DEFAULT.grade(completions, golds)]
