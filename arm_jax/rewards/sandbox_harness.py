"""What runs inside the code sandbox (stdlib only: `arm_jax.rewards.code` writes this file's text into the sandbox
as `main.py`), and the value codec both sides share.

The untrusted process only runs the candidate and answers requests with what it computed, as plain data; it never
sees an expected value and decides nothing. `arm_jax.rewards.code_checks` (trusted, outside) sends the requests,
evaluates the tests and computes the verdict. Requests and answers are JSON lines on two inherited pipes (their
descriptors are the program's arguments), one answer per request:

- {"op": "load"} (function tests): runs setup.py then solution.py as `__main__`; -> {"ok": true} or {"raised": ...}
- {"op": "lookup", "names": [...]}: -> {"kinds": {name: "callable" | "value" | "module" | "missing"}, "values":
  {name: the value, or the module's name}}
- {"op": "call", "name", "args", "kwargs"}: calls the solution's function on the decoded arguments; -> {"value": v}
  or {"raised": [exception type name, message]}
- {"op": "run", "stdin", "timeout_s"} (stdin/stdout tests): forks; the child runs solution.py as `__main__` with
  that stdin on descriptor 0 and a file on 1 (`open(0)`, `sys.stdin.buffer` and `os.write(1, ...)` all work), so
  model code never runs in this serving process and every case starts from a fresh interpreter state; -> {"stdout",
  "exit": exit code or -signal, "timeout": bool, "stderr": its tail}. The serving process is made non-dumpable
  first, so a child cannot reach its descriptors through /proc or ptrace to forge an answer.

Values cross as JSON with tags for what JSON lacks (`encode` / `decode`): exact builtin types only (None, bool,
int, float, complex, str, bytes, list, tuple, set, frozenset, dict); a subclass, a generator or any other object is
not data and cannot cross, so an object that claims equality with everything never reaches a comparison.
"""

import json

MAX_DEPTH = 100


class NotData(ValueError):
    """A value that is not made of exact builtin types (or nests deeper than MAX_DEPTH)."""


class TooDeep(NotData):
    """Nested deeper than the codec carries."""


def encode(x, depth=0):
    """A builtin value -> a JSON-able structure: lists stay lists, other containers and bytes/complex are tagged
    {"$": tag, "v": ...}; exact types only (NotData otherwise)."""
    t = type(x)
    if depth > MAX_DEPTH:
        raise TooDeep("nested deeper than %d" % MAX_DEPTH)
    if x is None or t is bool or t is int or t is float or t is str:
        return x
    if t is list:
        return [encode(v, depth + 1) for v in x]
    if t is tuple or t is set or t is frozenset:
        return {"$": t.__name__, "v": [encode(v, depth + 1) for v in x]}
    if t is dict:
        return {"$": "dict", "v": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in x.items()]}
    if t is bytes:
        return {"$": "bytes", "v": x.decode("latin-1")}
    if t is complex:
        return {"$": "complex", "v": [x.real, x.imag]}
    raise NotData("a value of type %s is not builtin data" % t.__name__)


_BUILD = {"tuple": tuple, "set": set, "frozenset": frozenset}
MAX_SAME_HASH = 64  # distinct hashable values sharing one hash an answer may hold (hash flooding the trusted side)
MAX_NODES = 200_000  # values in one answer (a 4 MiB answer of empty sets would be 30x its size in memory)
DECODE_DEPTH = MAX_DEPTH - 2  # decoded values re-encode as a call's arguments (+1 list, +1 keyword dict)


def decode(y):
    """The inverse of `encode` over parsed JSON; anything else is NotData (a malformed answer), and so is an answer
    with more than MAX_NODES values, nested deeper than DECODE_DEPTH, or whose values are crafted to share hashes:
    ints, floats, complex numbers and tuples of them hash predictably, so a set of n of them would cost the trusted
    side n^2 (checked before every set or dict is built, and over the whole answer for the tests' own set())."""
    hashable = []
    try:
        value = _decode(y, 0, hashable, [MAX_NODES])
    except (TypeError, ValueError, RecursionError) as e:  # unhashable set members / dict keys, bytes over U+00FF
        raise NotData("malformed value: %s" % e) from None
    _check_hashes(hashable)
    return value


def _decode(y, depth, hashable, budget):
    t = type(y)
    if depth > DECODE_DEPTH:
        raise TooDeep("nested deeper than %d" % DECODE_DEPTH)
    budget[0] -= 1
    if budget[0] < 0:
        raise NotData("more than %d values" % MAX_NODES)
    if t is int or t is float or t is str:
        hashable.append(y)
        return y
    if y is None or t is bool:
        return y
    if t is list:
        return [_decode(v, depth + 1, hashable, budget) for v in y]
    if t is not dict or set(y) != {"$", "v"}:
        raise NotData("malformed value")
    tag, v = y["$"], y["v"]
    start = len(hashable)
    if tag in _BUILD and type(v) is list:
        items = [_decode(e, depth + 1, hashable, budget) for e in v]
        if tag != "tuple":
            _check_hashes(items)  # before the set is built
        out = _BUILD[tag](items)
    elif tag == "dict" and type(v) is list and all(type(p) is list and len(p) == 2 for p in v):
        pairs = [(_decode(k, depth + 1, hashable, budget), _decode(val, depth + 1, hashable, budget)) for k, val in v]
        _check_hashes([k for k, _ in pairs])
        out = dict(pairs)
    elif tag == "bytes" and type(v) is str:
        out = v.encode("latin-1")
    elif tag == "complex" and type(v) is list and len(v) == 2 and all(type(e) in (int, float) for e in v):
        out = complex(v[0], v[1])
    else:
        raise NotData("malformed value tag %r" % (tag,))
    del hashable[start:]  # a container stands for its members (a tuple's hash covers theirs)
    hashable.append(out)
    return out


def _hash_or_none(x):
    try:
        return hash(x)
    except TypeError:  # a tuple holding a list: it cannot enter a set
        return None


def _check_hashes(values):
    """NotData when more than MAX_SAME_HASH distinct values share a hash: hashes counted in C (a Counter of ints,
    whose own hashes an answer cannot crowd), then only the crowded hashes' values compared, against at most
    MAX_SAME_HASH + 1 representatives each."""
    if len(values) <= MAX_SAME_HASH:
        return
    try:
        hashes = list(map(hash, values))
    except TypeError:
        hashes = [_hash_or_none(x) for x in values]
    import collections
    crowded = {h for h, c in collections.Counter(hashes).items() if c > MAX_SAME_HASH and h is not None}
    reps = {}
    for h, x in zip(hashes, values):
        if h in crowded:
            group = reps.setdefault(h, [])
            if not any(x == r for r in group):
                group.append(x)
                if len(group) > MAX_SAME_HASH:
                    raise NotData("more than %d distinct values share one hash" % MAX_SAME_HASH)


def dumps(x) -> str:
    """One message as a JSON line."""
    return json.dumps(x, separators=(",", ":")) + "\n"


# ------------------------------------------------------------------------------------ inside the sandbox only


def _raised(e):
    return {"raised": [type(e).__name__, str(e)[:300]]}


def _lookup(g, names):
    import types
    kinds, values = {}, {}
    for n in names:
        if n not in g:
            kinds[n] = "missing"
        elif type(g[n]) is types.ModuleType:  # the tests' `math.isclose` after the solution's `import math`
            kinds[n], values[n] = "module", str(g[n].__name__)
        elif callable(g[n]):
            kinds[n] = "callable"
        else:
            try:
                values[n] = encode(g[n])
                kinds[n] = "value"
            except Exception:  # noqa: BLE001 - a value that is not data is a callable-less object: missing
                kinds[n] = "missing"
    return {"kinds": kinds, "values": values}


def _call(g, msg):
    fn = g.get(msg["name"])
    if fn is None:
        return {"raised": ["NameError", "name %r is not defined" % msg["name"]]}
    try:
        value = fn(*decode(msg["args"]), **decode(msg["kwargs"]))
    except BaseException as e:  # noqa: BLE001 - the candidate's failure is its answer
        return _raised(e)
    try:
        return {"value": encode(value)}
    except NotData as e:
        return {"raised": ["NotData", str(e)]}


def _run_child(code, stdin_path, out_path, err_path, closing):
    """In the forked child: descriptors 0/1/2 onto the case's files, fresh sys.std*, the program as __main__."""
    import io
    import os
    import sys
    import traceback
    for fd in closing:
        os.close(fd)
    for fd, path, flags in ((0, stdin_path, os.O_RDONLY), (1, out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, err_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)):
        os.dup2(os.open(path, flags, 0o600), fd)
    sys.stdin = io.TextIOWrapper(io.open(0, "rb", closefd=False))
    sys.stdout = io.TextIOWrapper(io.open(1, "wb", closefd=False), write_through=False)
    sys.stderr = io.TextIOWrapper(io.open(2, "wb", buffering=0, closefd=False), write_through=True)
    status = 0
    try:
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit as e:
        status = 0 if e.code is None else (e.code if type(e.code) is int else 1)
    except BaseException:  # noqa: BLE001 - a crash is a failed case
        traceback.print_exc()
        status = 1
    try:
        sys.stdout.flush()
    except BaseException:  # noqa: BLE001 - e.g. the file-size limit
        traceback.print_exc()
        status = status or 1
    try:
        sys.stderr.flush()
    finally:
        os._exit(status)


def _run_case(code, msg, closing, max_bytes):
    """One stdin/stdout case in a forked child, killed after msg['timeout_s']."""
    import os
    import signal
    import time
    stdin_path, out_path, err_path = "/tmp/case.in", "/tmp/case.out", "/tmp/case.err"
    with open(stdin_path, "w") as f:
        f.write(msg["stdin"])
    pid = os.fork()
    if pid == 0:
        _run_child(code, stdin_path, out_path, err_path, closing)
    deadline, timed_out = time.monotonic() + msg["timeout_s"], False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            timed_out = True
            break
        time.sleep(0.002)
    code_ = os.waitstatus_to_exitcode(status)
    out = err = b""
    if os.path.exists(out_path):
        with open(out_path, "rb") as f:
            out = f.read(max_bytes)
    if os.path.exists(err_path):
        with open(err_path, "rb") as f:
            err = f.read()[-2000:]
        os.unlink(err_path)
    return {"stdout": out.decode("utf-8", "replace"), "exit": code_, "timeout": timed_out,
            "stderr": err.decode("utf-8", "replace")}


def _non_dumpable():
    """prctl(PR_SET_DUMPABLE, 0): the forked case children (same uid, no capabilities) can then neither ptrace this
    process nor open its /proc/<pid>/fd descriptors to forge an answer. True when it took effect."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(4, 0, 0, 0, 0) == 0 and libc.prctl(3, 0, 0, 0, 0) == 0  # PR_SET/GET_DUMPABLE
    except Exception:  # noqa: BLE001 - no ctypes / libc: reported per 'run' request
        return False


def _arm_serve(req_fd, resp_fd, max_bytes):
    """The serving loop: one answer per request until the request pipe closes."""
    import os
    import sys
    import types
    guarded = _non_dumpable()
    files = {}
    for name in ("setup.py", "solution.py"):
        if os.path.exists(name):
            with open(name) as f:
                files[name] = f.read()
            os.unlink(name)
    requests = os.fdopen(req_fd, "r")
    write = os.write
    module = types.ModuleType("__main__")
    g = module.__dict__
    g["__builtins__"] = __builtins__
    compiled = None
    for line in requests:
        msg = json.loads(line)
        op = msg.get("op")
        if op == "load":
            sys.modules["__main__"] = module
            try:
                for name in ("setup.py", "solution.py"):
                    if name in files:
                        exec(compile(files[name], name, "exec"), g)
                answer = {"ok": True}
            except BaseException as e:  # noqa: BLE001 - the candidate's failure is its answer
                answer = _raised(e)
        elif op == "lookup":
            answer = _lookup(g, msg["names"])
        elif op == "call":
            answer = _call(g, msg)
        elif op == "run" and not guarded:
            answer = {"raised": ["SandboxError", "could not make the serving process non-dumpable (prctl)"]}
        elif op == "run":
            try:
                compiled = compiled or compile(files["solution.py"], "solution.py", "exec")
                answer = _run_case(compiled, msg, (req_fd, resp_fd), max_bytes)
            except SyntaxError as e:
                answer = _raised(e)
        else:
            answer = {"raised": ["ProtocolError", "unknown op %r" % (op,)]}
        try:
            text = dumps(answer)
        except (TypeError, ValueError) as e:
            text = dumps(_raised(e))
        data = text.encode("utf-8", "replace")
        while data:
            data = data[write(resp_fd, data):]
