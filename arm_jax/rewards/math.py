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

from arm_jax.rewards.pool import WorkerPool

MAX_ANSWER_CHARS = 1000
_BOX_RE = re.compile(r"\\(?:boxed|fbox)\b")
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


@dataclasses.dataclass(frozen=True)
class GradeResult:
    """reward in {0, 1}; extracted: the answer string found (None if none); status: 'ok', 'no_answer', 'timeout'
    or 'error' (detail in `detail`)."""

    reward: float
    extracted: Optional[str]
    status: str
    detail: str = ""


def extract_boxed(text: str) -> Optional[str]:
    """Content of the last \\boxed{...} / \\fbox{...} (brace-balanced); `\\boxed 5` (no braces) gives '5'.
    None when there is no box or the last box's braces never close: a response truncated inside its final box has
    no answer (an earlier box is an intermediate result, not the answer)."""
    matches = list(_BOX_RE.finditer(text))
    for m in reversed(matches):
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                c = text[j]
                if c == "{" and text[j - 1] != "\\":
                    depth += 1
                elif c == "}" and text[j - 1] != "\\":
                    depth -= 1
                    if depth == 0:
                        return _strip_outer_braces(text[i + 1:j].strip())
            return None  # the last box never closes: no answer
        bare = re.match(r"[^\s$]+", text[i:])
        if bare and i > m.end():  # '\boxed 5' (a space, no brace)
            return bare.group(0)
    return None


def _strip_outer_braces(s: str) -> str:
    """'{{5}}' -> '5': drops braces that wrap the whole answer (they only slow math-verify's parser down)."""
    while len(s) >= 2 and s[0] == "{" and s[-1] == "}":
        depth = 0
        for j, c in enumerate(s):
            depth += (c == "{") - (c == "}")
            if depth == 0 and j < len(s) - 1:
                return s  # the first brace closes early: '{a}+{b}'
        s = s[1:-1].strip()
    return s


def extract_gsm8k(text: str) -> Optional[str]:
    """The number after the last '####' (commas removed), as in GSM8K's reference answers."""
    idx = text.rfind("####")
    if idx < 0:
        return None
    m = _NUMBER_RE.search(text[idx + 4:])
    return m.group(0).replace(",", "") if m else None


def extract_answer(text: str, mode: str = "boxed", fallback: str = "none") -> Optional[str]:
    """mode: 'boxed' (last \\boxed{} / \\fbox{}), 'gsm8k' ('#### N', then a box) or 'auto' (box, then '####').
    fallback: 'none' or 'last_number' (the last number in the text when nothing else was found)."""
    if mode == "boxed":
        ans = extract_boxed(text)
    elif mode == "gsm8k":
        ans = extract_gsm8k(text)
        ans = ans if ans is not None else extract_boxed(text)
    elif mode == "auto":
        ans = extract_boxed(text)
        ans = ans if ans is not None else extract_gsm8k(text)
    else:
        raise ValueError(f"extraction mode must be 'boxed', 'gsm8k' or 'auto', got {mode!r}")
    if ans is None and fallback == "last_number":
        nums = _NUMBER_RE.findall(text)
        ans = nums[-1].replace(",", "") if nums else None
    elif fallback not in ("none", "last_number"):
        raise ValueError(f"fallback must be 'none' or 'last_number', got {fallback!r}")
    return ans


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
