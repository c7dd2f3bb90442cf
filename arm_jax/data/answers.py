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


# DAPO-Math-17k's rules, named for what they are (docs/method.md §5): 'dapo' is the reference's (FlowRL's verl fork,
# verl/utils/reward_score/math_dapo.py): the last `Answer:` match in the response's last 300 characters, Minerva-
# normalised, string equality with the normalised gold, no fallback; 'dapo_boxed_fallback' is verl 0.9.1's (the same,
# and when no `Answer:` line is found, the last \boxed{} in the last 100 of those characters equal to the raw gold);
# 'dapo_mathverify' is a lenient variant (that answer line, then math-verify equivalence).
DAPO_FORMATS = ("dapo", "dapo_boxed_fallback", "dapo_mathverify")
ANSWER_FORMATS = ("boxed", "gsm8k", "auto") + DAPO_FORMATS
DAPO_TAIL_CHARS = 300  # the reference grades the response's last 300 characters
DAPO_BOX_TAIL_CHARS = 100  # verl 0.9.1's boxed fallback: the last 100 of those
_DAPO_LINE_RE = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")  # the reference's answer pattern
_INVALID = "[INVALID]"  # the reference's prediction when no Answer: line matches


def extract_dapo(text: str) -> Optional[str]:
    """DAPO-Math-17k's answer (its prompt asks for a last line `Answer: $Answer`) as the reference reads it: the
    last match of `(?i)Answer\\s*:\\s*([^\\n]+)` in the last 300 characters of the response, unstripped (the
    normalisation sees it as the reference does; `\\s*` may cross a newline after the colon). None when there is
    no match: no boxed or last-number fallback."""
    found = _DAPO_LINE_RE.findall(text[-DAPO_TAIL_CHARS:])
    return found[-1] if found else None


def verl_last_boxed(text: str) -> Optional[str]:
    """verl's `remove_boxed(last_boxed_only_string(text))`: the content of the last literal '\\boxed{' up to the brace
    that closes it, every brace counted (escaped ones too); None when there is none or it never closes. Not
    `extract_boxed`: no '\\fbox', no '\\boxed {', no stripping."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    for j in range(start, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[start + len("\\boxed{"):j]
    return None


def dapo_verdict(text: str, gold: str, boxed_fallback: bool = False) -> tuple[Optional[str], bool]:
    """The reference DAPO rule: (the answer graded, None when none; correct). The `Answer:` line (`extract_dapo`)
    is correct iff its `minerva_normalize` equals the gold's. boxed_fallback (verl 0.9.1): when there is no such line
    (or its normalisation is the reference's '[INVALID]' marker) and the last 100 of the 300 characters hold a
    closed \\boxed{...}, its raw content must equal the raw gold. One deliberate difference: no answer is never
    correct (the reference compares its '[INVALID]' marker to the gold, so a gold '[INVALID]' would match)."""
    tail = text[-DAPO_TAIL_CHARS:]
    ans = extract_dapo(tail)
    pred = minerva_normalize(ans) if ans is not None else None
    if boxed_fallback and pred in (None, _INVALID):
        box = verl_last_boxed(tail[-DAPO_BOX_TAIL_CHARS:])
        if box is not None:
            return box, box == gold
    if ans is None:
        return None, False
    return ans, pred == minerva_normalize(gold)


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
    """The Minerva string normalisation of a final answer, exactly the reference's `normalize_final_answer` (its
    substitution and removal lists, regexes and order; checked against its outputs in
    tests/fixtures/dapo_reference.json): the part after the last '=', units and decorations removed, on each line
    the math between its first pair of $...$ kept, \\text{} / \\textbf{} / \\overline{} / \\boxed{} unwrapped,
    shorthand \\fracab / \\sqrta expanded, '$' dropped, digit-group commas dropped, stripped."""
    s = answer.split("=")[-1]
    for old, new in _MINERVA_REPLACE:
        s = s.replace(old, new)
    for junk in _MINERVA_DROP:
        s = s.replace(junk, "")
    s = re.sub(r"(.*?)\$(.*?)\$(.*)", r"$\2$", s)  # per line ('.' stops at a newline), as the reference
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
    """mode (the answer format): 'boxed' (last \\boxed{} / \\fbox{}), 'dapo' / 'dapo_mathverify' (the last
    `Answer:` line in the last 300 characters, `extract_dapo`), 'dapo_boxed_fallback' (that line, else verl's last
    \\boxed{} in the last 100 of them), 'gsm8k' ('#### N', then a box) or 'auto' (box, then '####').
    fallback: 'none' or 'last_number' (the last number in the text when nothing else was found; never with the
    DAPO formats)."""
    if mode in DAPO_FORMATS:
        if fallback != "none":
            raise ValueError(f"answer format {mode!r} takes no fallback (the reference's rule: no Answer: line, no "
                             f"answer), got fallback={fallback!r}")
        if mode == "dapo_boxed_fallback":
            return dapo_verdict(text, "", boxed_fallback=True)[0]
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
