"""Rewards registered by name and combined with weights.

A reward function maps (completions: list[str], examples: list[dict], context: dict) -> list[float]; `context`
carries per-response extras (lengths, truncated, max_len). `RewardSpec`s combine into a total; the verifier terms
(those marked `accuracy=True`) also give the accuracy signal that ARM's gate and Pass@k read.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

import numpy as np

from arm_jax.registry import Registry

REWARDS = Registry("reward")
register_reward = REWARDS.register


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """name: a registered reward; weight: its coefficient in the total; accuracy: it is a verifier (its value > 0
    means "correct"); kwargs: its options."""

    name: str
    weight: float = 1.0
    accuracy: bool = False
    kwargs: tuple = ()


@register_reward("math")
def _math(completions, examples, context, mode: str = "boxed", fallback: str = "none"):
    from arm_jax.rewards.math import MathGrader
    grader = context.setdefault("_math_grader", {}).get((mode, fallback))
    if grader is None:
        grader = MathGrader(mode=mode, fallback=fallback)
        context["_math_grader"][(mode, fallback)] = grader
    return [r.reward for r in grader.grade(completions, [e["answer"] for e in examples])]


@register_reward("code")
def _code(completions, examples, context, timeout_s: float = 5.0, workers: int = 4):
    """HumanEval-style (tests.test + entry_point), MBPP-style (tests.asserts) or stdin/stdout (tests.io: [[stdin,
    expected stdout], ...], APPS / CodeContests style: 1 when every case matches) examples; the completion's last
    ```python block (or the whole text) is the program."""
    from arm_jax.rewards.code import SandboxLimits, run_code, run_humaneval, run_io_tests, run_many
    limits = SandboxLimits(timeout_s=timeout_s)

    def one(pair):
        text, ex = pair
        code = extract_code(text)
        tests = json.loads(ex.get("tests") or "{}")
        if "test" in tests:
            return float(run_humaneval(ex["question"], code, tests["test"], ex["entry_point"], limits=limits).passed)
        if "io" in tests:
            return run_io_tests(code, [tuple(case) for case in tests["io"]], limits=limits)[0]
        program = "\n".join([tests.get("setup") or "", code, *tests.get("asserts", [])])
        return float(run_code(program, limits=limits).passed)

    return run_many(one, list(zip(completions, examples)), max_workers=workers)


@register_reward("format")
def _format(completions, examples, context, pattern: str = "think_boxed"):
    from arm_jax.rewards.format import format_reward
    return [format_reward(c, pattern) for c in completions]


def overlong_penalty(lengths, max_len: int, cache_len: int) -> np.ndarray:
    """DAPO soft overlong punishment (Yu et al. 2025), in tokens: 0 if L <= max_len - cache_len,
    ((max_len - cache_len) - L) / cache_len in the cache zone, -1 beyond max_len. lengths [N] -> [N] float32."""
    lengths = np.asarray(lengths, np.float32)
    start = max_len - cache_len
    return np.where(lengths <= start, 0.0, np.where(lengths <= max_len, (start - lengths) / cache_len, -1.0))


@register_reward("overlong")
def _overlong(completions, examples, context, cache_len: int = 4096):
    """DAPO soft overlong punishment from the response lengths in tokens (context['lengths'], ['max_len'])."""
    return overlong_penalty(context["lengths"], context["max_len"], cache_len).tolist()


def extract_code(text: str) -> str:
    """The last ```python fenced block of a completion, or the whole text when there is none."""
    import re
    blocks = re.findall(r"```(?:python|py)?\n(.*?)```", text, re.DOTALL)
    return blocks[-1] if blocks else text


class RewardComposer:
    """total = sum_k weight_k * reward_k; accuracy = the (weighted-free) mean of the accuracy terms, or the total
    when no term is marked as a verifier."""

    def __init__(self, specs: Sequence[RewardSpec]):
        for s in specs:
            if s.name not in REWARDS:
                raise KeyError(f"unknown reward {s.name!r}; registered: {sorted(REWARDS)}")
        self.specs = list(specs)
        self.context: dict = {}

    def __call__(self, completions: list[str], examples: list[dict], **context) -> dict[str, np.ndarray]:
        ctx = dict(self.context, **context)
        out, total, acc = {}, np.zeros(len(completions), np.float32), []
        for s in self.specs:
            vals = np.asarray(REWARDS.get_fn(s.name)(completions, examples, ctx, **dict(s.kwargs)), np.float32)
            out[s.name] = vals
            total += s.weight * vals
            if s.accuracy:
                acc.append(vals)
        self.context.update({k: v for k, v in ctx.items() if k.startswith("_")})
        out["total"] = total
        out["accuracy"] = np.mean(acc, axis=0) if acc else total
        return out

    def close(self):
        """Releases the rewards' resources (grader worker pools)."""
        for grader in self.context.get("_math_grader", {}).values():
            grader.close()
