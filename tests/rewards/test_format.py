"""The format term's layouts: 'answer_line' pays exactly for what the 'dapo' answer format grades."""

import pytest

from arm_jax.data.answers import extract_dapo
from arm_jax.rewards.format import format_reward
from arm_jax.rewards.math import MathGrader


@pytest.mark.parametrize("text, graded", [
    ("Answer: 34\n" + "so the reasoning goes on. " * 20, False),  # more than 300 characters from the end
    ("the work...\nAnswer:\n34", True),  # the answer on the line after the colon
    ("so the final answer: 34", True),  # inline, not at the start of a line
    ("the work...\nAnswer: 34", True),
    ("Answer:   ", False),  # nothing after the colon
    ("no answer line at all", False),
])
def test_answer_line_is_what_the_dapo_rule_grades(text, graded):
    """The bonus is earned iff the 'dapo' rule finds an answer to grade (status 'ok', not 'no_answer')."""
    [res] = MathGrader(answer_format="dapo").grade([text], ["34"])
    assert (res.status == "ok") is graded and (extract_dapo(text) is not None and bool(extract_dapo(text).strip())) \
        is graded
    assert format_reward(text, "answer_line") == float(graded)


def test_regular_expression_layouts_still_search():
    assert format_reward("<think>a</think> so \\boxed{3}") == 1.0
    assert format_reward("```python\nx = 1\n```", "code_block") == 1.0 and format_reward("x = 1", "code_block") == 0.0
    with pytest.raises(KeyError, match="unknown format pattern"):
        format_reward("x", "no_such_layout")
