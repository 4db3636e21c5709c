"""G4 object storage: one object per block on any fsspec URL, bounded, checksummed, concurrent.

    ObjectStorage(capacity_blocks, block_nbytes, namespace=, url=, max_concurrency=, ...)
    allocate() -> handle         an int below capacity_blocks, or None: capacity is a hard bound
    free(handle)                 the handle comes back at once; the object is deleted in the background
    write([(key, handle, buf)])  put objects concurrently -> per block True/False (never raises)
    read([(key, handle, buf)])   get, verify header + length + CRC-32C + MAC, copy into buf
    recover() -> [(key, handle)] the newest objects under <url>/<namespace>/, oldest first (the
                                 listing streams into a bounded heap, stopped after LIST_BUDGET_S;
                                 cut short, it goes on in the background: object_resume.py)
    found_waiting / take_found(n) objects of ours that background listing found, for the manager
                                 (BlockManager.adopt_found) to adopt
    meta_of / kept_meta()        an opaque blob per block in the object's sealed trailer (object_meta.py)

An object is `<url>/<namespace>/<Seal.name(key)>`: a 64-byte header and then the payload. The
name is the key sealed under the deployment secret (seal.py: `secret` / `secret_file`, else a
per-user file made on first use), and the MAC covers the namespace, the key, the payload and
the header. So another deployment sharing the bucket (another secret) can neither find nor
overwrite our objects, and an object it wrote, forged with a valid header and CRC-32C, or
renamed, is a counted miss (`errors.foreign_objects`, within `checksum_errors`), never
served. Headers (little-endian; the payload always starts 64 bytes in):

    v3 (written when `cryptography` is installed)  magic "KVB4", 3, 16, CRC-32C, block_nbytes |
        16-byte random nonce | 12 zero bytes | Poly1305 tag under Seal.one_time_key(key,
        fields, nonce), over payload + header bytes 0-47
    v2 (written without it; still read)            magic, 2, 32, CRC-32C, block_nbytes |
        HMAC-SHA256 over namespace, key, payload, fields | zero padding
    v1 (kvbm before the MAC)                       never looked up: misses

After the payload an object may carry a trailer: the block's blob (meta_of), sealed to its key
(object_meta.py); read with the object, checked (another one makes the get a miss), not served.

A v3 put CRCs its block first (the CRC keys the tag), then tags it beside the copy; a get
checks the tag (v2: CRC and MAC) in one pass, chunk by chunk, beside the copy (on s3fs once
the payload has streamed into the buffer; a v3 get computes the CRC only when the tag fails,
to count the object as damaged or foreign; a tag
that holds vouches for the header's CRC and the payload together), so a read that fails
verification may have filled part of its buffer: False means use none of it (the manager
frees that slot; as with G3, the caller never sees the bytes).

`file://` objects are created 0600 and the folders kvbm makes 0700, whatever the umask.

Async filesystems (s3fs, gcsfs, ...) run each put/get as a coroutine on fsspec's IO loop
under a semaphore of max_concurrency, each cancelled after `timeout` seconds (botocore's
read timeout does not end a PUT that an endpoint accepted and never answers; this bound
always holds). CRCs and MACs are computed and checked in the calling thread, so the IO loop
only moves bytes: from s3fs straight into the caller's buffer, chunk by chunk as they arrive
(object_s3.get_into; other async filesystems hand over the whole object, copied after).
`file://` uses worker threads (object_pool.py) that seal each put as they write it from the
caller's buffer, and read each get a chunk at a time into their own buffer, verify it there (in
cache; hashlib releases the GIL, so blocks verify in parallel) and copy it into the caller's.
Other synchronous filesystems (memory://, sftp, ...) run on the same workers, but the caller
seals each body (a copy) before the put and verifies and copies each get after it. On every
synchronous filesystem, file:// included (an NFS mount that hangs, a FIFO where an object was), a
call is given up once it ran `timeout` seconds, or waited that long in the queue while no worker
finished anything (a slow disk moving a large batch is not a hang: ObjectPool.overdue). A call
given up is a counted miss (a get's block is kept: unavailable()), a failed put, and the store
is taken as down for retry_after; it holds its worker until it returns (at most max_concurrency
threads, whatever the hangs), its object takes no second call meanwhile (one hung file costs one
thread, not all of them), and it never touches the caller's buffer again: file:// copies into
it, and renames a put's object into place, only under a Claim the caller gives up first. Each
file:// put reads the caller's buffer until it commits; a put given up after that still lands
(its block's own bytes: an object no handle names, deleted as surplus or adopted after a
restart). Listings (recover(), the background one) and the folder's creation at start run in
helper threads too, each waited for at most its own deadline; close() waits `timeout` in all.
`file://`, the embedded default, writes a temporary name and renames it: a reader or a
restart sees the whole object or none of it.

The MAC is the price of a shared bucket: HMAC-SHA256 (v2) runs ~1.4 GB/s per core (SHA-NI) on
a 16 MiB block, against ~7 GB/s for the copy and ~12 GB/s for the CRC-32C here, so it bounded
one thread's G4 throughput; Poly1305 (v3) runs ~5 GB/s. Puts and gets of a batch run on
max_concurrency threads.

`s3://` gets small timeouts by default (object_s3.S3_CONFIG, under the user's config_kwargs;
`retries` in storage_options sets s3fs's own loop). A connection failure marks the endpoint
down for `retry_after` seconds: meanwhile every put/get fails at once, a counted miss,
instead of each waiting out its own timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, as_completed, wait
from typing import Any

import numpy as np

from .. import ops
from .base import Region, Storage, make_private_dir
from . import object_meta
from .object_meta import MAX_TRAILER, STALE_TMP_S, TMP_PREFIX, Listing, Trailers, listed, parse, trailer  # noqa: F401
from .object_pool import ObjectPool
from .object_resume import Resume, entries
from .object_s3 import S3_RETRIES, SINGLE_PUT_BYTES, PutBody, get_into, streams, unreachable, with_defaults
from .seal import (  # noqa: F401  (the header's names are re-exported: tests and tools use them)
    HEADER, HEADER_MIN, HMAC_VERSION, MAC_LEN, MAGIC, NONCE_AT, NONCE_BYTES, VERSION, Corrupt, Foreign,
    Seal, _Check, _SealV2, _SealV3, _warn_no_poly1305, object_secret, poly1305_available)

log = logging.getLogger("kvbm.tiers")
CHUNK = 1 << 20  # CRC and MAC run over a chunk while it is in cache from the copy

def default_url() -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return "file://" + os.path.join(cache, "kvbm", "g4")


class ObjectStorage(Storage):
    medium = "object"
    persistent = True
    keeps_meta = True
    finds_late = True  # objects of ours may turn up after recover(): BlockManager.adopt_found takes them

    def __init__(self, capacity_blocks: int, block_nbytes: int, *, namespace: str = "default",
                 url: str | None = None, max_concurrency: int = 16,
                 storage_options: dict[str, Any] | None = None, timeout: float = 10.0,
                 retry_after: float = 2.0, secret: str | bytes | None = None,
                 secret_file: str | None = None) -> None:
        super().__init__(capacity_blocks, block_nbytes, namespace=namespace)
        if block_nbytes <= 0:
            raise ValueError("object storage needs a layout: block_nbytes must be > 0")
        if not namespace or "/" in namespace or namespace.startswith("."):
            raise ValueError(f"object storage namespace must be a path-safe name, got {namespace!r}")
        if max_concurrency < 1:
            raise ValueError(f"object storage max_concurrency must be >= 1, got {max_concurrency}")
        import fsspec

        self._seal = Seal(object_secret(secret, secret_file), namespace)
        self._poly = poly1305_available()
        # what puts write: v3 when `cryptography` is here, else v2 (both are read)
        self.write_version = VERSION if self._poly else HMAC_VERSION
        self.url = url or default_url()
        protocol = fsspec.core.split_protocol(self.url)[0] or "file"
        opts = with_defaults(protocol, storage_options or {}, max_concurrency)
        retries = opts.pop("retries", S3_RETRIES) if protocol in ("s3", "s3a") else None
        # our own instance: the timeouts and retries set here must not leak to other users
        opts.setdefault("skip_instance_cache", True)
        self.fs, root = fsspec.core.url_to_fs(self.url, **opts)
        if retries is not None:
            self.fs.retries = retries
        self.prefix = f"{root.rstrip('/')}/{namespace}"
        self.max_concurrency = max_concurrency
        self.timeout = timeout
        self.retry_after = retry_after
        self._async = bool(getattr(self.fs, "async_impl", False))
        self._streams = streams(self.fs)
        self._local = "file" in _protocols(self.fs)
        self._mu = threading.Lock()
        self._free = list(range(capacity_blocks - 1, -1, -1))  # pop() hands out 0 first
        self._names: dict[int, str] = {}  # handle -> object path, once written or recovered
        self._paths: dict[str, int] = {}  # the same, path -> handle
        self._found: dict[str, Any] = {}  # path -> key: found after the start, for the manager to adopt
        # keys whose last read failed because the store was unreachable (timeout, refused, down):
        # their objects are fine as far as anyone knows, so the manager keeps them (unavailable())
        self._unreachable: set = set()
        self._roomy = threading.Condition(self._mu)  # take_found made room in _found
        self._resume: Resume | None = None  # the background listing after a cut-short recover()
        self._deleting: dict[str, Future] = {}  # path -> background delete (free)
        self._down_until = 0.0
        self._hung: dict[str, int] = {}  # path -> calls given up that have not returned (_given_up)
        self._pool: ObjectPool | None = None
        self._sem: asyncio.Semaphore | None = None
        self._bodies: dict[int, list[Any]] = {}  # spare put bodies by size (async fs)
        self._trailers = Trailers(self)  # blobs of recovered objects, read when kept_meta() asks
        self.listing_complete = True  # recover() listed the whole prefix within LIST_BUDGET_S
        if self._local:  # its folder, 0700: on a worker too (a hung mount must not hang the start)
            fut = self._submit("mkdir", self.prefix)
            try:
                fut.result(self.timeout)
            except TimeoutError:
                self._given_up(fut)
                self._note(TimeoutError(f"object store {self.url}: no answer in {self.timeout} s"))
                log.warning("G4 %s: making its folder did not answer in %.1f s (a hung mount?); G4 calls "
                            "are misses until it answers", self.prefix, self.timeout)

    # ------------------------------------------------------------------ handles

    def allocate(self) -> int | None:
        with self._mu:
            return self._free.pop() if self._free else None

    def free(self, slot: int) -> None:
        with self._mu:
            path = self._names.pop(slot, None)
            if path is not None and self._paths.get(path) == slot:
                del self._paths[path]
            self._free.append(slot)
        if path is not None:
            fut = self._submit("delete", path)
            with self._mu:
                self._deleting[path] = fut
            fut.add_done_callback(lambda f, p=path: self._deleted(p, f))

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def path_of(self, key: Any) -> str:
        return f"{self.prefix}/{self._seal.name(key)}"

    def describe(self, slot: int) -> list[Region]:
        path = self._names.get(slot)
        if path is None:
            raise ValueError(f"object slot {slot} holds no block")
        # the payload follows the header inside the object; whoever reads this region directly
        # (NIXL's object backend) skips the CRC and MAC checks that read() makes
        return [Region("object", self.fs.unstrip_protocol(path), HEADER_MIN, self.block_nbytes)]

    # ------------------------------------------------------------------ data

    def write(self, items: Sequence[tuple[Any, int, Any]]) -> list[bool]:
        fn = self.meta_of
        jobs = [(slot, key, self.path_of(key), _bytes(buf, self.block_nbytes),
                 trailer(self._seal, key, fn(key)) if fn is not None else b"") for key, slot, buf in items]
        with self._mu:
            for slot, _, path, _, _ in jobs:
                self._names[slot] = path  # before the put: free() must delete even a failed one
                self._paths[path] = slot
        pending = [f for _, _, p, _, _ in jobs if (f := self._deleting.get(p)) is not None]
        if pending:  # a block freed and stored again: its delete must land before the new put
            wait(pending, timeout=self.timeout)
        if self._local:  # worker threads seal each block as they write it; given up after `timeout`
            # (a claim: a put its caller gave up never renames its object into place)
            return self._collect([self._submit("put", path, key, data, tail) for _, key, path, data, tail in jobs],
                                 bounded=True)
        if not self._async:
            # Another synchronous filesystem (memory://, sftp, ...): its puts are waited for at most
            # `timeout`, so each body is sealed and copied here first: a put still hung when its
            # caller gave up must not read the block's buffer after it was given to another block
            bodies = [b"".join((self._header(key, data), data, tail)) for _, key, _, data, tail in jobs]
            return self._collect([self._submit("put", path, body) for (_, _, path, _, _), body in zip(jobs, bodies)],
                                 bounded=True)
        # Seal each block just before its put is queued (the IO loop only moves bytes): the
        # first puts overlap the later MACs.
        futures = [self._submit("put", path, self._header(key, data), data, tail) for _, key, path, data, tail in jobs]
        return self._collect(futures)

    def read(self, items: Sequence[tuple[Any, int, Any]]) -> list[bool]:
        jobs = [(key, self.path_of(key), _bytes(buf, self.block_nbytes, writable=True))
                for key, _, buf in items]
        keys = [key for key, _, _ in jobs]
        if self._local:  # worker threads read and verify each chunk, then copy it into the buffer
            # under a claim: once the caller gave up (`timeout`), nothing more is copied there
            return self._collect([self._submit("get", path, key, dst) for key, path, dst in jobs], bounded=True,
                                 keys=keys)
        if not self._async:  # another synchronous fs: fetched by a worker, verified and copied here if
            # it came within `timeout` (a get that comes later never touches the buffer)
            futures = [self._submit("get", path) for _, path, _ in jobs]
            return self._collect(futures, lambda i, data: self._unpack(*jobs[i], data), bounded=True, keys=keys)
        if self._streams:  # s3fs: the payload lands in its buffer as it arrives; verified here
            futures = [self._submit("get_into", path, dst) for _, path, dst in jobs]
            return self._collect(futures, lambda i, head: self._verify(*jobs[i], head), keys=keys)
        # the IO loop only fetches; this thread verifies each object as it arrives and copies it
        futures = [self._submit("get", path) for _, path, _ in jobs]
        return self._collect(futures, lambda i, data: self._unpack(*jobs[i], data), keys=keys)

    def unavailable(self, key: Any) -> bool:
        """True (once) when `key`'s last read failed because the store did not answer (a timeout,
        a refused or reset connection, the store taken as down), not because its object is
        missing, foreign or corrupt: the manager then keeps the block (a miss for that load) instead
        of dropping it and deleting an object that is fine. Before, a brief outage deleted every
        block asked for during it."""
        with self._mu:
            if key in self._unreachable:
                self._unreachable.discard(key)
                return True
        return False

    def recover(self) -> list[tuple[Any, int]]:
        """The newest objects of this namespace, up to the free handles; verified when read.
        The listing streams (file://: scandir; s3: page by page) into a bounded heap and stops
        at LIST_BUDGET_S: a prefix stuffed with foreign objects delays a restart by at most that."""
        with self._mu:
            known = set(self._names.values())
            limit = len(self._free)
        sink = Listing(self, known, limit, time.monotonic() + object_meta.LIST_BUDGET_S)
        try:
            self.fs.invalidate_cache(self.prefix)
            self._list_into(sink)
        except FileNotFoundError:
            return []
        except Exception:
            self._count(io_errors=1)
            return []
        found, foreign, complete = sink.result()
        self.listing_complete = complete
        if not complete:
            log.warning("G4 %s: listing stopped after %.0f s (%d names seen, %d not ours); objects not listed "
                        "yet are not recovered", self.prefix, object_meta.LIST_BUDGET_S, sink.seen, foreign)
        out, base = [], HEADER_MIN + self.block_nbytes
        with self._mu:
            self.errors.foreign_objects += foreign
            for key, path, size in found[:len(self._free)]:
                slot = self._free.pop()
                self._names[slot] = path
                self._paths[path] = slot
                out.append((key, slot))
                if size != base:  # a trailer (or, size unknown, maybe one): read if kept_meta() asks
                    self._trailers.found(key, path, size, base)
        out.reverse()  # oldest first: a recency policy fed in this order ranks them right
        self._trailers.pending = dict(reversed(self._trailers.pending.items()))
        cutoff = sink.oldest_kept
        if (not complete or cutoff is not None) and self._resume is None:
            # what this listing left out is listed again in the background (object_resume.py):
            # ours found late are adopted by the manager, the surplus of a full tier deleted
            self._resume = Resume(self, sink.seen, cutoff).start()
        return out

    # ------------------------------------------------------------------ found after the start

    @property
    def found_waiting(self) -> int:
        """Objects of ours the background listing found and no handle names yet."""
        return len(self._found)

    def take_found(self, n: int, held: Callable[[Any], bool] | None = None) -> list[tuple[Any, int]]:
        """Up to n of the objects found after the start, each given a free handle (as recover()
        gives them), oldest found first. One whose key `held` says the tier holds or is writing,
        or whose name a handle took meanwhile, or that is being deleted, is dropped from the queue
        and left alone (its object is the holder's)."""
        out = []
        with self._mu:
            while self._found and len(out) < n and self._free:
                path = next(iter(self._found))
                key = self._found.pop(path)
                if path in self._paths or path in self._deleting or (held is not None and held(key)):
                    continue
                slot = self._free.pop()
                self._names[slot] = path
                self._paths[path] = slot
                out.append((key, slot))
            self._roomy.notify_all()
        return out

    def _unnamed(self, path: str) -> bool:
        """No handle names the object and no delete is removing it."""
        with self._mu:
            return path not in self._paths and path not in self._deleting

    def _exists(self, path: str) -> bool:
        try:  # on a worker, waited for at most `timeout` (a hung mount: not adopted now)
            return bool(self._submit("exists", path).result(self.timeout))
        except Exception:  # the endpoint failed: not adopted now (a later restart lists it again)
            return False

    def _offer_found(self, key: Any, path: str) -> bool | None:
        """(Under _mu) queue an object found late: True, or None when a handle names it or it is
        being deleted (nothing to adopt), or False when the queue is full."""
        if path in self._paths or path in self._deleting or path in self._found:
            return None
        if len(self._found) >= max(1, self.capacity_blocks):
            return False
        self._found[path] = key
        return True

    def _delete_unnamed(self, path: str) -> Future | None:
        """Delete an object of ours that no handle names (the surplus a restart found); None,
        deleting nothing, when a handle names it (a store of its key since) or it is going already.
        Registered like free()'s deletes, so a put of the same name waits for it."""
        mark: Future = Future()
        with self._mu:
            if path in self._paths or path in self._deleting:
                return None
            self._deleting[path] = mark
        try:
            fut = self._submit("delete", path)
        except BaseException as exc:
            mark.set_exception(exc)
            self._deleted(path, mark)
            return mark

        def done(f: Future) -> None:
            exc = None if f.cancelled() else f.exception()
            if exc is None:
                mark.set_result(None)
            else:
                mark.set_exception(exc)
            self._deleted(path, mark)

        fut.add_done_callback(done)
        return mark

    def _list_into(self, sink: Listing) -> None:
        """Feed the prefix's entries to `sink` until it says stop (its deadline)."""
        if self._async and hasattr(self.fs, "_iterdir"):  # s3fs: one page (1,000 names) at a time
            from fsspec.asyn import sync

            try:
                sync(self.fs.loop, self._alist_into, sink)
            except asyncio.TimeoutError:
                sink.complete = False
            return
        # file:// (a directory read entry by entry, never the whole folder in memory) and any other
        # filesystem (one ls): in a helper thread, waited for until the deadline (a hung mount too)
        try:
            for info in entries(self, None, sink.deadline):
                if sink.add(info):
                    return
        except TimeoutError:
            sink.complete = False

    async def _alist_into(self, sink: Listing) -> None:
        bucket, key, _ = self.fs.split_path(self.prefix)

        async def pages() -> None:
            try:
                async for info in self.fs._iterdir(bucket, prefix=key.rstrip("/") + "/"):
                    if sink.add(info):
                        return
            except Exception as exc:  # botocore's ClientError: as ls() says it (no bucket: FileNotFoundError)
                try:
                    from s3fs.errors import translate_boto_error
                except ImportError:
                    raise exc from None
                raise translate_boto_error(exc) from None

        try:
            await asyncio.wait_for(pages(), max(0.001, sink.deadline - time.monotonic()))
        except asyncio.TimeoutError:  # a page that did not come by the deadline
            sink.complete = False

    def kept_meta(self) -> dict[Any, bytes]:
        """{key: blob} of the objects recover() found with a trailer that opens here, oldest
        first: read on the first call (one small read per object), then forgotten."""
        return self._trailers.take()

    def close(self) -> None:
        # one deadline for all of it: calls hung on the store (a dead mount, an endpoint that never
        # answers) are left behind, never waited for longer than `timeout` in all
        end = time.monotonic() + self.timeout
        if self._resume is not None:
            self._resume.stop()
            self._resume.join(self.timeout)  # ends at its next entry; a hung page is abandoned
        pending = list(self._deleting.values())
        if pending:
            wait(pending, timeout=max(0.0, end - time.monotonic()))
        if self._pool is not None:
            self._pool.shutdown(max(0.0, end - time.monotonic()))
            self._pool = None
        self._bodies = {}

    # ------------------------------------------------------------------ one object, synchronous fs

    def _put(self, path: str, body: bytes) -> None:
        self.fs.pipe_file(path, body)

    def _get(self, path: str) -> bytes:
        return self.fs.cat_file(path, start=0, end=HEADER_MIN + self.block_nbytes + MAX_TRAILER + 1)

    def _put_local(self, path: str, key: Any, data: memoryview, tail: bytes, claim: Claim) -> None:
        head, name = path.rsplit("/", 1)
        tmp = f"{head}/{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{name}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        try:
            try:
                fd = os.open(tmp, flags, 0o600)
            except FileNotFoundError:  # the folder was deleted under us (a cleanup): made again, 0700
                make_private_dir(head)
                fd = os.open(tmp, flags, 0o600)
            with open(fd, "wb") as f:
                # each chunk is written, then MAC'd (and for v2 CRC'd) while still in cache;
                # the header, which holds both, goes in last
                f.write(bytes(HEADER_MIN))
                tagger = self._tagger(key, data)
                for at in range(0, len(data), CHUNK):
                    piece = data[at:at + CHUNK]
                    f.write(piece)
                    tagger.update(piece)
                f.write(tail)
                header = tagger.header()  # the last read of `data`: from here on the caller's buffer is free
                if not claim.commit():  # the caller gave up (timeout): its buffer may hold another block
                    raise GivenUp(path)
                f.seek(0)
                f.write(header)
            # A rename that replaces a file makes ext4 (auto_da_alloc) flush the new one at
            # once: 3-4x slower rewrites. Unlinking first skips that; a reader in between
            # sees no object (a miss), never half of one.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            os.rename(tmp, path)  # readers and restarts see the whole object or none of it
        except BaseException:
            _quietly(os.unlink, tmp)
            raise

    def _get_into(self, path: str, key: Any, dst: np.ndarray, claim: Claim) -> None:
        # Each chunk is read into this worker's own buffer, checked there (in cache), and copied
        # into dst under the claim: a read that hangs (a dead mount) and returns after its caller
        # gave up writes into the worker's buffer, never into a block the caller gave to another.
        bounce = _bounce()
        with open(path, "rb") as f:
            head = f.read(HEADER_MIN)
            check = self._checker(path, key, head)
            got = 0
            while got < self.block_nbytes:
                n = f.readinto(bounce[:min(CHUNK, self.block_nbytes - got)])
                if not n:
                    raise Corrupt(f"{path}: short payload")
                piece = bounce[:n]
                check.update(piece)
                claim.deliver(dst, got, piece)
                got += n
            self._tail_ok(path, key, f.read(MAX_TRAILER + 1))
        check.verify(memoryview(dst))

    def _tail(self, path: str, n: int) -> bytes:
        base = HEADER_MIN + self.block_nbytes
        if self._local:
            with open(path, "rb") as f:
                f.seek(base)
                return f.read(n)
        return self.fs.cat_file(path, start=base, end=base + n)

    def _isfile(self, path: str) -> bool:
        return os.path.isfile(path) if self._local else bool(self.fs.exists(path))

    def _delete(self, path: str) -> None:
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------------ one object, async fs

    async def _aput(self, path: str, header: bytes, data: memoryview, tail: bytes = b"") -> None:
        # botocore takes bytes, bytearray or a file, not a view of G2: the object is assembled
        # in a body reused across puts (a fresh 16 MiB buffer per put costs more in page faults
        # than the copy itself). A file (PutBody), because aiohttp sends a file in 256 KiB reads,
        # where a bytes-like body is sliced, joined to the headers and buffered by asyncio's
        # transport whole: three more copies of each object, each into fresh pages (issue 17:
        # 2.5 vs 1.7 s of CPU per GiB). Only the IO loop touches the spares; at most
        # max_concurrency bodies exist, as at most that many puts run.
        size = len(header) + data.nbytes + len(tail)
        spare = self._bodies.get(size)
        if self._streams and size < SINGLE_PUT_BYTES:
            body = spare.pop() if spare else PutBody()
            body.fill(header, data, tail)
        else:  # another async fs, or a multipart upload (its parts are slices of the body)
            body = spare.pop() if spare else bytearray(size)
            body[:len(header)] = header
            body[len(header):len(header) + data.nbytes] = data
            body[len(header) + data.nbytes:] = tail
        await self.fs._pipe_file(path, body)
        # back to the spares only after success: a cancelled put's writer may still hold it
        self._bodies.setdefault(size, []).append(body)

    async def _aget(self, path: str) -> bytes:
        # a range makes it one GET (without one s3fs sends a HEAD first for the size), and bounds
        # it: an object swapped for a huge one costs one block and a trailer (+1: seen too long)
        return await self.fs._cat_file(path, start=0, end=HEADER_MIN + self.block_nbytes + MAX_TRAILER + 1)

    async def _aget_into(self, path: str, dst: np.ndarray) -> bytes:
        return await get_into(self.fs, path, dst, MAX_TRAILER)

    async def _atail(self, path: str, n: int) -> bytes:
        base = HEADER_MIN + self.block_nbytes
        return await self.fs._cat_file(path, start=base, end=base + n)

    async def _aexists(self, path: str) -> bool:
        return bool(await self.fs._exists(path))

    async def _adelete(self, path: str) -> None:
        try:
            await self.fs._rm_file(path)
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------------ verification

    def _header(self, key: Any, data: memoryview) -> bytes:
        tagger = self._tagger(key, data)
        for at in range(0, len(data), CHUNK):
            tagger.update(data[at:at + CHUNK])
        return tagger.header()

    def _tagger(self, key: Any, data: memoryview) -> _SealV2 | _SealV3:
        if self.write_version == VERSION:
            return _SealV3(self._seal, key, data)
        return _SealV2(self._seal.mac(key), len(data))

    def _unpack(self, key: Any, path: str, dst: np.ndarray, data: bytes) -> None:
        view = memoryview(data)
        check = self._checker(path, key, view[:HEADER_MIN])
        if len(view) < HEADER_MIN + self.block_nbytes:
            raise Corrupt(f"{path}: {len(view) - HEADER_MIN} payload bytes, expected {self.block_nbytes}")
        self._tail_ok(path, key, view[HEADER_MIN + self.block_nbytes:])
        end = HEADER_MIN + self.block_nbytes  # (a trailer follows: never part of a chunk)
        for at in range(0, self.block_nbytes, CHUNK):  # verify and copy chunk by chunk: one pass
            piece = view[HEADER_MIN + at:min(end, HEADER_MIN + at + CHUNK)]
            check.update(piece)
            dst[at:at + len(piece)] = np.frombuffer(piece, dtype=np.uint8)
        check.verify(view[HEADER_MIN:HEADER_MIN + self.block_nbytes])

    def _verify(self, key: Any, path: str, dst: np.ndarray, head: bytes) -> None:
        """The payload already in dst (get_into): its MAC (v2: and CRC) against the header."""
        check, view = self._checker(path, key, head[:HEADER_MIN]), memoryview(dst)
        for at in range(0, self.block_nbytes, CHUNK):
            check.update(view[at:at + CHUNK])
        check.verify(view)
        self._tail_ok(path, key, head[HEADER_MIN:])

    def _tail_ok(self, path: str, key: Any, tail: bytes | memoryview) -> None:
        """Bytes past the payload: none, or this block's own sealed trailer (object_meta.py)."""
        if len(tail) and (len(tail) > MAX_TRAILER or parse(self._seal, key, bytes(tail)) is None):
            raise Corrupt(f"{path}: longer than one block, and not by this block's trailer")

    def _checker(self, path: str, key: Any, head: bytes | memoryview) -> _Check:
        """Raises Corrupt unless the header is a kvbm object of this layout (v2 or v3); else
        what checks its payload, fed chunk by chunk, then verify()."""
        if len(head) != HEADER_MIN:
            raise Corrupt(f"{path}: short header")
        head = bytes(head)
        magic, version, mac_len, _, nbytes = HEADER.unpack_from(head)
        if magic != MAGIC or version not in MAC_LEN or mac_len != MAC_LEN[version]:
            raise Corrupt(f"{path}: not a kvbm object (magic {bytes(magic)!r}, version {version})")
        if nbytes != self.block_nbytes:
            raise Corrupt(f"{path}: the header names another layout ({nbytes}-byte blocks)")
        if version == HMAC_VERSION:
            return _Check(path, head, self._seal.mac(key))
        if not self._poly:
            _warn_no_poly1305()
            raise Corrupt(f"{path}: a v3 (Poly1305) object and `cryptography` is not installed")
        return _Check(path, head, self._seal.one_time_mac(key, head[:NONCE_AT], head[NONCE_AT:NONCE_AT + NONCE_BYTES]))

    # ------------------------------------------------------------------ running jobs

    def _submit(self, op: str, *args: Any) -> Future:
        if self._async:
            coro = {"put": self._aput, "get": self._aget, "delete": self._adelete,
                    "get_into": self._aget_into, "tail": self._atail, "exists": self._aexists}[op]
            return asyncio.run_coroutine_threadsafe(self._bounded(coro, *args), self.fs.loop)
        fn = {"put": self._put_local if self._local else self._put,
              "get": self._get_into if self._local else self._get, "delete": self._delete, "tail": self._tail,
              "exists": self._isfile, "mkdir": make_private_dir}[op]
        path = args[0]
        with self._mu:
            if path in self._hung:  # a call on this object is still hung: no second one (one thread)
                fut: Future = Future()
                fut.set_exception(Hung(f"object store {self.url}: a call on {path} is still hung"))
                return fut
            if self._pool is None:
                self._pool = ObjectPool(self.max_concurrency, "kvbm-g4")
        claim = Claim() if self._local and op in ("put", "get") else None
        fut = self._pool.submit(self._guarded, fn, *args, *((claim,) if claim is not None else ()))
        fut.path, fut.claim = path, claim  # type: ignore[attr-defined]  (for _given_up)
        return fut

    def _collect(self, futures: list[Future], finish: Callable[[int, Any], None] | None = None,
                 bounded: bool = False, keys: Sequence[Any] | None = None) -> list[bool]:
        """Per job True when it (and `finish` on its result) succeeded; failures are counted.
        `bounded`: jobs of a synchronous filesystem that ran for `timeout`, or waited that long in
        the queue while no worker finished anything (ObjectPool.overdue), are given up (a counted
        miss; the endpoint is then taken as down for retry_after): a thread cannot be cancelled, so
        the hung call keeps its worker, its object takes no second call until it returns
        (_given_up), and what it returns later is dropped."""
        index = {f: i for i, f in enumerate(futures)}
        ok = [False] * len(futures)
        io = bad = foreign = 0
        away: list[int] = []  # jobs the store did not answer (reads: kept, see unavailable())
        if bounded and futures:
            late = self._overdue(futures)
            if late:
                for fut in late:
                    self._given_up(fut)
                    away.append(index.pop(fut))
                io += len(late)
                self._note(TimeoutError(f"object store {self.url}: no answer in {self.timeout} s"))
        for fut in as_completed(index):  # every job carries its own timeout, so this ends
            i = index[fut]
            try:
                result = fut.result()
                if finish is not None:
                    finish(i, result)
                ok[i] = True
            except Foreign:
                bad += 1
                foreign += 1
            except Corrupt:
                bad += 1
            except Exception as exc:
                io += 1
                if unreachable(exc):
                    away.append(i)
        if away and keys is not None:
            with self._mu:
                if len(self._unreachable) > 65536:  # keys no load asked about again: a bound
                    self._unreachable.clear()
                self._unreachable.update(keys[i] for i in away)
        if io or bad:
            self._count(io_errors=io, checksum_errors=bad, foreign_objects=foreign)
        return ok

    def _overdue(self, futures: list[Future]) -> list[Future]:
        """Wait for the jobs; -> those to give up (ObjectPool.overdue), at most `timeout` after the
        last job that made progress."""
        pending, late = set(futures), []
        tick = min(1.0, max(0.05, self.timeout / 8))
        while pending:
            _, pending = wait(pending, timeout=tick, return_when=FIRST_COMPLETED)
            pool = self._pool
            if pending and pool is None:  # closed meanwhile: queued ones were cancelled, running ones left
                return late + list(pending)
            if pending:
                now = time.monotonic()
                over = [f for f in pending if pool.overdue(f, now, self.timeout)]
                pending.difference_update(over)
                late += over
        return late

    def _given_up(self, fut: Future) -> None:
        """A job its caller stopped waiting for: cancelled if queued; if running, its claim is
        given up (file:// touches the caller's buffer no more, never renames into place) and its
        object marked hung until the call returns (another call on it fails at once)."""
        if fut.cancel():
            return
        claim = getattr(fut, "claim", None)
        if claim is not None:
            claim.give_up()
        path = getattr(fut, "path", None)
        if path is None:
            return
        with self._mu:
            self._hung[path] = self._hung.get(path, 0) + 1

        def returned(_: Future, p: str = path) -> None:
            with self._mu:
                left = self._hung.pop(p, 1) - 1
                if left > 0:
                    self._hung[p] = left

        fut.add_done_callback(returned)

    async def _bounded(self, coro: Callable, *args: Any) -> Any:
        if self._sem is None:  # created on the IO loop, the only place it is used
            self._sem = asyncio.Semaphore(self.max_concurrency)
        async with self._sem:
            self._raise_if_down()
            try:
                return await asyncio.wait_for(coro(*args), self.timeout)
            except Exception as exc:
                self._note(exc)
                raise

    def _guarded(self, fn: Callable, *args: Any) -> Any:
        self._raise_if_down()
        try:
            return fn(*args)
        except Exception as exc:
            self._note(exc)
            raise

    def _raise_if_down(self) -> None:
        if time.monotonic() < self._down_until:
            raise ConnectionError(f"object store {self.url} is down; retrying after {self.retry_after} s")

    def _note(self, exc: Exception) -> None:
        if self.retry_after > 0 and unreachable(exc) and not isinstance(exc, Hung):
            self._down_until = time.monotonic() + self.retry_after

    def _deleted(self, path: str, fut: Future) -> None:
        with self._mu:
            if self._deleting.get(path) is fut:
                del self._deleting[path]
        if not fut.cancelled() and fut.exception() is not None:
            self._count(io_errors=1)

    def _count(self, io_errors: int = 0, checksum_errors: int = 0, foreign_objects: int = 0) -> None:
        with self._mu:
            self.errors.io_errors += io_errors
            self.errors.checksum_errors += checksum_errors
            self.errors.foreign_objects += foreign_objects


def _bytes(buf: Any, nbytes: int, writable: bool = False) -> Any:
    """A block buffer as flat bytes without a copy (memoryview to write, uint8 array to fill)."""
    if isinstance(buf, np.ndarray):
        arr = buf.reshape(-1).view(np.uint8) if buf.flags.c_contiguous else None
    else:
        arr = np.frombuffer(memoryview(buf).cast("B"), dtype=np.uint8)
    if arr is None or arr.nbytes != nbytes or (writable and not arr.flags.writeable):
        need = "a writable" if writable else "a"
        raise ValueError(f"object storage: a block needs {need} contiguous {nbytes}-byte buffer")
    return arr if writable else memoryview(arr)


def _quietly(fn: Callable, *args: Any) -> None:
    try:
        fn(*args)
    except Exception:
        pass


def _protocols(fs: Any) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


class Hung(TimeoutError):
    """A call on an object whose previous call was given up and has not returned: failed at once
    (a miss; the block is kept), without taking the whole store as down."""


class GivenUp(Exception):
    """The worker of a file:// call whose caller gave up: it stops before touching the caller's
    buffer (get) or putting its object into place (put)."""


class Claim:
    """The caller's buffer, shared with the worker of one file:// put or get until the caller gives
    up (timeout). The worker copies into the buffer (deliver) and a put renames its object into place
    (after commit) only while the caller still waits; give_up() waits at most for one chunk's copy."""

    __slots__ = ("_lock", "_given_up", "_committed")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._given_up = self._committed = False

    def deliver(self, dst: np.ndarray, at: int, piece: memoryview) -> None:
        with self._lock:
            if self._given_up:
                raise GivenUp("the caller gave up")
            dst[at:at + len(piece)] = np.frombuffer(piece, dtype=np.uint8)

    def commit(self) -> bool:
        """A put: True (and the caller can no longer take its buffer back) unless it gave up."""
        with self._lock:
            self._committed = not self._given_up
            return self._committed

    def give_up(self) -> None:
        with self._lock:
            self._given_up = True


_local_buffers = threading.local()


def _bounce() -> memoryview:
    """This worker thread's CHUNK-byte read buffer (made once per thread)."""
    buf = getattr(_local_buffers, "buf", None)
    if buf is None:
        buf = _local_buffers.buf = memoryview(np.empty(CHUNK, dtype=np.uint8)).cast("B")
    return buf
