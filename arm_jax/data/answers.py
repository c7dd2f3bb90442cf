"""Final-answer extraction from text: the last `\\boxed{...}` / `\\fbox{...}`, GSM8K's `#### N`, an optional
last-number fallback. Pure string functions: the data builders use them for gold answers, the math grader
(`arm_jax.rewards.math`) for predictions."""

from __future__ import annotations

import re
from typing import Optional

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\b")
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


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
