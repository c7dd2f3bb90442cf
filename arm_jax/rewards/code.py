"""A sandbox for model-written code (docs/method.md §5): every program runs in its own subprocess, isolated from the
trainer for every user, root or not, and a hostile one costs a zero reward, never a crashed or hung trainer.

Isolation (`sandbox_capabilities()` reports the mode in force; the code reward logs it and the run's metrics record
it). Built on util-linux (`unshare`, `setpriv`, `mount`, `pivot_root`), present on every Linux host, rather than
bubblewrap or nsjail, which TPU VMs, Slurm nodes and laptops often lack:
- mode 'userns' (any user, the default when the trainer is not root): an unprivileged user namespace with the
  trainer's uid mapped to 0 inside, plus network, pid, mount, ipc and uts namespaces;
- mode 'root' (the trainer is root): the same namespaces without the user namespace, and the program runs as uid
  nobody (65534) so the process limit applies.
Inside either: no network (not even loopback); its own pid namespace whose init is the program, so every process
it starts dies with it, and the trainer is neither visible nor signalable; a new root filesystem (pivot_root) that
holds only what Python needs, read-only (/usr and the /bin, /lib symlinks or folders, the interpreter's prefix,
/etc/ld.so.cache, /dev/null, zero, full, random, urandom), a fresh /proc, size-limited tmpfs at /tmp and /dev/shm,
and the program's fresh directory at /work (no home, datasets or trainer files); every capability dropped
(bounding set cleared, no_new_privs) before the program starts; a scrubbed environment; rlimits on CPU time,
address space, file size, open files and processes; a wall-clock kill.
Where neither mode works, running model-written code is an error naming what is missing and how to enable it;
`allow_unsandboxed=True` is the only way to run it unisolated (rlimits, scrubbed environment, temp directory and
the wall-clock kill only), logged as a warning.

Rewards no program can fake (`arm_jax.rewards.sandbox_harness`): the assert, HumanEval and stdin/stdout harnesses
pass only when the harness, after the last check, prints a per-call secret it reads from an inherited pipe (never
written to a file or the environment), and assertions compare builtin values only.
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

from arm_jax.rewards.sandbox_harness import harden_tests

log = logging.getLogger(__name__)

NOBODY = 65534
MODES = ("userns", "root")  # isolated modes, in the order they are tried ('root' first when the trainer is root)
_SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_DEVICES = ("null", "zero", "full", "random", "urandom")
_HARNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_harness.py")


class SandboxUnavailable(RuntimeError):
    """Model-written code would run without isolation; the message names what is missing and how to enable it."""


@dataclasses.dataclass(frozen=True)
class CodeResult:
    """passed: exit status 0 (run_code), or the harness's secret seen after the last check (run_humaneval,
    run_asserts, run_io_tests, which also compare the output); status: 'ok', 'failed', 'timeout', 'memory'
    (address-space limit), 'output_limit' (file/output size limit) or 'error' (the sandbox itself failed)."""

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


def _python() -> tuple[str, str]:
    """(the base interpreter's prefix, its executable): what the sandbox binds read-only and runs."""
    prefix = os.path.realpath(sys.base_prefix)
    return prefix, os.path.join(prefix, "bin", os.path.basename(os.path.realpath(sys.executable)))


def _isolated_command(base: str, argv: list[str], limits: SandboxLimits, mode: str) -> list[str]:
    """unshare (user in mode 'userns'; net, pid, mount, ipc, uts) -> sh building the new root under base/root ->
    pivot_root into it -> setpriv (nobody in mode 'root'; no capabilities, no_new_privs) -> the program. The
    limits are set by prlimit before unshare (rlimits survive exec and the uid change)."""
    q = shlex.quote
    prefix, _ = _python()
    size = f"size={limits.max_file_mb}m"
    ro = [d for d in _SYSTEM if os.path.isdir(d) and not os.path.islink(d)]
    links = [d for d in _SYSTEM if os.path.islink(d)]
    if not any(prefix == d or prefix.startswith(d + "/") for d in ro):
        ro.append(prefix)
    devices = " ".join(f"$R/dev/{d}" for d in _DEVICES)
    cache = os.path.isfile("/etc/ld.so.cache")
    cmds = ["set -e", f"R={q(os.path.join(base, 'root'))}", "mount -t tmpfs -o size=8m,mode=755 tmpfs $R",
            "mkdir -p $R/tmp $R/dev/shm $R/proc $R/etc $R/work",
            f"mount -t tmpfs -o {size},mode=1777 tmpfs $R/tmp", f"mount -t tmpfs -o {size},mode=1777 tmpfs $R/dev/shm",
            "mkdir -p " + " ".join(f"$R{q(d)}" for d in ro),  # after /tmp's tmpfs: the prefix may live under /tmp
            f"touch {devices}" + (" $R/etc/ld.so.cache" if cache else "")]
    for d in ro:  # read-only views of what Python needs
        cmds += [f"mount --rbind {q(d)} $R{q(d)}", f"mount -o remount,bind,ro $R{q(d)}"]
    cmds += [f"ln -s {q(os.readlink(d))} $R{d}" for d in links]
    cmds += ["mount --bind /etc/ld.so.cache $R/etc/ld.so.cache"] if cache else []
    cmds += [f"mount --bind /dev/{d} $R/dev/{d}" for d in _DEVICES]
    cmds += ["mount -t proc proc $R/proc", f"mount --bind {q(os.path.join(base, 'work'))} $R/work",
             "cd $R", "mkdir .old", "pivot_root . .old", "umount -l /.old", "rmdir /.old", "cd /work"]
    who = f"--reuid={NOBODY} --regid={NOBODY} --clear-groups " if mode == "root" else ""
    cmds.append(f"exec setpriv {who}--no-new-privs --bounding-set=-all --inh-caps=-all -- "
                + " ".join(q(a) for a in argv))
    user = ["--user", "--map-root-user"] if mode == "userns" else []
    return ["unshare", *user, "--net", "--pid", "--fork", "--kill-child", "--mount", "--ipc", "--uts",
            "--propagation", "private", "--", "sh", "-c", "\n".join(cmds)]


_NEEDED = ("unshare", "setpriv", "mount", "umount", "pivot_root", "sh")
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # pivot_root is in sbin, often off a user's PATH
_HOW = ("enable unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1 on Debian/Ubuntu kernels, "
        "user.max_user_namespaces > 0, and on Ubuntu 24.04+ kernel.apparmor_restrict_unprivileged_userns=0), "
        "install util-linux, or run the trainer as root")


@functools.lru_cache(maxsize=None)
def sandbox_capabilities() -> dict:
    """Probes once which isolation works here: {'mode': 'userns' | 'root' | None, 'isolated': bool, 'missing':
    what failed (empty when isolated), 'how_to_enable': the remedy}. Logs the mode, or a warning naming the gap."""
    missing = [t for t in _NEEDED if not shutil.which(t, path=_PATH)]
    tried = []
    if not missing:
        for mode in (("root",) if os.geteuid() == 0 else ()) + ("userns",):
            res = _run({"main.py": "print(sum(range(10)))"}, SandboxLimits(timeout_s=20), mode)
            if res.status == "ok" and res.stdout.strip() == "45":
                log.info("code sandbox: mode %r (network, pid, mount, ipc, uts namespaces; minimal read-only "
                         "root; no capabilities)", mode)
                return {"mode": mode, "isolated": True, "missing": "", "how_to_enable": ""}
            tried.append(f"mode {mode!r}: {res.status} ({res.stderr.strip()[-300:]})")
    why = (f"missing tools: {', '.join(missing)}" if missing else "; ".join(tried))
    log.warning("code sandbox: no isolation available (%s); to enable it: %s", why, _HOW)
    return {"mode": None, "isolated": False, "missing": why, "how_to_enable": _HOW}


_WARNED: list = []


def _mode(allow_unsandboxed: bool) -> Optional[str]:
    """The isolated mode in force, or None when unisolated runs were explicitly allowed; else SandboxUnavailable."""
    caps = sandbox_capabilities()
    if caps["isolated"]:
        return caps["mode"]
    if not allow_unsandboxed:
        raise SandboxUnavailable(f"refusing to run model-written code without isolation: {caps['missing']}. To "
                                 f"enable isolation: {caps['how_to_enable']}. To run it unisolated anyway (it can "
                                 f"read your files and environment, use the network and signal your processes), "
                                 f"pass allow_unsandboxed=True")
    if not _WARNED:
        _WARNED.append(True)
        log.warning("code sandbox: running model-written code WITHOUT isolation (allow_unsandboxed=True): %s",
                    caps["missing"])
    return None


def _read_ends(path: str, cap: int, tail: int = 512) -> tuple[str, str]:
    """(the first `cap` bytes, the last `tail` bytes) of a file, decoded."""
    with open(path, "rb") as f:
        head = f.read(cap)
        size = os.fstat(f.fileno()).st_size
        f.seek(max(0, size - tail))
        end = f.read(tail)
    return head.decode("utf-8", errors="replace"), end.decode("utf-8", errors="replace")


def _run(files: dict[str, str], limits: SandboxLimits, mode: Optional[str], stdin: Optional[str] = None,
         secret: Optional[str] = None) -> CodeResult:
    """Runs `python main.py` over `files` in a fresh directory, isolated per `mode` ('userns', 'root' or None).
    With `secret`, it is readable once on an inherited pipe whose descriptor is the program's first argument, and
    the run passes only when the last line of stdout is that secret (the line is removed from the returned
    stdout)."""
    base = tempfile.mkdtemp(prefix="arm_jax_sbx_")
    rfd = wfd = None
    try:
        work = os.path.join(base, "work")
        os.makedirs(os.path.join(base, "root"))
        os.mkdir(work)
        for name, text in files.items():
            with open(os.path.join(work, name), "w") as f:
                f.write(text)
        out_path, err_path = os.path.join(base, "stdout"), os.path.join(base, "stderr")
        _, python = _python()
        argv = [python if mode else os.path.realpath(sys.executable), "-I", "-B", "main.py"]
        if mode == "root":
            os.chmod(base, 0o711)
            for path in [work] + [os.path.join(work, n) for n in files]:
                os.chown(path, NOBODY, NOBODY)
        pass_fds = ()
        if secret is not None:
            rfd, wfd = os.pipe()
            os.write(wfd, secret.encode())
            os.close(wfd)
            wfd = None
            pass_fds = (rfd,)
            argv.append(str(rfd))  # the harness reads the secret from this descriptor after the last check
        cmd = _isolated_command(base, argv, limits, mode) if mode else argv
        env = {"PATH": _PATH, "LANG": "C.UTF-8", "HOME": "/work" if mode else work,
               "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        preexec = None
        if shutil.which("prlimit", path=_PATH):
            cmd = _with_prlimit(cmd, limits)
        else:
            preexec = functools.partial(_set_limits, limits)
        start = time.monotonic()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.PIPE if stdin is not None else
                                    subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True,
                                    preexec_fn=preexec, close_fds=True, pass_fds=pass_fds)
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
        stdout, tail = _read_ends(out_path, limits.max_output_bytes)
        stderr, _ = _read_ends(err_path, limits.max_output_bytes)
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
        passed = status == "ok"
        if secret is not None:
            lines = tail.rstrip("\n").split("\n")
            passed = passed and lines[-1] == secret
            status = status if passed or status != "ok" else "failed"
            cut = stdout.rfind("\n" + secret)
            stdout = stdout[:cut] if cut >= 0 else stdout
        return CodeResult(passed, status, stdout, stderr, rc, duration)
    except OSError as e:
        return CodeResult(False, "error", "", f"sandbox error: {e}", None, 0.0)
    finally:
        for fd in (rfd, wfd):
            if fd is not None:
                os.close(fd)
        shutil.rmtree(base, ignore_errors=True)


def run_code(program: str, *, timeout_s: float = 5.0, memory_mb: int = 512, stdin: Optional[str] = None,
             limits: Optional[SandboxLimits] = None, allow_unsandboxed: bool = False) -> CodeResult:
    """Public API (docs/method.md §9): runs `program` (Python source) in the sandbox; passed = exit status 0. Raises
    SandboxUnavailable when no isolation works here, unless allow_unsandboxed=True."""
    limits = limits or SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb)
    return _run({"main.py": program}, limits, _mode(allow_unsandboxed), stdin=stdin)


# ------------------------------------------------------------------------------------------ test formats


def _harnessed(kind: str, solution: str, tests: Optional[str] = None, setup: Optional[str] = None,
               stdin: Optional[str] = None, limits: Optional[SandboxLimits] = None,
               allow_unsandboxed: bool = False) -> CodeResult:
    """Runs the harness (`sandbox_harness._arm_main(kind)`) over setup, solution and hardened tests with a fresh
    secret: passed only if every check ran and the harness printed the secret after them."""
    with open(_HARNESS) as f:
        main = f.read() + f"\n_arm_main({kind!r})\n"
    files = {"main.py": main, "solution.py": solution}
    if tests is not None:
        files["tests.py"] = harden_tests(tests)
    if setup:
        files["setup.py"] = setup
    return _run(files, limits or SandboxLimits(), _mode(allow_unsandboxed), stdin=stdin,
                secret=f"ARM_JAX_CHECKS_DONE_{secrets.token_hex(16)}")


def run_humaneval(prompt: str, completion: str, test: str, entry_point: str, *,
                  limits: Optional[SandboxLimits] = None, allow_unsandboxed: bool = False) -> CodeResult:
    """One HumanEval-style sample: prompt + completion, then the test module (asserts hardened) and
    check(entry_point); passed only if check() returned and the harness reached its end."""
    return _harnessed("tests", prompt + completion, f"{test}\n\ncheck({entry_point})\n", limits=limits,
                      allow_unsandboxed=allow_unsandboxed)


def run_asserts(code: str, asserts: Sequence[str], setup: str = "", *, limits: Optional[SandboxLimits] = None,
                allow_unsandboxed: bool = False) -> CodeResult:
    """MBPP-style assert tests (`test_setup_code`, the solution, then each assert, hardened): passed only if every
    assert held and the harness reached its end (an early exit of status 0 is not a pass)."""
    return _harnessed("tests", code, "\n".join(asserts) + "\n", setup=setup or None, limits=limits,
                      allow_unsandboxed=allow_unsandboxed)


def _same_output(got: str, expected: str) -> bool:
    norm = lambda s: [line.rstrip() for line in s.strip().splitlines()]  # noqa: E731
    return norm(got) == norm(expected)


def run_io_tests(program: str, cases: Sequence[tuple[str, str]], *, limits: Optional[SandboxLimits] = None,
                 fraction: bool = False, allow_unsandboxed: bool = False) -> tuple[float, list[CodeResult]]:
    """stdin/stdout tests (APPS / CodeContests / LiveCodeBench style): reward 1 if every case's output matches
    (trailing whitespace ignored) and the program ended normally (`sys.exit(0)` counts; a crash or `os._exit`
    after printing does not), or the fraction passed with `fraction=True`. Stops at the first failure unless
    `fraction`."""
    results = []
    for stdin, expected in cases:
        res = _harnessed("io", program, stdin=stdin, limits=limits, allow_unsandboxed=allow_unsandboxed)
        ok = res.passed and _same_output(res.stdout, expected)
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
