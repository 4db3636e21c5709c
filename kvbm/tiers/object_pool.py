"""The worker threads of a synchronous object store (file://, memory://, any fsspec filesystem
without an IO loop).

    ObjectPool(n, name).submit(fn, *args) -> Future   at most n threads, started as calls wait
    .overdue(future, now, timeout) -> bool             the call ran `timeout` seconds, or waits in the
                                                       queue while no call finished for `timeout`
    .shutdown(timeout)                                 queued calls cancelled; running ones waited
                                                       for at most `timeout`, then left behind

ThreadPoolExecutor, used before, joins its threads at close and again at interpreter exit: one
call hung on a dead endpoint (a read that never returns) then held the daemon's shutdown, and its
process's exit, for good. Here the threads are daemon threads and nobody waits on a hung one
longer than asked. A hung call still holds its thread: at most n calls hang at once, the ones
queued behind them are cancelled by their callers' timeouts (ObjectStorage._collect), so hangs
cost no more threads than n, whatever their number.

`overdue` is how a caller bounds a call (ObjectStorage._collect): by its own running time once a
worker took it, and while it waits in the queue by the pool's progress (a queue behind healthy
workers drains; one behind n hung workers never does). A batch larger than the workers can move
in `timeout` is therefore not given up on a slow but working disk, and one hung call is given
up after `timeout` whatever the others do.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable


class ObjectPool:
    def __init__(self, n: int, name: str) -> None:
        self.n, self.name = n, name
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False
        self._idle = 0  # workers waiting for a call
        self._pending = 0  # calls queued, not taken yet
        self.last_done = time.monotonic()  # when a call last finished (the pool's progress)

    def submit(self, fn: Callable, *args: Any) -> Future:
        fut: Future = Future()
        fut.queued_at, fut.started_at = time.monotonic(), None  # type: ignore[attr-defined]
        with self._lock:
            if self._closed:
                raise RuntimeError("object store worker pool is closed")
            self._q.put((fut, fn, args))
            self._pending += 1
            if self._pending > self._idle and len(self._threads) < self.n:  # as ThreadPoolExecutor: on demand
                t = threading.Thread(target=self._work, name=f"{self.name}_{len(self._threads)}", daemon=True)
                self._threads.append(t)
                t.start()
        return fut

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            item = self._q.get()
            with self._lock:
                self._idle -= 1
                if item is not None:
                    self._pending -= 1
            if item is None:
                return
            fut, fn, args = item
            if not fut.set_running_or_notify_cancel():
                continue
            fut.started_at = time.monotonic()
            try:
                result = fn(*args)
            except BaseException as exc:  # noqa: BLE001 (handed to the caller)
                fut.set_exception(exc)
            else:
                fut.set_result(result)
            self.last_done = time.monotonic()

    def overdue(self, fut: Future, now: float, timeout: float) -> bool:
        """A call not done that its caller should give up: running for `timeout` seconds, or
        queued for `timeout` while no call of this pool finished for as long."""
        if fut.done():
            return False
        started = getattr(fut, "started_at", None)
        if started is not None:
            return now - started >= timeout
        return now - max(self.last_done, getattr(fut, "queued_at", now)) >= timeout

    def shutdown(self, timeout: float | None = None) -> None:
        with self._lock:
            self._closed = True
            threads = self._threads
        while True:  # calls not started yet never start
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        for _ in threads:
            self._q.put(None)
        end = None if timeout is None else time.monotonic() + timeout
        for t in threads:
            t.join(None if end is None else max(0.0, end - time.monotonic()))

    @property
    def alive(self) -> int:
        return sum(t.is_alive() for t in self._threads)
