"""Staging windows: the only daemon memory a client maps.

    Window.create(prefix, slots, stride, block_nbytes, scratch=0, deadline_s=None)
                                                          a /dev/shm file (0600) for one session;
                                                          deadline_s: its copies' base time limit
    Window.allocate(n) -> [slot] | None                   window slots for one request
    Window.scratch_slots(wslots, n) -> [slot]             check a one-shot op's slots (the client's own)
    Window.free(slots)
    Window.read_into(wslots, dst, dst_offsets) -> {i}     window -> G2; the blocks that failed
    Window.write_from(src, src_offsets, wslots) -> n      G2 -> window; blocks written, from the first
    WindowStalled                                         a copy outlived its deadline (copy_deadline_s)
    Window.view(slot)                                     a copy of the slot's bytes (tests)
    Window.unlink() / close()
    sweep(prefix)                                         files left by a killed daemon

Why: G2 holds every namespace's blocks. A client that mapped G2 could read any of them, and a
client frozen past its lease could wake and write into a slot already recycled to another
namespace. So G2 stays private to the daemon; each session gets a window of its own, the
client writes a store's bytes there and reads a load's bytes there, and the daemon copies
between the window and G2 while it handles the request (store_commit, load_prepare). A stray
or late write can only reach the writer's own window, which no other session ever reads.

Past the `slots` the daemon hands out sit `scratch` more that the client manages itself: a
one-shot `store` (the client writes them, then one request copies them into G2) or `load` (one
request copies G2 into them, the client reads them) takes one round trip instead of two, and
holds nothing once answered. They are the session's own memory like the rest: a client that
scribbles on them (or a late one-shot that lands after the client gave up on it) reaches only
its own window.

The file is unlinked as soon as the client has mapped it (the client unlinks it at hello,
the daemon again at the session's first request and at release): nothing else can open it,
and a killed client or daemon leaves nothing behind. Its name embeds the daemon's pid, so a
restarted daemon removes what a killed one left between creating a file and its client
opening it (`sweep`).

How the daemon copies (session 13). The client holds its window open read-write, so it can
ftruncate it, punch holes in it or fill its tmpfs at any moment. A plain mapping would then fault
(SIGBUS) in the daemon and kill every tenant's cache (session 12). The daemon maps the window
anyway, for speed, but touches the mapping only through ops.window_to_blocks / blocks_to_window:
a native copy under a SIGBUS guard (csrc/guarded_copy.cpp) that turns a fault inside this
mapping into a failed block. A failed block is then tried once more with pread/pwrite on the
window's descriptor, so the answer is the system calls' (a write past a truncated end extends
the file; a read past it fails). Without the extension there is no mapping: pread/pwrite only.

A copy runs on a copier thread while the request loop waits at most copy_deadline_s(nbytes) for
it (for a client of the daemon's own uid with no tenant token, which could stop the daemon
anyway, the guarded copy runs on the loop thread: dataplane._inline). A client can hold a copy up (fallocate holds the tmpfs inode lock that pwrite takes; a
hole punch holds the faults on its range): past the deadline the loop stops waiting (WindowStalled),
the caller fails the request and ends the session, and the window's descriptor and mapping, and
the G2 slots the copy reads or writes, stay held until the copy really ends (`then`). The loop
goes on serving everyone else.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import threading
from queue import SimpleQueue
from typing import Any, Callable

import numpy as np

from .. import ops
from .transport import alive

SHM_DIR = "/dev/shm"
_open = 0  # windows of this process holding a descriptor (one each)
_open_lock = threading.Lock()  # a stalled window's descriptor is closed by its copier thread

# The loop waits for a window copy at most BASE + bytes / RATE seconds: far above any honest
# copy (a mapping copies GB/s; pwrite beside CPU hogs still ~1 GB/s), far below a client's stall.
# BASE is each Window's own (daemon.window_copy_deadline_s, passed by the server at hello); this
# default serves windows made without one (tests).
DEADLINE_BASE_S = 0.5
DEADLINE_RATE = float(os.environ.get("KVBM_CI_WINDOW_COPY_RATE", str(128 << 20)))  # bytes per second


def copy_deadline_s(nbytes: int, base_s: float | None = None) -> float:
    return (DEADLINE_BASE_S if base_s is None else base_s) + nbytes / DEADLINE_RATE


class _Task:
    """One copy on a copier thread. wait(timeout) -> done; then(cb) runs cb once fn() returned (at
    once if it has), on whichever thread finishes last. Plain locks, not an Event: the loop waits
    for every copy, so the hand-off is on its path (a lock ping-pong is a third of an Event's)."""

    __slots__ = ("fn", "result", "exc", "_done", "_finished", "_lock", "_then")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.result: Any = None
        self.exc: BaseException | None = None
        self._done = threading.Lock()
        self._done.acquire()  # released when fn() returned
        self._finished = False
        self._lock = threading.Lock()
        self._then: list[Callable[[], None]] = []

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # handed to the waiter
            self.exc = exc
        self.fn = None
        with self._lock:
            self._finished = True
            then, self._then = self._then, []
        self._done.release()
        for cb in then:
            _call(cb)

    def wait(self, timeout: float) -> bool:
        if self._done.acquire(timeout=timeout):
            self._done.release()
            return True
        return False

    def then(self, cb: Callable[[], None]) -> None:
        with self._lock:
            if not self._finished:
                self._then.append(cb)
                return
        _call(cb)

    def value(self) -> Any:
        if self.exc is not None:
            raise self.exc
        return self.result


def _call(cb: Callable[[], None]) -> None:
    try:
        cb()
    except Exception:  # a late clean-up must not kill a copier thread
        import logging
        logging.getLogger("kvbm.daemon").exception("window clean-up after a stalled copy failed")


class _Worker:
    __slots__ = ("go", "task")

    def __init__(self) -> None:
        self.go = threading.Lock()
        self.go.acquire()  # released when a task is handed over
        self.task: _Task | None = None


class _Copier:
    """Copier threads: one per copy in flight (the loop waits for one at a time; a stalled copy
    keeps its thread, so the next copy gets another). Idle ones are reused."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._pid = os.getpid()

    def submit(self, fn: Callable[[], Any]) -> _Task:
        task = _Task(fn)
        with self._lock:
            if self._pid != os.getpid():  # a forked child has none of its parent's threads
                self._idle, self._pid = [], os.getpid()
            w = self._idle.pop() if self._idle else None
        if w is None:
            w = _Worker()
            threading.Thread(target=self._work, args=(w,), name="kvbm-window-copy", daemon=True).start()
        w.task = task
        w.go.release()
        return task

    def _work(self, w: _Worker) -> None:
        while True:
            w.go.acquire()
            task, w.task = w.task, None
            task.run()  # (a stalled copy keeps this thread: no later copy may queue behind it)
            del task
            with self._lock:
                self._idle.append(w)


_copier = _Copier()


class WindowStalled(Exception):
    """A window copy outlived its deadline: the request fails and the session must end. The copy
    still runs; task.then(cb) runs cb when it ends (the G2 slots it touches must stay out of use
    until then: the caller's clean-up goes there)."""

    def __init__(self, task: _Task, seconds: float) -> None:
        super().__init__(f"the copy through this session's window took longer than {seconds:.2f} s "
                         f"(its client holds the window's file busy: fallocate, hole punching)")
        self.task = task


def max_windows() -> int:
    """Windows this process may hold open at once: a quarter of its descriptor limit (the
    request socket may take half for connections, conn_gate.py; the rest is G3's files, the
    event links and libzmq's own). Past it a hello is refused `busy`: a session flood under a
    small limit must not leave the daemon without a descriptor to accept a connection (libzmq
    aborts the process at EMFILE on an ipc:// listener)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1 << 30 if soft == resource.RLIM_INFINITY else max(8, soft // 4)


class Window:
    def __init__(self, path: str, slots: int, stride: int, block_nbytes: int, scratch: int = 0,
                 deadline_s: float | None = None) -> None:
        self.path = path
        self.deadline_s = deadline_s  # a copy's base time limit (daemon.window_copy_deadline_s); None: the default
        self.slots, self.stride, self.block_nbytes = slots, stride, block_nbytes
        self.scratch = scratch  # slots [slots, slots + scratch): the client's, for one-shot ops
        self.nbytes = (slots + scratch) * stride
        # The client holds the file open read-write, so it can ftruncate it at any moment; a plain
        # mapping would then fault (SIGBUS) on the vanished pages, and a tmpfs filled by anyone
        # faults it on a page it writes first. So the mapping is touched only by the guarded
        # native copy (a fault fails that block), and a failed block is retried with pread/pwrite
        # on this descriptor: that block is not stored or not loaded (tests/test_attack_wire.py).
        global _open
        self.fd = -1
        if _open >= max_windows():
            raise OSError(errno.EMFILE, f"{_open} staging windows open, the most this daemon's descriptor "
                                        f"limit allows (RLIMIT_NOFILE / 4)")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, self.nbytes)  # sparse: pages exist only once written
            self._guarded = ops.window_map(fd, self.nbytes) if self.nbytes else None  # None: no extension
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        self.fd = fd
        self._busy: _Task | None = None  # a copy that outlived its deadline and still runs
        with _open_lock:
            _open += 1
        self._free = list(range(slots - 1, -1, -1))  # pop() hands out slot 0 first
        self.linked = True

    @classmethod
    def create(cls, prefix: str, slots: int, stride: int, block_nbytes: int, scratch: int = 0,
               deadline_s: float | None = None) -> "Window":
        name = f"{prefix}.w{os.getpid()}.{os.urandom(8).hex()}"
        return cls(os.path.join(SHM_DIR, name), slots, stride, block_nbytes, scratch, deadline_s)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        """n slots (lowest first), or None when fewer are free (nothing taken)."""
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def scratch_slots(self, wslots, n: int) -> list[int]:
        """A one-shot op's window slots: n distinct scratch slots, else ValueError."""
        lo, hi = self.slots, self.slots + self.scratch
        if not isinstance(wslots, list) or len(wslots) != n:
            raise ValueError(f"field 'slots' must list one scratch slot per key ({n})")
        for w in wslots:
            if isinstance(w, bool) or not isinstance(w, int) or not lo <= w < hi:
                raise ValueError(f"field 'slots': scratch slots are integers in [{lo}, {hi})")
        if len(set(wslots)) != n:
            raise ValueError("field 'slots' repeats a slot")
        return wslots

    def free(self, slots) -> None:
        self._free.extend(s for s in slots if s >= 0)
        if len(self._free) == self.slots:
            self._free.sort(reverse=True)  # reuse low (already faulted) pages first

    def offsets(self, slots) -> np.ndarray:
        return np.asarray(slots, dtype=np.int64) * self.stride

    def read_into(self, wslots, dst: np.ndarray, dst_offsets, inline: bool = False) -> set[int]:
        """Window slots wslots[i] -> dst[dst_offsets[i]:][:block_nbytes]; the indices i whose
        bytes could not be read (the client truncated its file): their destination may hold
        part of the data, so the caller must not publish them. WindowStalled past the deadline."""
        if not len(wslots):
            return set()
        if self.fd < 0:
            return set(range(len(wslots)))
        woffs, doffs = self.offsets(wslots), np.asarray(dst_offsets, dtype=np.int64)
        fd, mem, nb = self.fd, self._guarded, self.block_nbytes

        def copy() -> np.ndarray:
            st = ops.window_to_blocks(fd, mem, woffs, dst, doffs, nb)
            bad = np.flatnonzero(st)
            if len(bad) and mem is not None:  # a fault: the system call's answer for that block
                st[bad] = ops.pread_blocks(fd, dst, woffs[bad], nb, dst_offsets=doffs[bad])
            return st

        st = self._run(copy, len(wslots) * nb, inline)
        return {int(i) for i in np.flatnonzero(st)}

    def write_from(self, src: np.ndarray, src_offsets, wslots, inline: bool = False) -> int:
        """src[src_offsets[i]:][:block_nbytes] -> window slot wslots[i]; how many blocks, from
        the first, are in the window (a write fails when the tmpfs is full). WindowStalled past
        the deadline."""
        if not len(wslots):
            return 0
        if self.fd < 0:
            return 0
        woffs, soffs = self.offsets(wslots), np.asarray(src_offsets, dtype=np.int64)
        fd, mem, nb = self.fd, self._guarded, self.block_nbytes

        def copy() -> np.ndarray:
            st = ops.blocks_to_window(src, soffs, fd, mem, woffs, nb)
            bad = np.flatnonzero(st)
            if len(bad) and mem is not None:  # past a truncated end: pwrite extends the file
                st[bad] = ops.pwrite_blocks(fd, src, woffs[bad], nb, src_offsets=soffs[bad])
            return st

        bad = np.flatnonzero(self._run(copy, len(wslots) * nb, inline))
        return int(bad[0]) if len(bad) else len(wslots)

    def _run(self, copy: Callable[[], np.ndarray], nbytes: int, inline: bool = False) -> np.ndarray:
        """copy() on a copier thread; its result, or WindowStalled once copy_deadline_s passed
        (the window then stays open, descriptor and mapping, until the copy ends). inline (the
        caller's word that the client could stop the daemon anyway: its own uid, no tenant) with
        the guarded mapping: on this thread, no hand-off (10-20 us of a small op's ~110-160)."""
        if inline and self._guarded is not None:
            return copy()
        task = _copier.submit(copy)
        limit = copy_deadline_s(nbytes, self.deadline_s)
        if not task.wait(limit):
            self._busy = task
            raise WindowStalled(task, limit)
        return task.value()

    def view(self, slot: int) -> np.ndarray:
        """A copy of the slot's bytes (tests; read with pread, never through the mapping)."""
        out = np.zeros(self.block_nbytes, dtype=np.uint8)
        if self.fd >= 0:
            got = os.pread(self.fd, self.block_nbytes, slot * self.stride)
            out[:len(got)] = np.frombuffer(got, dtype=np.uint8)
        return out

    def unlink(self) -> None:
        if self.linked:
            self.linked = False
            try:
                os.unlink(self.path)
            except FileNotFoundError:  # the client unlinked it first
                pass

    def close(self) -> None:
        """Unlink and close: a client that still maps it keeps pages only it can see. A copy
        still running (WindowStalled) keeps the descriptor and mapping until it ends."""
        self.unlink()
        if self.fd < 0:
            return
        task, self._busy = self._busy, None
        fd, mem, self.fd, self._guarded = self.fd, self._guarded, -1, None
        if task is not None:
            task.then(lambda: _close(fd, mem))
        else:
            _close(fd, mem)


def _close(fd: int, mem: Any) -> None:
    global _open
    if mem is not None:
        mem.close()
    os.close(fd)
    with _open_lock:
        _open -= 1


def sweep(prefix: str) -> int:
    """Remove window files of `prefix` whose daemon (the pid in the name) is dead."""
    pat = re.compile(re.escape(prefix) + r"\.w(\d+)\.[0-9a-f]{16}$")
    removed = 0
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    for name in names:
        m = pat.match(name)
        if m is None or int(m.group(1)) == os.getpid() or alive(int(m.group(1))):
            continue
        try:
            os.unlink(os.path.join(SHM_DIR, name))
            removed += 1
        except OSError:
            pass
    return removed

