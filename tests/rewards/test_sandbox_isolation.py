"""The code sandbox for every user: the hostile corpus and the reward exploits of `sandbox_corpus.py`, run by a
trainer that is this process's user (root in CI: namespaces + a uid of each sandbox's own) and, when this process is
root, by an unprivileged trainer (uid 65534 through `setpriv`: an unprivileged user namespace); either trainer holds
200 threads and grades the forgeries of `forgeries.py` 16 sandboxes at once. The unprivileged trainer uses a
world-readable copy of the base interpreter and of the sandbox modules (CI's venv and checkout live in
folders uid 65534 cannot enter; nothing is loosened)."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import pytest

from tests.rewards import forgeries

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
NOBODY = 65534


@pytest.fixture(scope="module")
def world():
    """A world-readable folder: the sandbox modules as a minimal package, the corpus script, and (as root) a copy
    of the base interpreter that uid 65534 can execute."""
    d = tempfile.mkdtemp(prefix="arm_jax_sbx_test_")
    os.chmod(d, 0o755)
    pkg = os.path.join(d, "pkg", "arm_jax", "rewards")
    os.makedirs(pkg)
    for init in (os.path.join(d, "pkg", "arm_jax", "__init__.py"), os.path.join(pkg, "__init__.py")):
        open(init, "w").close()
    for name in ("code.py", "code_checks.py", "sandbox.py", "sandbox_harness.py"):
        shutil.copy(os.path.join(ROOT, "arm_jax", "rewards", name), pkg)
    for name in ("sandbox_corpus.py", "forgeries.py"):
        shutil.copy(os.path.join(HERE, name), d)
    python = sys.executable
    if os.geteuid() == 0:
        base = os.path.realpath(sys.base_prefix)
        ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
        copy = os.path.join(d, "python")
        os.makedirs(os.path.join(copy, "bin"))
        shutil.copy(os.path.join(base, "bin", os.path.basename(os.path.realpath(sys.executable))),
                    os.path.join(copy, "bin", ver))
        lib = sysconfig.get_config_var("LDLIBRARY") or ""
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        if lib.endswith(".so") or ".so." in lib:
            os.makedirs(os.path.join(copy, "lib"), exist_ok=True)
            shutil.copy(os.path.join(libdir, lib), os.path.join(copy, "lib"))
        shutil.copytree(os.path.join(base, "lib", ver), os.path.join(copy, "lib", ver), symlinks=True,
                        ignore=shutil.ignore_patterns("site-packages", "test", "__pycache__", "idlelib", "tkinter"))
        python = os.path.join(copy, "bin", ver)
    out = os.path.join(d, "out")
    os.makedirs(out)
    subprocess.run(["chmod", "-R", "a+rX", d], check=True)
    os.chown(out, NOBODY, NOBODY) if os.geteuid() == 0 else None
    yield {"dir": d, "python": python, "out": out}
    shutil.rmtree(d, ignore_errors=True)


def _corpus(world, as_nobody: bool) -> dict:
    out = os.path.join(world["out"], f"corpus_{'nobody' if as_nobody else os.geteuid()}.json")
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "SECRET_TOKEN": "hunter2", "LANG": "C.UTF-8",
           "PYTHONPATH": os.path.join(world["dir"], "pkg")}
    cmd = [world["python"] if as_nobody else sys.executable, os.path.join(world["dir"], "sandbox_corpus.py"), out]
    if as_nobody:
        cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"] + cmd
    proc = subprocess.run(cmd, env=env, cwd=world["dir"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.load(open(out))


def _check(result: dict):
    rows = result["rows"]
    table = "\n".join(f"{r['kind']:22s} {r['program']:40s} reward {r['reward']} {r['status']:12s} "
                      f"left: {','.join(r['left_behind']) or '-'}" for r in rows)
    print(f"\nuid {result['uid']}, sandbox mode {result['capabilities']['mode']}:\n{table}")
    assert result["capabilities"]["isolated"], result["capabilities"]
    hostile = [r for r in rows if r["kind"] == "hostile"]
    assert len(hostile) == 11 and all(r["reward"] == 0.0 and not r["left_behind"] for r in hostile), table
    control = [r for r in rows if r["kind"].startswith("control")]
    assert len(control) == 6 and all(r["reward"] == 1.0 for r in control), table  # the attacks work unisolated
    exploits = [r for r in rows if r["kind"] == "exploit"]
    assert len(exploits) == 15 and all(r["reward"] == r["expected"] and not r["left_behind"] for r in exploits), table
    forged = [r for r in rows if r["kind"] in ("forgery", "right solution")]
    assert len(forged) == len(forgeries.cases()), table
    assert all(r["reward"] == r["expected"] and not r["left_behind"] for r in forged), table
    beside = [r for r in rows if r["kind"] == "beside fork bombs"]
    assert len(beside) == 16 and all(r["reward"] == r["expected"] for r in beside), table
    assert result["threads"] >= 201, result["threads"]  # the trainer held its 200 threads while it graded
    nested = [r for r in rows if r["kind"] == "nested user namespace"]
    if result["capabilities"]["mode"] == "userns":  # mode 'root' runs without a user namespace to limit it in
        assert len(nested) == 1 and nested[0]["reward"] == 0.0, table

def test_corpus_as_this_user(world):
    result = _corpus(world, as_nobody=False)
    assert result["capabilities"]["mode"] == ("root" if os.geteuid() == 0 else "userns")
    _check(result)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to uid 65534 needs root (this user is the non-root case)")
def test_corpus_as_an_unprivileged_trainer(world):
    result = _corpus(world, as_nobody=True)
    assert result["uid"] == NOBODY and result["capabilities"]["mode"] == "userns"
    _check(result)
