"""Client of the node's cache daemon (`kvbm serve`), usable where an in-process BlockManager is.

    Client(address, model=, layout=, salt=, token=)   hello: a session bound to one namespace (of
                                                        the token's tenant: daemon/tenants.py)
    lookup(keys) -> (n, where)                          longest ready prefix, tier per block
    lookup_pin(keys, pin_from) -> (n, where, pinned)    the same, and keys[pin_from:n] pinned (one trip)
    store(keys, source=[buffers], parent=, position=) -> stored count
    load(keys, destination=[buffers]) -> loaded count   the usable prefix
    prepare_store / commit_store, prepare_load / release_load    the zero-copy halves
    pin / unpin / events / stats / close

Block bytes go through this session's staging window, a shared-memory file the daemon made for
this client alone and that is unlinked once mapped (the daemon's G2 pool is never mapped here):
a store writes window slots then commits (the daemon copies them into G2); a load reads window
slots the daemon filled, then releases them. The socket carries keys and slot numbers only.
A background thread heartbeats so the daemon keeps this client's lease; if this process dies,
the daemon releases what it held when the lease runs out.

Recovery: when the daemon answers `no_session` (it restarted, or closed an idle session), the
client says hello again and retries the request once, transparently; a store or load whose
reservation died with the old session counts as not done (0), never as an error. A request
that times out is cancelled (the daemon undoes it when the cancel or the request arrives),
and the ones that finish something (commit, release) are retried once under the same request
id, which the daemon answers from its reply cache if it already did them.

    client.py          Client: session (hello, window), block ops, one-shot and pipelined batches
    client_wire.py     Wire, Client's base: the request socket, ids, timeouts, cancels, heartbeat
    client_window.py   mapping the window; rows and buffers of block bytes
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import threading
from typing import Any, Sequence

import numpy as np

from . import ops
from .blocks import KVLayout
from .client_window import _bytes, _map_window, _rows, _unmap  # noqa: F401 (tests import _rows from here)
from .client_wire import _CANCELLED_ON_TIMEOUT, _RETRIED_ON_TIMEOUT, _SESSION_BOUND, Wire, zmq  # noqa: F401
from .daemon.events import topic_of
from .daemon.leases import namespace_of
from .daemon.protocol import RemoteError, request
from .daemon.transport import check_client_address, default_address

# A store refused for now (quota, a full window, too many of this client's or tenant's requests
# waiting for room: `busy`) is not stored, never an error for the engine
_NOT_NOW = ("quota", "window_full", "busy")

__all__ = ["Client", "RemoteError", "QuotaRefused", "StoreReservation", "LoadPins"]


class QuotaRefused(RemoteError):
    """lookup_pin's pins refused by the daemon's quota; the lookup's answer is in n and where."""

    def __init__(self, message: str, n: int, where: list) -> None:
        super().__init__("quota", message)
        self.n, self.where = n, where


@dataclasses.dataclass
class StoreReservation:
    handle: int
    slots: list  # per key: a G2 slot to write, or -1 (already stored, nothing to write)
    views: list  # per key: a writable view of its window slot, or None
    rejected: str | None = None
    session: bytes | None = None


@dataclasses.dataclass
class LoadPins:
    handle: int
    views: list  # the loaded prefix, read-only views of window slots
    session: bytes | None = None
    slots: list = dataclasses.field(default_factory=list)  # their window slots


class Client(Wire):
    def __init__(self, address: str | None = None, *, model: str, layout: KVLayout | dict,
                 salt: str = "", token: str | None = None, timeout: float = 10.0,
                 heartbeat: bool = True) -> None:
        self.address = address or default_address()  # the daemon's same-node default socket
        # the socket's folder must be one no other user can swap (transport.check_client_address):
        # else whoever made /tmp/kvbm-<uid> first would read every store and answer every load
        check_client_address(self.address, default=address is None)
        self.token = token if token is not None else os.environ.get("KVBM_DAEMON__TOKEN", "")
        self.timeout = timeout
        lay = dataclasses.asdict(layout) if isinstance(layout, KVLayout) else dict(layout)
        self._hello_fields = {"model": model, "layout": lay, "salt": salt}
        # the namespace's topic on the daemon's KV-event stream (bad fields raise here, before
        # anything is opened); a named tenant's namespace has its name mixed in: hello says its topic
        self.topic = topic_of(namespace_of(model, KVLayout(**lay).fingerprint, salt))
        self.tenant = "default"  # whose token this is, as the daemon says at hello (daemon/tenants.py)
        self._ctx = zmq.Context()
        self._rcvtimeo = -1  # the request socket's receive timeout (ms) as last set
        self._sock = self._socket()
        self._lock = threading.RLock()
        self._next = 1
        self.session: bytes | None = None
        self.rehellos = 0  # sessions reopened after the daemon forgot ours (restart, idle eviction)
        self._stash: dict[int, dict] = {}  # replies to submitted requests that came before their turn
        self._map: mmap.mmap | None = None
        self._stop = threading.Event()
        try:
            self._hello()
        except BaseException:  # refused (token, layout), no daemon: nothing of this client stays open
            self._sock.close(0)  # (a zmq context left to the garbage collector can hang the process in term())
            self._ctx.term()
            raise
        self._beat: threading.Thread | None = None
        if heartbeat:
            self._beat = threading.Thread(target=self._heartbeat, name="kvbm-heartbeat", daemon=True)
            self._beat.start()

    def _hello(self) -> None:
        """Open a session and map its window (the caller holds the lock, or is __init__)."""
        self.session = None
        reply = self._call("hello", self._hello_fields)
        window = _map_window(reply["window_path"], reply["window_bytes"])
        old, self._map = self._map, window[1]
        self._pool = window[0]
        self.session = reply["session"]
        self.topic = reply.get("topic", self.topic)
        self.tenant = reply.get("tenant", self.tenant)
        self.block_nbytes = reply["block_nbytes"]
        self.stride = reply["stride"]
        self.max_keys = reply["max_keys"]
        self.lease_s = reply["lease_s"]
        self.scratch = reply.get("scratch")  # [first slot, count]: this client's, for one-shot ops
        # Per request at most half of G2 (a store or load must fit beside other clients' pins)
        # and at most the window.
        # Half the window: long stores and loads keep two batches in flight (see _pipelined_*).
        self.batch = max(1, min(self.max_keys, reply["capacity"] // 2, reply["window_slots"] // 2,
                                reply.get("share_blocks", 2**32) // 2, (reply["max_session_blocks"] or 2**32) // 2))
        if old is not None:
            _unmap(old)

    # ---------------------------------------------------------------- wire
    # call / _call / _submit / _collect / _send / _heartbeat: Wire (client_wire.py)

    # ---------------------------------------------------------------- views

    def view(self, slot: int) -> np.ndarray:
        off = slot * self.stride
        return self._pool[off:off + self.block_nbytes]

    def _fill(self, slots: Sequence[int], source: Any, rows: Sequence[int]) -> None:
        """Window slots[j] <- source[rows[j]]. Rows of one contiguous 2-D buffer (the
        connector's staging) move in one native copy: one GIL release, where a copy per row
        waited for the GIL once per block beside a busy engine thread (up to 5 ms each)."""
        flat = _rows(source, self.block_nbytes)
        if flat is not None:
            nb = self.block_nbytes
            ops.copy_blocks(flat, [r * nb for r in rows], self._pool, [s * self.stride for s in slots], nb)
            return
        for slot, r in zip(slots, rows):
            self.view(slot)[:] = _bytes(source[r], self.block_nbytes)

    def _drain(self, slots: Sequence[int], destination: Any, rows: Sequence[int]) -> None:
        """destination[rows[j]] <- window slots[j] (as _fill, the other way)."""
        flat = _rows(destination, self.block_nbytes)
        if flat is not None:
            nb = self.block_nbytes
            ops.copy_blocks(self._pool, [s * self.stride for s in slots], flat, [r * nb for r in rows], nb)
            return
        for slot, r in zip(slots, rows):
            _bytes(destination[r], self.block_nbytes)[:] = self.view(slot)

    # ---------------------------------------------------------------- blocks

    def lookup(self, keys: Sequence[bytes], remote: bool = True) -> tuple[int, list[str]]:
        r = self.call("lookup", keys=list(keys), remote=remote)
        return r["n"], r["where"]

    def lookup_pin(self, keys: Sequence[bytes], pin_from: int = 0, remote: bool = True) -> tuple[int, list[str], int | None]:
        """lookup(keys), then pin keys[pin_from:n] in this session, in one round trip:
        (n, where, pinned). pinned is None when the daemon did not pin (the lookup waited on a
        peer): pin them with pin(). RemoteError "quota" when the quota refused the pins (the
        lookup's n is in its `n`); unpin() releases what was pinned, as for pin()."""
        r = self.call("lookup_pin", keys=list(keys), pin_from=pin_from, remote=remote)
        if r.get("quota") is not None:
            raise QuotaRefused(r["quota"], r["n"], list(r["where"]))
        return r["n"], r["where"], r.get("pinned")

    def prepare_store(self, keys: Sequence[bytes], parent: bytes | None = None, position: int = 0,
                      hints: Sequence[Any] | None = None, more: dict | None = None) -> StoreReservation:
        """Reserve G2 slots; `hints` (one kvbm Hints per key, or None) carry TensorRT-LLM
        retention priorities and durations to the daemon's `priority` policy; `more`: further
        fields (the engine hashes of _hash_fields)."""
        extra = {} if hints is None else {"priorities": [[h.priority, h.duration] for h in hints]}
        extra.update(more or {})
        with self._lock:  # the views and the session they belong to, together
            r = self.call("store_prepare", keys=list(keys), parent=parent, position=position, **extra)
            slots = r["slots"]
            return StoreReservation(r["handle"], slots, [self.view(s) if s >= 0 else None for s in slots],
                                    r.get("rejected"), self.session)

    def commit_store(self, res: StoreReservation, failed: Sequence[int] = ()) -> int:
        """Blocks stored; 0 when the reservation died with its session (daemon restarted)."""
        if not res.handle or res.session != self.session:
            return 0
        try:
            return self.call("store_commit", handle=res.handle, failed=list(failed))["stored"]
        except RemoteError as exc:
            if exc.code == "no_session":
                return 0
            raise

    def store(self, keys: Sequence[bytes], source: Sequence[Any], parent: bytes | None = None,
              position: int = 0, hints: Sequence[Any] | None = None, hashes: Sequence[Any] | None = None,
              parent_hash: Any = None) -> int:
        """Write each new block's bytes into its reserved G2 slot, then commit; blocks stored.

        Long runs go in batches (each batch all or nothing); a rejected batch ends the store.
        `hashes`: the engine's block hash per key (and `parent_hash`, the one before keys[0]),
        published on the daemon's vLLM-format KV-event stream (daemon/kv_events.py).
        """
        if len(source) != len(keys):
            raise ValueError(f"store: {len(source)} buffers for {len(keys)} keys")
        if keys and self.scratch and len(keys) <= self.scratch[1]:
            extra = {} if hints is None else {"priorities": [[h.priority, h.duration] for h in hints]}
            extra.update(_hash_fields(hashes, parent_hash, 0, len(keys)))
            done = self._one_shot("store", keys, source, {"parent": parent, "position": position, **extra})
            if done is not None:
                return done
        if len(keys) > self.batch:
            return self._pipelined_store(keys, source, parent, position, hints, hashes, parent_hash)
        stored = 0
        for i in range(0, len(keys), self.batch):
            part = keys[i:i + self.batch]
            n, rejected = self._store(part, source[i:i + self.batch], keys[i - 1] if i else parent, position + i,
                                      None if hints is None else hints[i:i + self.batch],
                                      _hash_fields(hashes, parent_hash, i, self.batch))
            stored += n
            if rejected:
                break
        return stored

    def _store(self, keys: Sequence[bytes], source: Sequence[Any], parent: bytes | None,
               position: int, hints: Sequence[Any] | None = None, more: dict | None = None) -> tuple[int, str | None]:
        try:
            res = self.prepare_store(keys, parent, position, hints, more)
        except RemoteError as exc:
            if exc.code in _NOT_NOW:  # no room for this client now: not stored
                return 0, exc.code
            raise
        want = [i for i, slot in enumerate(res.slots) if slot >= 0]
        try:
            with self._lock:  # the window mapped now is the reservation's (else commit says 0)
                if res.session == self.session:
                    self._fill([res.slots[i] for i in want], source, want)
        except BaseException:
            self.commit_store(res, want)
            raise
        return self.commit_store(res), res.rejected

    def prepare_load(self, keys: Sequence[bytes]) -> LoadPins:
        """Copy the ready prefix into this session's window; a load refused `busy` (too many of
        this tenant's requests wait for G3/G4 blocks) is a miss."""
        with self._lock:
            try:
                r = self.call("load_prepare", keys=list(keys))
            except RemoteError as exc:
                if exc.code != "busy":
                    raise
                return LoadPins(0, [], self.session, [])
            views = [self.view(s) for s in r["slots"]]
            for v in views:
                v.flags.writeable = False
            return LoadPins(r["handle"], views, self.session, list(r["slots"]))

    def release_load(self, pins: LoadPins) -> None:
        if pins.handle and pins.session == self.session:
            try:
                self.call("load_release", handle=pins.handle)
            except RemoteError as exc:
                if exc.code != "no_session":
                    raise

    def _pipelined_store(self, keys: Sequence[bytes], source: Sequence[Any], parent: bytes | None,
                         position: int, hints: Sequence[Any] | None, hashes: Sequence[Any] | None = None,
                         parent_hash: Any = None) -> int:
        """Batches with the next one's prepare sent before this one's commit: the client writes
        batch i+1 into its window while the daemon copies batch i into G2."""
        b = self.batch

        def fields(i: int) -> dict:
            extra = {} if hints is None else {"priorities": [[h.priority, h.duration] for h in hints[i:i + b]]}
            return {"keys": list(keys[i:i + b]), "parent": keys[i - 1] if i else parent, "position": position + i,
                    **extra, **_hash_fields(hashes, parent_hash, i, b)}

        with self._lock:
            try:
                r = self.call("store_prepare", **fields(0))
            except RemoteError as exc:
                if exc.code in _NOT_NOW:
                    return 0
                raise
            commits: list[int] = []
            commits_done: list[dict] = []
            i = 0
            try:
                while True:
                    slots = r["slots"]
                    try:
                        want = [j for j, slot in enumerate(slots) if slot >= 0]
                        self._fill([slots[j] for j in want], source, [i + j for j in want])
                    except BaseException:
                        if r["handle"]:
                            commits.append(self._submit("store_commit", handle=r["handle"],
                                                        failed=[j for j, sl in enumerate(slots) if sl >= 0]))
                        raise
                    more = i + b < len(keys) and not r.get("rejected")
                    nxt = self._submit("store_prepare", **fields(i + b)) if more else None
                    if r["handle"]:
                        commits.append(self._submit("store_commit", handle=r["handle"], failed=[]))
                    if nxt is None:
                        break
                    try:
                        r = self._collect(nxt, "store_prepare")
                    except RemoteError as exc:
                        if exc.code not in _NOT_NOW:
                            if exc.code == "no_session":
                                break
                            raise
                        # two batches do not fit beside what else is held: one at a time then
                        for rid in commits:
                            commits_done.append(self._collect(rid, "store_commit"))
                        commits.clear()
                        try:
                            r = self.call("store_prepare", **fields(i + b))
                        except RemoteError as again:
                            if again.code in _NOT_NOW:
                                break
                            raise
                    i += b
            finally:
                stored = sum(c["stored"] for c in commits_done)
                for rid in commits:
                    try:
                        stored += self._collect(rid, "store_commit")["stored"]
                    except RemoteError as exc:
                        if exc.code != "no_session":
                            raise
            return stored

    def _pipelined_load(self, keys: Sequence[bytes], destination: Sequence[Any]) -> int:
        """Batches with the next one's prepare sent before this one is read: the daemon copies
        batch i+1 into the window while the client copies batch i out."""
        b = self.batch
        with self._lock:
            try:
                r = self.call("load_prepare", keys=list(keys[:b]))
            except RemoteError as exc:
                if exc.code != "busy":  # too many requests waiting for G3/G4: a miss
                    raise
                return 0
            releases: list[int] = []
            loaded = i = 0
            try:
                while True:
                    slots = r["slots"]
                    full = len(slots) == len(keys[i:i + b])
                    nxt = self._submit("load_prepare", keys=list(keys[i + b:i + 2 * b])) if (
                        full and i + b < len(keys)) else None
                    self._drain(slots, destination, range(i, i + len(slots)))
                    if r["handle"]:
                        releases.append(self._submit("load_release", handle=r["handle"]))
                    loaded += len(slots)
                    if nxt is None:
                        break
                    try:
                        r = self._collect(nxt, "load_prepare")
                    except RemoteError as exc:
                        if exc.code in ("no_session", "busy"):
                            break
                        raise
                    i += b
            finally:
                for rid in releases:
                    try:
                        self._collect(rid, "load_release")
                    except RemoteError as exc:
                        if exc.code != "no_session":
                            raise
            return loaded

    def load(self, keys: Sequence[bytes], destination: Sequence[Any]) -> int:
        """Copy the ready prefix of keys into destination buffers; returns its length."""
        if keys and self.scratch and len(keys) <= self.scratch[1]:
            done = self._one_shot("load", keys, destination, {})
            if done is not None:
                return done
        if len(keys) > self.batch:
            return self._pipelined_load(keys, destination)
        loaded = 0
        for i in range(0, len(keys), self.batch):
            n = self._load(keys[i:i + self.batch], destination[i:i + self.batch])
            loaded += n
            if n < len(keys[i:i + self.batch]):
                break
        return loaded

    def _load(self, keys: Sequence[bytes], destination: Sequence[Any]) -> int:
        pins = self.prepare_load(keys)
        try:
            self._drain(pins.slots, destination, range(len(pins.slots)))
        finally:
            self._release_soon(pins)
        return len(pins.views)

    def _release_soon(self, pins: LoadPins) -> None:
        """load_release without waiting for its reply: the daemon takes this socket's requests in
        order, so the slots are free before the next request is handled; the reply is dropped
        when it comes (a release fails only when the session or handle is gone, and then the
        slots are already free). A load then costs one round trip of waiting, not two."""
        with self._lock:
            if pins.handle and pins.session == self.session:
                self._send(request("load_release", self._take_id(), self.token, self.session, handle=pins.handle))

    def _one_shot(self, op: str, keys: Sequence[bytes], buffers: Sequence[Any], fields: dict) -> int | None:
        """store / load in one round trip through this session's scratch slots: the bytes are
        written there before the request (store) or read there after it (load). A session the
        daemon forgot: hello again and redo it once, bytes and all. On a timeout the daemon may
        still copy from or into these slots later, so they are not used again (two-phase ops
        until the next hello). None: no scratch (any more); use the two-phase ops."""
        for attempt in (0, 1):
            with self._lock:
                if not self.scratch:
                    return None
                slots = list(range(self.scratch[0], self.scratch[0] + len(keys)))
                if op == "store":
                    self._fill(slots, buffers, range(len(slots)))
                try:
                    r = self._call(op, {"keys": list(keys), "slots": slots, **fields})
                except RemoteError as exc:
                    if exc.code == "busy":  # too many requests waiting: not stored, or a miss
                        return 0
                    if exc.code != "no_session" or attempt or self._stop.is_set():
                        raise
                    self._hello()
                    self.rehellos += 1
                    continue
                except TimeoutError:
                    self.scratch = None
                    raise
                if op == "store":
                    return r["stored"]
                self._drain(slots[:r["n"]], buffers, range(r["n"]))
                return r["n"]
        return None  # pragma: no cover - the second attempt returns or raises

    def pin(self, keys: Sequence[bytes]) -> int:
        return self.call("pin", keys=list(keys))["n"]

    def unpin(self, keys: Sequence[bytes]) -> int:
        return self.call("unpin", keys=list(keys))["n"]

    def events(self, most: int = 1000) -> list[tuple[str, bytes, str]]:
        """stored / removed / moved events of this namespace since the last call."""
        return [tuple(e) for e in self.call("events", max=most)["events"]]

    def stats(self) -> dict:
        return self.call("stats")["stats"]

    def close(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=2)
        if self.session is not None:
            self.timeout = min(self.timeout, 2.0)  # a daemon that is gone must not hold up the exit
            try:
                self.call("bye")
            except (RemoteError, TimeoutError, zmq.ZMQError):
                pass
            self.session = None
        self._pool = np.empty(0, dtype=np.uint8)
        if self._map is not None:
            _unmap(self._map)
            self._map = None
        self._sock.close(0)
        self._ctx.term()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _hash_fields(hashes: Sequence[Any] | None, parent_hash: Any, i: int, n: int) -> dict:
    """store_prepare's engine-hash fields for keys[i:i + n] (none without hashes)."""
    if hashes is None:
        return {}
    return {"hashes": list(hashes[i:i + n]), "parent_hash": hashes[i - 1] if i else parent_hash}
