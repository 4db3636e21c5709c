"""G3 disk storage: one preallocated slot file on local NVMe, O_DIRECT, and a crash-safe index.

    DiskStorage(capacity_blocks, block_nbytes, namespace=, path=, direct=True, threads=0)
    allocate() -> slot             a free slot, or None: capacity is a hard bound
    free(slot)                     appends a delete record, so the block is never resurrected
    write([(key, slot, buf)])      batched pwrite, then put records -> per block True/False
    read([(key, slot, buf)])       batched pread, CRC-32C checked -> per block True/False
    recover() -> [(key, slot)]     the blocks the index kept, oldest write first
    meta_of = fn                   fn(key) -> bytes | None: an opaque blob kept beside each block written
    kept_meta() -> {key: blob}     the blobs of the indexed blocks (after a restart: those it recovered)
    describe(slot)                 the block's file extent (for NIXL)

Files live in `<path>/<namespace>/`:

    slots.bin   capacity_blocks slots `stride` bytes apart (block_nbytes rounded up to 4 KiB,
                so every slot is aligned for O_DIRECT), preallocated at open
    index.log   a header (block size, capacity), then put records (key, slot, crc32c, blob and
                sequence for each block of one write call) and delete records (slot), each
                framed with its own length and checksum (the record format: disk_index.py)

The blob is what `meta_of` (set by BlockManager.keep_meta) gives for a key as its block is
written (<= MAX_META bytes, else none); never read here, it comes back after a restart.

A write lands the bytes first and appends their put record after, and syncs neither (the
files are synced at close and when the index is compacted). After a crash a record may
therefore name bytes that never fully landed: the record's CRC-32C catches that at read,
which is a miss and a counted checksum error. Bytes whose record never came are simply not
found. Either way a torn block is a miss, never wrong bytes, so open does not read the slots.

Open replays the index (a torn tail record ends it; per slot and per key the latest record
wins, a delete removes) and rewrites it compacted: temporary file, fsync, rename, fsync of
the folder. An index written for another block size or capacity is dropped with a warning
and the store starts empty: old slots are never read with the wrong layout.

On a full disk (ENOSPC, EDQUOT) that rewrite cannot land: the store then opens read-only
(one warning), serves what the index holds, and refuses writes (`writable` is False, so the
manager admits nothing and evicts nothing here; a write that comes anyway fails, counted in
`errors.writes_refused`). Every `readonly_retry_s` a write attempt (or `writable`) tries
the rewrite again; once it lands the store takes writes again. The same holds on a read-only
filesystem (EROFS: at open, the slot file is opened for reads only and reopened for writes when the
retry lands; at runtime, a slot write or index append refused with EROFS), and when a failed index
append cannot be cut back (part of a record would sit at the log's end, and every record appended
after it would be lost at a restart: none is appended until the whole index is rewritten).

The folder is 0700 and both files 0600, whatever the umask: other local users can neither
read cached KV nor learn which blocks are cached.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import re
import shutil
import stat
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import ops
from .base import Region, Storage, encode_key, make_private_dir
from .disk_index import DELETE, MAX_META, PUT, Entry, compacted, delete_record, put_record, replay

log = logging.getLogger(__name__)

PAGE = 4096
SLOTS_FILE = "slots.bin"
INDEX_FILE = "index.log"
NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
READ_ONLY = (*NO_SPACE, errno.EROFS)  # the index cannot be written: G3 serves what it holds, takes nothing


def align_up(n: int, a: int = PAGE) -> int:
    return (n + a - 1) // a * a


class DiskStorage(Storage):
    medium = "disk"
    persistent = True
    keeps_meta = True

    def __init__(self, capacity_blocks: int, block_nbytes: int, *, path: str | os.PathLike | None = None,
                 direct: bool = True, threads: int = 0, readonly_retry_s: float = 5.0,
                 **options: Any) -> None:
        super().__init__(capacity_blocks, block_nbytes, **options)
        if path is None:
            raise ValueError("disk storage needs `path`, a folder on a local disk (NVMe)")
        if block_nbytes <= 0:
            raise ValueError("disk storage needs a layout: block_nbytes must be > 0")
        if not 0 < capacity_blocks < 2**32:
            raise ValueError(f"disk storage capacity_blocks must be in [1, 2**32), got {capacity_blocks}")
        self.stride = align_up(block_nbytes)
        self.threads = threads
        self.folder = Path(path) / self.namespace
        if not self.folder.exists():
            _warn_about_old_folders(Path(path), self.namespace)
        make_private_dir(self.folder)
        self.slots_path = self.folder / SLOTS_FILE
        self.index_path = self.folder / INDEX_FILE
        self._lock = threading.Lock()
        self._index: dict[int, Entry] = {}  # slot -> the block it holds
        self._slot_of: dict[Any, int] = {}  # key -> slot
        self._seq = 0
        self._free = list(range(capacity_blocks - 1, -1, -1))  # pop() hands out slot 0 first
        self._used: set[int] = set()
        self._fd = self._log_fd = -1
        self.read_only = False
        self.readonly_retry_s = readonly_retry_s
        self._retry_at = 0.0
        self._replay()
        self._want_direct = direct
        self._slots_ro = False  # the slot file opened read-only (a read-only filesystem)
        self._fd, self.direct = self._open_slots(direct)
        try:
            if self._slots_ro:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))
            self._compact()
        except OSError as exc:
            if exc.errno not in READ_ONLY:
                os.close(self._fd)
                raise OSError(exc.errno, f"disk storage: cannot write the index {self.index_path}: "
                                         f"{exc.strerror}") from exc
            self._enter_read_only(exc)
        self._compact_after = max(4096, 4 * capacity_blocks)  # appended records before a rewrite

    # ---------------------------------------------------------------- open

    def _replay(self) -> None:
        try:
            data = self.index_path.read_bytes()
        except FileNotFoundError:
            return
        for kind, seq, body in replay(data, self.index_path, self.block_nbytes, self.capacity_blocks):
            self._seq = max(self._seq, seq)
            if kind == PUT:
                for j, (slot, crc, key, meta) in enumerate(body):
                    if slot < self.capacity_blocks:
                        self._map(slot, key, crc, seq + j, meta)
                self._seq = max(self._seq, seq + len(body) - 1)
            elif kind == DELETE:
                self._unmap(body)

    def _enter_read_only(self, exc: OSError, why: str = "") -> None:
        """The index cannot be written (no space, a read-only filesystem, a torn record that could not
        be cut back): serve what it holds, take no writes until a rewrite of the index lands."""
        self.read_only = True
        self._retry_at = time.monotonic() + self.readonly_retry_s
        with contextlib.suppress(OSError):  # an index from before 0600: no one else reads it now
            os.chmod(self.index_path, 0o600)
        if why:
            until = "its index can be rewritten there"
        elif exc.errno == errno.EROFS:
            why, until = "is on a read-only file system", "it is writable again"
        else:
            why, until = "is full", "space is freed there"
        log.warning("disk storage: %s %s (%s); G3 opens read-only: it serves the %d blocks it holds and "
                    "takes no new ones until %s", self.folder, why, exc.strerror, len(self._index), until)

    def _writable_now(self) -> bool:
        """Under the lock: False while read-only; retries the index rewrite now and then."""
        if not self.read_only:
            return True
        if time.monotonic() < self._retry_at:
            return False
        try:
            if self._slots_ro:  # opened on a read-only filesystem: the slot file, writable now?
                self._reopen_slots()
            self._compact()
        except OSError as exc:
            self._retry_at = time.monotonic() + self.readonly_retry_s
            if exc.errno not in READ_ONLY:
                log.warning("disk storage: cannot rewrite %s: %s", self.index_path, exc.strerror)
            return False
        self.read_only = False
        log.warning("disk storage: %s has room again; G3 takes new blocks", self.folder)
        return True

    @property
    def writable(self) -> bool:
        with self._lock:
            return self._writable_now()

    def _open_slots(self, direct: bool) -> tuple[int, bool]:
        path, need = self.slots_path, self.capacity_blocks * self.stride
        created = not path.exists()
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        fd, is_direct = -1, False
        if direct and hasattr(os, "O_DIRECT"):
            try:
                fd, is_direct = os.open(path, flags | os.O_DIRECT, 0o600), True
            except OSError as exc:
                if exc.errno == errno.EROFS and not created:
                    return self._open_slots_read_only(direct)
                if exc.errno != errno.EINVAL:
                    raise
                self._warn_buffered(exc)
        if fd < 0:
            try:
                fd = os.open(path, flags, 0o600)
            except OSError as exc:
                if exc.errno == errno.EROFS and not created:
                    return self._open_slots_read_only(False)
                raise
        try:
            if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:  # a slot file from before 0600
                os.fchmod(fd, 0o600)
            if os.fstat(fd).st_size > need:
                os.ftruncate(fd, need)
            os.posix_fallocate(fd, 0, need)
        except OSError as exc:
            os.close(fd)
            if created:
                path.unlink(missing_ok=True)
            free = shutil.disk_usage(self.folder).free
            raise OSError(exc.errno, f"disk storage: cannot preallocate {need} bytes ({self.capacity_blocks} "
                                     f"slots x {self.stride} bytes) for {path}: {exc.strerror}; {free} bytes "
                                     f"are free there") from exc
        if is_direct and not self._direct_reads_work(fd):
            os.close(fd)
            fd, is_direct = os.open(path, flags, 0o600), False
        return fd, is_direct

    def _open_slots_read_only(self, direct: bool) -> tuple[int, bool]:
        """A read-only filesystem (EROFS): the slot file opened for reads only; G3 serves what its
        index holds and takes no writes (read_only) until the filesystem is writable again."""
        self._slots_ro = True
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
        if direct and hasattr(os, "O_DIRECT"):
            try:
                fd = os.open(self.slots_path, flags | os.O_DIRECT)
                if self._direct_reads_work(fd):
                    return fd, True
                os.close(fd)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
        return os.open(self.slots_path, flags), False

    def _reopen_slots(self) -> None:
        """Under the lock, leaving read-only: the slot file opened for writes again (OSError: not yet)."""
        self._slots_ro = False
        try:
            fd, is_direct = self._open_slots(self._want_direct)
        except OSError:
            self._slots_ro = True
            raise
        if self._slots_ro:  # still refused
            os.close(fd)
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        # the same descriptor number, now writable: a read in flight on it never meets another file
        os.dup2(fd, self._fd, inheritable=False)
        os.close(fd)
        self.direct = is_direct

    def _direct_reads_work(self, fd: int) -> bool:
        # Some filesystems accept O_DIRECT at open and refuse it at the first I/O.
        probe = np.frombuffer(mmap.mmap(-1, PAGE), dtype=np.uint8)
        status = ops.pread_blocks(fd, [probe], [0], PAGE)[0]
        if status == errno.EINVAL:
            self._warn_buffered(OSError(errno.EINVAL, os.strerror(errno.EINVAL)))
            return False
        return True

    def _warn_buffered(self, exc: OSError) -> None:
        log.warning("disk storage: the filesystem under %s refuses O_DIRECT (%s); using buffered I/O, "
                    "so blocks also pass through the page cache", self.folder, exc.strerror)

    def _compact(self) -> None:
        """Rewrite the index as header + one put per live block (atomic: temp, fsync, rename)."""
        data = compacted(self.block_nbytes, self.capacity_blocks, self._index)
        tmp = self.index_path.with_name(INDEX_FILE + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            os.fchmod(fd, 0o600)  # a leftover temporary file keeps its old mode through O_CREAT
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        os.replace(tmp, self.index_path)
        _fsync_folder(self.folder)
        if self._log_fd >= 0:
            os.close(self._log_fd)
        self._log_fd = os.open(self.index_path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_CLOEXEC", 0))
        self._log_size = len(data)
        self._appended = 0

    # ---------------------------------------------------------------- index

    def _map(self, slot: int, key: Any, crc: int, seq: int, meta: bytes = b"") -> None:
        """slot now holds key: whatever the slot held, and wherever the key was, is gone."""
        self._unmap(slot)
        old = self._slot_of.pop(key, None)
        if old is not None:
            self._index.pop(old, None)
        self._index[slot] = Entry(key, crc, seq, meta)
        self._slot_of[key] = slot

    def _unmap(self, slot: int) -> Entry | None:
        entry = self._index.pop(slot, None)
        if entry is not None and self._slot_of.get(entry.key) == slot:
            del self._slot_of[entry.key]
        return entry

    def _append(self, data: bytes, records: int = 1) -> bool:
        """Append records (not synced). On failure cut the log back, so a partial record
        cannot hide the ones appended after it, and return False."""
        try:
            if os.write(self._log_fd, data) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as exc:
            log.warning("disk storage: cannot append to %s: %s", self.index_path, exc.strerror)
            try:
                os.ftruncate(self._log_fd, self._log_size)
            except OSError as cut:
                # Part of the record may sit at the end of the log, and every record appended after
                # it would be lost at a restart (the replay stops at the torn one): take no more
                # records until the whole index is rewritten (read-only, retried; _writable_now)
                self._enter_read_only(cut, f"cannot cut a failed index append back ({exc.strerror})")
            else:
                if exc.errno == errno.EROFS:
                    self._enter_read_only(exc)
            return False
        self._log_size += len(data)
        self._appended += records
        if self._appended > self._compact_after:
            try:
                self._compact()
            except OSError as exc:  # the log as it is stays valid
                log.warning("disk storage: cannot compact %s: %s", self.index_path, exc.strerror)
        return True

    # ---------------------------------------------------------------- slots

    def allocate(self) -> int | None:
        with self._lock:
            if not self._free:
                return None
            slot = self._free.pop()
            self._used.add(slot)
            return slot

    def free(self, slot: int) -> None:
        with self._lock:
            if slot not in self._used:
                raise ValueError(f"disk storage: slot {slot} is not allocated")
            self._used.remove(slot)
            self._free.append(slot)
            # read-only: no delete record (none could land); the slot takes no new bytes meanwhile,
            # so a block that comes back after a restart still matches its record
            if self._unmap(slot) is not None and not self.read_only:
                self._seq += 1
                if not self._append(delete_record(self._seq, slot)):
                    self.errors.io_errors += 1  # it may come back after a restart; its crc still holds

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def fd(self) -> int:
        """The slot file's descriptor (O_DIRECT when `direct`), e.g. for NIXL registration."""
        return self._fd

    def offset(self, slot: int) -> int:
        return slot * self.stride

    def describe(self, slot: int) -> list[Region]:
        return [Region("file", str(self.slots_path), slot * self.stride, self.block_nbytes)]

    def recover(self) -> list[tuple[Any, int]]:
        """The indexed blocks, oldest write first; their slots become allocated. Bytes are
        verified when read, not here (that would read the whole disk)."""
        with self._lock:
            live = sorted(self._index.items(), key=lambda item: item[1].seq)
            slots = {slot for slot, _ in live}
            self._used |= slots
            self._free = [s for s in self._free if s not in slots]
            return [(e.key, slot) for slot, e in live]

    def kept_meta(self) -> dict[Any, bytes]:
        """{key: blob} of the indexed blocks that have one, oldest write first."""
        with self._lock:
            return {e.key: e.meta for e in sorted(self._index.values(), key=lambda e: e.seq) if e.meta}

    def _metas(self, items: Sequence[tuple[Any, Any, Any]]) -> list[bytes]:
        """Each key's blob from meta_of: b"" without one (or for one longer than MAX_META)."""
        fn = self.meta_of
        metas = [b""] * len(items) if fn is None else [fn(key) or b"" for key, _, _ in items]
        return [m if len(m) <= MAX_META else b"" for m in metas]

    # ---------------------------------------------------------------- bytes

    def _check(self, items: Sequence[tuple[Any, Any, Any]], writable: bool) -> tuple[list, list[int]]:
        """(buffers, slots), each buffer checked to be one C-contiguous block (ValueError)."""
        nbytes, capacity, ndarray = self.block_nbytes, self.capacity_blocks, np.ndarray
        views, slots = [], []
        for _, slot, buf in items:
            if type(slot) is not int:
                if not isinstance(slot, np.integer):
                    raise ValueError(f"disk storage: slot {slot!r} is not an integer")
                slot = int(slot)
            if not 0 <= slot < capacity:
                raise ValueError(f"disk storage: slot {slot} is outside [0, {capacity})")
            # numpy blocks (host slot views) pass as they are: the common case, kept cheap
            if not (type(buf) is ndarray and buf.nbytes == nbytes and (flags := buf.flags).c_contiguous
                    and (flags.writeable or not writable)):
                buf = memoryview(buf).cast("B")
                if buf.nbytes != nbytes:
                    raise ValueError(f"disk storage: a {buf.nbytes}-byte buffer for a {nbytes}-byte block")
                if writable and buf.readonly:
                    raise TypeError("disk storage: read() needs writable buffers")
            views.append(buf)
            slots.append(slot)
        return views, slots

    def write(self, items: Sequence[tuple[Any, Any, Any]]) -> list[bool]:
        items = list(items)
        views, slots = self._check(items, writable=False)
        names = [encode_key(key).encode() for key, _, _ in items]  # TypeError before any I/O
        metas = self._metas(items)
        if len(set(slots)) != len(slots):
            raise ValueError("disk storage: a write batch names the same slot twice")
        if not items:
            return []
        with self._lock:
            if not self._writable_now():
                self.errors.writes_refused += len(items)
                return [False] * len(items)
            index, unmap = self._index, self._unmap
            for slot in slots:  # its bytes are about to change: the old block is gone
                if slot in index:
                    unmap(slot)
        crcs = np.zeros(len(items), dtype=np.uint32)
        offsets = np.array(slots, dtype=np.int64) * self.stride
        status = ops.pwrite_blocks(self._fd, views, offsets, self.block_nbytes, threads=self.threads, crcs=crcs)
        ok = np.flatnonzero(status == 0).tolist()
        crc_list = crcs.tolist()
        result = [False] * len(items)
        with self._lock:
            first = self._seq + 1
            record = put_record(first, [(slots[i], crc_list[i], names[i], metas[i]) for i in ok])
            if ok and self._append(record, len(ok)):
                self._seq += len(ok)
                index, slot_of, unmap = self._index, self._slot_of, self._unmap
                for j, i in enumerate(ok):  # _map, inlined: this loop runs once per block
                    slot, key = slots[i], items[i][0]
                    if slot in index:
                        unmap(slot)
                    old = slot_of.pop(key, None)
                    if old is not None:
                        index.pop(old, None)
                    index[slot] = Entry(key, crc_list[i], first + j, metas[i])
                    slot_of[key] = slot
                    result[i] = True
            self.errors.io_errors += len(items) - result.count(True)  # write or record failed
            if not self.read_only and (status == errno.EROFS).any():  # remounted read-only under us
                self._enter_read_only(OSError(errno.EROFS, os.strerror(errno.EROFS)))
        if len(ok) < len(items):
            log.warning("disk storage: %d of %d block writes to %s failed (%s)", len(items) - len(ok),
                        len(items), self.slots_path, _errnames(status))
        return result

    def read(self, items: Sequence[tuple[Any, Any, Any]]) -> list[bool]:
        items = list(items)
        views, slots = self._check(items, writable=True)
        with self._lock:
            index = self._index
            entries = [index.get(slot) for slot in slots]
        todo = [i for i, e in enumerate(entries) if e is not None and e.key == items[i][0]]
        result = [False] * len(items)
        if not todo:
            return result
        crcs = np.zeros(len(todo), dtype=np.uint32)
        stride = self.stride
        offsets = np.array([slots[i] for i in todo], dtype=np.int64) * stride
        status = ops.pread_blocks(self._fd, [views[i] for i in todo], offsets, self.block_nbytes,
                                  threads=self.threads, crcs=crcs)
        bad_io = bad_crc = 0
        for i, st, crc in zip(todo, status.tolist(), crcs.tolist()):
            if st:
                bad_io += 1
            elif crc != entries[i].crc:
                bad_crc += 1
                log.warning("disk storage: block in slot %d of %s fails its checksum; not served",
                            slots[i], self.slots_path)
            else:
                result[i] = True
        if bad_io or bad_crc:
            with self._lock:
                self.errors.io_errors += bad_io
                self.errors.checksum_errors += bad_crc
        if bad_io:
            log.warning("disk storage: %d block reads from %s failed (%s)", bad_io, self.slots_path,
                        _errnames(status))
        return result

    # ---------------------------------------------------------------- close

    def close(self) -> None:
        with self._lock:
            for fd in (self._fd, self._log_fd):
                if fd < 0:
                    continue
                try:
                    os.fsync(fd)
                except OSError as exc:
                    log.warning("disk storage: fsync failed under %s: %s", self.folder, exc.strerror)
                os.close(fd)
            self._fd = self._log_fd = -1

    def __enter__(self) -> DiskStorage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# namespace_id's form since namespaces are length-prefixed: name--fingerprint--24 hex digits;
# before: name--fingerprint, or name--fingerprint--12 hex digits (a salt)
_NEW_FORM = re.compile(r"^(.+--[^-]+)--[0-9a-f]{24}$")
_OLD_SALT = re.compile(r"^[0-9a-f]{12}$")


def _warn_about_old_folders(path: Path, namespace: str) -> None:
    """An older kvbm's folder for this model and layout holds blocks whose keys no longer
    exist (all misses) in a preallocated slot file: say which, so its space can be freed."""
    m = _NEW_FORM.match(namespace)
    if m is None:
        return
    prefix = m.group(1)
    try:
        folders = [d for d in path.iterdir() if d.is_dir()]
    except OSError:
        return
    for d in folders:
        rest = d.name[len(prefix):]
        if d.name.startswith(prefix) and (rest == "" or (rest[:2] == "--" and _OLD_SALT.match(rest[2:]))):
            slots = d / SLOTS_FILE
            size = slots.stat().st_size if slots.exists() else 0
            log.warning("disk storage: %s is an older kvbm's G3 for this model and layout; its blocks are "
                        "misses now (block keys changed), and its %d-byte slot file stays allocated: delete "
                        "the folder to free it", d, size)


def _errnames(status: np.ndarray) -> str:
    return ", ".join(sorted({errno.errorcode.get(s, str(s)) for s in status.tolist() if s}))


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
