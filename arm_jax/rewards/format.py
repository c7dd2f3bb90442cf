"""Format rewards: does a completion follow the expected reasoning/answer layout?

A task's format term (`make_task(..., format_weight=w)`) defaults to the pattern of the layout its training prompts
ask for (`default_pattern`): 'boxed' for the boxed instruction, 'answer_line' for DAPO's `Answer:` line,
'code_block' for code.
"""

from __future__ import annotations

import re
from typing import Callable, Optional, Union

from arm_jax.data.answers import extract_dapo


def _dapo_answer(completion: str) -> bool:
    """The 'dapo' rule finds an answer: `extract_dapo` (the last `Answer:` match in the last 300 characters, any
    case, inline or with the answer on the next line) returns a non-blank one, exactly what it grades."""
    ans = extract_dapo(completion)
    return ans is not None and bool(ans.strip())


# a layout: a regular expression searched in the completion, or a predicate on it
_PATTERNS: dict[str, Union[re.Pattern, Callable[[str], bool]]] = {
    # R1 style: reasoning closed by </think>, then an answer with a box
    "think_boxed": re.compile(r"^(?:<think>)?.*?</think>.*\\boxed\{.*\}", re.DOTALL),
    # <think>...</think> then <answer>...</answer> and nothing after
    "think_answer": re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL),
    # just a final boxed answer somewhere
    "boxed": re.compile(r"\\boxed\{.*\}", re.DOTALL),
    # DAPO's instruction: an `Answer: <something>` the 'dapo' answer format grades (not merely a line that looks so)
    "answer_line": _dapo_answer,
    # a fenced Python block, the program the code reward runs
    "code_block": re.compile(r"```(?:python|py)?\n.*?```", re.DOTALL),
}
PATTERNS = tuple(_PATTERNS)


def format_reward(completion: str, pattern: str = "think_boxed") -> float:
    """1.0 if `completion` matches the named layout (one of PATTERNS), else 0.0."""
    if pattern not in _PATTERNS:
        raise KeyError(f"unknown format pattern {pattern!r}; known: {sorted(_PATTERNS)}")
    layout = _PATTERNS[pattern]
    found = layout.search(completion) if isinstance(layout, re.Pattern) else layout(completion)
    return 1.0 if found else 0.0


def default_pattern(answer_format: Optional[str]) -> str:
    """The layout a split's prompts ask for, by its answer format (`arm_jax.data.templates.PromptFormat`): None
    (code) -> 'code_block', 'dapo*' (the `Answer:` line) -> 'answer_line', any other (boxed) -> 'boxed'."""
    if answer_format is None:
        return "code_block"
    return "answer_line" if answer_format.startswith("dapo") else "boxed"
