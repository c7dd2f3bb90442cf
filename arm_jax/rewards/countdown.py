"""The mini-Countdown verifier: exactly one \\boxed{...} whose content matches [0-9+\\-*()]{1,20}, uses the prompt's
numbers exactly once each, and evaluates to the target. The reasoning chain before it is not graded."""

from __future__ import annotations

import json
import re

from arm_jax.rewards.registry import register_reward

_BOX = re.compile(r"\\boxed\{([^{}]*)\}")
_EXPR = re.compile(r"[0-9+\-*()]{1,20}")


def countdown_score(completion: str, numbers: list[int], target: int) -> float:
    """1.0 if the completion has exactly one \\boxed{} expression (digits, + - * / and parentheses, no '**') that
    uses exactly the given numbers, each once, and evaluates to the target; else 0.0."""
    boxes = _BOX.findall(completion)
    if len(boxes) != 1 or completion.count("\\boxed{") != 1:
        return 0.0
    expr = boxes[0]
    if not _EXPR.fullmatch(expr) or "**" in expr:
        return 0.0
    if sorted(int(n) for n in re.findall(r"\d+", expr)) != sorted(numbers):
        return 0.0
    try:
        value = eval(expr, {"__builtins__": {}}, {})  # noqa: S307 - charset checked above, no '**'
    except Exception:  # noqa: BLE001 - malformed expression
        return 0.0
    return 1.0 if value == target else 0.0


@register_reward("countdown")
def countdown_reward(completions, examples, context):
    """The registered 'countdown' reward: `countdown_score` of each completion against its example."""
    return [countdown_score(c, json.loads(e["numbers"]), int(e["answer"])) for c, e in zip(completions, examples)]
