"""A pool of worker processes with a per-item timeout and worker recycling.

Each worker is a long-lived `spawn`ed process (no inherited JAX threads) serving one item at a time over a pipe.
An item that exceeds its time bound gets status 'timeout' and its worker is killed and replaced; a worker that
dies gets 'error' and is replaced. The caller never waits longer than about `timeout_s` per wave of items, and a
pathological input can cost only that item's reward (as MaxText's math_verify_pool).
"""

from __future__ import annotations

import multiprocessing as mp
import time
from multiprocessing.connection import wait
from typing import Any, Callable, Optional, Sequence


def _serve(conn, fn):
    while True:
        try:
            msg = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if msg is None:
            return
        index, payload = msg
        try:
            conn.send((index, "ok", fn(payload)))
        except Exception as e:  # noqa: BLE001 - any grader failure is that item's 'error'
            conn.send((index, "error", f"{type(e).__name__}: {e}"[:500]))


class _Worker:
    def __init__(self, ctx, fn):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, fn), daemon=True)
        self.proc.start()
        child.close()
        self.item: Optional[int] = None
        self.deadline = 0.0

    def kill(self):
        try:
            self.proc.kill()
            self.proc.join(timeout=5)
        finally:
            self.conn.close()


class WorkerPool:
    """map(items) -> [(status, result)] with status in {'ok', 'timeout', 'error'}; `fn` must be picklable."""

    def __init__(self, fn: Callable[[Any], Any], num_workers: int = 2, timeout_s: float = 5.0):
        self._ctx = mp.get_context("spawn")
        self._fn = fn
        self.timeout_s = timeout_s
        self._workers = [_Worker(self._ctx, fn) for _ in range(max(1, num_workers))]
        self.restarts = 0

    def map(self, items: Sequence[Any]) -> list[tuple[str, Any]]:
        results: list[Optional[tuple[str, Any]]] = [None] * len(items)
        pending = list(range(len(items)))[::-1]
        busy = 0
        while pending or busy:
            for w in self._workers:
                if w.item is None and pending:
                    i = pending.pop()
                    try:
                        w.conn.send((i, items[i]))
                    except (BrokenPipeError, OSError):
                        results[i] = ("error", "worker unavailable")
                        self._replace(w)
                        continue
                    w.item, w.deadline = i, time.monotonic() + self.timeout_s
                    busy += 1
            active = [w for w in self._workers if w.item is not None]
            if not active:
                continue
            timeout = max(0.0, min(w.deadline for w in active) - time.monotonic())
            ready = wait([w.conn for w in active], timeout=timeout)
            now = time.monotonic()
            for w in active:
                if w.conn in ready:
                    try:
                        index, status, value = w.conn.recv()
                        results[index] = (status, value)
                        w.item = None
                    except (EOFError, OSError):
                        results[w.item] = ("error", "worker died")
                        self._replace(w)
                    busy -= 1
                elif now >= w.deadline:
                    results[w.item] = ("timeout", None)
                    self._replace(w)
                    busy -= 1
        return results  # type: ignore[return-value]

    def _replace(self, w: _Worker):
        w.kill()
        self.restarts += 1
        fresh = _Worker(self._ctx, self._fn)
        w.conn, w.proc, w.item = fresh.conn, fresh.proc, None

    def close(self):
        for w in self._workers:
            try:
                w.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            w.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
