"""Daemon: the request loop that owns one BlockManager for the node (`kvbm serve`).

    Daemon(config, daemon_config)   build the manager (G2 in shared memory), bind sockets
    Daemon.run()                    serve until SIGTERM/SIGINT or stop(), then shut down cleanly
    Daemon.shutdown()               roll back reservations, release pins, close storages

One thread owns the manager: requests are handled in order, so the manager's invariants need
no locks. The HTTP metrics thread reads a snapshot only. Helper threads (the offloader, the
peer puller) ask the owner thread for every manager step through `_owner` (a call queue and a
wake-up message on the router, from an inproc socket).

The ops live beside this file, one concern each, as mixins of Daemon:
    sessions.py    hello / heartbeat / bye, lease expiry
    dataplane.py   lookup, store_prepare / store_commit, load_prepare / load_release, pin / unpin
    events.py      KV events drained after each request, published per namespace
    peering.py     peer_* ops and the puller thread (cross-node pulls over NIXL)
    onboard.py     G3/G4 blocks come up to G2 on transfer threads; requests needing them wait
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

import zmq

from ..config import ConfigError, KVBMConfig
from ..manager import BlockManager
from ..offload import Offloader, offload_headroom
from ..tiers.seal import cluster_object_secret
from . import protocol as P
from .config import DaemonConfig, is_local
from .conn_gate import RCVHWM, ConnGate, harden
from .dataplane import SCRATCH_BLOCKS, DataPlane
from .events import Events
from .leases import PEER_NS, Sessions
from .metrics import Metrics
from .onboard import G4_TIMEOUT_S, Onboarding
from .peering import DEFERRED, Peering, ShuttingDown
from .peerauth import load_secret
from .sessions import SessionOps
from .tenants import DEFAULT_TENANT, TenantIndex, partition_tiers, tenant_stats
from .transport import bind
from .windows import max_windows, sweep

log = logging.getLogger("kvbm.daemon")
_NOBLOCK, _MORE = int(zmq.NOBLOCK), int(zmq.NOBLOCK | zmq.SNDMORE)
# Replies queued per connection (the router's SNDHWM; past it a reply is dropped: that client is not
# reading). A Client has at most 3 requests in flight (two pipelined batches and a cancel), a peer one,
# the tests' raw clients up to ~2,000 (read once sent). A client that never reads holds this many
# (~REPLY_HWM x the largest reply: 12 KiB for 4,096 keys); on tcp:// the gate shuts such a connection
# down once SNDBUF / 2 of its replies sit unread in the kernel (conn_gate.py), so a token holder's many
# silent connections do not hold the daemon's memory (H52, tests/test_attack_starve.py). Was 10,000,
# then 4,096.
REPLY_HWM = 2048


class Daemon(SessionOps, DataPlane, Events, Peering, Onboarding):
    def __init__(self, config: KVBMConfig, dcfg: DaemonConfig) -> None:
        try:
            self._build(config, dcfg)
        except BaseException:  # a failed start leaves nothing behind: no socket file, G3 closed
            self._abort()
            raise

    def _abort(self) -> None:
        if hasattr(self, "origin"):  # the event streams came up: PUB, KV events (threads, sockets), ZAP
            self._close_events()
        if getattr(self, "_gate", None) is not None:
            self._gate.close()
        for name in ("_waker", "router"):
            sock = getattr(self, name, None)
            if sock is not None:
                sock.close(0)
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
        if getattr(self, "manager", None) is not None:
            self.manager.close()
            self.manager = None
        if getattr(self, "ctx", None) is not None:
            self.ctx.term()

    def _build(self, config: KVBMConfig, dcfg: DaemonConfig) -> None:
        self.dcfg = dcfg
        self.config = _daemon_tiers(config, dcfg)
        self.manager = BlockManager.from_config(self.config)
        self.top = self.manager.tiers[0]
        self.pool = self.top.storage
        self.nbytes = self.manager.block_nbytes
        # each session's window holds a descriptor (windows.max_windows: a quarter of RLIMIT_NOFILE,
        # past it a hello is busy): another uid or a named tenant holds at most half of the sessions
        # that can have one (Sessions.bound), so its flood cannot lock the others out of hello
        self.sessions = Sessions(dcfg.max_clients, dcfg.max_sessions_per_uid, windows=max_windows())
        # a session's staging window (windows.py): one request's blocks, at most window_mib
        self.window_slots = max(1, min(dcfg.max_keys, (dcfg.window_mib << 20) // self.pool.stride))
        # and past them a few the client manages itself, for one-shot store / load (one round trip)
        self.scratch_slots = max(1, min(SCRATCH_BLOCKS, self.window_slots // 4))
        self.share_blocks = max(1, int(self.top.capacity * dcfg.namespace_share))  # per namespace, per uid
        # each named tenant its own bound (tenants.py), however many sessions and salts it uses
        self.tenant_blocks = {t.name: max(1, int(self.top.capacity * t.share)) for t in dcfg.tenants.values()}
        if sum(t.share for t in dcfg.tenants.values()) > 1:
            log.warning("daemon.tenants: the shares add up to more than 1; tenants holding all of theirs "
                        "can leave others no room to store")
        # the daemon's own user: no uid quota. Unknown (-1: every default-tenant tcp client) is one uid
        # for the quota: those clients together keep at most namespace_share of G2 busy
        self._own_uids = {os.getuid()}
        self._auth = TenantIndex(dcfg.token, dcfg.tenants)  # request token -> tenant (tenants.py)
        self._tenant = DEFAULT_TENANT  # the current request's tenant (handle)
        self._undo_info: tuple | None = None  # what the current request created, for a cancel
        sweep(dcfg.shm_name)  # windows a killed daemon left between creating them and a client mapping them
        self.counters = dict.fromkeys(
            ("lookup_blocks", "prefix_hit_blocks", "lease_expiries", "peer_pull_blocks", "peer_pull_bytes",
             "peer_pull_seconds", "peer_errors", "bad_requests", "unauthorized", "client_store_bytes",
             "client_load_bytes", "requests", "reservation_expiries", "pin_expiries", "cancelled",
             "sessions_evicted", "stalls", "dead_clients", "pinned_blocks"), 0)
        self.metrics = Metrics()
        self._stop = False
        self._started = time.monotonic()
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.MAXMSGSIZE, dcfg.max_message_bytes)  # bigger: the sender is cut off
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.SNDHWM, REPLY_HWM)
        self._gate: ConnGate | None = None
        if dcfg.address.startswith("tcp://"):
            harden(self.router)  # handshake deadline, keepalive (conn_gate.py)
        else:  # ipc: whole requests queued per connection before libzmq stops reading it (was 1,000:
            self.router.setsockopt(zmq.RCVHWM, RCVHWM)  # ~1 GiB of 1 MiB requests a connection)
        self.address = bind(self.router, dcfg.address)  # ipc: 0700 folder, 0600 socket (transport.py)
        # tcp: anyone reaching the port may connect; ipc: tenants (tokens) and other uids the operator
        # let in may too. Bound what each holds (conn_gate.py; the daemon's own uid untokened on ipc is let be)
        self._gate = ConnGate(self.router, dcfg.max_message_bytes)
        self._count_bytes = not self._gate.ipc  # (a byte count per connection: tcp only, TCP_INFO)
        self._last_frame: zmq.Frame | None = None  # the current request's payload: its sender's creds
        self._init_events()  # the PUB stream and the origin map (events.py)
        self.metrics_address = ""
        if dcfg.metrics:
            # beyond loopback /metrics and /health want the token (config.py insists on one there)
            host, port = self.metrics.serve(dcfg.metrics, "" if is_local("tcp://" + dcfg.metrics) else dcfg.token)
            self.metrics_address = f"{host}:{port}"
        # owner-thread calls from helper threads (the puller, the offloader): (Future | None, fn, args)
        self._owner_ident = threading.get_ident()
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._calls_lock = threading.Lock()
        self._closed = False
        # A helper wakes the loop with an empty message on the router itself (an inproc DEALER
        # whose routing id is a random secret), so the loop blocks in one recv like a bare zmq
        # server instead of polling the router and a pipe (half the syscalls per request)
        self._wake_id = b"\0kvbm-owner-" + os.urandom(16)
        wake_at = f"inproc://kvbm-owner-{self._wake_id[-16:].hex()}"
        self.router.bind(wake_at)
        self._waker = self.ctx.socket(zmq.DEALER)
        self._waker.setsockopt(zmq.ROUTING_ID, self._wake_id)
        self._waker.setsockopt(zmq.LINGER, 0)
        self._waker.connect(wake_at)
        self._current: tuple | None = None  # (envelope, rid, t0) of the request being handled
        self._init_peering()
        self._init_onboarding()  # G3/G4 reads off this loop (onboard.py)
        self._ops: dict[str, Callable[[dict, Any], dict]] = {
            "hello": self.op_hello, "heartbeat": self.op_heartbeat, "lookup": self.op_lookup,
            "store_prepare": self.op_store_prepare, "store_commit": self.op_store_commit,
            "load_prepare": self.op_load_prepare, "load_release": self.op_load_release,
            "store": self.op_store, "load": self.op_load,
            "pin": self.op_pin, "unpin": self.op_unpin, "lookup_pin": self.op_lookup_pin, "events": self.op_events, "stats": self.op_stats,
            "bye": self.op_bye, "cancel": self.op_cancel, "peer_hello": self.op_peer_hello, "peer_lookup": self.op_peer_lookup,
            "peer_release": self.op_peer_release,
        }
        if self.kv_events is not None:  # the vLLM-format stream's ground truth (kv_events.py)
            self._ops["kv_view"] = self.kv_events.op_view
        # keeps room free in G2 (and below): a client's store then never waits, with every
        # other client, for the owner thread to demote victims to disk
        self.offloader = Offloader(self.manager, None, offload_headroom(self.config, self.manager),
                                   call=self._offload_call)  # (onboard.py: stores may wait for room)
        self._publish_metrics()

    # ---------------------------------------------------------------- loop

    def describe(self) -> dict[str, Any]:
        return {"ready": True, "pid": os.getpid(), "address": self.address, "events": self.events_address,
                "events_replay": self.events_replay_address,
                "metrics": self.metrics_address, "shm": self.pool.shm_path,
                "nixl": self.agent.name if self.agent else None, "nixl_note": self.nixl_note,
                "tiers": {t.name: {"capacity": t.capacity, "recovered": t.stats.recovered}
                          for t in self.manager.tiers}}

    def stop(self, *_: Any) -> None:
        self._stop = True

    def run(self) -> None:
        self._owner_ident = threading.get_ident()
        next_tick = 0.0
        last = time.monotonic()
        stall_s = min(0.5, self.dcfg.lease_s / 4)
        router, calls, wake_id = self.router, self._calls, self._wake_id
        router.setsockopt(zmq.RCVTIMEO, 50)  # housekeeping at least every 50 ms when idle
        try:
            while not self._stop:
                try:  # one blocking recv per request: no poll of its own (a bare server's cost)
                    frames = router.recv_multipart(copy=False)
                except zmq.Again:
                    frames = None
                if frames is not None:
                    if frames[0].bytes == wake_id:  # a helper queued owner calls (_owner)
                        self._run_calls()
                    else:
                        self.handle(frames)
                        if not calls.empty():  # a pull's commit goes before the next request
                            self._run_calls()
                now = time.monotonic()
                if self._room_waiters:  # stores waiting for G2 room: some may go (onboard.py)
                    self._service_room(now)
                if now - last > stall_s:  # this loop did not run (stopped, starved, a long step):
                    self.sessions.extend(now - last)  # no client could be heard, so no lease counts it
                    self.counters["stalls"] += 1
                last = now
                if now >= next_tick:
                    next_tick = now + 0.25
                    self._expire(now)
                    self.onboarder.service(now)  # requests whose G3/G4 blocks are late get G2's prefix
                    self._service_events(now)  # a dead event publisher restarts (events.py, publisher.py)
                    self._publish_metrics()
        finally:
            self.shutdown()

    def handle(self, frames: list[bytes]) -> None:
        """One request: never raises; a reply (or an error reply) goes back to the sender."""
        if frames and isinstance(frames[-1], zmq.Frame):  # from run(): the kernel's word on the sender
            self._last_frame = frames[-1]
            if self._gate is not None and self._count_bytes:
                self._gate.received(frames)  # bytes read per connection: a message that never ends is cut
            frames = [f.bytes for f in frames]
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
            self._tenant = self._authenticate(msg)
            if self._gate is not None and self._last_frame is not None:
                # this connection is a client's, not a stranger's; one tenant holds at most a quarter of them
                if not self._gate.authenticated(self._last_frame, self._tenant):
                    raise P.ProtocolError("busy", f"this tenant holds {self._gate.per_owner_cap} connections "
                                                  f"to the daemon already, the most one may; close some")
            op = name
            replayed = self._replayed(msg, name, rid, time.monotonic())
            if replayed is not None:  # a retry of a request already answered (or cancelled)
                self._send(envelope, replayed)
                return
            self._undo_info = None
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
            self._remember(msg, name, rid, out, self._undo_info)
        except P.ProtocolError as exc:
            self.counters["unauthorized" if exc.code == "unauthorized" else "bad_requests"] += 1
            out = P.error_reply(rid, exc.code, str(exc))
        except Exception as exc:  # a bug must not take the node's cache down: log, answer, go on
            log.exception("request %s failed", op)
            out = P.error_reply(rid, "internal", f"{type(exc).__name__}: {exc}")
        self._answer(envelope, out, op, t0)

    def _answer(self, envelope: list[bytes], out: bytes, op: str, t0: float) -> None:
        """Send a reply (now or after a deferral) with the events it caused, and count it."""
        self._drain_events()
        self._send(envelope, out)
        self.counters["requests"] += 1
        self.metrics.observe(op, time.perf_counter() - t0)

    def _send(self, envelope: list[bytes], payload: bytes) -> None:
        try:  # frame by frame with plain int flags: a third of send_multipart's cost
            for frame in envelope:
                self.router.send(frame, _MORE)
            self.router.send(payload, _NOBLOCK)
        except (zmq.Again, zmq.ZMQError):  # the client is gone or not reading: drop the reply
            pass

    def _authenticate(self, msg: dict) -> str:
        """The request's tenant ("" for daemon.token, or when no token is configured)."""
        if not self._auth.required:
            return DEFAULT_TENANT
        tenant = self._auth.identify(msg.get("auth"))  # keyed hash, looked up: no timing oracle
        if tenant is None:
            raise P.ProtocolError("unauthorized", "missing or wrong auth token")
        return tenant

    def op_stats(self, msg: dict, now: float) -> dict:
        """A named tenant's token: that tenant's own counters only (tenants.tenant_stats: its
        lookups, hits, stores, loads, pins, blocks per tier, sessions, busy share), nothing of the
        node or of other tenants. daemon.token (the operator's; or no token): the node's, with
        every tenant's row under "tenants"."""
        if self._tenant:
            return {"stats": {"tenant": self._tenant, **tenant_stats(self)[self._tenant]}}
        return {"stats": self._stats()}

    # ---------------------------------------------------------------- stats

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
            "onboard": {"started": self.onboarder.started, "deferred": self.onboarder.deferred},
            "room": {**self._room_counts, "waiting": len(self._room_waiters)},  # stores that waited for G2 room
            # requests waiting now (room, G3/G4), per owner at most half (onboard.MAX_DEFERRED); refused busy
            "deferred": {"waiting": self._deferred, "owners": len(self._deferred_by), **self._deferred_counts},
            "onboarding_keys": len(self.onboarder), "origin_keys": len(self.origin),
            "peer_challenges": len(self._challenges) if self._challenges is not None else 0,
            "state": self._state_sizes(),
        }
        if self._gate is not None:  # the request socket's gated connections (conn_gate.py)
            st["daemon"]["connections"] = {"open": self._gate.live, "waiting": self._gate.waiting,
                                           "cut": self._gate.cut, "overfed": self._gate.overfed,
                                           "silent": self._gate.silent, "refused": self._gate.refused}
        st["tenants"] = tenant_stats(self)  # per tenant (op_stats: the operator's view only)
        return st

    def _state_sizes(self) -> dict[str, int]:
        """Sizes of every per-client map: tests assert they return to baseline after abuse."""
        ss = list(self.sessions.by_id.values())
        return {"sessions": len(ss), "reservations": sum(len(s.stores) for s in ss),
                "loads": sum(len(s.loads) for s in ss), "pins": sum(len(s.pins) for s in ss),
                "busy_blocks": sum(s.busy for s in ss), "replies": sum(len(s.replies) for s in ss),
                "cancelled": sum(len(s.cancelled) for s in ss), "events": sum(len(s.events) for s in ss),
                "window_slots_used": sum(s.window.slots - s.window.free_slots for s in ss if s.window),
                "busy_namespaces": len(self.sessions.busy_by_ns), "busy_uids": len(self.sessions.busy_by_owner),
                "uids": len(self.sessions.count_by_owner), "g2_pinned": len(getattr(self.top, "pins", ())),
                "g2_pending": len(getattr(self.top, "pending", ()))}

    def _publish_metrics(self) -> None:
        self.metrics.publish(self._stats())

    # ---------------------------------------------------------------- owner-thread calls

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
                self._waker.send(b"", _NOBLOCK)
            except zmq.ZMQError:  # its queue is full: the owner has wake-ups coming anyway
                pass
        return fut.result() if fut is not None else None

    def _run_calls(self) -> None:
        """Owner thread: run the calls queued by the puller."""
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

    def _count(self, **counts: float) -> None:
        for k, v in counts.items():
            self.counters[k] += v

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
        self.onboarder.close()  # requests waiting on G3/G4 get their answer now
        self._close_room()  # and stores waiting for room in G2
        for s in list(self.sessions.by_id.values()):
            self._release(s)
        self._close_peering()
        self.manager.close()
        self.manager = None
        self.metrics.close()
        if self._gate is not None:
            self._gate.close()
        self.router.close(0)
        self._close_events()
        with self._calls_lock:
            self._closed = True
            self._waker.close(0)
        if self._puller is None or not self._puller.is_alive():
            self.ctx.term()


def _daemon_tiers(config: KVBMConfig, dcfg: DaemonConfig) -> KVBMConfig:
    """G2 (host) must be the top tier; its pool is the daemon's alone (clients map only their
    windows, windows.py), so it is plain private memory, never a file another process can open."""
    if config.layout is None:
        raise ConfigError("kvbm serve needs a `layout`: the daemon holds real block bytes")
    top = config.tiers[0]
    if top.name != "g2" or top.storage.name != "host":
        raise ConfigError(f"kvbm serve: the first tier must be g2 with storage host (clients load from it), "
                          f"got {top.name} with storage {top.storage.name}")
    if not config.promote_on_hit:
        log.warning("kvbm serve: promote_on_hit is forced on; clients read blocks from G2 only")
    tiers = list(config.tiers)
    opts = {**{k: v for k, v in top.storage.options.items() if k != "shm_name"}, "pin": "never"}
    tiers[0] = dataclasses.replace(top, storage=dataclasses.replace(top.storage, options=opts))
    for i, t in enumerate(tiers):  # a hung object store: give up well before a client does (10 s)
        if t.storage.name == "object" and "timeout" not in t.storage.options:
            o = {**t.storage.options, "timeout": G4_TIMEOUT_S}
            tiers[i] = dataclasses.replace(t, storage=dataclasses.replace(t.storage, options=o))
    for i, t in enumerate(tiers):  # one cluster, one G4: without a secret of its own, the peers' seals it
        own = {"secret", "secret_file"} & set(t.storage.options)
        if dcfg.peer_secret_file and t.storage.name == "object" and not own:
            o = {**t.storage.options, "secret": cluster_object_secret(load_secret(dcfg.peer_secret_file))}
            tiers[i] = dataclasses.replace(t, storage=dataclasses.replace(t.storage, options=o))
    # named tenants: every tier partitioned among them (idempotent: load_daemon_config did it
    # already for `kvbm serve`; a Daemon built in-process from a DaemonConfig gets it here too)
    return partition_tiers(dataclasses.replace(config, tiers=tiers, promote_on_hit=True, events=True), dcfg)


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
