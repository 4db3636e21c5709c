"""Peer pulls: this daemon as a peer's source (peer_hello / peer_lookup / peer_release) and as
a puller of its own local misses from other nodes' daemons (over NIXL).

    Peering._init_peering()        NIXL agent over the G2 pool, peer connections, the puller thread
    Peering.op_peer_*              the serving side: pin our G2 prefix, answer addresses and crc32c
    Peering._ask_peers(...)        a lookup that missed locally goes to the puller (DEFERRED)
    Peering._stop_puller(), _close_peering()   the shutdown halves

Peer pulls run off the request loop. A lookup that misses locally (and may ask peers) is handed
to the puller thread and answered when the pull ends; meanwhile the loop serves everyone else.
The puller does the network work (ask the peer, NIXL READ, verify crc32c) and asks the owner
thread, through a call queue and a wake-up pipe (Daemon._owner), for every manager step:
reserve slots before the READ, commit or roll back after it. Pulls run one at a time, in order;
at most MAX_PENDING_PULLS wait, at most half of them of one owner (a tenant, a uid), and the last
eighth only of owners with none waiting; beyond that a lookup is answered from local tiers only.

On the serving side a peer_lookup pins the blocks and answers their addresses at once; their
crc32c is computed on a helper thread while the peer READs and goes back with peer_release.
G2 keeps a block's crc32c once computed (HostStorage.remember_crcs) until its slot is reused, so
a block served before, or one this daemon pulled and verified, is not checksummed again. A
crc32c pass leaves one core to the READ (CRC_THREADS: one thread on a 2-core node).
The puller READs in PULL_CHUNK_BYTES chunks and checksums each landed chunk during the next
one, so only the last chunk's checksum follows the READ. Seconds per phase of this daemon's
pulls are summed in the counters peer_pull_<phase>_s (stats()["daemon"], PULL_PHASES).

Who may pull (SECURITY.md): only a daemon that proves, in peer_hello, that it holds the cluster's
peer secret (daemon.peer_secret_file, separate from the client token; peerauth.py). Without one
this daemon neither serves nor pulls. A pull names a namespace and the client keys within it, and
the serving daemon derives its own server keys from the two: a peer can only reach the blocks of
a namespace whose id it presents, and this daemon only asks for the namespace of the client
session whose lookup missed. The origin of a pulled block (its namespace and client key, for
events) is recorded when its slot is reserved, and dropped if the pull fails: a lookup of random
keys leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np

from .. import ops
from ..config import ConfigError
from . import protocol as P
from .leases import PEER_NS, Session, owner_may_take, server_key
from .peerauth import NONCE_BYTES, Challenges, load_secret
from .peers import Agent, Peers

log = logging.getLogger("kvbm.daemon")
MAX_PENDING_PULLS = 64  # lookups waiting for the puller; beyond this, local answers only
PULL_CHUNK_BYTES = 16 << 20  # a pull READs in chunks; each landed chunk is checksummed during the next
# threads of a pull's crc32c pass, on either side: every core but one, which the READ needs (over
# shared memory UCX's cma copies on the puller's thread). Before, each side's pass took two
# threads on a 2-core node: five busy threads beside the READ's one
CRC_THREADS = max(1, min(8, len(os.sched_getaffinity(0)) - 1)) if hasattr(os, "sched_getaffinity") else 1
DEFERRED = object()  # an op's result when the reply is sent later (a lookup waiting for a pull)
# a pull's phases, each summed into counters peer_pull_<phase>_s: the peer_lookup round trip (with
# peer_hello when needed), the owner's reservation, the READs, peer_release (the server's crc32c),
# waiting for our own crc32c of the last chunk, the owner's commit
PULL_PHASES = ("ask", "reserve", "read", "release", "verify", "commit")


class _Pending:
    """A lookup answered when its pull ends (skeys: all of the lookup's server keys)."""

    __slots__ = ("envelope", "rid", "skeys", "t0", "owner")

    def __init__(self, envelope: list, rid: int, skeys: list, t0: float, owner: Any = None) -> None:
        self.envelope, self.rid, self.skeys, self.t0 = envelope, rid, skeys, t0
        self.owner = owner  # whose lookup (Session.owner): counted in Peering._pending_by


class ShuttingDown(RuntimeError):
    """The owner thread no longer takes calls (the puller stops)."""


class Peering:
    """Mixin of Daemon: the peer ops and the puller thread (see the module docstring)."""

    def _init_peering(self) -> None:
        dcfg = self.dcfg
        self.agent: Agent | None = None
        self._late: list = []  # (NIXL handle, StoreJob): READs past their timeout (puller's own)
        self.nixl_note = "cross-node pulls are off (daemon.nixl: false)"
        if dcfg.nixl is not False:
            self.agent, self.nixl_note = Agent.create(self.pool.pool, f"kvbm-{os.uname().nodename}-{os.getpid()}-"
                                                                      f"{os.urandom(3).hex()}")
            if self.agent is None and dcfg.nixl is True:
                raise ConfigError(f"daemon.nixl is true but {self.nixl_note}")
        secret = load_secret(dcfg.peer_secret_file) if dcfg.peer_secret_file else None
        self._challenges = Challenges(secret) if secret is not None and self.agent is not None else None
        self.peers = None
        if dcfg.peers and self.agent is None:
            log.warning("daemon.peers is set but %s", self.nixl_note)
        elif dcfg.peers and secret is None:
            log.warning("daemon.peers is set but daemon.peer_secret_file is not: no peer pulls "
                        "(daemons prove a shared secret to each other, see SECURITY.md)")
        elif dcfg.peers:
            self.peers = Peers(self.ctx, dcfg.peers, dcfg.token, dcfg.peer_timeout_s, secret)
        self.counters.setdefault("peer_auth_failures", 0)
        for phase in PULL_PHASES:  # seconds per phase of this daemon's pulls, summed (stats: where time goes)
            self.counters.setdefault(f"peer_pull_{phase}_s", 0.0)
        self.counters.setdefault("peer_serve_crc_s", 0.0)  # the serving side's crc32c, on its helper
        self.counters.setdefault("peer_serve_crc_blocks", 0)  # blocks it checksummed (not kept from before)
        self._pending = 0  # lookups waiting for a pull
        # the same per owner (Session.owner: a tenant, a uid), each at most MAX_PENDING_PULLS // 2:
        # one tenant's local misses must not take every pending pull and others' peer hits
        self._pending_by: dict = {}
        self._pull_jobs: dict = {}  # id(job) -> (StoreJob, keys reserved below G2): pulls in flight
        self._stopping = False  # shutdown began: queued pulls are answered from local tiers
        self._pulls: queue.SimpleQueue = queue.SimpleQueue()
        self._puller: threading.Thread | None = None
        if self.peers is not None:
            self._puller = threading.Thread(target=self._pull_loop, name="kvbm-puller", daemon=True)
            self._puller.start()
        self._crc_pool: ThreadPoolExecutor | None = None  # crc32c of blocks a peer is reading
        if self.agent is not None:
            self._crc_pool = ThreadPoolExecutor(1, thread_name_prefix="kvbm-peer-crc",
                                                initializer=_name_thread, initargs=("kvbm-peer-crc",))

    def _ask_peers(self, s: Session, keys: list, skeys: list, n: int) -> Any:
        """A lookup that missed from key n on: DEFERRED (a queued pull answers it), or None.
        The pull asks for session s's namespace only, by its client keys."""
        if (n < len(skeys) and self._puller is not None and self._current is not None and self.peers.live()
                and owner_may_take(self._pending, self._pending_by.get(s.owner, 0), MAX_PENDING_PULLS,
                                   MAX_PENDING_PULLS // 2)):
            envelope, rid, t0 = self._current
            self._pending += 1
            self._pending_by[s.owner] = self._pending_by.get(s.owner, 0) + 1
            self._pulls.put((_Pending(envelope, rid, skeys, t0, s.owner), (s.namespace, keys[n:], skeys[n:])))
            return DEFERRED
        return None

    def _lookup_done(self, pending: _Pending) -> None:
        """Owner thread: a pull ended (blocks landed or not); answer the lookup that waited."""
        self._pending -= 1
        left = self._pending_by.get(pending.owner, 0) - 1
        if left > 0:
            self._pending_by[pending.owner] = left
        else:
            self._pending_by.pop(pending.owner, None)
        n, where = self.manager.lookup(pending.skeys)
        reply = self._lookup_reply(pending.skeys, n, where)
        reply.update(id=pending.rid, ok=True)
        self._drain_events()
        self._send(pending.envelope, P.pack(reply))
        self.counters["requests"] += 1
        self.metrics.observe("lookup", time.perf_counter() - pending.t0)

    def op_peer_hello(self, msg: dict, now: float) -> dict:
        """Step 1 {nonce} -> {challenge, proof}: we prove the peer secret. Step 2 {nonce, challenge,
        proof} -> {session, agent, metadata}: the peer proved it back (peerauth.py)."""
        if not self.agent:
            raise P.ProtocolError("nixl_off", self.nixl_note)
        if self._challenges is None:
            raise P.ProtocolError("peer_off", "this daemon takes no peers: daemon.peer_secret_file is not set")
        nonce = _bin(msg, "nonce")
        if msg.get("proof") is None:
            challenge, proof = self._challenges.issue(nonce)
            return {"challenge": challenge, "proof": proof}
        if not self._challenges.check(nonce, _bin(msg, "challenge"), _bin(msg, "proof")):
            self.counters["peer_auth_failures"] += 1
            raise P.ProtocolError("unauthorized", "peer_hello: the proof does not match this cluster's "
                                                  "peer secret (or the challenge expired or was used)")
        s, evicted = self.sessions.open(PEER_NS, "peer", self.dcfg.lease_s, now)
        if s is None:
            raise P.ProtocolError("busy", f"too many clients ({self.dcfg.max_clients})")
        if evicted is not None:  # an idle client's session made room (sessions.py does the same)
            self._release(evicted)
        return {"session": s.sid, "agent": self.agent.name, "metadata": self.agent.metadata}

    def op_peer_lookup(self, msg: dict, now: float) -> dict:
        """A peer's pull: pin our G2 prefix of its keys and answer their addresses.

        With `crcs_later` (a peer of this version) the crc32c per block is computed on a helper
        thread while the peer READs and returned by peer_release; otherwise it is in this reply.
        """
        s = self._session(msg, now, peer=True)
        ns = P.field(msg, "namespace", bytes)
        if len(ns) != P.KEY_BYTES:
            raise P.ProtocolError("bad_field", f"field 'namespace' must be a {P.KEY_BYTES}-byte namespace id")
        # our own server keys, within the namespace asked for: no other namespace can be named
        skeys = [server_key(ns, k) for k in P.keys(msg, "keys", self.dcfg.max_keys, unique=True)]
        later = P.field(msg, "crcs_later", bool, required=False, default=False)
        wait_s = P.field(msg, "wait_s", (int, float), required=False, default=0.0)
        deferred = self._defer_for_lower(s, skeys, lambda: self._peer_pinned(s, skeys, later),
                                         max(0.0, min(float(wait_s), 5.0)))
        return deferred if deferred is not None else self._peer_pinned(s, skeys, later)

    def _peer_pinned(self, s: Session, skeys: list, later: bool) -> dict:
        job = self._pin_in_g2(skeys)
        if not job.keys:
            self.manager.complete_load(job)
            return {"handle": 0, "n": 0}
        slots = np.asarray(job.slots, dtype=np.int64)
        offsets = self.pool.offsets(slots).astype(np.uint64)
        h = s.handle()
        s.loads[h] = job
        base = self.pool.address
        reply = {"handle": h, "n": len(job.keys), "addrs": [base + int(o) for o in offsets], "nbytes": self.nbytes}
        # a block served or pulled before keeps its crc32c (HostStorage.remember_crcs): only the
        # others are checksummed, leaving a core to the READ (CRC_THREADS)
        crcs, known = self.pool.known_crcs(slots)
        todo = np.flatnonzero(~known)
        if not len(todo):
            reply["crcs"] = crcs.tolist()
        elif later and self._crc_pool is not None:
            s.crcs[h] = (crcs, todo, self._crc_pool.submit(_timed_crcs, self.pool.pool, offsets[todo], self.nbytes))
            reply["crcs_later"] = True
        else:
            crcs[todo] = ops.crc32c_blocks(self.pool.pool, offsets[todo], self.nbytes, threads=CRC_THREADS)
            self.pool.remember_crcs(slots[todo], crcs[todo])
            self.counters["peer_serve_crc_blocks"] += len(todo)
            reply["crcs"] = crcs.tolist()
        return reply

    def op_peer_release(self, msg: dict, now: float) -> dict:
        s = self._session(msg, now, peer=True)
        h = P.integer(msg, "handle")
        job = s.loads.pop(h, None)
        if job is None:
            raise P.ProtocolError("bad_handle", f"no load {h} in this session")
        pending = s.crcs.pop(h, None)
        out: dict = {}
        if pending is not None and P.field(msg, "crcs", bool, required=False, default=False):
            crcs, todo, fut = pending
            try:  # computed while the peer READ (pinned, so the bytes cannot change); done by now
                got, seconds = fut.result(timeout=30)
            except Exception as exc:
                log.warning("crc32c for a peer's pull failed: %s", exc)
            else:
                crcs[todo] = got
                self.pool.remember_crcs(np.asarray(job.slots, dtype=np.int64)[todo], got)  # still pinned
                out["crcs"] = crcs.tolist()
                self.counters["peer_serve_crc_s"] += seconds
                self.counters["peer_serve_crc_blocks"] += len(todo)
        self.manager.complete_load(job)
        return out

    # The puller thread: everything below up to the owner-thread halves runs there, except what
    # goes through _owner (the manager is the owner thread's alone). The NIXL agent is the
    # puller's alone too (it is created without thread-safety: sync mode none).

    def _pull_loop(self) -> None:
        _name_thread("kvbm-puller")
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
                pending, want = item
                try:
                    if not self._stopping:
                        self._pull(*want)
                except ShuttingDown:
                    raise
                except Exception:  # a bug in one pull must not stop later ones
                    log.exception("peer pull failed")
                self._owner(self._lookup_done, pending, wait=False)
            except ShuttingDown:
                return

    def _pull(self, ns: bytes, keys: list, skeys: list) -> int:
        """Ask peers, in order, for the prefix of namespace ns's client keys (skeys: our server
        keys of them); READ it into our G2. Blocks landed."""
        ask = {"namespace": ns, "keys": keys, "crcs_later": True, "wait_s": self.dcfg.peer_timeout_s / 2}
        clock = dict.fromkeys(PULL_PHASES, 0.0)
        try:
            for peer in self.peers.live():
                if self._stopping:
                    return 0
                t0 = time.perf_counter()
                if not self.peers.connect(peer):
                    continue
                reply = self.peers.ask(peer, "peer_lookup", **ask)
                if reply is None and peer.session is None and peer.down_until <= time.monotonic():
                    # our session there lapsed (idle past its lease, or it restarted): hello, retry once
                    if self.peers.connect(peer):
                        reply = self.peers.ask(peer, "peer_lookup", **ask)
                clock["ask"] += time.perf_counter() - t0
                if reply is None or not reply.get("handle"):
                    continue
                released = [False]
                try:
                    return self._read_from(peer, (ns, keys, skeys), reply, released, clock)
                finally:
                    if not released[0]:
                        self.peers.ask(peer, "peer_release", handle=reply["handle"])
            return 0
        finally:
            failures, self.peers.auth_failures = self.peers.auth_failures, 0
            counts = {f"peer_pull_{k}_s": v for k, v in clock.items() if v}
            if failures:
                counts["peer_auth_failures"] = failures
            if counts:
                self._owner(partial(self._count, **counts), wait=False)

    def _read_from(self, peer: Any, want_keys: tuple, reply: dict, released: list, clock: dict) -> int:
        ns, keys, skeys = want_keys
        n = reply.get("n")
        addrs, crcs = reply.get("addrs"), reply.get("crcs")
        later = reply.get("crcs_later") is True
        if (not isinstance(n, int) or not 0 < n <= len(skeys) or reply.get("nbytes") != self.nbytes
                or not isinstance(addrs, list) or len(addrs) != n
                or not (later or isinstance(crcs, list) and len(crcs) == n)):
            self._owner(partial(self._count, peer_errors=1))
            return 0
        t0 = time.perf_counter()
        job, slots = self._owner(self._reserve_pull, ns, keys[:n], skeys[:n])
        clock["reserve"] += time.perf_counter() - t0
        if job is None:
            return 0
        want = [i for i, slot in enumerate(slots) if slot >= 0]
        failed = {skeys[i] for i in want}  # until verified
        verified: list = []  # (slot, crc32c) of the blocks that matched: G2 keeps their checksum
        counts: dict = {}
        landed = 0
        try:
            if want:
                state, late, dt, local_crcs = self._read_chunks(peer, want, slots, addrs)
                clock["read"] += dt
                if late is not None:
                    # The READ may still land in these slots: they stay reserved (never served,
                    # never reused) until it ends, then roll back (_reap_late, or at shutdown).
                    self._late.append((late, job))
                    self._owner(partial(self._count, peer_errors=len(want)))
                    job = None
                    return 0
                if state == "DONE" and later:
                    released[0] = True
                    t0 = time.perf_counter()
                    got = self.peers.ask(peer, "peer_release", handle=reply["handle"], crcs=True)
                    clock["release"] += time.perf_counter() - t0
                    crcs = got.get("crcs") if got else None
                    if not isinstance(crcs, list) or len(crcs) != n:
                        log.warning("peer %s sent no checksums for a pull; dropping it", peer.address)
                        state = "ERR"
                if state == "DONE":
                    t0 = time.perf_counter()
                    got_crcs = [c for fut in local_crcs for c in fut.result()]
                    clock["verify"] += time.perf_counter() - t0
                    bad = [skeys[i] for i, c in zip(want, got_crcs) if int(c) != crcs[i]]
                    failed = set(bad)
                    verified = [(slots[i], int(c)) for i, c in zip(want, got_crcs) if int(c) == crcs[i]]
                    counts.update(peer_errors=len(bad), peer_pull_blocks=len(want) - len(bad),
                                  peer_pull_bytes=(len(want) - len(bad)) * self.nbytes, peer_pull_seconds=dt)
                else:
                    counts["peer_errors"] = len(want)
        finally:
            if job is not None:
                t0 = time.perf_counter()
                landed = self._owner(self._commit_pull, job, failed, counts, verified)
                clock["commit"] += time.perf_counter() - t0
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
            futures.append(self._crc_pool.submit(ops.crc32c_blocks, self.pool.pool, offs, self.nbytes,
                                                 threads=CRC_THREADS))
        return state, late, time.perf_counter() - t0, futures

    # owner-thread halves of a pull

    def _reserve_pull(self, ns: bytes, keys: list, skeys: list) -> tuple[Any, list]:
        job, slots, extra = self._reserve(skeys)
        if job is None:
            return None, slots
        for k, ck, slot in zip(skeys, keys, slots):
            if slot >= 0:  # its events go to namespace ns, named by the client's key
                self.origin[k] = (ns, ck)
        # keys reserved below G2 (admission said so) get no bytes from the READ: rolled back at commit
        self._pull_jobs[id(job)] = (job, set(extra))
        return job, slots

    def _commit_pull(self, job: Any, failed: set, counts: dict, verified: list = ()) -> int:
        _, extra = self._pull_jobs.pop(id(job), (job, set()))
        if verified:  # a block that rolls back below frees its slot, which forgets the checksum
            self.pool.remember_crcs([slot for slot, _ in verified], [crc for _, crc in verified])
        self.manager.complete_store(job, failed=failed | extra)
        for k in job.failed:  # rolled back: no event will ever name it again
            if k not in self.manager:
                self.origin.pop(k, None)
        self._count(**counts)
        return len(job.keys) - len(job.failed)

    def _reap_late(self) -> None:
        """Puller thread: roll back pulls whose READ outlived its timeout, once the READ ended."""
        keep = []
        for handle, job in self._late:
            if self.agent.finished(handle):
                self._owner(self._commit_pull, job, set(job.keys), {})
            else:
                keep.append((handle, job))
        self._late = keep

    # ---------------------------------------------------------------- shutdown halves

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

    def _close_peering(self) -> None:
        """After sessions are released: the crc helper, pulls that did not come back, the agent."""
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


def _name_thread(name: str) -> None:
    """The OS name of the calling thread (top -H, /proc/PID/task/*/comm), where Linux allows it."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _timed_crcs(pool: np.ndarray, offsets: np.ndarray, nbytes: int) -> tuple:
    t0 = time.perf_counter()
    crcs = ops.crc32c_blocks(pool, offsets, nbytes, threads=CRC_THREADS)
    return crcs, time.perf_counter() - t0


def _bin(msg: dict, name: str) -> bytes:
    v = P.field(msg, name, bytes)
    if len(v) != NONCE_BYTES:
        raise P.ProtocolError("bad_field", f"field {name!r} must be {NONCE_BYTES} bytes")
    return v
