"""G4 after a restart whose listing was cut short: the rest of its prefix, listed in the background.

    Resume(storage, skip, cutoff).start()   one daemon thread that lists the prefix again, from the
                                            start, while the daemon serves
      .stop()                               close(): it ends at its next entry (a hung page or ls is
                                            abandoned, never waited for)
    entries(storage, stop, deadline)        the prefix's entries, yielded in the calling thread
    threaded(listing, deadline, stop)       a listing call (scandir, ls) made in a helper thread, page
                                            by page, waited for at most until the deadline (recover()
                                            lists with it too)
    storage.found_waiting / take_found(n)   (object.py) objects of ours it found, adopted by the
                                            manager (BlockManager.adopt_found)

recover() lists for at most LIST_BUDGET_S and keeps at most the free handles (the newest). Before,
what it did not list (the budget ran out; a listing that hangs or never ends; a prefix a bucket
writer stuffed so that ours came after the budget) stayed in the bucket for good: never served,
and never counted against capacity, so each such restart, and the stores after it, left the
prefix larger than its bound. Now, when recover() was cut short or saw more of ours than it
could keep, this thread lists the prefix again (entry by entry as recover() does), and each object
of ours that no handle names and no delete is removing
- is deleted when it is older than the oldest object recover() kept, where recover() saw more of
  ours than it had handles: the surplus of a full tier, as a recency policy would evict it (at
  most max_concurrency deletes in flight);
- else waits in a queue (at most capacity_blocks: the thread waits while it is full) for the
  manager to adopt it: a handle of its own, the tier's policy evicting victims first when the tier
  is full (capacity stays a hard bound), a "stored" event; its bytes are verified (MAC, CRC) on
  every read as a recovered object's are. A name that does not unseal under our secret is never
  queued (foreign: counted, left alone), nor one of another spelling.
Its trailer is not read: such a block is served, not published (as past TRAILER_BUDGET_S).

Bounded: one thread, a queue of at most capacity_blocks names, RESUME_BUDGET_S in all (then it
stops with a warning), RESUME_PAGE_S for one page of names (s3: 1,000; file://: PAGE entries of a
scandir; another filesystem: its whole ls), and close() ends it. It never runs on a request's path: only
take_found (a dict pop under the storage's lock) does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .object_meta import FOREIGN, classify
from .seal import HEADER_MIN

log = logging.getLogger("kvbm.tiers")

RESUME_BUDGET_S = 3600.0  # the whole background listing, waits for the manager included
RESUME_PAGE_S = 60.0  # one page of an s3 listing
PAGE = 1000


class Stopped(Exception):
    """close() asked the background listing to end."""


def local_entries(prefix: str, stop: threading.Event | None = None) -> Iterator[dict]:
    """A file:// prefix, entry by entry (never the whole folder in memory)."""
    with os.scandir(prefix) as it:
        for entry in it:
            if stop is not None and stop.is_set():
                return
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            yield {"name": f"{prefix}/{entry.name}", "size": st.st_size, "mtime": st.st_mtime,
                   "type": "file" if stat.S_ISREG(st.st_mode) else "other"}


def entries(st: Any, stop: threading.Event | None, deadline: float, page_s: float | None = None) -> Iterator[dict]:
    """The prefix's entries in this thread: s3 a page at a time from the IO loop, file:// (scandir)
    and any other filesystem (one ls) from a helper thread (threaded). Raises Stopped, TimeoutError
    (a page, or the ls, did not come in time) or what the listing raised."""
    if st._async and hasattr(st.fs, "_iterdir"):
        yield from _pages(st, stop or threading.Event(), deadline)
        return
    if st._local:
        yield from threaded(lambda: local_entries(st.prefix), deadline, stop, page_s, f"scandir {st.prefix}")
        return
    yield from threaded(lambda: st.fs.ls(st.prefix, detail=True), deadline, stop, page_s, f"ls {st.prefix}")


_END = object()


def threaded(listing: Callable[[], Iterable], deadline: float, stop: threading.Event | None = None,
             page_s: float | None = None, what: str = "the listing") -> Iterator:
    """The items of `listing()` (a scandir, an ls: calls that may hang on a dead mount or endpoint),
    made PAGE at a time in one daemon thread and yielded in the calling thread. Raises Stopped once
    `stop` is set, TimeoutError when a page has not come by `deadline` (or within `page_s`), or what
    the listing raised. A hung call is abandoned, never waited for: its thread ends when the call
    returns. At most one page is held in memory, whatever the listing's length."""
    asks: queue.SimpleQueue = queue.SimpleQueue()

    def run() -> None:
        it = None
        try:
            while True:
                fut = asks.get()
                if fut is None:
                    return
                try:
                    if it is None:
                        it = iter(listing())
                    page = []
                    for item in it:
                        page.append(item)
                        if len(page) >= PAGE:
                            break
                    else:
                        page.append(_END)
                except BaseException as exc:  # noqa: BLE001 (raised in the calling thread)
                    fut.set_exception(exc)
                    return
                fut.set_result(page)
                if page[-1] is _END:
                    return
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()

    threading.Thread(target=run, name="kvbm-g4-list", daemon=True).start()
    try:
        while True:
            fut: concurrent.futures.Future = concurrent.futures.Future()
            asks.put(fut)
            until = deadline if page_s is None else min(deadline, time.monotonic() + page_s)
            while True:
                try:
                    page = fut.result(max(0.0, min(0.2, until - time.monotonic())))
                    break
                except concurrent.futures.TimeoutError:
                    if stop is not None and stop.is_set():
                        raise Stopped from None
                    if time.monotonic() >= until:
                        raise TimeoutError(f"{what} did not answer") from None
            for item in page:
                if item is _END:
                    return
                yield item
    finally:
        asks.put(None)  # the thread ends after the page it is making (at once when idle)


def _pages(st: Any, stop: threading.Event, deadline: float) -> Iterator[dict]:
    bucket, key, _ = st.fs.split_path(st.prefix)
    agen = st.fs._iterdir(bucket, prefix=key.rstrip("/") + "/")

    async def page() -> list:
        out: list = []
        try:
            for _ in range(PAGE):
                out.append(await agen.__anext__())
        except StopAsyncIteration:
            out.append(None)
        return out

    fut: concurrent.futures.Future | None = None
    try:
        while True:
            fut = asyncio.run_coroutine_threadsafe(page(), st.fs.loop)
            until = min(deadline, time.monotonic() + RESUME_PAGE_S)
            while True:
                try:
                    got = fut.result(0.2)
                    break
                except concurrent.futures.TimeoutError:
                    if stop.is_set() or time.monotonic() >= until:
                        fut.cancel()
                        if stop.is_set():
                            raise Stopped from None
                        raise TimeoutError(f"a page of {st.prefix} did not come") from None
            for info in got:
                if info is None:
                    return
                yield info
    finally:
        if fut is not None and not fut.done():
            fut.cancel()

        async def close() -> None:
            try:
                await agen.aclose()
            except Exception:  # a generator cancelled mid-page: nothing left to close
                pass

        asyncio.run_coroutine_threadsafe(close(), st.fs.loop)


class Resume:
    """The background listing of one ObjectStorage (see the module docstring).

    `skip`: how many entries recover() already examined (their foreign names were counted);
    `cutoff`: the mtime of the oldest object recover() kept when it saw more of ours than it had
    handles (older ones of ours are surplus: deleted), else None."""

    def __init__(self, st: Any, skip: int = 0, cutoff: float | None = None) -> None:
        self.st, self.skip, self.cutoff = st, skip, cutoff
        self.stop_event = threading.Event()
        self.found = 0  # objects of ours queued for the manager
        self.deleted = 0  # surplus objects deleted
        self.done = threading.Event()
        self._deletes: list[concurrent.futures.Future] = []
        self._thread = threading.Thread(target=self._run, name="kvbm-g4-resume", daemon=True)

    def start(self) -> "Resume":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        with self.st._mu:
            self.st._roomy.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    def _run(self) -> None:
        st = self.st
        deadline = time.monotonic() + RESUME_BUDGET_S
        seen, foreign, base, now = 0, 0, HEADER_MIN + st.block_nbytes, time.time()
        how = "listed the rest of"
        try:
            for info in entries(st, self.stop_event, deadline, RESUME_PAGE_S):
                seen += 1
                if self.stop_event.is_set():
                    raise Stopped
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{st.prefix}: {RESUME_BUDGET_S:.0f} s")
                item = classify(st, info, (), now, base)
                if item is FOREIGN:
                    foreign += seen > self.skip  # recover() counted the ones it saw
                elif item is not None:
                    self._take(item, deadline)
        except Stopped:
            how = "stopped listing"
        except FileNotFoundError:
            how = "found no"
        except Exception as exc:  # noqa: BLE001 (a listing that fails here is a warning, not a crash)
            how = "gave up listing"
            st._count(io_errors=1)
            log.warning("G4 %s: the background listing failed (%s: %s); objects not listed stay unserved",
                        st.prefix, type(exc).__name__, exc)
        finally:
            st._count(foreign_objects=foreign)
            concurrent.futures.wait(self._deletes, timeout=st.timeout)
            log.info("G4 %s: %s the prefix after the start: %d objects of ours found, %d older ones deleted "
                     "(over capacity), %d foreign names", st.prefix, how, self.found, self.deleted, foreign)
            self.done.set()

    def _take(self, item: tuple, deadline: float) -> None:
        mtime, _, key, path, _ = item
        st = self.st
        if self.cutoff is not None and mtime < self.cutoff:
            fut = st._delete_unnamed(path)
            if fut is not None:
                self.deleted += 1
                self._deletes.append(fut)
                if len(self._deletes) >= st.max_concurrency:
                    done, pending = concurrent.futures.wait(self._deletes, return_when="FIRST_COMPLETED")
                    self._deletes = list(pending)
            return
        # An object freed since the listing saw it (a block recovered at start, then evicted) is
        # gone: ask for it (after the check under the lock: a name a handle held then is skipped)
        if not st._unnamed(path) or not st._exists(path):
            return
        while True:
            with st._mu:
                queued = st._offer_found(key, path)
                if queued is False:  # the queue is full: wait for the manager to adopt some
                    st._roomy.wait(0.5)
            if queued is not False:
                self.found += bool(queued)
                return
            if self.stop_event.is_set():
                raise Stopped
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{st.prefix}: nobody adopted the objects found")
