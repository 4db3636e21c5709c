"""Daemon: the request loop that owns one BlockManager for the node (`kvbm serve`).

    Daemon(config, daemon_config)   build the manager (G2 in shared memory), bind sockets
    Daemon.run()                    serve until SIGTERM/SIGINT or stop(), then shut down cleanly
    Daemon.shutdown()               roll back reservations, release pins, close storages

One thread owns the manager: requests are handled in order, so the manager's invariants need
no locks. The HTTP metrics thread reads a snapshot only.

Peer pulls run off the request loop. A lookup that misses locally (and may ask peers) is handed
to the puller thread and answered when the pull ends; meanwhile the loop serves everyone else.
The puller does the network work (ask the peer, NIXL READ, verify crc32c) and asks the owner
thread, through a call queue and a wake-up pipe, for every manager step: reserve slots before
the READ, commit or roll back after it. Pulls run one at a time, in order; at most
MAX_PENDING_PULLS wait, beyond that a lookup is answered from local tiers only.

On the serving side a peer_lookup pins the blocks and answers their addresses at once; their
crc32c is computed on a helper thread while the peer READs and goes back with peer_release.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
import zmq

from .. import ops
from ..blocks import KVLayout
from ..config import ConfigError, KVBMConfig
from ..manager import BlockManager
from ..offload import Offloader, offload_headroom
from ..policies.base import Hints
from . import protocol as P
from .config import DaemonConfig
from .leases import Session, Sessions, namespace_of, server_key
from .metrics import Metrics
from .peers import Agent, Peers

log = logging.getLogger("kvbm.daemon")
PEER_NS = b"peer"
MAX_EVENTS = 10_000  # per session, oldest dropped
MAX_PENDING_PULLS = 64  # lookups waiting for the puller; beyond this, local answers only
PULL_CHUNK_BYTES = 64 << 20  # a pull READs in chunks; each landed chunk is checksummed during the next
DEFERRED = object()  # an op's result when the reply is sent later (a lookup waiting for a pull)


class _Pending:
    """A lookup answered when its pull ends."""

    __slots__ = ("envelope", "rid", "skeys", "t0")

    def __init__(self, envelope: list, rid: int, skeys: list, t0: float) -> None:
        self.envelope, self.rid, self.skeys, self.t0 = envelope, rid, skeys, t0


class ShuttingDown(RuntimeError):
    """The owner thread no longer takes calls (the puller stops)."""


_LAYOUT_FIELDS = {f.name: f.type for f in dataclasses.fields(KVLayout)}


class Daemon:
    def __init__(self, config: KVBMConfig, dcfg: DaemonConfig) -> None:
        self.dcfg = dcfg
        self.config = _daemon_tiers(config, dcfg)
        self.manager = BlockManager.from_config(self.config)
        self.top = self.manager.tiers[0]
        self.pool = self.top.storage
        self.nbytes = self.manager.block_nbytes
        self.sessions = Sessions(dcfg.max_clients)
        self.origin: dict[bytes, tuple[bytes, bytes]] = {}  # server key -> (namespace, client key)
        self.counters = dict.fromkeys(
            ("lookup_blocks", "prefix_hit_blocks", "lease_expiries", "peer_pull_blocks", "peer_pull_bytes",
             "peer_pull_seconds", "peer_errors", "bad_requests", "unauthorized", "client_store_bytes",
             "client_load_bytes", "requests"), 0)
        self.metrics = Metrics()
        self._token = dcfg.token.encode()
        self._stop = False
        self._started = time.monotonic()
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.MAXMSGSIZE, dcfg.max_message_bytes)  # bigger: the sender is cut off
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.SNDHWM, 10_000)
        self.router.bind(dcfg.address)
        self.address = self.router.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.pub = None
        self.events_address = ""
        if dcfg.events:
            self.pub = self.ctx.socket(zmq.PUB)
            self.pub.setsockopt(zmq.LINGER, 0)
            self.pub.bind(dcfg.events)
            self.events_address = self.pub.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.metrics_address = ""
        if dcfg.metrics:
            host, port = self.metrics.serve(dcfg.metrics)
            self.metrics_address = f"{host}:{port}"
        self.agent: Agent | None = None
        self._late: list = []  # (NIXL handle, StoreJob): READs past their timeout (puller's own)
        self.nixl_note = "cross-node pulls are off (daemon.nixl: false)"
        if dcfg.nixl is not False:
            self.agent, self.nixl_note = Agent.create(self.pool.pool, f"kvbm-{os.uname().nodename}-{os.getpid()}-"
                                                                      f"{os.urandom(3).hex()}")
            if self.agent is None and dcfg.nixl is True:
                raise ConfigError(f"daemon.nixl is true but {self.nixl_note}")
        self.peers = Peers(self.ctx, dcfg.peers, dcfg.token, dcfg.peer_timeout_s) if dcfg.peers and self.agent else None
        if dcfg.peers and self.agent is None:
            log.warning("daemon.peers is set but %s", self.nixl_note)
        # owner-thread calls from the puller (and other helpers): (Future | None, fn, args)
        self._owner_ident = threading.get_ident()
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._calls_lock = threading.Lock()
        self._closed = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._current: tuple | None = None  # (envelope, rid, t0) of the request being handled
        self._pending = 0  # lookups waiting for a pull
        self._pull_jobs: dict = {}  # id(job) -> (StoreJob, keys reserved below G2): pulls in flight
        self._stopping = False  # shutdown began: queued pulls are answered from local tiers
        self._pulls: queue.SimpleQueue = queue.SimpleQueue()
        self._puller: threading.Thread | None = None
        if self.peers is not None:
            self._puller = threading.Thread(target=self._pull_loop, name="kvbm-puller", daemon=True)
            self._puller.start()
        self._crc_pool: ThreadPoolExecutor | None = None  # crc32c of blocks a peer is reading
        if self.agent is not None:
            self._crc_pool = ThreadPoolExecutor(1, thread_name_prefix="kvbm-peer-crc")
        self._ops: dict[str, Callable[[dict, Any], dict]] = {
            "hello": self.op_hello, "heartbeat": self.op_heartbeat, "lookup": self.op_lookup,
            "store_prepare": self.op_store_prepare, "store_commit": self.op_store_commit,
            "load_prepare": self.op_load_prepare, "load_release": self.op_load_release,
            "pin": self.op_pin, "unpin": self.op_unpin, "events": self.op_events, "stats": self.op_stats,
            "bye": self.op_bye, "peer_hello": self.op_peer_hello, "peer_lookup": self.op_peer_lookup,
            "peer_release": self.op_load_release,
        }
        # keeps room free in G2 (and below): a client's store then never waits, with every
        # other client, for the owner thread to demote victims to disk
        self.offloader = Offloader(self.manager, None, offload_headroom(self.config, self.manager),
                                   call=self._owner)
        self._publish_metrics()

    # ---------------------------------------------------------------- loop

    def describe(self) -> dict[str, Any]:
        return {"ready": True, "pid": os.getpid(), "address": self.address, "events": self.events_address,
                "metrics": self.metrics_address, "shm": self.pool.shm_path,
                "nixl": self.agent.name if self.agent else None, "nixl_note": self.nixl_note,
                "tiers": {t.name: {"capacity": t.capacity, "recovered": t.stats.recovered}
                          for t in self.manager.tiers}}

    def stop(self, *_: Any) -> None:
        self._stop = True

    def run(self) -> None:
        self._owner_ident = threading.get_ident()
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        next_tick = 0.0
        try:
            while not self._stop:
                if poller.poll(50):
                    self._run_calls()
                    for _ in range(256):  # a burst, then housekeeping
                        try:
                            frames = self.router.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self.handle(frames)
                        self._run_calls()  # a pull's commit goes before the next request
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + 0.25
                    self._expire(now)
                    self._publish_metrics()
        finally:
            self.shutdown()

    def handle(self, frames: list[bytes]) -> None:
        """One request: never raises; a reply (or an error reply) goes back to the sender."""
        if len(frames) == 2:
            envelope, payload = frames[:1], frames[1]
        elif len(frames) == 3 and frames[1] == b"":  # a REQ socket's envelope
            envelope, payload = frames[:2], frames[2]
        else:
            self.counters["bad_requests"] += 1
            if frames:
                self._send(frames[:1], P.error_reply(0, "bad_message", "one frame per request"))
            return
        t0 = time.perf_counter()
        rid: Any = 0
        op = "invalid"
        try:
            msg = P.unpack(payload, self.dcfg.max_keys + 16)
            rid = msg.get("id", 0)
            if isinstance(rid, bool) or not isinstance(rid, int) or not 0 <= rid < 2**63:
                raise P.ProtocolError("bad_field", "field 'id' must be a non-negative integer")
            name = P.string(msg, "op", limit=32)
            fn = self._ops.get(name)
            if fn is None:
                raise P.ProtocolError("unknown_op", f"unknown op {name!r}")
            self._authenticate(msg)
            op = name
            self._current = (envelope, rid, t0)
            try:
                reply = fn(msg, time.monotonic())
            finally:
                self._current = None
            if reply is DEFERRED:  # answered when its pull ends (_lookup_done)
                self._drain_events()
                return
            reply.update(id=rid, ok=True)
            out = P.pack(reply)
        except P.ProtocolError as exc:
            self.counters["unauthorized" if exc.code == "unauthorized" else "bad_requests"] += 1
            out = P.error_reply(rid, exc.code, str(exc))
        except Exception as exc:  # a bug must not take the node's cache down: log, answer, go on
            log.exception("request %s failed", op)
            out = P.error_reply(rid, "internal", f"{type(exc).__name__}: {exc}")
        self._drain_events()
        self._send(envelope, out)
        self.counters["requests"] += 1
        self.metrics.observe(op, time.perf_counter() - t0)

    def _send(self, envelope: list[bytes], payload: bytes) -> None:
        try:
            self.router.send_multipart([*envelope, payload], zmq.NOBLOCK)
        except (zmq.Again, zmq.ZMQError):  # the client is gone or not reading: drop the reply
            pass

    def _authenticate(self, msg: dict) -> None:
        if not self._token:
            return
        auth = msg.get("auth")
        if not isinstance(auth, str) or not hmac.compare_digest(auth.encode(), self._token):
            raise P.ProtocolError("unauthorized", "missing or wrong auth token")

    def _session(self, msg: dict, now: float, peer: bool = False) -> Session:
        s = self.sessions.get(msg.get("session"))
        if s is None:
            raise P.ProtocolError("no_session", "unknown or expired session; say hello again")
        if (s.namespace == PEER_NS) != peer:
            raise P.ProtocolError("bad_session", "this op is not allowed for this session kind")
        s.renew(now)
        return s

    # ---------------------------------------------------------------- sessions

    def op_hello(self, msg: dict, now: float) -> dict:
        model = P.string(msg, "model")
        salt = P.string(msg, "salt", required=False)
        if not model:
            raise P.ProtocolError("bad_field", "field 'model' must name the model")
        layout = _layout(P.field(msg, "layout", dict))
        if layout.block_nbytes != self.nbytes:
            raise P.ProtocolError("layout_mismatch", f"this daemon holds blocks of {self.nbytes} bytes; "
                                                     f"the layout gives {layout.block_nbytes}")
        s = self.sessions.open(namespace_of(model, layout.fingerprint, salt), model, self.dcfg.lease_s, now)
        if s is None:
            raise P.ProtocolError("busy", f"too many clients ({self.dcfg.max_clients})")
        return {"session": s.sid, "shm_path": self.pool.shm_path, "shm_bytes": self.pool.nbytes,
                "stride": self.pool.stride, "block_nbytes": self.nbytes, "lease_s": self.dcfg.lease_s,
                "max_keys": self.dcfg.max_keys, "capacity": self.top.capacity,
                "max_session_blocks": self.dcfg.max_session_blocks}

    def op_heartbeat(self, msg: dict, now: float) -> dict:
        s = self.sessions.get(msg.get("session"))
        if s is None:
            raise P.ProtocolError("no_session", "unknown or expired session; say hello again")
        s.renew(now)
        return {}

    def op_bye(self, msg: dict, now: float) -> dict:
        s = self.sessions.get(msg.get("session"))
        if s is not None:
            self._release(s)
        return {}

    def _release(self, s: Session) -> None:
        """Roll back every reservation, finish every load, drop every pin of s."""
        m = self.manager
        for job, _, _ in s.stores.values():
            m.complete_store(job, failed=job.keys)
        for job in s.loads.values():
            m.complete_load(job)
        s.crcs.clear()
        for key, count in s.pins.items():
            for _ in range(count):
                m.unpin([key])
        s.stores.clear()
        s.loads.clear()
        s.pins.clear()
        self.sessions.close(s)

    def _expire(self, now: float) -> None:
        for s in self.sessions.expired(now):
            if s.held:
                log.warning("lease of %s expired: releasing %d pins and %d reservations", s.label,
                            sum(s.pins.values()) + len(s.loads), len(s.stores))
            self.counters["lease_expiries"] += 1
            self._release(s)
        self._drain_events()

    # ---------------------------------------------------------------- blocks

    def _keys(self, msg: dict, s: Session, unique: bool = False, busy: bool = False) -> tuple[list[bytes], list[bytes]]:
        """The request's keys, namespaced; `busy`: they would be held, so check the quota."""
        keys = P.keys(msg, "keys", self.dcfg.max_keys, unique=unique)
        limit = self.dcfg.max_session_blocks
        if busy and limit and s.held + len(keys) > limit:
            raise P.ProtocolError("quota", f"this client keeps {s.held} blocks busy; at most {limit} "
                                           f"(daemon.max_session_blocks): release or commit first")
        return keys, [server_key(s.namespace, k) for k in keys]

    def op_lookup(self, msg: dict, now: float) -> Any:
        s = self._session(msg, now)
        keys, skeys = self._keys(msg, s)
        remote = P.field(msg, "remote", bool, required=False, default=True)
        n, where = self.manager.lookup(skeys)
        if (n < len(skeys) and remote and self._puller is not None and self._current is not None
                and self.peers.live() and self._pending < MAX_PENDING_PULLS):
            for k, ck in zip(skeys[n:], keys[n:]):
                self.origin.setdefault(k, (s.namespace, ck))
            envelope, rid, t0 = self._current
            self._pending += 1
            self._pulls.put((_Pending(envelope, rid, skeys, t0), skeys[n:]))
            return DEFERRED
        return self._lookup_reply(skeys, n, where)

    def _lookup_reply(self, skeys: list, n: int, where: list) -> dict:
        self.counters["lookup_blocks"] += len(skeys)
        self.counters["prefix_hit_blocks"] += n
        return {"n": n, "where": where}

    def _lookup_done(self, pending: _Pending) -> None:
        """Owner thread: a pull ended (blocks landed or not); answer the lookup that waited."""
        self._pending -= 1
        n, where = self.manager.lookup(pending.skeys)
        reply = self._lookup_reply(pending.skeys, n, where)
        reply.update(id=pending.rid, ok=True)
        self._drain_events()
        self._send(pending.envelope, P.pack(reply))
        self.counters["requests"] += 1
        self.metrics.observe("lookup", time.perf_counter() - pending.t0)

    def op_store_prepare(self, msg: dict, now: float) -> dict:
        s = self._session(msg, now)
        keys, skeys = self._keys(msg, s, unique=True, busy=True)
        parent = P.field(msg, "parent", bytes, required=False)
        if parent is not None and len(parent) != P.KEY_BYTES:
            raise P.ProtocolError("bad_field", f"field 'parent' must be {P.KEY_BYTES} bytes")
        position = P.integer(msg, "position", required=False, lo=0, hi=2**31)
        sparent = server_key(s.namespace, parent) if parent is not None else None
        retention = P.priorities(msg, "priorities", len(skeys))
        hints = None if retention is None else [Hints(priority=p, duration=d) for p, d in retention]
        job, slots, extra = self._reserve(skeys, sparent, position, hints)
        if job is None:
            return {"handle": 0, "slots": slots, "rejected": extra}
        for k, ck, slot in zip(skeys, keys, slots):
            if slot >= 0:
                self.origin[k] = (s.namespace, ck)
        if not job.runs:
            return {"handle": 0, "slots": slots}
        h = s.handle()
        s.stores[h] = (job, skeys, extra)
        return {"handle": h, "slots": slots}

    def _reserve(self, skeys: list, parent: Any = None, position: int = 0, hints: list | None = None):
        """prepare_store; per key a G2 slot to write, or -1 (present, or placed below G2)."""
        job = self.manager.prepare_store(skeys, hints=hints, parent=parent, position=position)
        self.offloader.kick()
        slots = [-1] * len(skeys)
        if job.rejected:
            return None, slots, job.rejected
        extra: list = []  # reserved below G2 (admission said so): no bytes can reach them, roll back
        for t, run, tslots, start in job.runs:
            if t is self.top:
                slots[start:start + len(run)] = tslots
            else:
                extra += run
        return job, slots, extra

    def op_store_commit(self, msg: dict, now: float) -> dict:
        s = self._session(msg, now)
        h = P.integer(msg, "handle")
        entry = s.stores.get(h)
        if entry is None:
            raise P.ProtocolError("bad_handle", f"no reservation {h} in this session")
        job, skeys, extra = entry
        failed = {skeys[i] for i in P.indices(msg, "failed", len(skeys))}
        del s.stores[h]
        self.manager.complete_store(job, failed=failed.union(extra))
        for k in job.failed:  # rolled back: no event will ever name it again
            if k not in self.manager:
                self.origin.pop(k, None)
        stored = len(job.keys) - len(job.failed)
        self.counters["client_store_bytes"] += stored * self.nbytes
        return {"stored": stored}

    def op_load_prepare(self, msg: dict, now: float) -> dict:
        s = self._session(msg, now)
        _, skeys = self._keys(msg, s, unique=True, busy=True)
        job = self._pin_in_g2(skeys)
        if not job.keys:
            self.manager.complete_load(job)
            return {"handle": 0, "slots": []}
        h = s.handle()
        s.loads[h] = job
        self.counters["client_load_bytes"] += len(job.keys) * self.nbytes
        return {"handle": h, "slots": list(job.slots)}

    def _pin_in_g2(self, skeys: list):
        """Pin the ready prefix of skeys in G2, onboarding blocks from lower tiers first."""
        m, top = self.manager, self.top
        n, where = m.lookup(skeys)
        lower = [k for k, w in zip(skeys[:n], where) if w != top.name]
        if lower:
            try:
                m.load(lower)  # destination None: promotion copies them into G2
            except Exception:  # the manager rolled back; those blocks are a miss
                log.exception("onboarding %d blocks into G2 failed", len(lower))
        ready = top.ready
        k = 0
        while k < n and skeys[k] in ready:
            k += 1
        if lower:
            self.offloader.kick()  # promotions filled G2
        return m.prepare_load(skeys[:k])

    def op_load_release(self, msg: dict, now: float) -> dict:
        peer = msg.get("op") == "peer_release"
        s = self._session(msg, now, peer=peer)
        h = P.integer(msg, "handle")
        job = s.loads.pop(h, None)
        if job is None:
            raise P.ProtocolError("bad_handle", f"no load {h} in this session")
        crcs = s.crcs.pop(h, None)
        out: dict = {}
        if peer and crcs is not None and P.field(msg, "crcs", bool, required=False, default=False):
            try:  # computed while the peer READ (pinned, so the bytes cannot change); done by now
                out["crcs"] = [int(c) for c in crcs.result(timeout=30)]
            except Exception as exc:
                log.warning("crc32c for a peer's pull failed: %s", exc)
        self.manager.complete_load(job)
        return out

    def op_pin(self, msg: dict, now: float) -> dict:
        s = self._session(msg, now)
        _, skeys = self._keys(msg, s, busy=True)
        n = self.manager.pin(skeys)
        for k in skeys[:n]:
            s.pins[k] = s.pins.get(k, 0) + 1
        return {"n": n}

    def op_unpin(self, msg: dict, now: float) -> dict:
        s = self._session(msg, now)
        _, skeys = self._keys(msg, s)
        n = 0
        for k in skeys:  # only what this session pinned
            c = s.pins.get(k, 0)
            if c:
                self.manager.unpin([k])
                n += 1
                if c == 1:
                    del s.pins[k]
                else:
                    s.pins[k] = c - 1
        return {"n": n}

    def op_events(self, msg: dict, now: float) -> dict:
        s = self._session(msg, now)
        most = P.integer(msg, "max", required=False, default=1000, lo=1, hi=10_000)
        out, s.events = s.events[:most], s.events[most:]
        return {"events": out}

    def op_stats(self, msg: dict, now: float) -> dict:
        return {"stats": self._stats()}

    # ---------------------------------------------------------------- events and stats

    def _drain_events(self) -> None:
        events = self.manager.take_events()
        if not events:
            return
        by_ns: dict[bytes, list] = {}
        for ev in events:
            origin = self.origin.get(ev.key)
            if ev.kind == "removed" and ev.key not in self.manager:
                self.origin.pop(ev.key, None)
            if origin is None:
                continue
            ns, ck = origin
            by_ns.setdefault(ns, []).append([ev.kind, ck, ev.tier])
        for ns, rows in by_ns.items():
            if self.pub is not None:
                try:
                    self.pub.send_multipart([ns.hex().encode(), P.pack(rows)], zmq.NOBLOCK)
                except zmq.Again:
                    pass
            for s in self.sessions.in_namespace(ns):
                s.events.extend(rows)
                if len(s.events) > MAX_EVENTS:
                    del s.events[:len(s.events) - MAX_EVENTS]

    def _stats(self) -> dict[str, Any]:
        st = self.manager.stats()
        c = self.counters
        peer = {"blocks": c["peer_pull_blocks"], "bytes": c["peer_pull_bytes"],
                "seconds": round(c["peer_pull_seconds"], 6), "failed": c["peer_errors"],
                "gb_per_s": round(c["peer_pull_bytes"] / c["peer_pull_seconds"] / 1e9, 3)
                if c["peer_pull_seconds"] > 0 else None}
        if c["peer_pull_blocks"] or c["peer_errors"]:
            st["transfers"]["peer->host"] = peer
        st["daemon"] = {
            **{k: v for k, v in c.items() if k != "peer_pull_seconds"},
            "prefix_hit_ratio": round(c["prefix_hit_blocks"] / c["lookup_blocks"], 6) if c["lookup_blocks"] else 0.0,
            "clients": sum(1 for s in self.sessions.by_id.values() if s.namespace != PEER_NS),
            "uptime_seconds": round(time.monotonic() - self._started, 3),
            "nixl": self.agent.name if self.agent else None,
            "peers": [p.address for p in self.peers.live()] if self.peers else [],
            "offloaded_blocks": self.offloader.moved,  # demoted ahead of time, off the request loop
        }
        return st

    def _publish_metrics(self) -> None:
        self.metrics.publish(self._stats())

    # ---------------------------------------------------------------- peers

    def op_peer_hello(self, msg: dict, now: float) -> dict:
        if not self.agent:
            raise P.ProtocolError("nixl_off", self.nixl_note)
        s = self.sessions.open(PEER_NS, "peer", self.dcfg.lease_s, now)
        if s is None:
            raise P.ProtocolError("busy", f"too many clients ({self.dcfg.max_clients})")
        return {"session": s.sid, "agent": self.agent.name, "metadata": self.agent.metadata}

    def op_peer_lookup(self, msg: dict, now: float) -> dict:
        """A peer's pull: pin our G2 prefix of its keys and answer their addresses.

        With `crcs_later` (a peer of this version) the crc32c per block is computed on a helper
        thread while the peer READs and returned by peer_release; otherwise it is in this reply.
        """
        s = self._session(msg, now, peer=True)
        skeys = P.keys(msg, "keys", self.dcfg.max_keys, unique=True)
        later = P.field(msg, "crcs_later", bool, required=False, default=False)
        job = self._pin_in_g2(skeys)
        if not job.keys:
            self.manager.complete_load(job)
            return {"handle": 0, "n": 0}
        offsets = np.array([self.pool.offset(slot) for slot in job.slots], dtype=np.uint64)
        h = s.handle()
        s.loads[h] = job
        base = self.pool.address
        reply = {"handle": h, "n": len(job.keys), "addrs": [base + int(o) for o in offsets], "nbytes": self.nbytes}
        if later and self._crc_pool is not None:
            s.crcs[h] = self._crc_pool.submit(ops.crc32c_blocks, self.pool.pool, offsets, self.nbytes)
            reply["crcs_later"] = True
        else:
            reply["crcs"] = [int(c) for c in ops.crc32c_blocks(self.pool.pool, offsets, self.nbytes)]
        return reply

    # The puller thread: everything below up to the owner-thread halves runs there, except what
    # goes through _owner (the manager is the owner thread's alone). The NIXL agent is the
    # puller's alone too (it is created without thread-safety: sync mode none).

    def _pull_loop(self) -> None:
        while True:
            try:
                item = self._pulls.get(timeout=0.25 if self._late else None)
            except queue.Empty:
                item = False
            try:
                if self._late:
                    self._reap_late()
                if item is None:
                    return
                if item is False:
                    continue
                pending, skeys = item
                try:
                    if not self._stopping:
                        self._pull(skeys)
                except ShuttingDown:
                    raise
                except Exception:  # a bug in one pull must not stop later ones
                    log.exception("peer pull failed")
                self._owner(self._lookup_done, pending, wait=False)
            except ShuttingDown:
                return

    def _owner(self, fn: Callable, *args: Any, wait: bool = True) -> Any:
        """Run fn(*args) on the owner thread; its result (wait) or None at once."""
        if threading.get_ident() == self._owner_ident:
            return fn(*args)
        fut: Future | None = Future() if wait else None
        with self._calls_lock:  # (shutdown closes the pipe under it)
            if self._closed:
                raise ShuttingDown("the daemon is shutting down")
            self._calls.put((fut, fn, args))
            try:
                os.write(self._wake_w, b"x")
            except BlockingIOError:  # the pipe is full: the owner is awake anyway
                pass
        return fut.result() if fut is not None else None

    def _run_calls(self) -> None:
        """Owner thread: run the calls queued by the puller."""
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        ran = False
        while True:
            try:
                fut, fn, args = self._calls.get_nowait()
            except queue.Empty:
                break
            ran = True
            try:
                result = fn(*args)
            except BaseException as exc:
                if fut is None:
                    log.exception("owner call %s failed", getattr(fn, "__name__", fn))
                else:
                    fut.set_exception(exc)
            else:
                if fut is not None:
                    fut.set_result(result)
        if ran:
            self._drain_events()

    def _pull(self, skeys: list) -> int:
        """Ask peers, in order, for the prefix of skeys; READ it into our G2. Blocks landed."""
        for peer in self.peers.live():
            if self._stopping:
                return 0
            if not self.peers.connect(peer):
                continue
            reply = self.peers.ask(peer, "peer_lookup", keys=skeys, crcs_later=True)
            if reply is None and peer.session is None and peer.down_until <= time.monotonic():
                # our session there lapsed (idle past its lease, or it restarted): hello, retry once
                if self.peers.connect(peer):
                    reply = self.peers.ask(peer, "peer_lookup", keys=skeys, crcs_later=True)
            if reply is None or not reply.get("handle"):
                continue
            released = [False]
            try:
                return self._read_from(peer, skeys, reply, released)
            finally:
                if not released[0]:
                    self.peers.ask(peer, "peer_release", handle=reply["handle"])
        return 0

    def _read_from(self, peer: Any, skeys: list, reply: dict, released: list) -> int:
        n = reply.get("n")
        addrs, crcs = reply.get("addrs"), reply.get("crcs")
        later = reply.get("crcs_later") is True
        if (not isinstance(n, int) or not 0 < n <= len(skeys) or reply.get("nbytes") != self.nbytes
                or not isinstance(addrs, list) or len(addrs) != n
                or not (later or isinstance(crcs, list) and len(crcs) == n)):
            self._owner(self._count, peer_errors=1)
            return 0
        job, slots = self._owner(self._reserve_pull, skeys[:n])
        if job is None:
            return 0
        want = [i for i, slot in enumerate(slots) if slot >= 0]
        failed = {skeys[i] for i in want}  # until verified
        counts: dict = {}
        landed = 0
        try:
            if want:
                state, late, dt, local_crcs = self._read_chunks(peer, want, slots, addrs)
                if late is not None:
                    # The READ may still land in these slots: they stay reserved (never served,
                    # never reused) until it ends, then roll back (_reap_late, or at shutdown).
                    self._late.append((late, job))
                    self._owner(self._count, peer_errors=len(want))
                    job = None
                    return 0
                if state == "DONE" and later:
                    released[0] = True
                    got = self.peers.ask(peer, "peer_release", handle=reply["handle"], crcs=True)
                    crcs = got.get("crcs") if got else None
                    if not isinstance(crcs, list) or len(crcs) != n:
                        log.warning("peer %s sent no checksums for a pull; dropping it", peer.address)
                        state = "ERR"
                if state == "DONE":
                    got_crcs = [c for fut in local_crcs for c in fut.result()]
                    bad = [skeys[i] for i, c in zip(want, got_crcs) if int(c) != crcs[i]]
                    failed = set(bad)
                    counts.update(peer_errors=len(bad), peer_pull_blocks=len(want) - len(bad),
                                  peer_pull_bytes=(len(want) - len(bad)) * self.nbytes, peer_pull_seconds=dt)
                else:
                    counts["peer_errors"] = len(want)
        finally:
            if job is not None:
                landed = self._owner(self._commit_pull, job, failed, counts)
        return landed

    def _read_chunks(self, peer: Any, want: list, slots: list, addrs: list) -> tuple:
        """READ blocks `want` into their slots in chunks; each landed chunk's crc32c is computed on
        the helper thread while the next one moves -> (state, late handle, seconds, crc futures)."""
        per = max(1, PULL_CHUNK_BYTES // self.nbytes)
        deadline = time.monotonic() + max(5.0, self.dcfg.peer_timeout_s)
        futures: list = []
        state, late, t0 = "DONE", None, time.perf_counter()
        for lo in range(0, len(want), per):
            part = want[lo:lo + per]
            offs = np.array([self.pool.offset(slots[i]) for i in part], dtype=np.uint64)
            local = [(self.pool.address + int(o), self.nbytes) for o in offs]
            remote = [(addrs[i], self.nbytes) for i in part]
            try:
                state, late = self.agent.read(peer.agent, peer.meta, local, remote,
                                              timeout=max(0.0, deadline - time.monotonic()))
            except Exception as exc:
                log.warning("NIXL READ from %s failed: %s", peer.address, exc)
                state, late = "ERR", None
            if state != "DONE":
                break
            futures.append(self._crc_pool.submit(ops.crc32c_blocks, self.pool.pool, offs, self.nbytes))
        return state, late, time.perf_counter() - t0, futures

    # owner-thread halves of a pull

    def _reserve_pull(self, skeys: list) -> tuple[Any, list]:
        job, slots, extra = self._reserve(skeys)
        if job is None:
            return None, slots
        # keys reserved below G2 (admission said so) get no bytes from the READ: rolled back at commit
        self._pull_jobs[id(job)] = (job, set(extra))
        return job, slots

    def _commit_pull(self, job: Any, failed: set, counts: dict) -> int:
        _, extra = self._pull_jobs.pop(id(job), (job, set()))
        self.manager.complete_store(job, failed=failed | extra)
        self._count(**counts)
        return len(job.keys) - len(job.failed)

    def _count(self, **counts: float) -> None:
        for k, v in counts.items():
            self.counters[k] += v

    def _reap_late(self) -> None:
        """Puller thread: roll back pulls whose READ outlived its timeout, once the READ ended."""
        keep = []
        for handle, job in self._late:
            if self.agent.finished(handle):
                self._owner(self._commit_pull, job, set(job.keys), {})
            else:
                keep.append((handle, job))
        self._late = keep

    # ---------------------------------------------------------------- shutdown

    def shutdown(self) -> None:
        """Roll back in-flight work, release pins, close storages (G3 flushes its index)."""
        if self.manager is None:
            return
        self.offloader.stop()  # the demotion in hand completes through the owner calls run here
        while self.offloader.alive:
            self._run_calls()
            self.offloader.join(0.01)
        self._stop_puller()
        for s in list(self.sessions.by_id.values()):
            self._release(s)
        if self._crc_pool is not None:
            self._crc_pool.shutdown(wait=True)
        for job, _ in list(self._pull_jobs.values()):  # a pull that did not come back in time
            self.manager.complete_store(job, failed=job.keys)
        self._pull_jobs.clear()
        self._drain_events()
        if self.peers is not None and (self._puller is None or not self._puller.is_alive()):
            self.peers.close()  # (zmq sockets belong to the puller; a stuck one dies with the process)
        self._late = []  # their jobs were in _pull_jobs, rolled back above
        if self.agent is not None:
            self.agent.close()
        self.manager.close()
        self.manager = None
        self.metrics.close()
        for sock in (self.router, self.pub):
            if sock is not None:
                sock.close(0)
        with self._calls_lock:
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
        if self._puller is None or not self._puller.is_alive():
            self.ctx.term()

    def _stop_puller(self) -> None:
        """Let an in-flight pull finish (serving its owner calls), then close the call queue."""
        self._stopping = True
        if self._puller is not None:
            self._pulls.put(None)
            deadline = time.monotonic() + max(5.0, self.dcfg.peer_timeout_s) + 2 * self.dcfg.peer_timeout_s + 1
            while self._puller.is_alive() and time.monotonic() < deadline:
                self._run_calls()
                self._puller.join(0.01)
            if self._puller.is_alive():
                log.warning("a peer pull did not end in time; its reservation is rolled back")
        with self._calls_lock:
            self._closed = True
        while True:  # what came in meanwhile: run it (waiting lookups get their answer)
            try:
                fut, fn, args = self._calls.get_nowait()
            except queue.Empty:
                break
            if fut is not None:
                fut.set_exception(ShuttingDown("the daemon is shutting down"))
            else:
                try:
                    fn(*args)
                except Exception:
                    log.exception("owner call at shutdown failed")


def _layout(raw: dict) -> KVLayout:
    if len(raw) > len(_LAYOUT_FIELDS):
        raise P.ProtocolError("bad_field", "layout has unknown keys")
    for k, v in raw.items():
        if k not in _LAYOUT_FIELDS:
            raise P.ProtocolError("bad_field", f"layout has an unknown key {k!r}")
        if not isinstance(v, (int, str)) or isinstance(v, bool) or (isinstance(v, int) and not 0 <= v < 2**31):
            raise P.ProtocolError("bad_field", f"layout.{k} must be a small integer or a string")
    try:
        return KVLayout(**raw)
    except (TypeError, ValueError) as exc:
        raise P.ProtocolError("bad_field", f"layout: {exc}") from None


def _daemon_tiers(config: KVBMConfig, dcfg: DaemonConfig) -> KVBMConfig:
    """G2 (host) must be the top tier, held in the shared-memory file clients map."""
    if config.layout is None:
        raise ConfigError("kvbm serve needs a `layout`: the daemon holds real block bytes")
    top = config.tiers[0]
    if top.name != "g2" or top.storage.name != "host":
        raise ConfigError(f"kvbm serve: the first tier must be g2 with storage host (clients map it), "
                          f"got {top.name} with storage {top.storage.name}")
    if not config.promote_on_hit:
        log.warning("kvbm serve: promote_on_hit is forced on; clients read blocks from G2 only")
    tiers = list(config.tiers)
    opts = {**top.storage.options, "shm_name": dcfg.shm_name, "pin": "never"}
    tiers[0] = dataclasses.replace(top, storage=dataclasses.replace(top.storage, options=opts))
    return dataclasses.replace(config, tiers=tiers, promote_on_hit=True, events=True)


def serve(config: KVBMConfig, dcfg: DaemonConfig, ready: Any = sys.stdout) -> int:
    daemon = Daemon(config, dcfg)
    signal.signal(signal.SIGTERM, daemon.stop)
    signal.signal(signal.SIGINT, daemon.stop)
    print(json.dumps(daemon.describe()), file=ready, flush=True)
    daemon.run()  # returns after a clean shutdown: storages closed, G3 index flushed
    if daemon.agent is not None:
        # nixl 1.5.1's wheel bundles a libnl whose destructor crashes at process exit (after
        # an agent with UCX's IB module loaded): exit here, with everything already shut down.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
