"""The sandbox for model-written code (docs/method.md §5; the public API is `arm_jax.rewards.code`): every program
runs in its own subprocess, isolated from the
trainer for every user, root or not, and a hostile one costs a zero reward, never a crashed or hung trainer.

Isolation (`sandbox_capabilities()` reports the mode in force; the code reward logs it and the run's metrics record
it). Built on util-linux (`unshare`, `setpriv`, `mount`, `pivot_root`), present on every Linux host, rather than
bubblewrap or nsjail, which TPU VMs, Slurm nodes and laptops often lack:
- mode 'userns' (any user, the default when the trainer is not root): an unprivileged user namespace with the
  trainer's uid mapped to 0 inside, plus network, pid, mount, ipc and uts namespaces;
- mode 'root' (the trainer is root): the same namespaces without the user namespace, and the program runs as an
  unused uid of its own (one per sandbox) so the process limit applies to it alone.
Inside either: no network (not even loopback); its own pid namespace whose init is the program, so every process
it starts dies with it, and the trainer is neither visible nor signalable; a new root filesystem (pivot_root) that
holds only what Python needs, read-only (/usr and the /bin, /lib symlinks or folders, the interpreter's prefix,
/etc/ld.so.cache, /dev/null, zero, full, random, urandom), a fresh /proc, size-limited tmpfs at /tmp and /dev/shm,
and the program's fresh directory at /work (no home, datasets or trainer files); every capability dropped
(bounding set cleared, no_new_privs) before the program starts; a scrubbed environment; rlimits on CPU time,
address space, file size, open files and processes (counted inside the sandbox: a trainer holding hundreds of
threads and running many sandboxes at once is not refused); a wall-clock kill.
Where neither mode works, running model-written code is an error naming what is missing and how to enable it;
`allow_unsandboxed=True` is the only way to run it unisolated (rlimits, scrubbed environment, temp directory and
the wall-clock kill only), logged as a warning.

Verdicts the program cannot reach (`arm_jax.rewards.code_checks`): one sandboxed process per program and problem
runs the candidate and answers with what it computed, as plain data (`arm_jax.rewards.sandbox_harness`); the
expected values, the comparisons and the verdict are computed outside it, so no secret enters the sandbox and a
program passes only by returning the right values.
"""

from __future__ import annotations

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

MODES = ("userns", "root")  # isolated modes, in the order they are tried ('root' first when the trainer is root)
_SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_DEVICES = ("null", "zero", "full", "random", "urandom")


class SandboxUnavailable(RuntimeError):
    """Model-written code would run without isolation; the message names what is missing and how to enable it."""


@dataclasses.dataclass(frozen=True)
class CodeResult:
    """passed: exit status 0 (run_code), or every test held as judged outside the sandbox (run_humaneval,
    run_asserts, run_io_tests); status: 'ok', 'failed', 'timeout', 'memory' (address-space limit), 'output_limit'
    (file/output/answer size limit) or 'error' (the sandbox itself failed, or a test the grader cannot run);
    passed_tests / num_tests: the tests that held and the tests the problem has (tests after a stop count as not
    passed)."""

    passed: bool
    status: str
    stdout: str = ""
    stderr: str = ""
    returncode: Optional[int] = None
    duration_s: float = 0.0
    passed_tests: int = 0
    num_tests: int = 0


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """timeout_s: wall clock for the whole program (every test of a problem); test_timeout_s: wall clock for one
    test (an assert, HumanEval's check(), one stdin/stdout case; default timeout_s); cpu_s: CPU seconds (default
    timeout + 1); memory_mb: address space of each process (a sandbox holds at most max_processes x memory_mb:
    rlimits are per process, and no cgroup is assumed); max_processes: processes and threads the sandbox may hold
    at once, counted inside the sandbox (never against the trainer's uid); max_file_mb: any file written, stdout
    included; max_open_files; max_output_bytes: how much of stdout/stderr is read back; max_answer_bytes: the
    largest answer the sandbox may send (a returned value, one case's stdout) before it is cut off as
    'output_limit'."""

    timeout_s: float = 5.0
    cpu_s: Optional[float] = None
    memory_mb: int = 512
    max_processes: int = 8
    max_file_mb: int = 16
    max_open_files: int = 64
    max_output_bytes: int = 64 * 1024
    test_timeout_s: Optional[float] = None
    max_answer_bytes: int = 4 * 1024 * 1024

    @property
    def per_test_s(self) -> float:
        return self.timeout_s if self.test_timeout_s is None else min(self.test_timeout_s, self.timeout_s)


def _rlimits(limits: SandboxLimits, nproc: bool = True) -> dict[str, tuple[int, int]]:
    """The rlimits prlimit sets before the namespaces are made; `nproc=False` leaves RLIMIT_NPROC to be set inside
    the new user namespace (mode 'userns'), where it counts the sandbox's own processes only."""
    cpu = int(limits.cpu_s if limits.cpu_s is not None else limits.timeout_s + 1)
    mem = limits.memory_mb * 1024 * 1024
    fsize = limits.max_file_mb * 1024 * 1024
    out = {"cpu": (cpu, cpu + 1), "as": (mem, mem), "fsize": (fsize, fsize),
           "nofile": (limits.max_open_files, limits.max_open_files), "core": (0, 0)}
    if nproc:
        out["nproc"] = (limits.max_processes, limits.max_processes)
    return out


def _set_limits(limits: SandboxLimits, nproc: bool):
    """preexec fallback when util-linux `prlimit` is missing (runs Python between fork and exec)."""
    names = {"cpu": resource.RLIMIT_CPU, "as": resource.RLIMIT_AS, "fsize": resource.RLIMIT_FSIZE,
             "nofile": resource.RLIMIT_NOFILE, "core": resource.RLIMIT_CORE, "nproc": resource.RLIMIT_NPROC}
    for key, value in _rlimits(limits, nproc).items():
        resource.setrlimit(names[key], value)


def _with_prlimit(cmd: list[str], limits: SandboxLimits, nproc: bool) -> list[str]:
    """Sets the limits with util-linux `prlimit` (no Python code runs in the forked child: safe beside JAX's
    threads)."""
    return ["prlimit"] + [f"--{k}={soft}:{hard}" for k, (soft, hard) in _rlimits(limits, nproc).items()] + ["--"] + cmd


def _python() -> tuple[str, str]:
    """(the base interpreter's prefix, its executable): what the sandbox binds read-only and runs."""
    prefix = os.path.realpath(sys.base_prefix)
    return prefix, os.path.join(prefix, "bin", os.path.basename(os.path.realpath(sys.executable)))


def _isolated_command(base: str, argv: list[str], limits: SandboxLimits, mode: str, uid: int) -> list[str]:
    """unshare (user in mode 'userns'; net, pid, mount, ipc, uts) -> sh building the new root under base/root ->
    pivot_root into it -> [prlimit --nproc in mode 'userns'] -> setpriv (uid `uid` in mode 'root'; no
    capabilities, no_new_privs) -> the program. The other limits are set by prlimit before unshare (rlimits survive
    exec and the uid change). The process limit counts per user (per user namespace and uid): in mode 'userns' it is
    set inside the new user namespace, so it counts the sandbox's own processes, not the trainer's threads; in mode
    'root' the program runs as a uid of its own (`_sandbox_uid`), so concurrent sandboxes never share a count."""
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
    # /work is a size-limited tmpfs holding a copy of the program's files (the trainer's disk is never written)
    cmds += ["mount -t proc proc $R/proc", f"mount -t tmpfs -o {size},mode=0777 tmpfs $R/work",
             f"cp -a {q(os.path.join(base, 'work'))}/. $R/work/"]
    if mode == "userns":  # no nested user namespaces (they would hand the program a full capability set)
        cmds.append("echo 0 > $R/proc/sys/user/max_user_namespaces")
    cmds += ["cd $R", "mkdir .old", "pivot_root . .old", "umount -l /.old", "rmdir /.old", "cd /work"]
    who = f"--reuid={uid} --regid={uid} --clear-groups " if mode == "root" else ""
    nproc = f"prlimit --nproc={limits.max_processes}:{limits.max_processes} -- " if mode == "userns" else ""
    cmds.append(f"exec {nproc}setpriv {who}--no-new-privs --bounding-set=-all --inh-caps=-all -- "
                + " ".join(q(a) for a in argv))
    user = ["--user", "--map-root-user"] if mode == "userns" else []
    return ["unshare", *user, "--net", "--pid", "--fork", "--kill-child", "--mount", "--ipc", "--uts",
            "--propagation", "private", "--", "sh", "-c", "\n".join(cmds)]


_NEEDED = ("unshare", "setpriv", "prlimit", "mount", "umount", "pivot_root", "sh")
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


def _sandbox_uid() -> int:
    """Mode 'root': the uid a sandbox's program runs as, one of 2^24 unused uids picked at random per sandbox (not
    in any passwd file; above the subordinate-uid ranges container runtimes hand out), so the process limit counts
    that sandbox alone even with many running at once."""
    return 0x60000000 + secrets.randbelow(1 << 24)


@dataclasses.dataclass
class Started:
    """A sandboxed program running: its process (its own session: killing the group kills it all), its folder and
    where its stdout / stderr go."""

    proc: subprocess.Popen
    base: str
    out_path: str
    err_path: str
    start: float
    limits: SandboxLimits

    def stop(self) -> None:
        """Kills the pid namespace's first process (the kernel then kills everything in the namespace, whatever
        session or process group it moved to) and the program's process group (unshare, prlimit)."""
        if self.proc.poll() is None:
            for pid in _children(self.proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def result(self, timed_out: bool) -> CodeResult:
        """The finished program's CodeResult (status from its exit and stderr); removes its folder."""
        try:
            duration = time.monotonic() - self.start
            stdout, _ = _read_ends(self.out_path, self.limits.max_output_bytes)
            stderr, _ = _read_ends(self.err_path, self.limits.max_output_bytes)
            rc = self.proc.returncode
            return CodeResult(rc == 0 and not timed_out, exit_status(rc, stderr, timed_out, duration, self.limits),
                              stdout, stderr, rc, duration)
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


def _children(pid: int) -> list[int]:
    """The child processes of `pid` (unshare's: the sandbox's pid namespace init), from /proc."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:  # a kernel without CONFIG_PROC_CHILDREN: scan the parents
        out = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                            out.append(int(entry))
                except (OSError, ValueError, IndexError):
                    pass
        return out


def exit_status(rc: Optional[int], stderr: str, timed_out: bool, duration: float, limits: SandboxLimits) -> str:
    """'timeout', 'output_limit', 'memory', 'ok' or 'failed' from how a program ended."""
    if timed_out or rc in (-signal.SIGXCPU, -signal.SIGKILL) and duration >= limits.timeout_s * 0.9:
        return "timeout"
    if rc == -signal.SIGXFSZ or "File too large" in stderr or "No space left on device" in stderr:
        return "output_limit"
    if "MemoryError" in stderr or rc == -signal.SIGSEGV:
        return "memory"
    return "ok" if rc == 0 else "failed"


def start_program(files: dict[str, str], limits: SandboxLimits, mode: Optional[str], args: Sequence[str] = (),
                  pass_fds: Sequence[int] = (), stdin: bool = False) -> Started:
    """Starts `python main.py *args` over `files` in a fresh directory, isolated per `mode` ('userns', 'root' or
    None), with `pass_fds` inherited (their numbers are what `args` name). stdin: a pipe (else /dev/null)."""
    base = tempfile.mkdtemp(prefix="arm_jax_sbx_")
    try:
        work = os.path.join(base, "work")
        os.makedirs(os.path.join(base, "root"))
        os.mkdir(work)
        for name, text in files.items():
            with open(os.path.join(work, name), "w") as f:
                f.write(text)
        out_path, err_path = os.path.join(base, "stdout"), os.path.join(base, "stderr")
        _, python = _python()
        argv = [python if mode else os.path.realpath(sys.executable), "-I", "-B", "main.py", *args]
        uid = _sandbox_uid()
        if mode == "root":
            os.chmod(base, 0o711)
            for path in [work] + [os.path.join(work, n) for n in files]:
                os.chown(path, uid, uid)
        cmd = _isolated_command(base, argv, limits, mode, uid) if mode else argv
        env = {"PATH": _PATH, "LANG": "C.UTF-8", "HOME": "/work" if mode else work,
               "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        nproc = mode != "userns"  # 'userns' sets it inside its user namespace
        preexec = None
        if shutil.which("prlimit", path=_PATH):
            cmd = _with_prlimit(cmd, limits, nproc)
        else:
            preexec = functools.partial(_set_limits, limits, nproc)
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                    stdout=out, stderr=err, start_new_session=True, preexec_fn=preexec,
                                    close_fds=True, pass_fds=tuple(pass_fds))
        return Started(proc, base, out_path, err_path, time.monotonic(), limits)
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise


def _run(files: dict[str, str], limits: SandboxLimits, mode: Optional[str], stdin: Optional[str] = None
         ) -> CodeResult:
    """Runs `python main.py` over `files` to its end (or the wall-clock limit), isolated per `mode`."""
    try:
        started = start_program(files, limits, mode, stdin=stdin is not None)
    except OSError as e:
        return CodeResult(False, "error", "", f"sandbox error: {e}", None, 0.0)
    timed_out = False
    try:
        started.proc.communicate(input=stdin.encode() if stdin is not None else None, timeout=limits.timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        started.stop()
    return started.result(timed_out)


def run_code(program: str, *, timeout_s: float = 5.0, memory_mb: int = 512, stdin: Optional[str] = None,
             limits: Optional[SandboxLimits] = None, allow_unsandboxed: bool = False) -> CodeResult:
    """Public API (docs/method.md §9): runs `program` (Python source) in the sandbox; passed = exit status 0. Raises
    SandboxUnavailable when no isolation works here, unless allow_unsandboxed=True."""
    limits = limits or SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb)
    return _run({"main.py": program}, limits, _mode(allow_unsandboxed), stdin=stdin)
