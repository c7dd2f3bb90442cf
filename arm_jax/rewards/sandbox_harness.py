"""The harness that runs inside the code sandbox (stdlib only; `arm_jax.rewards.code` writes this file's text
into the sandbox as `main.py`). It runs the trusted setup, the model's solution and the trusted tests, then copies
the per-call secret from an inherited pipe (its descriptor is the first argument) to stdout: a program that exits
early (`os._exit(0)`, `sys.exit(0)`, an atexit hook, a crash after partial output) never prints it and earns 0.

Test assertions are rewritten by `harden_tests` (in the trainer) to go through `_arm_cmp` / `_arm_truth`, which
compare only values made of builtin types (exact types: None, bool, int, float, complex, str, bytes, range and
lists, tuples, sets, dicts of them): an object whose `__eq__` always returns True meets a builtin expected value and
the check fails. The helpers hold their own references to the builtins they use (a solution that replaces
`builtins.exec` or `builtins.type` does not reach them), the solution and test files are deleted before the
solution runs, and the tests run in a copy of the solution's namespace with the helpers bound last.
Known limit: code in the same process can read that descriptor itself before the harness does; the secret is never in
a file, the environment or the program text.
"""

import ast

_PLAIN_ATOMS = (type(None), bool, int, float, complex, str, bytes, range, type(Ellipsis))
_PLAIN_CONTAINERS = (list, tuple, set, frozenset, dict)


def _arm_plain(x, depth=0, _type=type, _atoms=_PLAIN_ATOMS, _containers=_PLAIN_CONTAINERS, _dict=dict):
    """True when x is built only of builtin values (exact types, no subclasses)."""
    t = _type(x)
    if t in _atoms:
        return True
    if t not in _containers or depth > 64:
        return False
    items = list(x.items()) if t is _dict else x
    for item in items:
        if t is _dict:
            if not (_arm_plain(item[0], depth + 1) and _arm_plain(item[1], depth + 1)):
                return False
        elif not _arm_plain(item, depth + 1):
            return False
    return True


def _arm_cmp(op, a, b, _plain=_arm_plain):
    """`a op b` for an assertion's comparison, failing closed when only one side is made of builtin values."""
    pa, pb = _plain(a), _plain(b)
    if pa != pb:
        return False
    if op == "Eq":
        return a == b
    if op == "NotEq":
        return a != b
    if op == "Lt":
        return a < b
    if op == "LtE":
        return a <= b
    if op == "Gt":
        return a > b
    if op == "GtE":
        return a >= b
    if op == "In":
        return a in b
    if op == "NotIn":
        return a not in b
    if op == "Is":
        return a is b
    if op == "IsNot":
        return a is not b
    raise AssertionError("unsupported comparison " + op)


def _arm_truth(x, _plain=_arm_plain, _bool=bool):
    """The truth of an asserted value, which must be made of builtin values (no custom __bool__)."""
    if not _plain(x):
        raise AssertionError("an asserted value is not a builtin value")
    return _bool(x)


def _arm_main(kind, _open=open, _exec=exec, _compile=compile, _dict=dict):
    """kind: 'tests' (setup, solution, tests) or 'io' (the solution reads stdin; sys.exit(0) ends it normally)."""
    import os
    import sys
    import traceback
    fd = int(sys.argv[1])  # the secret's pipe, read only after the last check
    files = {}
    for name in ("setup.py", "solution.py", "tests.py"):
        if os.path.exists(name):
            with _open(name) as f:
                files[name] = f.read()
            os.unlink(name)
    read, write, exit_ = os.read, os.write, os._exit
    import types
    module = types.ModuleType("__main__")  # the solution's own __main__, not this harness module
    g = module.__dict__
    g["__builtins__"] = __builtins__
    sys.modules["__main__"] = module
    try:
        if "setup.py" in files:
            _exec(_compile(files["setup.py"], "setup.py", "exec"), g)
        try:
            _exec(_compile(files["solution.py"], "solution.py", "exec"), g)
        except SystemExit as e:
            if kind != "io" or e.code not in (None, 0):
                raise
        sys.stdout.flush()
        if kind == "tests":
            t = _dict(g)
            t.update(_arm_cmp=_arm_cmp, _arm_truth=_arm_truth)
            _exec(_compile(files["tests.py"], "tests.py", "exec"), t)
            sys.stdout.flush()
    except BaseException:  # noqa: BLE001 - any failure of the solution or the tests is a failed run
        traceback.print_exc()
        exit_(1)
    write(1, b"\n" + read(fd, 256) + b"\n")
    exit_(0)


# -------------------------------------------------------------------------- trainer side (not run in the sandbox)


class _Harden(ast.NodeTransformer):
    def visit_Assert(self, node):
        node.test = _checked(node.test)
        return node


def _call(name, args):
    return ast.Call(func=ast.Name(id=name, ctx=ast.Load()), args=args, keywords=[])


def _checked(e):
    if isinstance(e, ast.Compare) and len(e.ops) == 1:
        return _call("_arm_cmp", [ast.Constant(type(e.ops[0]).__name__), e.left, e.comparators[0]])
    if isinstance(e, ast.UnaryOp) and isinstance(e.op, ast.Not):
        return ast.UnaryOp(op=ast.Not(), operand=_checked(e.operand))
    if isinstance(e, ast.BoolOp):
        return ast.BoolOp(op=e.op, values=[_checked(v) for v in e.values])
    return _call("_arm_truth", [e])


def harden_tests(source: str) -> str:
    """Test source with every `assert` comparison routed through `_arm_cmp` and every other asserted value through
    `_arm_truth` (an always-equal or always-true object fails). Source that does not parse is returned unchanged
    (it fails in the sandbox as it would have)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return source
    return ast.unparse(ast.fix_missing_locations(_Harden().visit(tree)))
