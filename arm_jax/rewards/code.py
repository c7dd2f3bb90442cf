"""A sandbox for model-written code (docs/method.md §5): every program runs in its own subprocess, and a hostile one
costs a zero reward, never a crashed or hung trainer.

Protections (all on by default where the OS allows; `sandbox_capabilities()` says which are active):
- resource limits: CPU time, address space, file size, open files, no core dumps (setrlimit in the child);
- wall-clock timeout: the whole process group (and, with a pid namespace, every process the program made) is killed;
- captured stdout/stderr go to files capped by the file-size limit, and only the first `max_output_bytes` are read;
- a fresh temporary working directory and a scrubbed environment (no inherited variables: no secrets);
- with root and util-linux `unshare`/`setpriv` (checked on these machines): private network namespace (no network,
  not even loopback), pid namespace (the trainer is invisible and unkillable), private mount namespace with fresh
  size-limited tmpfs over /tmp, /var/tmp, /dev/shm and /root, and the program runs as an unprivileged uid
  (nobody), so the process-count limit applies and it cannot write outside its directory.
Without those privileges the sandbox falls back to resource limits only and logs loudly which protections are
missing.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import functools
import logging
import os
import resource
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

log = logging.getLogger(__name__)

NOBODY = 65534


@dataclasses.dataclass(frozen=True)
class CodeResult:
    """passed: exit status 0 (and expected output, for stdin/stdout tests); status: 'ok', 'failed', 'timeout',
    'memory' (address-space limit), 'output_limit' (file/output size limit) or 'error'."""

    passed: bool
    status: str
    stdout: str = ""
    stderr: str = ""
    returncode: Optional[int] = None
    duration_s: float = 0.0


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """timeout_s: wall clock; cpu_s: CPU seconds (default timeout + 1); memory_mb: address space; max_processes:
    processes of the sandbox uid (namespaced mode); max_file_mb: any file written, stdout included;
    max_open_files; max_output_bytes: how much of stdout/stderr is read back."""

    timeout_s: float = 5.0
    cpu_s: Optional[float] = None
    memory_mb: int = 512
    max_processes: int = 32
    max_file_mb: int = 16
    max_open_files: int = 64
    max_output_bytes: int = 64 * 1024


def _rlimits(limits: SandboxLimits) -> dict[str, tuple[int, int]]:
    cpu = int(limits.cpu_s if limits.cpu_s is not None else limits.timeout_s + 1)
    mem = limits.memory_mb * 1024 * 1024
    fsize = limits.max_file_mb * 1024 * 1024
    return {"cpu": (cpu, cpu + 1), "as": (mem, mem), "fsize": (fsize, fsize),
            "nofile": (limits.max_open_files, limits.max_open_files), "core": (0, 0),
            "nproc": (limits.max_processes, limits.max_processes)}


def _set_limits(limits: SandboxLimits):
    """preexec fallback when util-linux `prlimit` is missing (runs Python between fork and exec)."""
    names = {"cpu": resource.RLIMIT_CPU, "as": resource.RLIMIT_AS, "fsize": resource.RLIMIT_FSIZE,
             "nofile": resource.RLIMIT_NOFILE, "core": resource.RLIMIT_CORE, "nproc": resource.RLIMIT_NPROC}
    for key, value in _rlimits(limits).items():
        resource.setrlimit(names[key], value)


def _with_prlimit(cmd: list[str], limits: SandboxLimits) -> list[str]:
    """Sets the limits with util-linux `prlimit` (no Python code runs in the forked child: safe beside JAX's
    threads)."""
    return ["prlimit"] + [f"--{k}={soft}:{hard}" for k, (soft, hard) in _rlimits(limits).items()] + ["--"] + cmd


def _namespaced_command(workdir: str, argv: list[str], limits: SandboxLimits) -> list[str]:
    """unshare (net, pid, mount) -> private mounts -> setpriv to nobody -> the program (limits set by prlimit-like
    preexec in the parent's child before unshare; rlimits survive exec and setuid)."""
    prefix = os.path.realpath(sys.base_prefix)
    tmpfs = "mount -t tmpfs -o size={}m,mode=1777 tmpfs {}"
    q = shlex.quote
    script = " && ".join([
        f"mount --bind {q(workdir)} /mnt",
        "mkdir -p /dev/shm",
        f"{tmpfs.format(limits.max_file_mb, '/tmp')}",
        "mkdir /tmp/.py",
        f"mount --bind {q(prefix)} /tmp/.py",
        f"{tmpfs.format(limits.max_file_mb, '/var/tmp')}",
        f"{tmpfs.format(limits.max_file_mb, '/dev/shm')}",
        "mount -t tmpfs -o size=1m,mode=755 tmpfs /root",
        f"mkdir -p {q(prefix)}",
        f"mount --bind /tmp/.py {q(prefix)}",
        f"mount -o remount,bind,ro {q(prefix)}",
        "mount -t proc proc /proc",
        "cd /mnt",
        f"exec setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups --no-new-privs -- "
        + " ".join(q(a) for a in argv),
    ])
    return ["unshare", "--net", "--pid", "--fork", "--kill-child", "--mount", "--propagation", "private", "--",
            "sh", "-c", script]


@functools.lru_cache(maxsize=None)
def sandbox_capabilities() -> dict[str, bool]:
    """Probes once which protections work here; logs a warning naming the missing ones."""
    caps = {"namespaces": False}
    if os.geteuid() == 0 and shutil.which("unshare") and shutil.which("setpriv") and shutil.which("mount"):
        res = _run(["print(sum(range(10)))"], SandboxLimits(timeout_s=10), namespaced=True)
        caps["namespaces"] = res.status == "ok" and res.stdout.strip() == "45"
        if not caps["namespaces"]:
            log.warning("code sandbox: namespaces unavailable (%s %s)", res.status, res.stderr[-300:])
    if not caps["namespaces"]:
        log.warning("code sandbox: running WITHOUT network, pid and mount isolation and WITHOUT an unprivileged "
                    "uid (needs root + util-linux unshare/setpriv): only rlimits, a scrubbed environment, a temp "
                    "directory and the wall-clock kill protect this machine")
    return caps


def _read_capped(path: str, cap: int) -> str:
    with open(path, "rb") as f:
        return f.read(cap).decode("utf-8", errors="replace")


def _run(program_lines: list[str], limits: SandboxLimits, namespaced: bool, stdin: Optional[str] = None,
         ) -> CodeResult:
    base = tempfile.mkdtemp(prefix="arm_jax_sbx_")
    try:
        work = os.path.join(base, "work")
        os.mkdir(work)
        with open(os.path.join(work, "main.py"), "w") as f:
            f.write("\n".join(program_lines))
        out_path, err_path = os.path.join(base, "stdout"), os.path.join(base, "stderr")
        argv = [os.path.realpath(sys.executable) if not namespaced else
                os.path.join(os.path.realpath(sys.base_prefix), "bin", os.path.basename(os.path.realpath(
                    sys.executable))), "-I", "-B", "main.py"]
        if namespaced:
            os.chmod(base, 0o711)
            os.chown(work, NOBODY, NOBODY)
            cmd = _namespaced_command(work, argv, limits)
        else:
            cmd = argv
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/mnt" if namespaced else work,
               "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        preexec = None
        if shutil.which("prlimit"):
            cmd = _with_prlimit(cmd, limits)
        else:
            preexec = functools.partial(_set_limits, limits)
        start = time.monotonic()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.PIPE if stdin is not None else
                                    subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True,
                                    preexec_fn=preexec, close_fds=True)
            timed_out = False
            try:
                proc.communicate(input=stdin.encode() if stdin is not None else None, timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        duration = time.monotonic() - start
        stdout = _read_capped(out_path, limits.max_output_bytes)
        stderr = _read_capped(err_path, limits.max_output_bytes)
        rc = proc.returncode
        if timed_out or rc in (-signal.SIGXCPU, -signal.SIGKILL) and duration >= limits.timeout_s * 0.9:
            status = "timeout"
        elif rc == -signal.SIGXFSZ or "File too large" in stderr:
            status = "output_limit"
        elif "MemoryError" in stderr or rc == -signal.SIGSEGV:
            status = "memory"
        elif rc == 0:
            status = "ok"
        else:
            status = "failed"
        return CodeResult(status == "ok", status, stdout, stderr, rc, duration)
    except OSError as e:
        return CodeResult(False, "error", "", f"sandbox error: {e}", None, 0.0)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run_code(program: str, *, timeout_s: float = 5.0, memory_mb: int = 512, stdin: Optional[str] = None,
             limits: Optional[SandboxLimits] = None) -> CodeResult:
    """Public API (docs/method.md §9): runs `program` (Python source) in the sandbox; passed = exit status 0."""
    limits = limits or SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb)
    return _run([program], limits, namespaced=sandbox_capabilities()["namespaces"], stdin=stdin)


# ------------------------------------------------------------------------------------------ test formats


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str, nonce: str = "") -> str:
    """HumanEval layout: prompt + completion, the test module defining check(), then check(entry_point), then a
    print of `nonce` (so an early `sys.exit(0)` in the completion cannot pass)."""
    tail = f"\nprint({nonce!r})\n" if nonce else ""
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n{tail}"


def run_humaneval(prompt: str, completion: str, test: str, entry_point: str, *,
                  limits: Optional[SandboxLimits] = None) -> CodeResult:
    """Runs one HumanEval-style sample; passed only if check() returned and the run reached its end (nonce seen:
    exiting with status 0 before the tests ran is not a pass)."""
    nonce = f"ARM_JAX_TESTS_DONE_{secrets.token_hex(8)}"
    res = run_code(humaneval_program(prompt, completion, test, entry_point, nonce), limits=limits)
    if res.passed and nonce not in res.stdout:
        return dataclasses.replace(res, passed=False, status="failed")
    return res


def _same_output(got: str, expected: str) -> bool:
    norm = lambda s: [line.rstrip() for line in s.strip().splitlines()]  # noqa: E731
    return norm(got) == norm(expected)


def run_io_tests(program: str, cases: Sequence[tuple[str, str]], *, limits: Optional[SandboxLimits] = None,
                 fraction: bool = False) -> tuple[float, list[CodeResult]]:
    """stdin/stdout tests (APPS / CodeContests / LiveCodeBench style): reward 1 if every case's output matches
    (trailing whitespace ignored), or the fraction passed with `fraction=True`. Stops at the first failure unless
    `fraction`."""
    results = []
    for stdin, expected in cases:
        res = run_code(program, stdin=stdin, limits=limits)
        ok = res.status == "ok" and _same_output(res.stdout, expected)
        results.append(dataclasses.replace(res, passed=ok, status=res.status if res.status != "ok" or ok
                                           else "failed"))
        if not ok and not fraction:
            break
    passed = sum(r.passed for r in results)
    return (passed / max(len(cases), 1) if fraction else float(passed == len(cases))), results


def run_many(fn, items: Sequence, *, max_workers: int = 4) -> list[CodeResult]:
    """Runs fn(item) for every item in parallel threads (each call sandboxes its own subprocess); order kept.
    E.g. `run_many(lambda p: run_humaneval(**p), problems)`."""
    with cf.ThreadPoolExecutor(max_workers=max_workers) as ex:
        return list(ex.map(fn, items))
