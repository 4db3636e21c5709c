"""The worker threads of a synchronous object store (file://, memory://, any fsspec filesystem
without an IO loop).

    ObjectPool(n, name).submit(fn, *args) -> Future   at most n threads, started as calls wait
    .shutdown(timeout)                                 queued calls cancelled; running ones waited
                                                       for at most `timeout`, then left behind

ThreadPoolExecutor, used before, joins its threads at close and again at interpreter exit: one
call hung on a dead endpoint (a read that never returns) then held the daemon's shutdown, and its
process's exit, for good. Here the threads are daemon threads and nobody waits on a hung one
longer than asked. A hung call still holds its thread: at most n calls hang at once, the ones
queued behind them are cancelled by their callers' timeouts (ObjectStorage._collect), so hangs
cost no more threads than n, whatever their number.
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

    def submit(self, fn: Callable, *args: Any) -> Future:
        fut: Future = Future()
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
            try:
                result = fn(*args)
            except BaseException as exc:  # noqa: BLE001 (handed to the caller)
                fut.set_exception(exc)
            else:
                fut.set_result(result)

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
