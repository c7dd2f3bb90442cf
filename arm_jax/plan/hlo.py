"""Collective traffic read from a compiled (optimized, SPMD-partitioned) HLO module's text.

Each all-gather / reduce-scatter / all-reduce / all-to-all / collective-permute instruction is counted with the
number of times its computation runs: 1 for the entry, times the trip count of every enclosing while loop (read
from the loop's condition: the largest integer constant it compares against, which for `lax.scan` / `fori_loop` is
the length and for the rollout's decode loop the token budget N, an upper bound). Bytes are per device, the data one
chip sends over its links with ring algorithms on a group of n: all-gather out * (n-1)/n, reduce-scatter
out * (n-1), all-reduce 2 * size * (n-1)/n, all-to-all size * (n-1)/n, collective-permute size. A ragged
all-to-all (the MoE exchange) moves a data-dependent part of its buffers: counted as the smaller of its operand and
its output (the rows a device sends or receives; the output of the dispatch is the worst-case receive buffer) times
(n-1)/n, the traffic under uniform routing.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "ragged-all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1,
                "s4": 0.5, "u4": 0.5}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLEE = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


@dataclasses.dataclass
class Collectives:
    """Per-device bytes sent per kind (times the loops they sit in), instruction counts, and the loops seen."""

    bytes: dict
    count: dict
    loops: list  # (body computation, trip count)

    @property
    def total_bytes(self) -> float:
        return float(sum(self.bytes.values()))


def _split_shape_op(rest: str) -> tuple[str, str]:
    """'bf16[4,8]{1,0} all-gather(%x), ...' -> ('bf16[4,8]{1,0}', 'all-gather'); tuples are balanced-paren."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                shape, tail = rest[:i + 1], rest[i + 1:].lstrip()
                break
        else:
            return rest, ""
    else:
        shape, _, tail = rest.partition(" ")
    op = tail.split("(", 1)[0].strip()
    return shape, op


def _array_bytes(shape: str) -> list[float]:
    return [_DTYPE_BYTES[d] * math.prod(int(x) for x in dims.split(",") if x) for d, dims in _ARRAY.findall(shape)]


def _group_size(line: str, num_devices: int) -> int:
    m = re.search(r"replica_groups=\{\{([^}]*)\}", line)
    if m:
        return len([x for x in m.group(1).split(",") if x.strip()])
    m = re.search(r"replica_groups=\[([\d,]+)\]<=", line)
    if m:
        return int(m.group(1).split(",")[-1])
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
    if m:
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", m.group(2)))
    return num_devices


def parse_module(text: str):
    """-> (computations {name: [instruction lines]}, entry name)."""
    comps, entry, current = {}, None, None
    for line in text.splitlines():
        m = _HEADER.match(line)
        if m and not line.startswith(" "):
            current = m.group(1)
            comps[current] = []
            if line.startswith("ENTRY"):
                entry = current
            continue
        if line.strip() == "}":  # a computation's end (a Pallas call's backend config spans lines like "}}, ...")
            current = None
        elif current is not None and line.strip():
            comps[current].append(line)
    return comps, entry


def _trip_count(comps: dict, cond: str) -> int:
    """The largest integer constant in the loop condition (and what it calls), 1 if none."""
    seen, stack, best = set(), [cond], 1
    while stack:
        name = stack.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        for line in comps[name]:
            for value in re.findall(r"[su](?:32|64)\[\]\S*\s+constant\((\d+)\)", line):
                best = max(best, int(value))
            stack.extend(c for _, c in _CALLEE.findall(line))
    return best


def collectives(text: str, num_devices: int) -> Collectives:
    """Collective bytes per device of one run of the module (module docstring for the conventions)."""
    comps, entry = parse_module(text)
    edges = defaultdict(list)  # caller -> [(callee, factor)]
    loops = []
    for name, lines in comps.items():
        for line in lines:
            callees = _CALLEE.findall(line)
            kinds = dict((k, c) for k, c in callees)
            trip = _trip_count(comps, kinds["condition"]) if "body" in kinds and "condition" in kinds else 1
            if "body" in kinds:
                loops.append((kinds["body"], trip))
            for kind, callee in callees:
                edges[name].append((callee, trip if kind == "body" else 1))
            for group in _BRANCHES.findall(line):
                edges[name].extend((c.strip().lstrip("%"), 1) for c in group.split(",") if c.strip())
    runs = defaultdict(float)
    runs[entry] = 1.0
    order, seen = [], set()

    def visit(n):  # post-order DFS -> reverse topological order
        if n in seen:
            return
        seen.add(n)
        for c, _ in edges.get(n, ()):
            visit(c)
        order.append(n)

    visit(entry)
    for name in reversed(order):
        for callee, factor in edges.get(name, ()):
            runs[callee] += runs[name] * factor
    # TPU's async collective fusions split one collective into a start and a continuation that share its
    # channel_id: such instructions are one transfer (the largest of them is kept)
    found = {}
    for name, lines in comps.items():
        if runs.get(name, 0) == 0:
            continue
        shapes = {}  # instruction -> its result shape (the operands of a ragged all-to-all are named only)
        for line in lines:
            m = _INSTR.match(line)
            if m:
                shapes[m.group(1)] = _split_shape_op(m.group(2))[0]
        for line in lines:
            m = _INSTR.match(line)
            if not m:
                continue
            shape, op = _split_shape_op(m.group(2))
            base = op[:-len("-start")] if op.endswith("-start") else op
            if base not in KINDS:
                continue
            sizes = _array_bytes(shape)
            size = max(sizes) if op.endswith("-start") else sum(sizes)
            if base == "ragged-all-to-all":
                operand = re.search(r"ragged-all-to-all(?:-start)?\(\s*(?:[a-z0-9]+\[[^\]]*\]\S*\s+)?%?([\w.\-]+)",
                                    m.group(2))
                if operand and operand.group(1) in shapes:
                    size = min(size, sum(_array_bytes(shapes[operand.group(1)])))
            n = _group_size(line, num_devices)
            per_device = {"all-gather": size * (n - 1) / n, "reduce-scatter": size * (n - 1),
                          "all-reduce": 2 * size * (n - 1) / n, "all-to-all": size * (n - 1) / n,
                          "ragged-all-to-all": size * (n - 1) / n, "collective-permute": size}[base]
            channel = re.search(r"channel_id=(\d+)", line)
            # (XLA gives every ragged all-to-all of a program the same channel id: each is its own transfer)
            key = (base, channel.group(1)) if channel and base != "ragged-all-to-all" else (base, name, m.group(1))
            total = per_device * runs[name]
            if key not in found or total > found[key][0]:
                found[key] = (total, int(runs[name]))
    out_bytes, count = defaultdict(float), defaultdict(int)
    for (base, *_), (total, times) in found.items():
        out_bytes[base] += total
        count[base] += times
    return Collectives(dict(out_bytes), dict(count), loops)
