"""G2 host storage: one pool allocated up front, pre-faulted, in fixed slots.

The pool is pinned (page-locked, cudaHostAlloc through torch) when CUDA is present, so
device copies run at full PCIe/NVLink-C2C speed; otherwise it is an anonymous page-aligned
mmap whose pages are faulted in at start (first touch of fresh pages costs more than the copy).
With `shm_name` the pool is a named shared-memory file (/dev/shm/<shm_name>, mode 0600) that
other processes of the same user map: the cache daemon's clients read and write slots there.
Slots are `stride` bytes apart, `block_nbytes` rounded up to 4 KiB, so every slot is aligned
for O_DIRECT and DMA.

A slot's bytes change only between allocate() and the store that fills it, so a CRC-32C a
caller computed or verified over a stored slot (`remember_crcs`) stays true until the slot is
handed out again (allocate and free forget it): the daemon serves a block to a second peer, or
a block it pulled, without checksumming it again (`known_crcs`).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import sys
from typing import Any

import numpy as np

from .base import Region, Storage

PAGE = 4096
SHM_DIR = "/dev/shm"


def align_up(n: int, a: int = PAGE) -> int:
    return (n + a - 1) // a * a


class HostStorage(Storage):
    medium = "host"
    instant = False

    def __init__(self, capacity_blocks: int, block_nbytes: int, *, pin: str = "auto",
                 shm_name: str | None = None, **options: Any) -> None:
        super().__init__(capacity_blocks, block_nbytes, **options)
        if block_nbytes <= 0:
            raise ValueError("host storage needs a layout: block_nbytes must be > 0")
        if pin not in ("auto", "always", "never"):
            raise ValueError(f"host storage option pin must be auto, always or never, got {pin!r}")
        self.stride = align_up(block_nbytes)
        self.nbytes = self.stride * capacity_blocks
        self.pinned = False
        self._keepalive: Any = None
        self.shm_path: str | None = None
        self._shm_fd = -1
        if shm_name is not None:
            if pin == "always":
                raise ValueError("host storage: pin=always cannot be combined with shm_name")
            self.pool = self._allocate_shared(shm_name)
        else:
            self.pool = self._allocate(pin)
        self._free = list(range(capacity_blocks - 1, -1, -1))  # pop() hands out slot 0 first
        self._crcs = np.zeros(capacity_blocks, dtype=np.uint32)  # CRC-32C of a slot's bytes, where known
        self._crc_known = np.zeros(capacity_blocks, dtype=bool)

    def _allocate(self, pin: str) -> np.ndarray:
        if pin != "never":
            pool = _pinned_pool(self.nbytes)
            if pool is not None:
                self.pinned = True
                return pool
            if pin == "always":
                raise RuntimeError("host storage pin=always, but no CUDA runtime is available to pin memory")
        buf = mmap.mmap(-1, self.nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._keepalive = buf
        pool = np.frombuffer(buf, dtype=np.uint8)
        _prefault(buf, pool)
        return pool

    def _allocate_shared(self, name: str) -> np.ndarray:
        """A named /dev/shm file, held under an exclusive flock while this storage lives.

        A stale file left by a killed process is replaced; one locked by a live process is not.
        """
        if not name or "/" in name or name.startswith(".") or len(name) > 200:
            raise ValueError(f"host storage shm_name must be a plain file name, got {name!r}")
        path = os.path.join(SHM_DIR, name)
        try:
            old = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            pass
        else:
            try:
                fcntl.flock(old, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ValueError(f"host storage shm_name {name!r}: {path} is in use by a running "
                                 f"process (another daemon?); choose another shm_name") from None
            finally:
                os.close(old)
            os.unlink(path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, self.nbytes)
            buf = mmap.mmap(fd, self.nbytes, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        self._shm_fd = fd
        self.shm_path = path
        self._keepalive = buf
        pool = np.frombuffer(buf, dtype=np.uint8)
        _prefault(buf, pool)
        return pool

    @property
    def address(self) -> int:
        return int(self.pool.ctypes.data)

    def allocate(self) -> int | None:
        if not self._free:
            return None
        slot = self._free.pop()
        self._crc_known[slot] = False  # its bytes are about to change
        return slot

    def free(self, slot: int) -> None:
        self._crc_known[slot] = False
        self._free.append(slot)

    def remember_crcs(self, slots, crcs) -> None:
        """Keep the CRC-32C of the bytes now in each slot (the caller computed or verified them
        over these very bytes) until the slot is allocated or freed again."""
        idx = np.asarray(slots, dtype=np.int64)
        self._crcs[idx] = np.asarray(crcs, dtype=np.uint32)
        self._crc_known[idx] = True

    def known_crcs(self, slots) -> tuple[np.ndarray, np.ndarray]:
        """(CRC-32C per slot, a bool array: which of them are known); unknown entries are 0."""
        idx = np.asarray(slots, dtype=np.int64)
        known = self._crc_known[idx]
        return np.where(known, self._crcs[idx], 0).astype(np.uint32), known

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def view(self, slot: int) -> np.ndarray:
        """The block's bytes, writable, without a copy."""
        off = slot * self.stride
        return self.pool[off:off + self.block_nbytes]

    def offset(self, slot: int) -> int:
        return slot * self.stride

    def offsets(self, slots) -> np.ndarray:
        """offset() of many slots at once (a batched copy's argument)."""
        return np.asarray(slots, dtype=np.int64) * self.stride

    def describe(self, slot: int) -> list[Region]:
        return [Region("memory", self.address + slot * self.stride, 0, self.block_nbytes)]

    def close(self) -> None:
        self.pool = np.empty(0, dtype=np.uint8)
        if isinstance(self._keepalive, mmap.mmap):
            try:
                self._keepalive.close()
            except BufferError:  # a caller still holds a view; the GC frees it later
                pass
        self._keepalive = None
        if self.shm_path is not None:
            try:
                os.unlink(self.shm_path)  # still ours: the flock kept others from replacing it
            except FileNotFoundError:
                pass
            os.close(self._shm_fd)
            self.shm_path = None


def _prefault(buf: mmap.mmap, pool: np.ndarray) -> None:
    # Huge pages first (THP is often "madvise" only): a 4 KiB-paged pool costs a TLB miss per
    # 4 KiB in every copy, and cma/NIXL pin it page by page (issue 17). Ignored where refused.
    huge = getattr(mmap, "MADV_HUGEPAGE", None)
    if huge is not None:
        try:
            buf.madvise(huge)
        except OSError:
            pass
    # Python < 3.12 lacks the constant; Linux >= 5.14 has it (23): ~25 % faster than a write per page
    populate = getattr(mmap, "MADV_POPULATE_WRITE", 23 if sys.platform == "linux" else None)
    if populate is not None:
        try:
            buf.madvise(populate)
            return
        except OSError:  # kernels before 5.14
            pass
    pool[::PAGE] = 0  # one write per page faults it in


def _pinned_pool(nbytes: int) -> np.ndarray | None:
    """Page-locked host memory through torch, when a CUDA device is usable."""
    try:
        import torch
    except ImportError:
        return None
    try:
        if not torch.cuda.is_available():
            return None
        t = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    except RuntimeError:
        return None
    return t.numpy()
