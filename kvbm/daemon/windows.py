"""Staging windows: the only daemon memory a client maps.

    Window.create(prefix, slots, stride, block_nbytes, scratch=0)   a /dev/shm file (0600) for one session
    Window.allocate(n) -> [slot] | None                   window slots for one request
    Window.scratch_slots(wslots, n) -> [slot]             check a one-shot op's slots (the client's own)
    Window.free(slots)
    Window.read_into(wslots, dst, dst_offsets) -> {i}     window -> G2 (pread); the blocks that failed
    Window.write_from(src, src_offsets, wslots) -> n      G2 -> window (pwrite); blocks written, from the first
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
"""

from __future__ import annotations

import errno
import os
import re
import resource

import numpy as np

from .. import ops
from .transport import alive

SHM_DIR = "/dev/shm"
_open = 0  # windows of this process holding a descriptor (one each)


def max_windows() -> int:
    """Windows this process may hold open at once: a quarter of its descriptor limit (the
    request socket may take half for connections, conn_gate.py; the rest is G3's files, the
    event links and libzmq's own). Past it a hello is refused `busy`: a session flood under a
    small limit must not leave the daemon without a descriptor to accept a connection (libzmq
    aborts the process at EMFILE on an ipc:// listener)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1 << 30 if soft == resource.RLIM_INFINITY else max(8, soft // 4)


class Window:
    def __init__(self, path: str, slots: int, stride: int, block_nbytes: int, scratch: int = 0) -> None:
        self.path = path
        self.slots, self.stride, self.block_nbytes = slots, stride, block_nbytes
        self.scratch = scratch  # slots [slots, slots + scratch): the client's, for one-shot ops
        self.nbytes = (slots + scratch) * stride
        # The daemon never maps the window: it copies with pread/pwrite on this descriptor. The
        # client holds the file open read-write, so it can ftruncate it at any moment; a daemon
        # mapping would then fault (SIGBUS) on the vanished pages, and a tmpfs filled by anyone
        # faults it on a page it writes first. A system call just fails instead: that block is
        # not stored or not loaded (tests/test_attack_wire.py).
        global _open
        self.fd = -1
        if _open >= max_windows():
            raise OSError(errno.EMFILE, f"{_open} staging windows open, the most this daemon's descriptor "
                                        f"limit allows (RLIMIT_NOFILE / 4)")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, self.nbytes)  # sparse: pages exist only once written
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        self.fd = fd
        _open += 1
        self._free = list(range(slots - 1, -1, -1))  # pop() hands out slot 0 first
        self.linked = True

    @classmethod
    def create(cls, prefix: str, slots: int, stride: int, block_nbytes: int, scratch: int = 0) -> "Window":
        name = f"{prefix}.w{os.getpid()}.{os.urandom(8).hex()}"
        return cls(os.path.join(SHM_DIR, name), slots, stride, block_nbytes, scratch)

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

    def read_into(self, wslots, dst: np.ndarray, dst_offsets) -> set[int]:
        """Window slots wslots[i] -> dst[dst_offsets[i]:][:block_nbytes]; the indices i whose
        bytes could not be read (the client truncated its file): their destination may hold
        part of the data, so the caller must not publish them."""
        if not len(wslots):
            return set()
        if self.fd < 0:
            return set(range(len(wslots)))
        st = ops.pread_blocks(self.fd, dst, self.offsets(wslots), self.block_nbytes,
                              dst_offsets=np.asarray(dst_offsets, dtype=np.int64))
        return {i for i, e in enumerate(st) if e}

    def write_from(self, src: np.ndarray, src_offsets, wslots) -> int:
        """src[src_offsets[i]:][:block_nbytes] -> window slot wslots[i]; how many blocks, from
        the first, are in the window (a write fails when the tmpfs is full)."""
        if not len(wslots):
            return 0
        if self.fd < 0:
            return 0
        st = ops.pwrite_blocks(self.fd, src, self.offsets(wslots), self.block_nbytes,
                               src_offsets=np.asarray(src_offsets, dtype=np.int64))
        bad = np.flatnonzero(st)
        return int(bad[0]) if len(bad) else len(wslots)

    def view(self, slot: int) -> np.ndarray:
        """A copy of the slot's bytes (tests; the daemon never maps the window)."""
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
        """Unlink and close: a client that still maps it keeps pages only it can see."""
        global _open
        self.unlink()
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            _open -= 1
            os.close(fd)


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

