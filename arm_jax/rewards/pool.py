"""A pool of worker processes with a per-item timeout and worker recycling.

Each worker is a long-lived `spawn`ed process (no inherited JAX threads) serving one item at a time over a pipe.
An item that exceeds its time bound gets status 'timeout' and its worker is killed and replaced; a worker that
dies gets 'error' and is replaced. A worker first runs `warmup` (the grader's imports: math-verify takes seconds to
import) and says it is ready; items go only to ready workers and an item's deadline starts when it is sent to one,
so a restarted worker's start-up never turns a correct answer into a timeout. The caller never waits longer than
about `timeout_s` per wave of items (plus a restart), and a pathological input can cost only that item's reward
(as MaxText's math_verify_pool).
"""

from __future__ import annotations

import multiprocessing as mp
import time
from multiprocessing.connection import wait
from typing import Any, Callable, Optional, Sequence


def _serve(conn, fn, warmup):
    if warmup is not None:
        try:
            warmup()
        except Exception:  # noqa: BLE001 - the item calls will report the failure
            pass
    conn.send(("ready",))
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
    def __init__(self, ctx, fn, warmup, startup_s: float):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, fn, warmup), daemon=True)
        self.proc.start()
        child.close()
        self.item: Optional[int] = None
        self.ready = False
        self.deadline = time.monotonic() + startup_s  # to become ready; then per item

    def kill(self):
        """Kills the worker process and closes its pipe."""
        try:
            self.proc.kill()
            self.proc.join(timeout=5)
        finally:
            self.conn.close()


class WorkerPool:
    """map(items) -> [(status, result)] with status in {'ok', 'timeout', 'error'}; `fn` must be picklable."""

    def __init__(self, fn: Callable[[Any], Any], num_workers: int = 2, timeout_s: float = 5.0,
                 warmup: Optional[Callable[[], Any]] = None, startup_s: float = 120.0):
        """timeout_s: per item, from the moment a ready worker receives it. warmup: run once per worker before it
        takes items (picklable). startup_s: a worker not ready by then is replaced."""
        self._ctx = mp.get_context("spawn")
        self._fn, self._warmup, self.startup_s = fn, warmup, startup_s
        self.timeout_s = timeout_s
        self._workers = [self._new() for _ in range(max(1, num_workers))]
        self.restarts = 0

    def _new(self) -> _Worker:
        return _Worker(self._ctx, self._fn, self._warmup, self.startup_s)

    def map(self, items: Sequence[Any]) -> list[tuple[str, Any]]:
        """Runs `fn` on every item in the workers: [(status, result)] in item order, status 'ok', 'timeout' or
        'error'."""
        results: list[Optional[tuple[str, Any]]] = [None] * len(items)
        pending = list(range(len(items)))[::-1]
        busy = 0
        while pending or busy:
            for w in self._workers:
                if w.ready and w.item is None and pending and not w.proc.is_alive():
                    self._replace(w)  # died while idle (killed, OOM): a fresh one, before it takes an item
                if w.ready and w.item is None and pending:
                    i = pending.pop()
                    try:
                        w.conn.send((i, items[i]))
                    except (BrokenPipeError, OSError):
                        pending.append(i)  # not this item's fault: retry it on a fresh worker
                        self._replace(w)
                        continue
                    w.item, w.deadline = i, time.monotonic() + self.timeout_s
                    busy += 1
            waiting = [w for w in self._workers if w.item is not None or (not w.ready and pending)]
            if not waiting:
                continue
            timeout = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
            ready = wait([w.conn for w in waiting], timeout=timeout)
            now = time.monotonic()
            for w in waiting:
                if w.conn in ready:
                    try:
                        msg = w.conn.recv()
                    except (EOFError, OSError):
                        if w.item is not None:
                            results[w.item] = ("error", "worker died")
                            busy -= 1
                        self._replace(w)
                        continue
                    if msg == ("ready",):
                        w.ready = True
                        continue
                    index, status, value = msg
                    results[index] = (status, value)
                    w.item = None
                    busy -= 1
                elif now >= w.deadline:
                    if w.item is not None:
                        results[w.item] = ("timeout", None)
                        busy -= 1
                    self._replace(w)  # a hung item, or a worker that never became ready
        return results  # type: ignore[return-value]

    def _replace(self, w: _Worker):
        w.kill()
        self.restarts += 1
        fresh = self._new()
        w.conn, w.proc, w.item, w.ready, w.deadline = fresh.conn, fresh.proc, None, False, fresh.deadline

    def close(self):
        """Asks every worker to exit, then kills it."""
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
