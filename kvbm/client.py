"""Client of the node's cache daemon (`kvbm serve`), usable where an in-process BlockManager is.

    Client(address, model=, layout=, salt=, token=)   hello: a session bound to one namespace
    lookup(keys) -> (n, where)                          longest ready prefix, tier per block
    store(keys, source=[buffers], parent=, position=) -> stored count
    load(keys, destination=[buffers]) -> loaded count   the usable prefix
    prepare_store / commit_store, prepare_load / release_load    the zero-copy halves
    pin / unpin / events / stats / close

Block bytes go through the daemon's G2 pool, a shared-memory file mapped here: a store writes
reserved slots then commits; a load reads pinned slots then releases. The socket carries keys
and slot numbers only. A background thread heartbeats so the daemon keeps this client's lease;
if this process dies, the daemon releases its pins when the lease runs out.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import threading
import time
from typing import Any, Sequence

import numpy as np

try:
    import zmq
except ImportError as exc:  # the daemon extra
    raise ImportError("kvbm.client needs pyzmq and msgpack: pip install 'kvbm-tiered[daemon]'") from exc

from .blocks import KVLayout
from .daemon.events import topic_of
from .daemon.leases import namespace_of
from .daemon.protocol import RemoteError, pack, request, unpack

__all__ = ["Client", "RemoteError", "StoreReservation", "LoadPins"]


@dataclasses.dataclass
class StoreReservation:
    handle: int
    slots: list  # per key: a G2 slot to write, or -1 (already stored, nothing to write)
    views: list  # per key: a writable view of its slot, or None
    rejected: str | None = None


@dataclasses.dataclass
class LoadPins:
    handle: int
    views: list  # the pinned prefix, read-only views of G2 slots


class Client:
    def __init__(self, address: str = "tcp://127.0.0.1:5557", *, model: str, layout: KVLayout | dict,
                 salt: str = "", token: str | None = None, timeout: float = 10.0,
                 heartbeat: bool = True) -> None:
        self.address = address
        self.token = token if token is not None else os.environ.get("KVBM_DAEMON__TOKEN", "")
        self.timeout = timeout
        self._ctx = zmq.Context()
        self._sock = self._socket()
        self._lock = threading.Lock()
        self._next = 1
        self.session: bytes | None = None
        lay = dataclasses.asdict(layout) if isinstance(layout, KVLayout) else dict(layout)
        # the namespace's topic on the daemon's KV-event stream
        self.topic = topic_of(namespace_of(model, KVLayout(**lay).fingerprint, salt))
        reply = self.call("hello", model=model, layout=lay, salt=salt)
        self.session = reply["session"]
        self.block_nbytes = reply["block_nbytes"]
        self.stride = reply["stride"]
        self.max_keys = reply["max_keys"]
        self.lease_s = reply["lease_s"]
        # Per request at most half of G2: a store or load must fit beside other clients' pins.
        self.batch = max(1, min(self.max_keys, reply["capacity"] // 2, reply["max_session_blocks"] or 2**31))
        self._pool, self._map = _map_pool(reply["shm_path"], reply["shm_bytes"])
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        if heartbeat:
            self._beat = threading.Thread(target=self._heartbeat, name="kvbm-heartbeat", daemon=True)
            self._beat.start()

    # ---------------------------------------------------------------- wire

    def _socket(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.address)
        return sock

    def call(self, op: str, **fields: Any) -> dict:
        """One request, one reply; RemoteError on an error reply, TimeoutError if none comes."""
        with self._lock:
            rid = self._next
            self._next += 1
            self._sock.send(request(op, rid, self.token, self.session, **fields))
            deadline = time.monotonic() + self.timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not self._sock.poll(int(left * 1000) + 1):
                    # a fresh socket, so a late reply cannot be taken for the next request's
                    self._sock.close(0)
                    self._sock = self._socket()
                    raise TimeoutError(f"kvbm daemon at {self.address} did not answer {op} in {self.timeout}s")
                reply = unpack(self._sock.recv(), 1 << 22)
                if reply.get("id") == rid:
                    break
        if not reply.get("ok"):
            raise RemoteError(str(reply.get("error")), str(reply.get("message")))
        return reply

    def _heartbeat(self) -> None:
        period = max(0.05, self.lease_s / 4)
        sock = self._socket()  # its own socket: zmq sockets are not shared across threads
        try:
            while not self._stop.wait(period):
                msg = {"op": "heartbeat", "id": 0, "session": self.session}
                if self.token:
                    msg["auth"] = self.token
                try:
                    sock.send(pack(msg), zmq.NOBLOCK)
                    while sock.poll(0):
                        sock.recv()
                except zmq.ZMQError:
                    pass
        finally:
            sock.close(0)

    # ---------------------------------------------------------------- views

    def view(self, slot: int) -> np.ndarray:
        off = slot * self.stride
        return self._pool[off:off + self.block_nbytes]

    # ---------------------------------------------------------------- blocks

    def lookup(self, keys: Sequence[bytes], remote: bool = True) -> tuple[int, list[str]]:
        r = self.call("lookup", keys=list(keys), remote=remote)
        return r["n"], r["where"]

    def prepare_store(self, keys: Sequence[bytes], parent: bytes | None = None, position: int = 0,
                      hints: Sequence[Any] | None = None) -> StoreReservation:
        """Reserve G2 slots; `hints` (one kvbm Hints per key, or None) carry TensorRT-LLM
        retention priorities and durations to the daemon's `priority` policy."""
        extra = {} if hints is None else {"priorities": [[h.priority, h.duration] for h in hints]}
        r = self.call("store_prepare", keys=list(keys), parent=parent, position=position, **extra)
        slots = r["slots"]
        return StoreReservation(r["handle"], slots, [self.view(s) if s >= 0 else None for s in slots],
                                r.get("rejected"))

    def commit_store(self, res: StoreReservation, failed: Sequence[int] = ()) -> int:
        if not res.handle:
            return 0
        return self.call("store_commit", handle=res.handle, failed=list(failed))["stored"]

    def store(self, keys: Sequence[bytes], source: Sequence[Any], parent: bytes | None = None,
              position: int = 0, hints: Sequence[Any] | None = None) -> int:
        """Write each new block's bytes into its reserved G2 slot, then commit; blocks stored.

        Long runs go in batches (each batch all or nothing); a rejected batch ends the store.
        """
        if len(source) != len(keys):
            raise ValueError(f"store: {len(source)} buffers for {len(keys)} keys")
        stored = 0
        for i in range(0, len(keys), self.batch):
            part = keys[i:i + self.batch]
            n, rejected = self._store(part, source[i:i + self.batch], keys[i - 1] if i else parent, position + i,
                                      None if hints is None else hints[i:i + self.batch])
            stored += n
            if rejected:
                break
        return stored

    def _store(self, keys: Sequence[bytes], source: Sequence[Any], parent: bytes | None,
               position: int, hints: Sequence[Any] | None = None) -> tuple[int, str | None]:
        res = self.prepare_store(keys, parent, position, hints)
        failed = []
        try:
            for i, v in enumerate(res.views):
                if v is not None:
                    v[:] = _bytes(source[i], self.block_nbytes)
        except BaseException:
            failed = [i for i, v in enumerate(res.views) if v is not None]
            self.commit_store(res, failed)
            raise
        return self.commit_store(res), res.rejected

    def prepare_load(self, keys: Sequence[bytes]) -> LoadPins:
        r = self.call("load_prepare", keys=list(keys))
        views = [self.view(s) for s in r["slots"]]
        for v in views:
            v.flags.writeable = False
        return LoadPins(r["handle"], views)

    def release_load(self, pins: LoadPins) -> None:
        if pins.handle:
            self.call("load_release", handle=pins.handle)

    def load(self, keys: Sequence[bytes], destination: Sequence[Any]) -> int:
        """Copy the ready prefix of keys into destination buffers; returns its length."""
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
            for v, dst in zip(pins.views, destination):
                _bytes(dst, self.block_nbytes)[:] = v
        finally:
            self.release_load(pins)
        return len(pins.views)

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
            try:
                self.call("bye")
            except (RemoteError, TimeoutError, zmq.ZMQError):
                pass
            self.session = None
        self._pool = np.empty(0, dtype=np.uint8)
        try:
            self._map.close()
        except BufferError:  # a caller still holds a view; the GC unmaps it
            pass
        self._sock.close(0)
        self._ctx.term()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _map_pool(path: str, nbytes: int) -> tuple[np.ndarray, mmap.mmap]:
    fd = os.open(path, os.O_RDWR)
    try:
        m = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED)
    finally:
        os.close(fd)
    return np.frombuffer(m, dtype=np.uint8), m


def _bytes(buf: Any, nbytes: int) -> np.ndarray:
    if isinstance(buf, np.ndarray):
        arr = buf.reshape(-1).view(np.uint8)
    elif hasattr(buf, "numpy"):  # a CPU torch tensor
        arr = buf.reshape(-1).view(__import__("torch").uint8).numpy()
    else:
        arr = np.frombuffer(memoryview(buf).cast("B"), dtype=np.uint8)
    if arr.nbytes != nbytes:
        raise ValueError(f"a block buffer must be {nbytes} bytes, got {arr.nbytes}")
    return arr
