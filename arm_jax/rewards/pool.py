"""A pool of worker processes with a per-item timeout and worker recycling.

Each worker is a long-lived `spawn`ed process (no inherited JAX threads) serving one item at a time over a pipe.
An item that exceeds its time bound gets status 'timeout' and its worker is killed and replaced; a worker that
dies gets 'error' and is replaced. A worker first runs `warmup` (the grader's imports: math-verify takes seconds to
import) and says it is ready; items go only to ready workers and an item's deadline starts when it is sent to one,
so a restarted worker's start-up never turns a correct answer into a timeout. The caller never waits longer than
about `timeout_s` per wave of items (plus a restart), and a pathological input can cost only that item's reward
(as MaxText's math_verify_pool).

A worker that cannot start (its warm-up raises, it exits or hangs before it is ready) is not replaced forever:
`max_startup_failures` start-up failures in a row, with no worker becoming ready in between, raise
`WorkerStartupError` naming the last cause (a failed import, or a script that grades at import time without an
`if __name__ == "__main__":` guard, which every spawned worker re-runs).
"""

from __future__ import annotations

import multiprocessing as mp
import time
from multiprocessing.connection import wait
from typing import Any, Callable, Optional, Sequence


class WorkerStartupError(RuntimeError):
    """The pool's workers cannot start; the message names the last cause."""


def _serve(conn, fn, warmup):
    if warmup is not None:
        try:
            warmup()
        except BaseException as e:  # noqa: BLE001 - reported to the pool, which decides whether to give up
            conn.send(("failed", f"{type(e).__name__}: {e}"[:1000]))
            return
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
                 warmup: Optional[Callable[[], Any]] = None, startup_s: float = 120.0, max_startup_failures: int = 3,
                 name: str = "worker pool"):
        """timeout_s: per item, from the moment a ready worker receives it. warmup: run once per worker before it
        takes items (picklable). startup_s: a worker not ready by then is replaced. max_startup_failures: start-up
        failures in a row (no worker ready in between) that raise WorkerStartupError. name: used in errors."""
        if num_workers < 1:
            raise ValueError(f"{name}: num_workers must be >= 1, got {num_workers}")
        self._ctx = mp.get_context("spawn")
        self._fn, self._warmup, self.startup_s = fn, warmup, startup_s
        self.timeout_s, self.name, self.max_startup_failures = timeout_s, name, max_startup_failures
        self._startup_failures, self._last_failure = 0, ""
        self._workers = [self._new() for _ in range(num_workers)]
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
                        elif not w.ready:
                            self._startup_failed(f"exited during start-up (exit code {self._exitcode(w)})")
                        self._replace(w)
                        continue
                    if self._startup_message(w, msg):
                        continue
                    index, status, value = msg
                    results[index] = (status, value)
                    w.item = None
                    busy -= 1
                elif now >= w.deadline:
                    if w.item is not None:
                        results[w.item] = ("timeout", None)
                        busy -= 1
                    elif not w.ready:
                        self._startup_failed(f"not ready within startup_s={self.startup_s} s")
                    self._replace(w)  # a hung item, or a worker that never became ready
        return results  # type: ignore[return-value]

    def wait_ready(self) -> None:
        """Blocks until every worker has started (its warm-up done); raises WorkerStartupError after
        `max_startup_failures` failed starts in a row. Call it before relying on the pool (e.g. before step 1)."""
        while not all(w.ready for w in self._workers):
            waiting = [w for w in self._workers if not w.ready]
            timeout = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
            ready = wait([w.conn for w in waiting], timeout=timeout)
            for w in waiting:
                if w.conn in ready:
                    try:
                        msg = w.conn.recv()
                    except (EOFError, OSError):
                        self._startup_failed(f"exited during start-up (exit code {self._exitcode(w)})")
                        self._replace(w)
                        continue
                    self._startup_message(w, msg)
                elif time.monotonic() >= w.deadline:
                    self._startup_failed(f"not ready within startup_s={self.startup_s} s")
                    self._replace(w)

    def _startup_message(self, w: _Worker, msg) -> bool:
        """Handles 'ready' / 'failed' messages; True when `msg` was one of them."""
        if msg == ("ready",):
            w.ready = True
            self._startup_failures = 0
            return True
        if isinstance(msg, tuple) and len(msg) == 2 and msg[0] == "failed":
            self._startup_failed(f"start-up raised {msg[1]}")
            self._replace(w)
            return True
        return False

    @staticmethod
    def _exitcode(w: _Worker):
        w.proc.join(timeout=1)
        return w.proc.exitcode

    def _startup_failed(self, why: str) -> None:
        self._startup_failures += 1
        self._last_failure = why
        if self._startup_failures >= self.max_startup_failures:
            self.close()
            raise WorkerStartupError(
                f"{self.name}: {self._startup_failures} worker start-ups failed in a row; the last one {why}. "
                f"Workers are spawned processes that re-import the main module: a script that grades at import "
                f"time must guard that code with `if __name__ == \"__main__\":`.")

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
