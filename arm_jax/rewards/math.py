"""Math answer extraction and grading (docs/method.md §5).

Answer formats (`answer_format`, what the prompt asked for): 'boxed', the last `\\boxed{...}` or `\\fbox{...}`
(brace-balanced, nested braces kept); 'dapo', the last `Answer:` line in the last 300 characters (DAPO-Math-17k's
prompt; verl's `math_dapo` rule, no fallback); 'gsm8k' / 'auto', GSM8K's `#### N` and a box; 'boxed' may add a
`'last_number'` fallback. Grading: math-verify (`verify(parse(gold), parse(pred))`, gold first) in a pool of worker
processes with a per-item timeout and worker recycling, so a pathological expression costs that item reward 0 and
status 'timeout', never a stuck trainer. Identical normalized strings are accepted without a worker ('dapo': the
Minerva normalisation verl compares, so everything verl's scorer accepts is accepted). The pool starts when the
grader is built and a grader that cannot start (math-verify missing, workers dying at start-up) is an error then.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import threading
from typing import Optional, Sequence

from arm_jax.data.answers import (ANSWER_FORMATS, extract_answer, extract_boxed, extract_gsm8k,  # noqa: F401
                                  minerva_normalize)
from arm_jax.rewards.pool import WorkerPool

STATUSES = ("ok", "no_answer", "timeout", "error")

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


def _for_verify(answer: str) -> str:
    """A 'dapo' answer line as math-verify reads it inside \\boxed{}: no $...$ delimiters, no trailing period."""
    s = answer.strip().replace("$", "").strip()
    return s[:-1].rstrip() if s.endswith(".") else s


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
    """Grades completions against gold answers in `num_workers` processes, `timeout_s` per item.
    answer_format: 'boxed' | 'dapo' | 'gsm8k' | 'auto' (`arm_jax.data.answers.extract_answer`); fallback: 'none' |
    'last_number' (not with 'dapo'). Building it starts the workers and waits for them (WorkerStartupError, or
    ImportError when math-verify is not installed)."""

    def __init__(self, num_workers: int = 2, timeout_s: float = 5.0, answer_format: str = "boxed",
                 fallback: str = "none"):
        if answer_format not in ANSWER_FORMATS:
            raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
        extract_answer("", answer_format, fallback)  # an invalid combination is an error now, not at step 1
        if importlib.util.find_spec("math_verify") is None:
            raise ImportError("the math reward needs math-verify, which is not installed: pip install math-verify "
                              "(it is a dependency of arm_jax; the environment is incomplete)")
        self.answer_format, self.fallback = answer_format, fallback
        self._pool = WorkerPool(_verify, num_workers=num_workers, timeout_s=timeout_s, warmup=_warmup,
                                name="math grader (math-verify workers)")
        self._pool.wait_ready()

    def grade(self, completions: Sequence[str], golds: Sequence[str]) -> list[GradeResult]:
        """Grades completions against gold answers: one GradeResult per completion (reward 0 for no answer, a timeout or
        an error)."""
        if len(completions) != len(golds):
            raise ValueError(f"{len(completions)} completions but {len(golds)} gold answers")
        results: list[Optional[GradeResult]] = [None] * len(completions)
        jobs, where = [], []
        for i, (text, gold) in enumerate(zip(completions, golds)):
            ans = extract_answer(text, self.answer_format, self.fallback)
            dapo = self.answer_format == "dapo"
            if ans is None or not ans.strip():
                results[i] = GradeResult(0.0, ans, "no_answer")
            elif len(ans) > MAX_ANSWER_CHARS:
                results[i] = GradeResult(0.0, ans[:80] + "...", "error", f"answer longer than {MAX_ANSWER_CHARS}")
            elif _normalize(ans) == _normalize(str(gold)) or (
                    dapo and minerva_normalize(ans) == minerva_normalize(str(gold))):
                results[i] = GradeResult(1.0, ans, "ok")
            else:
                jobs.append((str(gold), _for_verify(ans) if dapo else ans))
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


_DEFAULT: dict[str, MathGrader] = {}
_LOCK = threading.Lock()


def math_reward(completions: Sequence[str], golds: Sequence[str], answer_format: str = "boxed") -> list[float]:
    """Public API (docs/method.md §9): list[str], list[str] -> list[float] in {0, 1}, graded by a shared MathGrader
    per answer format ('boxed', 'dapo', 'gsm8k', 'auto')."""
    with _LOCK:
        if answer_format not in _DEFAULT:
            _DEFAULT[answer_format] = MathGrader(answer_format=answer_format)
    return [r.reward for r in _DEFAULT[answer_format].grade(completions, golds)]
