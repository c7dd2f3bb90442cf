"""Math answer extraction and grading (docs/method.md §5).

Answer formats (`answer_format`, what the prompt asked for and the rule that grades it): 'boxed', the last
`\\boxed{...}` or `\\fbox{...}` (brace-balanced, nested braces kept); 'gsm8k' / 'auto', GSM8K's `#### N` and a box;
'boxed' may add a `'last_number'` fallback; and DAPO-Math-17k's `Answer:` line, three rules named for what they are:

- 'dapo': the reference rule (FlowRL's verl fork, `verl/utils/reward_score/math_dapo.py`): the last `Answer:` match
  in the last 300 characters, Minerva-normalised, string equality with the normalised gold; no fallback, no
  math-verify (`arm_jax.data.answers.dapo_verdict`; held to the reference's own verdicts,
  tests/fixtures/dapo_reference.json);
- 'dapo_boxed_fallback': verl 0.9.1's rule, the same plus its `\\boxed{}` fallback when there is no `Answer:` line;
- 'dapo_mathverify': lenient, the `Answer:` line graded by math-verify (it accepts `34.0` or `\\frac{68}{2}` for 34).

Grading by math-verify (`verify(parse(gold), parse(pred))`, gold first; every format but 'dapo' and
'dapo_boxed_fallback', which are string rules and start no workers) runs in a pool of worker processes with a
per-item timeout and worker recycling, so a pathological expression costs that item reward 0, never a stuck
trainer. Identical normalized strings are accepted without a worker. The pool starts when the grader is built and a
grader that cannot start (math-verify missing, workers dying at start-up) is an error then.

Statuses say whose fault a 0 is. The model's: 'no_answer' (nothing to grade), 'malformed' (an answer over
MAX_ANSWER_CHARS, not graded; or one math-verify cannot decide in time: an item that timed out is retried once on a
fresh worker, and if it times out again while the workers graded other items of the same call (status 'ok': the
pool is healthy), it is 'malformed', e.g. `\\boxed{9^{9^{9^{9}}}}`, `\\boxed{100000000!}` or 300 nested
parentheses, so a model cannot stop the run with its own answers). The grader's: 'timeout' (twice, and nothing else
in the call was graded by the workers: the grader, not the answer, is slow) and 'error' (a worker failed); only
these count towards RLConfig.max_reward_timeout_frac / max_reward_error_frac.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import threading
from typing import Optional, Sequence

from arm_jax.data.answers import (ANSWER_FORMATS, dapo_verdict, extract_answer, extract_boxed,  # noqa: F401
                                  extract_gsm8k, minerva_normalize)
from arm_jax.rewards.pool import WorkerPool

STATUSES = ("ok", "no_answer", "malformed", "timeout", "error")
STRING_RULES = ("dapo", "dapo_boxed_fallback")  # graded by string equality alone: no math-verify workers

MAX_ANSWER_CHARS = 1000


@dataclasses.dataclass(frozen=True)
class GradeResult:
    """reward in {0, 1} (1: correct); extracted: the answer string found (None if none); status: 'ok',
    'no_answer', 'malformed' (the model's: an answer too long to grade, or one that timed out twice beside graded
    ones), 'timeout' or 'error' (the grader's; detail in `detail`)."""

    reward: float
    extracted: Optional[str]
    status: str
    detail: str = ""


def _normalize(s: str) -> str:
    return re.sub(r"\s+", "", s).strip("$").replace("\\!", "").replace("dfrac", "frac").replace("tfrac", "frac")


def _for_verify(answer: str) -> str:
    """A 'dapo_mathverify' answer line as math-verify reads it inside \\boxed{}: no $...$ delimiters, no trailing
    period."""
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


def _grade_dapo(text: str, gold: str, boxed_fallback: bool) -> GradeResult:
    """The reference DAPO rule on one response (`dapo_verdict`): 'no_answer' when it has no `Answer:` line (nor,
    with boxed_fallback, a box), else 'ok' with reward 1 iff the normalised strings are equal."""
    ans, correct = dapo_verdict(text, gold, boxed_fallback)
    if correct:
        return GradeResult(1.0, ans, "ok")
    if ans is None or not ans.strip():
        return GradeResult(0.0, ans, "no_answer")
    return GradeResult(0.0, ans, "ok")


class MathGrader:
    """Grades completions against gold answers in `num_workers` processes, `timeout_s` per item.
    answer_format: one of ANSWER_FORMATS (`arm_jax.data.answers.extract_answer`; 'dapo' and 'dapo_boxed_fallback'
    are string rules graded in this process, without workers or math-verify); fallback: 'none' | 'last_number' (not
    with the DAPO formats). Building it starts the workers and waits for them (WorkerStartupError, or ImportError
    when math-verify is not installed)."""

    def __init__(self, num_workers: int = 2, timeout_s: float = 5.0, answer_format: str = "boxed",
                 fallback: str = "none"):
        if answer_format not in ANSWER_FORMATS:
            raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
        extract_answer("", answer_format, fallback)  # an invalid combination is an error now, not at step 1
        self.answer_format, self.fallback = answer_format, fallback
        self._pool = None
        if answer_format in STRING_RULES:
            return
        if importlib.util.find_spec("math_verify") is None:
            raise ImportError("the math reward needs math-verify, which is not installed: pip install math-verify "
                              "(it is a dependency of arm_jax; the environment is incomplete)")
        self._pool = WorkerPool(_verify, num_workers=num_workers, timeout_s=timeout_s, warmup=_warmup,
                                name="math grader (math-verify workers)")
        self._pool.wait_ready()

    def grade(self, completions: Sequence[str], golds: Sequence[str]) -> list[GradeResult]:
        """Grades completions against gold answers: one GradeResult per completion (reward 0 for no answer, a
        malformed one, a timeout or an error). An item that times out is retried once on a fresh worker; timing out
        again while other items of this call were graded by the workers, it is 'malformed' (see the module)."""
        if len(completions) != len(golds):
            raise ValueError(f"{len(completions)} completions but {len(golds)} gold answers")
        if self.answer_format in STRING_RULES:
            return [_grade_dapo(text, str(gold), self.answer_format == "dapo_boxed_fallback")
                    for text, gold in zip(completions, golds)]
        results: list[Optional[GradeResult]] = [None] * len(completions)
        jobs, where = [], []
        lenient_dapo = self.answer_format == "dapo_mathverify"
        for i, (text, gold) in enumerate(zip(completions, golds)):
            ans = extract_answer(text, self.answer_format, self.fallback)
            if ans is None or not ans.strip():
                results[i] = GradeResult(0.0, ans, "no_answer")
            elif len(ans) > MAX_ANSWER_CHARS:  # the model's fault, not the grader's
                results[i] = GradeResult(0.0, ans[:80] + "...", "malformed", f"answer longer than {MAX_ANSWER_CHARS}")
            elif _normalize(ans) == _normalize(str(gold)) or (
                    lenient_dapo and minerva_normalize(ans) == minerva_normalize(str(gold))):
                results[i] = GradeResult(1.0, ans.strip() if lenient_dapo else ans, "ok")
            else:
                jobs.append((str(gold), _for_verify(ans) if lenient_dapo else ans))
                where.append(i)
        verdicts = self._pool.map(jobs) if jobs else []
        again = [k for k, (status, _) in enumerate(verdicts) if status == "timeout"]
        if again:  # once more, each on a fresh worker (the pool replaced the ones that timed out)
            for k, verdict in zip(again, self._pool.map([jobs[k] for k in again])):
                verdicts[k] = verdict
        healthy = any(status == "ok" for status, _ in verdicts)  # the workers graded other items of this call
        for i, (_, ans), (status, value) in zip(where, jobs, verdicts):
            if status == "ok":
                results[i] = GradeResult(float(bool(value)), ans, "ok")
            elif status == "timeout" and healthy:  # twice, beside graded items: the answer, not the grader
                results[i] = GradeResult(0.0, ans, "malformed", f"math-verify timed out twice (timeout_s="
                                                                f"{self._pool.timeout_s}) beside graded answers")
            else:
                results[i] = GradeResult(0.0, ans, status, str(value or ""))
        return results  # type: ignore[return-value]

    def close(self):
        """Stops the grader's worker processes (if it has any)."""
        if self._pool is not None:
            self._pool.close()


_DEFAULT: dict[str, MathGrader] = {}
_LOCK = threading.Lock()


def math_reward(completions: Sequence[str], golds: Sequence[str], answer_format: str = "boxed") -> list[float]:
    """Public API (docs/method.md §9): list[str], list[str] -> list[float] in {0, 1}, graded by a shared MathGrader
    per answer format (ANSWER_FORMATS: 'boxed', 'gsm8k', 'auto', 'dapo', 'dapo_boxed_fallback',
    'dapo_mathverify')."""
    with _LOCK:
        if answer_format not in _DEFAULT:
            _DEFAULT[answer_format] = MathGrader(answer_format=answer_format)
    return [r.reward for r in _DEFAULT[answer_format].grade(completions, golds)]
