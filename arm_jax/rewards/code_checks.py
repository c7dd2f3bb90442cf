"""Verdicts computed where the program cannot reach them (docs/method.md §5): the trusted side of the code reward.

One sandboxed process per program and problem (`arm_jax.rewards.sandbox.start_program`) runs the candidate and
answers requests with what it computed, as plain data (`arm_jax.rewards.sandbox_harness`: JSON of exact builtin
types, at most `SandboxLimits.max_answer_bytes` an answer). Everything that decides runs here, in the caller's
process, which never runs model code:

- function tests (MBPP asserts, HumanEval's check): the test source, the dataset's setup code and HumanEval's prompt
  (its helpers, e.g. `poly` or `encode_cyclic`, which the tests call) run here; every name the tests use that only
  the solution defines becomes a proxy whose calls go into the sandbox with the arguments as data and come back as
  data. Expected values, comparisons, `set` / `sorted` / `abs` / `math.isclose` are this process's own, so a
  program that patches its builtins, its caller's frame or the harness only changes itself; arguments are passed
  by value (a candidate's mutation of its arguments is not seen by the test).
- stdin/stdout tests: each case's stdin goes in, its stdout and exit code come out, and the comparison is here.

No secret enters the sandbox: a program passes only by returning (printing) the right values. Limits: one wall
clock for the whole program (`timeout_s`) and one per test (`test_timeout_s`); the first failing test stops the
program unless a fraction is asked for.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import importlib
import json
import os
import select
import time
from typing import Optional, Sequence

from arm_jax.rewards import sandbox_harness as wire
from arm_jax.rewards.sandbox import CodeResult, SandboxLimits, _read_ends, exit_status, start_program

_HARNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_harness.py")


class SandboxStopped(BaseException):
    """The sandbox can answer no more: status is 'timeout', 'output_limit', 'memory', 'failed' or 'error'. A
    BaseException, so a test's `except Exception:` cannot swallow it."""

    def __init__(self, status: str, why: str):
        super().__init__(why)
        self.status = status


class CandidateError(Exception):
    """The candidate raised (or returned something that is not data); `args[0]` names what."""


class UnsupportedTest(BaseException):
    """A test the grader cannot run across the boundary (e.g. it passes a function to the candidate): 'error'."""


def _main_source() -> str:
    with open(_HARNESS) as f:
        return f.read() + "\nimport sys\n_arm_serve(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))\n"


class Session:
    """One sandboxed program serving requests (JSON lines over two pipes); `ask` waits at most to a deadline."""

    def __init__(self, files: dict[str, str], limits: SandboxLimits, mode: Optional[str],
                 run_deadline: Optional[float] = None):
        req_r, self._req = os.pipe()
        self._resp, resp_w = os.pipe()
        try:
            self.started = start_program(dict(files, **{"main.py": _main_source()}), limits, mode,
                                         args=(str(req_r), str(resp_w), str(limits.max_answer_bytes)),
                                         pass_fds=(req_r, resp_w))
        except OSError as e:
            for fd in (self._req, self._resp):
                os.close(fd)
            raise SandboxStopped("error", f"sandbox error: {e}") from e
        finally:
            os.close(req_r)
            os.close(resp_w)
        os.set_blocking(self._req, False)  # a program that stops reading (or shrinks its pipe) cannot block us
        self.limits, self._buf = limits, b""
        self.run_deadline = run_deadline or self.started.start + limits.timeout_s
        self.stopped: Optional[SandboxStopped] = None

    def ask(self, msg: dict, deadline: float) -> dict:
        """Sends one request and returns its answer; SandboxStopped when the program timed out, died, or sent
        more than max_answer_bytes or something that is not an answer."""
        if self.stopped:
            raise self.stopped
        deadline = min(deadline, self.run_deadline)
        try:
            self._send(wire.dumps(msg).encode(), deadline)
            line = self._receive(deadline)
        except SandboxStopped as e:
            raise self._stop(e) from None
        try:
            answer = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise self._stop(SandboxStopped("failed", f"the sandbox answered something that is not JSON ({e})"))
        if not isinstance(answer, dict):
            raise self._stop(SandboxStopped("failed", "the sandbox answered something that is not an answer"))
        return answer

    def _stop(self, stopped: SandboxStopped) -> SandboxStopped:
        """Ends the program; every later request raises `stopped`."""
        self.stopped = stopped
        self.started.stop()
        return stopped

    def _send(self, data: bytes, deadline: float) -> None:
        while data:
            _, ready, _ = select.select([], [self._req], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise self._timeout_or_death()
            try:
                data = data[os.write(self._req, data):]
            except BlockingIOError:
                continue  # writable by less than we had: select again, within the deadline
            except BrokenPipeError:
                raise self._died() from None

    def _receive(self, deadline: float) -> bytes:
        while b"\n" not in self._buf:
            if len(self._buf) > self.limits.max_answer_bytes:
                raise SandboxStopped("output_limit", f"an answer over max_answer_bytes={self.limits.max_answer_bytes}")
            ready, _, _ = select.select([self._resp], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise self._timeout_or_death()
            chunk = os.read(self._resp, 1 << 16)
            if not chunk:
                raise self._died()
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def _timeout_or_death(self) -> SandboxStopped:
        if self.started.proc.poll() is not None:
            return self._died()
        return SandboxStopped("timeout", "no answer within the time limit")

    def _died(self) -> SandboxStopped:
        self.started.stop()
        _, stderr = _read_ends(self.started.err_path, 0, 4096)
        status = exit_status(self.started.proc.returncode, stderr, False, 0.0, self.limits)
        return SandboxStopped("failed" if status == "ok" else status, "the program ended while serving")

    def close(self, status: str, passed_tests: int, num_tests: int) -> CodeResult:
        """Ends the program and returns the run's CodeResult."""
        for fd in (self._req, self._resp):
            try:
                os.close(fd)
            except OSError:
                pass
        self.started.stop()
        res = self.started.result(False)
        return CodeResult(status == "ok", status, res.stdout, res.stderr, res.returncode, res.duration_s,
                          passed_tests, num_tests)


# -------------------------------------------------------------------------------------------- function tests


def _bound_names(tree: ast.AST) -> set[str]:
    """Names a test source binds itself (assignments, defs, imports, arguments, comprehension targets)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            out.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.alias):
            out.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.arg):
            out.add(node.arg)
    return out


def _solution_names(tests: Sequence[ast.AST], trusted: dict) -> list[str]:
    """The names the tests read that neither they, the trusted namespace nor the builtins define: the solution's."""
    loaded, bound = set(), set()
    for tree in tests:
        bound |= _bound_names(tree)
        loaded |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return sorted(n for n in loaded - bound if n not in trusted and not hasattr(builtins, n))


class _Proxy:
    """A solution's function as the tests see it: each call goes into the sandbox, arguments and result as data."""

    def __init__(self, session: Session, name: str, clock: list):
        self.session, self.__name__, self._clock = session, name, clock

    def __call__(self, *args, **kwargs):
        try:
            msg = {"op": "call", "name": self.__name__, "args": wire.encode(list(args)),
                   "kwargs": wire.encode(kwargs)}
        except wire.TooDeep as e:  # only a candidate's own answers nest this deep: its doing
            raise CandidateError(f"an argument of {self.__name__} built from an answer nests too deep: {e}") from None
        except wire.NotData as e:
            raise UnsupportedTest(f"a test passes {self.__name__} an argument that cannot cross: {e}") from None
        answer = self.session.ask(msg, self._clock[0])
        if "value" in answer:
            try:
                return wire.decode(answer["value"])
            except wire.NotData as e:
                raise CandidateError(f"{self.__name__} answered a malformed value: {e}") from None
        kind, text = _raised(answer)
        cls = _RERAISED.get(kind)
        if cls is not None:  # the test may expect this exception type
            raise cls(f"{self.__name__} raised {kind}: {text}")
        raise CandidateError(f"{self.__name__} raised {kind}: {text}")


# The exception types a candidate's failure reaches the tests as, by name (what tests catch: `except ValueError`);
# any other (StopIteration would end a trusted map() or filter() early and pass it) arrives as CandidateError.
_RERAISED = {cls.__name__: cls for cls in (ValueError, TypeError, KeyError, IndexError, LookupError,
                                           ArithmeticError, ZeroDivisionError, OverflowError, AttributeError,
                                           RuntimeError, NotImplementedError, RecursionError, UnicodeError)}


def _raised(answer: dict) -> tuple[str, str]:
    raised = answer.get("raised")
    if isinstance(raised, list) and len(raised) >= 2:
        return str(raised[0])[:100], str(raised[1])[:300]
    return "ProtocolError", "an answer with neither a value nor an exception"


def defined_functions(reference: str) -> tuple[str, ...]:
    """The top-level functions a reference solution defines (the functions a problem asks for); () when it does not
    parse or is empty."""
    try:
        tree = ast.parse(reference or "")
    except SyntaxError:
        return ()
    return tuple(n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))


def runnable_prompt(prompt: str) -> str:
    """HumanEval's prompt as trusted code (its imports and helpers): as it is when it parses (every HumanEval prompt
    ends in a docstring), else with `pass` as the body of the signature it ends with."""
    try:
        ast.parse(prompt)
        return prompt
    except SyntaxError:
        return prompt.rstrip() + "\n    pass\n"


def _trusted_namespace(trusted: str) -> dict:
    ns = {"__builtins__": builtins, "__name__": "__arm_jax_tests__"}
    if trusted.strip():
        exec(compile(trusted, "<trusted setup>", "exec"), ns)
    return ns


# Standard modules a solution may have imported for the tests to use under the same name (MBPP's `math.isclose`
# after the solution's `import math`): the trusted side binds its own copy, and only of these.
TEST_MODULES = frozenset({"math", "cmath", "re", "string", "collections", "itertools", "functools", "operator",
                          "heapq", "bisect", "statistics", "decimal", "fractions", "datetime", "random", "copy",
                          "array", "json", "typing"})


def _bind_solution(session: Session, names: list[str], proxied: Sequence[str], ns: dict, clock: list) -> None:
    """Binds each of the solution's names in `ns`: a proxy for a callable, the decoded value for data, our own
    copy of an allowed standard module."""
    names = sorted(set(names) | set(proxied))
    answer = session.ask({"op": "lookup", "names": names}, clock[0]) if names else {}
    kinds, values = answer.get("kinds"), answer.get("values", {})
    kinds, values = (kinds if isinstance(kinds, dict) else {}), (values if isinstance(values, dict) else {})
    for n in names:
        kind, value = kinds.get(n), values.get(n)
        if kind == "missing" and n not in proxied:
            continue  # the trusted namespace's own (a builtin, the setup's), or a NameError in the test
        ns.pop(n, None)
        if kind not in ("callable", "value", "module"):  # a function the problem asks for, not defined
            ns[n] = _undefined(n)
        elif kind == "callable":
            ns[n] = _Proxy(session, n, clock)
        elif kind == "value":
            try:
                ns[n] = wire.decode(value)
            except wire.NotData:
                pass
        elif kind == "module" and value in TEST_MODULES:
            ns[n] = importlib.import_module(value)


def _undefined(name: str):
    def undefined(*args, **kwargs):
        raise CandidateError(f"the solution does not define {name}")
    return undefined


class _Unloadable(Exception):
    def __init__(self, status: str):
        super().__init__(status)
        self.status = status


def _open(files: dict, limits: SandboxLimits, mode: Optional[str], run_deadline: float, names: list[str],
          proxied: Sequence[str], trusted_ns: dict, clock: list) -> Session:
    """A sandbox with the solution loaded and the solution's names in `trusted_ns` bound to it (in place: they are
    the trusted functions' globals); _Unloadable when the solution fails to load (its status), SandboxStopped when
    the sandbox does."""
    session = Session(files, limits, mode, run_deadline)
    try:
        loaded = session.ask({"op": "load"}, clock[0])
        if "raised" in loaded or loaded.get("ok") is not True:
            raise _Unloadable("memory" if _raised(loaded)[0] == "MemoryError" else "failed")
        _bind_solution(session, names, proxied, trusted_ns, clock)
        return session
    except BaseException:
        session.close("failed", 0, 0)
        raise


def check_functions(solution: str, tests: Sequence[str], *, trusted: str = "", setup: str = "",
                    proxied: Sequence[str] = (), limits: SandboxLimits, mode: Optional[str],
                    fraction: bool = False) -> CodeResult:
    """Runs `setup` + `solution` in one sandbox and each test source here, in a namespace made by running
    `trusted` (the dataset's setup code / HumanEval's prompt and test module) with the solution's names bound to
    proxies (`proxied`: names bound to the solution's even where the trusted side has its own, e.g. a function the
    problem asks for that is named like a builtin). A test passes when it runs without an exception. Stops at the
    first failing test unless `fraction` (then a test that times out costs a fresh sandbox for the next one, within
    the whole-program limit)."""
    if not tests:
        return CodeResult(False, "error", stderr="the problem has no tests: nothing decides a verdict")
    try:
        trees = [ast.parse(t) for t in tests]
        trusted_ns = _trusted_namespace(trusted)
    except Exception as e:  # noqa: BLE001 - the dataset's tests themselves do not run: the grader's problem
        return CodeResult(False, "error", stderr=f"the tests do not run outside the sandbox: {e!r}",
                          num_tests=len(tests))
    files = {"solution.py": solution, **({"setup.py": setup} if setup.strip() else {})}
    names, run_deadline = _solution_names(trees, trusted_ns), time.monotonic() + limits.timeout_s
    clock = [run_deadline]
    passed, status, session, last = 0, "ok", None, None
    try:
        for tree in trees:
            clock[0] = min(time.monotonic() + limits.per_test_s, run_deadline)  # loading counts to the first test
            if session is None:
                session = _open(files, limits, mode, run_deadline, names, proxied, trusted_ns, clock)
            try:
                exec(compile(tree, "<test>", "exec"), dict(trusted_ns))
                if session.stopped:
                    raise session.stopped  # the test swallowed it
                passed += 1
            except SandboxStopped as e:
                status = e.status
                if not fraction or e.status != "timeout" or time.monotonic() >= run_deadline:
                    break
                last, session = session.close(status, passed, len(tests)), None  # a fresh sandbox for the rest
            except UnsupportedTest as e:
                status, last = "error", CodeResult(False, "error", stderr=str(e))
                break
            except Exception:  # noqa: BLE001 - a failed assert, the candidate's exception, a wrong-typed value
                status = "failed"
                if not fraction:
                    break
    except SandboxStopped as e:
        status = e.status
    except _Unloadable as e:
        status = e.status
    except Exception:  # noqa: BLE001 - an answer the protocol cannot use (forged, malformed): the program's doing
        status = "failed"
    final = "ok" if passed == len(tests) else status
    if session is not None:
        return session.close(final, passed, len(tests))
    last = last or CodeResult(False, final)
    return dataclasses.replace(last, passed=final == "ok", status=final, passed_tests=passed, num_tests=len(tests))


# ------------------------------------------------------------------------------------------- stdin / stdout


def same_output(got: str, expected: str) -> bool:
    """Outputs equal line by line, trailing whitespace and surrounding blank lines ignored."""
    norm = lambda s: [line.rstrip() for line in s.strip().splitlines()]  # noqa: E731
    return norm(got) == norm(expected)


def _case_status(answer: dict, expected: str, limits: SandboxLimits) -> str:
    code, stderr = answer.get("exit"), str(answer.get("stderr", ""))
    if answer.get("timeout"):
        return "timeout"
    if len(str(answer.get("stdout", ""))) >= limits.max_answer_bytes:
        return "output_limit"
    status = exit_status(code, stderr, False, 0.0, limits)
    if status != "ok":
        return status
    return "ok" if same_output(str(answer.get("stdout", "")), expected) else "failed"


def _io_case(session: Session, stdin: str, expected: str, limits: SandboxLimits) -> CodeResult:
    t = time.monotonic()
    try:
        answer = session.ask({"op": "run", "stdin": stdin, "timeout_s": limits.per_test_s},
                             t + limits.per_test_s + 1.0)
    except SandboxStopped as e:
        return CodeResult(False, e.status, duration_s=time.monotonic() - t)
    if "raised" in answer:
        status = "error" if _raised(answer)[0] == "SandboxError" else "failed"
    else:
        status = _case_status(answer, expected, limits)
    code = answer.get("exit")
    return CodeResult(status == "ok", status, str(answer.get("stdout", ""))[:limits.max_output_bytes],
                      str(answer.get("stderr", answer.get("raised", "")))[-4096:],
                      code if type(code) is int else None, time.monotonic() - t)


def check_io(program: str, cases: Sequence[tuple[str, str]], *, limits: SandboxLimits, mode: Optional[str],
             fraction: bool = False) -> tuple[float, list[CodeResult]]:
    """Every case through one sandbox (a fresh forked interpreter per case, `test_timeout_s` each), compared
    here. -> (1.0 if all pass, or the fraction with `fraction`; one CodeResult per case run)."""
    if not cases:
        return 0.0, [CodeResult(False, "error", stderr="the problem has no tests: nothing decides a verdict")]
    try:
        session = Session({"solution.py": program}, limits, mode)
    except SandboxStopped as e:
        return 0.0, [CodeResult(False, e.status, stderr=str(e), num_tests=len(cases))]
    results = []
    try:
        for stdin, expected in cases:
            results.append(_io_case(session, stdin, expected, limits))
            if results[-1].status != "ok" and not fraction:
                break
    except Exception:  # noqa: BLE001 - an answer the protocol cannot use (forged, malformed): the program's doing
        results.append(CodeResult(False, "failed"))
    passed = sum(r.passed for r in results)
    failure = next((r.status for r in results if r.status != "ok"), "error")
    session.close("ok" if passed == len(cases) else failure, passed, len(cases))
    reward = passed / max(len(cases), 1) if fraction else float(passed == len(cases))
    return reward, results
