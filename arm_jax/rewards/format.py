"""Format rewards: does a completion follow the expected reasoning/answer layout?"""

from __future__ import annotations

import re

_PATTERNS = {
    # R1 style: reasoning closed by </think>, then an answer with a box
    "think_boxed": re.compile(r"^(?:<think>)?.*?</think>.*\\boxed\{.*\}", re.DOTALL),
    # <think>...</think> then <answer>...</answer> and nothing after
    "think_answer": re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL),
    # just a final boxed answer somewhere
    "boxed": re.compile(r"\\boxed\{.*\}", re.DOTALL),
}


def format_reward(completion: str, pattern: str = "think_boxed") -> float:
    """1.0 if `completion` matches the named layout ('think_boxed', 'think_answer', 'boxed'), else 0.0."""
    if pattern not in _PATTERNS:
        raise KeyError(f"unknown format pattern {pattern!r}; known: {sorted(_PATTERNS)}")
    return 1.0 if _PATTERNS[pattern].search(completion) else 0.0
