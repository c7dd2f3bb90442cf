"""Final-answer extraction from text: the last `\\boxed{...}` / `\\fbox{...}`, GSM8K's `#### N`, DAPO's
`Answer: X` line, an optional last-number fallback; and the Minerva / DAPO string normalisation of an answer. Pure
string functions: the data builders use them for gold answers, the math grader (`arm_jax.rewards.math`) for
predictions."""

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


ANSWER_FORMATS = ("boxed", "dapo", "gsm8k", "auto")
DAPO_TAIL_CHARS = 300  # verl's math_dapo grades the response's last 300 characters
_DAPO_LINE_RE = re.compile(r"(?i)answer\s*:\s*([^\n]+)")


def extract_dapo(text: str) -> Optional[str]:
    """DAPO-Math-17k's answer (its prompt asks for a last line `Answer: $Answer`), by verl's `math_dapo` rule: the
    rest of the line after the last `Answer:` (any case) within the last 300 characters of the response. None when
    there is no such line: no boxed or last-number fallback (a response that ignores the format has no answer)."""
    found = _DAPO_LINE_RE.findall(text[-DAPO_TAIL_CHARS:])
    return found[-1].strip() if found else None


# The Minerva normalisation (Lewkowycz et al. 2022, appendix D; as lm-eval-harness and verl's math_dapo apply it):
# textual decorations, units and spaces dropped, then exact string comparison.
_MINERVA_REPLACE = (("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
                    (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"))
_MINERVA_DROP = ("square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots", "sue",
                 "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals",
                 "edges", "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}",
                 "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}",
                 "\\;", ",\\!", "{,}", '"', "\\dots")


def minerva_normalize(answer: str) -> str:
    """The Minerva string normalisation of a final answer: the part after the last '=', units and decorations
    removed, the math between the first pair of $...$ kept, \\text{} / \\textbf{} / \\overline{} / \\boxed{}
    unwrapped, shorthand \\fracab / \\sqrta expanded, digit-group commas dropped."""
    s = answer.split("=")[-1]
    for old, new in _MINERVA_REPLACE:
        s = s.replace(old, new)
    for junk in _MINERVA_DROP:
        s = s.replace(junk, "")
    s = re.sub(r"^.*?\$(.*?)\$.*$", r"$\1$", s, flags=re.DOTALL) if s.count("$") >= 2 else s
    for cmd in ("text", "textbf", "overline"):
        s = re.sub(r"\\" + cmd + r"\{(.*?)\}", r"\1", s)
    s = re.sub(r"\\boxed\{(.*)\}", r"\1", s)
    s = re.sub(r"frac([^{])(.)", r"frac{\1}{\2}", s)
    s = re.sub(r"sqrt([^{])", r"sqrt{\1}", s)
    s = s.replace("$", "")
    if s.replace(",", "").isdigit():
        s = s.replace(",", "")
    return s.strip()


def extract_answer(text: str, mode: str = "boxed", fallback: str = "none") -> Optional[str]:
    """mode (the answer format): 'boxed' (last \\boxed{} / \\fbox{}), 'dapo' (the last `Answer:` line in the last
    300 characters, `extract_dapo`), 'gsm8k' ('#### N', then a box) or 'auto' (box, then '####').
    fallback: 'none' or 'last_number' (the last number in the text when nothing else was found; never with 'dapo')."""
    if mode == "dapo":
        if fallback != "none":
            raise ValueError(f"answer format 'dapo' takes no fallback (verl's rule: no Answer: line, no answer), "
                             f"got fallback={fallback!r}")
        return extract_dapo(text)
    if mode == "boxed":
        ans = extract_boxed(text)
    elif mode == "gsm8k":
        ans = extract_gsm8k(text)
        ans = ans if ans is not None else extract_boxed(text)
    elif mode == "auto":
        ans = extract_boxed(text)
        ans = ans if ans is not None else extract_gsm8k(text)
    else:
        raise ValueError(f"answer format must be one of {ANSWER_FORMATS}, got {mode!r}")
    if ans is None and fallback == "last_number":
        nums = _NUMBER_RE.findall(text)
        ans = nums[-1].replace(",", "") if nums else None
    elif fallback not in ("none", "last_number"):
        raise ValueError(f"fallback must be 'none' or 'last_number', got {fallback!r}")
    return ans
