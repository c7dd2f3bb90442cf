"""Code rewards' public API (docs/method.md §9): run a program, or grade one against a problem's tests.

The isolation is `arm_jax.rewards.sandbox` (a subprocess in namespaces, for every user, root or not); the verdicts
are computed outside the untrusted process by `arm_jax.rewards.code_checks`: one sandbox per program and problem
runs the candidate and answers with what it computed, as plain data, and a program passes only by returning (or
printing) the right values.
"""

from __future__ import annotations

import concurrent.futures as cf
from typing import Optional, Sequence

from arm_jax.rewards.code_checks import check_functions, check_io, runnable_prompt
from arm_jax.rewards.sandbox import (CodeResult, SandboxLimits, SandboxUnavailable, _mode, _run,  # noqa: F401
                                     run_code, sandbox_capabilities)

def run_humaneval(prompt: str, completion: str, test: str, entry_point: str, *,
                  limits: Optional[SandboxLimits] = None, allow_unsandboxed: bool = False) -> CodeResult:
    """One HumanEval-style sample: prompt + completion run in the sandbox, which serves calls of `entry_point`;
    the prompt and the test module run outside (trusted) and `check(candidate)` calls into the sandbox. passed
    only if check() returned (`arm_jax.rewards.code_checks`)."""
    return check_functions(prompt + completion, [f"check({entry_point})\n"],
                           trusted=runnable_prompt(prompt) + "\n" + test,
                           proxied=(entry_point,), limits=limits or SandboxLimits(), mode=_mode(allow_unsandboxed))


def run_asserts(code: str, asserts: Sequence[str], setup: str = "", *, limits: Optional[SandboxLimits] = None,
                fraction: bool = False, functions: Sequence[str] = (), allow_unsandboxed: bool = False
                ) -> CodeResult:
    """MBPP-style assert tests: `test_setup_code` and the solution run in the sandbox, which serves calls of the
    solution's functions; each assert is evaluated outside with those calls' returned values. A name the asserts use
    that the trusted side defines (a builtin, the setup's) stays the trusted side's unless listed in `functions`
    (the functions the problem asks for, e.g. from its reference solution: one named like a builtin). passed only
    if every assert held; stops at the first failure unless `fraction` (then `passed_tests` of `num_tests`
    counts)."""
    return check_functions(code, list(asserts), trusted=setup, setup=setup, proxied=tuple(functions),
                           limits=limits or SandboxLimits(), mode=_mode(allow_unsandboxed), fraction=fraction)


def run_io_tests(program: str, cases: Sequence[tuple[str, str]], *, limits: Optional[SandboxLimits] = None,
                 fraction: bool = False, allow_unsandboxed: bool = False) -> tuple[float, list[CodeResult]]:
    """stdin/stdout tests (APPS / CodeContests / LiveCodeBench style), one sandbox for all cases, each case in a
    fresh forked interpreter: reward 1 if every case's output matches (trailing whitespace ignored) and the
    program ended normally (`sys.exit(0)` counts; a crash or `os._exit` after printing does not), or the fraction
    passed with `fraction=True`. Stops at the first failure unless `fraction`. -> (reward, one CodeResult per case
    run)."""
    return check_io(program, list(cases), limits=limits or SandboxLimits(), mode=_mode(allow_unsandboxed),
                    fraction=fraction)


def run_many(fn, items: Sequence, *, max_workers: int = 4) -> list[CodeResult]:
    """Runs fn(item) for every item in parallel threads (each call sandboxes its own subprocess); order kept.
    E.g. `run_many(lambda p: run_humaneval(**p), problems)`."""
    with cf.ThreadPoolExecutor(max_workers=max_workers) as ex:
        return list(ex.map(fn, items))
