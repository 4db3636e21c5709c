"""What a restarted G4 finds: its objects (listed), and the opaque per-block blob (BlockManager.keep_meta)
each keeps in a trailer after its payload.

    listed(storage, listing, known) -> ([(key, path, size)] newest first, foreign names)
    Listing(storage, known, limit, deadline)   the same, fed entry by entry: bounded in memory and time
    trailer(seal, key, blob) -> bytes          what a put appends after the payload (b"" without a blob)
    parse(seal, key, data) -> bytes | None      the blob of a trailer; None unless it is one, sealed here
    MAX_TRAILER                                 the most bytes an object may carry past its payload
    Trailers(storage)                           the objects recover() found with a trailer, read only when
      .found(key, path, size)                   someone asks (kept_meta): a restart with nobody asking
      .take() -> {key: blob}                    reads nothing; given once, then forgotten

An object is its 64-byte header, the payload, then (kvbm since the trailer) the trailer:

    Seal.seal_meta(key, blob) | zero padding | u16 length of the sealed blob | b"KVBm"

padded to a multiple of 64 bytes (few distinct object sizes: puts reuse their bodies). The
sealed blob is an SIV under a key of the namespace's own (seal.py): only this deployment, in
this namespace, for this block key, makes one that opens; anything else (another secret,
another namespace's prefix, a trailer moved from another object, a flipped bit) parses to
None: the block is served as before, its blob names nothing. Bounded: a blob longer than
MAX_META is not kept (as G3), an object longer than its payload by more than MAX_TRAILER is
torn or foreign (never recovered, a miss on a get). A get reads the trailer with the rest of
the object (no extra round trip) and ignores it; the payload's MAC is unchanged, so objects
written before the trailer (exactly header + payload) are still read, and recover with no blob.

Crash-safe as the object is: the trailer is written in the same put (file://: the same
temporary file, renamed whole; S3: one PUT), so an object has its blob or is not there.
"""

from __future__ import annotations

import heapq
import struct
import time
from collections.abc import Iterable
from concurrent.futures import Future, wait
from datetime import datetime
from typing import Any

from .disk_index import MAX_META
from .seal import HEADER_MIN, TAG_BYTES, Seal

TMP_PREFIX = ".tmp-"
STALE_TMP_S = 600.0  # a temporary file this old belongs to a writer that died
# A restart reads the recovered objects' trailers before the daemon serves; on a large bucket
# (one small GET per object) that must not hold the start for minutes: past this budget the
# trailers not read yet count as none (those blocks are served, just not published), newest read first
TRAILER_BUDGET_S = 15.0
# ... and the listing before it: a prefix a bucket writer stuffed with other objects (millions of
# names, each examined) must not hold it either. Past this budget recover() stops listing: the
# objects not listed yet are not recovered (misses; they stay in the bucket, unserved)
LIST_BUDGET_S = 15.0
MAGIC = b"KVBm"
TAIL = struct.Struct("<H4s")
ALIGN = 64
MAX_TRAILER = -(-(TAG_BYTES + MAX_META + TAIL.size) // ALIGN) * ALIGN


def trailer(seal: Seal, key: Any, blob: bytes | None) -> bytes:
    if not blob or len(blob) > MAX_META:
        return b""
    sealed = seal.seal_meta(key, bytes(blob))
    size = -(-(len(sealed) + TAIL.size) // ALIGN) * ALIGN
    return sealed.ljust(size - TAIL.size, b"\0") + TAIL.pack(len(sealed), MAGIC)


def parse(seal: Seal, key: Any, data: bytes) -> bytes | None:
    if not TAIL.size <= len(data) <= MAX_TRAILER or len(data) % ALIGN:
        return None
    n, magic = TAIL.unpack_from(data, len(data) - TAIL.size)
    if magic != MAGIC or n > len(data) - TAIL.size or any(data[n:len(data) - TAIL.size]):
        return None
    return seal.open_meta(key, data[:n])


class Trailers:
    """The trailers recover() saw, per key, until take() reads them (concurrently, each job under
    the storage's own timeout, all of them under `budget_s`, newest first; one that fails, times
    out or is not read within the budget is no blob)."""

    def __init__(self, storage: Any, budget_s: float = TRAILER_BUDGET_S) -> None:
        self.storage = storage
        self.budget_s = budget_s
        self.pending: dict[Any, tuple[str, int]] = {}  # key -> (path, trailer bytes), oldest first

    def found(self, key: Any, path: str, size: int | None, base: int) -> None:
        self.pending[key] = (path, MAX_TRAILER if size is None else size - base)

    def take(self) -> dict[Any, bytes]:
        st = self.storage
        todo, self.pending = self.pending, {}
        with st._mu:
            live = set(st._names.values())
        todo = {k: v for k, v in todo.items() if v[0] in live and v[1] > 0}  # freed since: gone
        jobs: dict[Any, Future] = {k: st._submit("tail", path, n) for k, (path, n) in reversed(todo.items())}
        if jobs:
            _, late = wait(jobs.values(), timeout=self.budget_s)
            for fut in late:
                fut.cancel()
        out: dict[Any, bytes] = {}
        for k in todo:
            fut = jobs[k]
            if not fut.done() or fut.cancelled():
                continue
            try:
                blob = parse(st._seal, k, fut.result())
            except Exception:
                blob = None
            if blob is not None:
                out[k] = blob
        return out


def listed(st: Any, listing: Iterable, known: set) -> tuple[list, int]:
    """The objects of a listing that are this namespace's blocks and could be served (sized as
    a header, a payload and at most MAX_TRAILER), newest first; and how many names were not ours
    (another secret's, or an old kvbm's: left alone). Stale temporary files of file:// go."""
    sink = Listing(st, known)
    for info in listing:
        sink.add(info)
    found, foreign, _ = sink.result()
    return found, foreign


class Listing:
    """What recover() keeps of a listing, fed one entry at a time as pages arrive (so a prefix
    stuffed with other objects costs neither memory nor an unbounded wait):

        Listing(storage, known, limit=None, deadline=None)
          .add(info) -> bool       True once the deadline (time.monotonic()) has passed: stop listing
          .result() -> ([(key, path, size)] newest first, foreign names, complete)

    At most `limit` candidates are kept (the newest by mtime: a heap), whatever the listing holds.
    """

    def __init__(self, st: Any, known: set, limit: int | None = None, deadline: float | None = None) -> None:
        self.st, self.known, self.limit, self.deadline = st, known, limit, deadline
        self.base = HEADER_MIN + st.block_nbytes
        self.now = time.time()
        self.heap: list[tuple] = []  # (mtime, name, key, path, size), oldest on top
        self.foreign = 0
        self.seen = 0
        self.complete = True
        self.overflowed = False

    def add(self, info: dict) -> bool:
        self.seen += 1
        self._add(info)
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.complete = False
            return True
        return False

    def _add(self, info: dict) -> None:
        item = classify(self.st, info, self.known, self.now, self.base)
        if item is FOREIGN:
            self.foreign += 1
        elif item is not None:
            if self.limit is None or len(self.heap) < self.limit:
                heapq.heappush(self.heap, item)
                return
            self.overflowed = True  # more of ours than free handles: the oldest stay out
            if self.limit > 0 and item > self.heap[0]:
                heapq.heapreplace(self.heap, item)  # newer than the oldest kept: it goes

    @property
    def oldest_kept(self) -> float | None:
        """The mtime of the oldest object kept, once the listing held more of ours than `limit`."""
        return self.heap[0][0] if self.overflowed and self.heap else None

    def result(self) -> tuple[list, int, bool]:
        found = sorted(self.heap, reverse=True)
        return [(key, path, size) for _, _, key, path, size in found], self.foreign, self.complete


FOREIGN = object()


def classify(st: Any, info: dict, known: set | dict, now: float, base: int) -> Any:
    """One listing entry: (mtime, name, key, path, size) for an object of ours that could be
    served, FOREIGN for a name that is not ours, None for anything else (known, not a file,
    sized wrong, a temporary file: file://'s stale ones are deleted here)."""
    path = info["name"].rstrip("/")
    name = path.rsplit("/", 1)[-1]
    if info.get("type") != "file" or path in known:
        return None
    if name.startswith(TMP_PREFIX):
        if st._local and now - _mtime(info) > STALE_TMP_S:
            try:  # on a worker (bounded, not waited for): a hung mount never holds the listing
                st._submit("delete", path)
            except Exception:
                pass
        return None
    key = st._seal.key_of(name)
    if key is None or bytes.fromhex(name).hex() != name:
        # not ours; or another spelling of one of our names (upper case, spaces: the same bytes
        # to fromhex), i.e. a copy a bucket writer made: taken as ours it would be a second
        # object of one key, and the manager frees (deletes) one of the two, maybe ours
        return FOREIGN
    size = info.get("size")
    if size is not None and not base <= size <= base + MAX_TRAILER:
        return None  # torn or foreign: it could never be served
    return (_mtime(info), name, key, path, size)


def _mtime(info: dict[str, Any]) -> float:
    for field in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(field)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return 0.0
