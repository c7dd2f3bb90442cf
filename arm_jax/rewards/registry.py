"""Rewards registered by name and combined with weights.

A reward function maps (completions: list[str], examples: list[dict], context: dict) -> list[float], or a `Graded`
(values and one status per response, `GRADING_STATUSES` or 'ok'); `context` carries per-response extras
(lengths, truncated, max_len). `RewardSpec`s combine into a total; the verifier terms (those marked
`accuracy=True`) also give the accuracy signal that ARM's gate and Pass@k read. The composer counts the statuses
(`GRADING_STATUSES`), so a grader that fails shows in the metrics instead of looking like a model that does not
learn. A status says whose fault a 0 is: the model's ('no_answer': no answer where the prompt asked for one;
'malformed': an answer the grader will not grade, e.g. one too long) or the grader's ('timeout': no verdict in time;
'error': the grader or its worker failed). Only the grader's stop a run (`arm_jax.train.loop.check_grading`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional, Sequence

import numpy as np

from arm_jax.registry import Registry

REWARDS = Registry("reward")
register_reward = REWARDS.register


GRADING_STATUSES = ("timeout", "error", "no_answer", "malformed")  # counted per response and term (besides 'ok')


@dataclasses.dataclass(frozen=True)
class Graded:
    """A reward term's output with how each response was graded: values [N]; statuses [N] in 'ok', 'no_answer',
    'timeout', 'error'; correct [N] (optional): the verifier's verdict (bool) where the values are a scale of it
    (+1 / -1), read as the accuracy instead of the values."""

    values: list
    statuses: list
    correct: list | None = None


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """name: a registered reward; weight: its coefficient in the total; accuracy: it is a verifier (its value > 0
    means "correct"); kwargs: its options."""

    name: str
    weight: float = 1.0
    accuracy: bool = False
    kwargs: tuple = ()


def _math_grader(context: dict, answer_format: str = "boxed", fallback: str = "none", workers: int = 2,
                 timeout_s: float = 5.0, correct: float = 1.0, incorrect: float = 0.0):
    """The context's MathGrader for these options, started on first use (correct / incorrect: the term's values,
    not the grader's)."""
    from arm_jax.rewards.math import MathGrader
    key = (answer_format, fallback, workers, timeout_s)
    grader = context.setdefault("_math_grader", {}).get(key)
    if grader is None:
        grader = MathGrader(num_workers=workers, timeout_s=timeout_s, answer_format=answer_format, fallback=fallback)
        context["_math_grader"][key] = grader
    return grader


# reward name -> start(context, **kwargs): builds the term's resources ahead of the first call
_STARTERS = {"math": _math_grader}


@register_reward("math")
def _math(completions, examples, context, correct: float = 1.0, incorrect: float = 0.0, **options):
    """Each example's 'answer' against the completion by `arm_jax.rewards.math.MathGrader`. options: answer_format
    (`arm_jax.data.answers.ANSWER_FORMATS`: 'boxed', 'gsm8k', 'auto', 'dapo' (the reference DAPO rule),
    'dapo_boxed_fallback', 'dapo_mathverify'), fallback, workers (processes, 2), timeout_s (per item, 5.0);
    correct / incorrect: the value of a right answer and of anything else (1 / 0; the DAPO reference's +1 / -1 is
    correct=1, incorrect=-1). The accuracy stays the verdict (0 / 1) whatever the values."""
    res = _math_grader(context, **options).grade(completions, [e["answer"] for e in examples])
    ok = [r.reward > 0 for r in res]
    return Graded([correct if c else incorrect for c in ok], [r.status for r in res], ok)


def _code_sandbox(context: dict, allow_unsandboxed: bool = False, **_) -> dict:
    """Checks, once per run, that model-written code can run isolated (SandboxUnavailable otherwise, unless
    allow_unsandboxed), logs the mode and records it for the metrics (`sandbox/isolated`)."""
    from arm_jax.rewards.sandbox import _mode, sandbox_capabilities
    if "_code_sandbox" not in context:
        mode = _mode(allow_unsandboxed)
        print(f"code sandbox: {'isolated, mode ' + repr(mode) if mode else 'NOT ISOLATED (allow_unsandboxed=True)'}"
              f"{'' if mode else ': ' + sandbox_capabilities()['missing']}", flush=True)
        context["_code_sandbox"] = {"sandbox/isolated": float(mode is not None)}
    return context["_code_sandbox"]


_STARTERS["code"] = _code_sandbox
_CODE_STATUS = {"ok": "ok", "failed": "ok", "memory": "ok", "output_limit": "ok", "timeout": "ok",
                "error": "error"}  # the program's failures, its time limits included, are graded answers (reward 0,
# never a stopped run); the sandbox's own failures and tests the grader cannot run are errors


def _code_limits(test_timeout_s: float, program_timeout_s: Optional[float], num_tests: int):
    """A problem's SandboxLimits: `test_timeout_s` per test, the whole program (test_timeout_s + 1) * tests + 5 s
    unless `program_timeout_s` is given (LiveCodeBench's global timeout)."""
    from arm_jax.rewards.sandbox import SandboxLimits
    total = program_timeout_s if program_timeout_s is not None else (test_timeout_s + 1) * max(num_tests, 1) + 5
    return SandboxLimits(timeout_s=total, test_timeout_s=test_timeout_s)


@register_reward("code")
def _code(completions, examples, context, timeout_s: float = 5.0, program_timeout_s: Optional[float] = None,
          fraction: bool = False, workers: int = 4, allow_unsandboxed: bool = False):
    """HumanEval-style (tests.test + entry_point), MBPP-style (tests.asserts, tests.setup) or stdin/stdout
    (tests.io: [[stdin, expected stdout], ...], APPS / CodeContests style) examples, one sandbox per program and
    problem, verdicts computed outside it (`arm_jax.rewards.code_checks`); the completion's last ```python block
    (or the whole text) is the program. timeout_s: per test (an assert, HumanEval's check, one stdin/stdout case);
    program_timeout_s: the whole program (default (timeout_s + 1) * tests + 5); fraction: the reward is the
    fraction of tests passed (all of them run) instead of 1 only when every test passes (stopping at the first
    failure); workers: sandboxes at once; allow_unsandboxed: run without isolation where none is available
    (otherwise an error)."""
    from arm_jax.rewards.code import run_asserts, run_humaneval, run_io_tests, run_many
    from arm_jax.rewards.code_checks import defined_functions
    _code_sandbox(context, allow_unsandboxed)

    def one(pair):
        text, ex = pair
        code = extract_code(text)
        tests = json.loads(ex.get("tests") or "{}")
        if "io" in tests:
            limits = _code_limits(timeout_s, program_timeout_s, len(tests["io"]))
            reward, runs = run_io_tests(code, [tuple(case) for case in tests["io"]], limits=limits,
                                        fraction=fraction, allow_unsandboxed=allow_unsandboxed)
            return reward, "ok" if reward > 0 and fraction else runs[-1].status
        if "test" in tests:
            r = run_humaneval(ex["question"], code, tests["test"], ex["entry_point"],
                              limits=_code_limits(timeout_s, program_timeout_s, 1),
                              allow_unsandboxed=allow_unsandboxed)
        else:
            asserts = tests.get("asserts", [])
            r = run_asserts(code, asserts, tests.get("setup") or "", fraction=fraction,
                            limits=_code_limits(timeout_s, program_timeout_s, len(asserts)),
                            functions=defined_functions(ex.get("solution", "")),  # e.g. a `def pow` asked for
                            allow_unsandboxed=allow_unsandboxed)
        if fraction:
            return r.passed_tests / max(r.num_tests, 1), r.status
        return float(r.passed), r.status

    res = run_many(one, list(zip(completions, examples)), max_workers=workers)  # [(reward, status)]
    return Graded([v for v, _ in res], [_CODE_STATUS.get(st, "error") for _, st in res],
                  [v == 1.0 for v, _ in res])  # correct: every test passed (also under `fraction`)


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
    """DAPO soft overlong punishment from the response lengths in tokens (context['lengths']) against the run's
    response budget (context['max_len'], RLConfig.max_new_tokens); cache_len: the buffer (task option
    overlong_buffer), shorter than the budget."""
    max_len = int(context["max_len"])
    check_overlong_buffer(cache_len, max_len)
    return overlong_penalty(context["lengths"], max_len, cache_len).tolist()


def check_overlong_buffer(cache_len: int, max_len: int, where: str = "") -> None:
    """The overlong penalty's buffer fits the response budget: 0 < buffer < max_len (ValueError naming both
    options; `where` prefixes the message, e.g. the task)."""
    if not 0 < cache_len < max_len:
        raise ValueError(f"{where}the overlong penalty's buffer (task option overlong_buffer={cache_len}) must be "
                         f"shorter than the response budget (RLConfig.max_new_tokens={max_len})")


def extract_code(text: str) -> str:
    """The last ```python fenced block of a completion, or the whole text when there is none."""
    import re
    blocks = re.findall(r"```(?:python|py)?\n(.*?)```", text, re.DOTALL)
    return blocks[-1] if blocks else text


_GRADING_BEFORE_MALFORMED = ("timeout", "error", "no_answer")  # the counts' layout before 'malformed' existed


def upgrade_grading(counts: np.ndarray) -> np.ndarray:
    """'grading' counts saved by an older version (a one-step-off checkpoint's waiting batches) in today's layout:
    the statuses it did not count are 0."""
    counts = np.asarray(counts, np.int64)
    if counts.shape == (len(_GRADING_BEFORE_MALFORMED) + 1,):
        old = dict(zip(_GRADING_BEFORE_MALFORMED, counts[:-1]))
        return np.array([old.get(name, 0) for name in GRADING_STATUSES] + [counts[-1]], np.int64)
    if counts.shape != (len(GRADING_STATUSES) + 1,):
        raise ValueError(f"'grading' counts of shape {counts.shape}: expected ({len(GRADING_STATUSES) + 1},) "
                         f"({', '.join(GRADING_STATUSES)}, graded)")
    return counts


def grading_metrics(counts: np.ndarray) -> dict[str, float]:
    """`reward/<status>_frac` for each of GRADING_STATUSES, from 'grading' counts (summed over processes)."""
    n = max(int(counts[-1]), 1)
    return {f"reward/{name}_frac": float(counts[i]) / n for i, name in enumerate(GRADING_STATUSES)}


class RewardComposer:
    """total = sum_k weight_k * reward_k; accuracy = the (weighted-free) mean of the accuracy terms, or the total
    when no term is marked as a verifier."""

    def __init__(self, specs: Sequence[RewardSpec]):
        for s in specs:
            if s.name not in REWARDS:
                raise KeyError(f"unknown reward {s.name!r}; registered: {sorted(REWARDS)}")
        self.specs = list(specs)
        self.context: dict = {}

    @property
    def info(self) -> dict[str, float]:
        """Per-run facts the terms recorded for the metrics (e.g. `sandbox/isolated`)."""
        return dict(self.context.get("_code_sandbox", {}))

    def start(self) -> "RewardComposer":
        """Starts every term's resources now (grader worker pools), so a grader that cannot start is an error
        before the first step rather than a reward of 0 at every step."""
        for s in self.specs:
            if s.name in _STARTERS:
                _STARTERS[s.name](self.context, **dict(s.kwargs))
        return self

    def __call__(self, completions: list[str], examples: list[dict], **context) -> dict[str, np.ndarray]:
        """-> {term name: [N], 'total': [N], 'accuracy': [N], 'grading': [len(GRADING_STATUSES) + 1] counts of
        each status and of graded responses, over the terms that report statuses}."""
        ctx = dict(self.context, **context)
        out, total, acc = {}, np.zeros(len(completions), np.float32), []
        grading = np.zeros(len(GRADING_STATUSES) + 1, np.int64)
        for s in self.specs:
            res = REWARDS.get_fn(s.name)(completions, examples, ctx, **dict(s.kwargs))
            correct = None
            if isinstance(res, Graded):
                grading[:-1] += [sum(st == name for st in res.statuses) for name in GRADING_STATUSES]
                grading[-1] += len(res.statuses)
                res, correct = res.values, res.correct
            vals = np.asarray(res, np.float32)
            out[s.name] = vals
            total += s.weight * vals
            if s.accuracy:
                acc.append(vals if correct is None else np.asarray(correct, np.float32))
        self.context.update({k: v for k, v in ctx.items() if k.startswith("_")})
        out["total"] = total
        out["accuracy"] = np.mean(acc, axis=0) if acc else total
        out["grading"] = grading
        return out

    def close(self):
        """Releases the rewards' resources (grader worker pools)."""
        for grader in self.context.get("_math_grader", {}).values():
            grader.close()
