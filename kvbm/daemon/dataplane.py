"""Data-plane ops of the daemon: lookups, two-phase stores and loads over the shared G2 pool, pins.

    lookup          the longest ready prefix (a local miss may go to the peers: Peering._ask_peers)
    store_prepare   reserve G2 slots and as many window slots, which the client writes;
                    store_commit copies window -> G2 and marks them ready, or rolls back
    load_prepare    copy the G2-ready prefix into the session's window (G3/G4 blocks come up first,
                    off the loop: onboard.py); load_release frees those window slots
    store / load    one-shot, one round trip: the same through the session's scratch slots, which
                    the client names (it wrote them before a store; it reads them after a load);
                    nothing is held once the request is answered
    pin / unpin     explicit pins, counted per session
    lookup_pin      lookup, then pin the ready prefix from an index on: one round trip

Keys are namespaced server-side (leases.server_key): two namespaces never address the same block.
A client never maps G2: only its own window (windows.py), so no byte of another namespace is
ever in memory it can read or write.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from . import protocol as P
from .leases import Reservation, Session, WindowLoad, server_key
from .tenants import store_hints
from .windows import WindowStalled

log = logging.getLogger("kvbm.daemon")
SCRATCH_BLOCKS = 16  # a session's scratch slots (one-shot ops), past its window's allocated ones


class DataPlane:
    """Mixin of Daemon: the block ops."""

    def _keys(self, msg: dict, s: Session, unique: bool = False, busy: bool = False) -> tuple[list[bytes], list[bytes]]:
        """The request's keys, namespaced; `busy`: they would be held, so check the quotas."""
        keys = P.keys(msg, "keys", self.dcfg.max_keys, unique=unique)
        if busy:
            self._check_quota(s, len(keys))
        return keys, [server_key(s.namespace, k) for k in keys]

    def _check_quota(self, s: Session, n: int) -> None:
        """G2 blocks held (pins, reservations) per session, and per namespace and per owner (a
        named tenant, else a uid) as a share of G2: many sessions or namespaces of one tenant
        cannot hold more than that tenant may, whatever the others do."""
        limit = self.dcfg.max_session_blocks
        if limit and s.held + n > limit:
            raise P.ProtocolError("quota", f"this client keeps {s.held} blocks busy; at most {limit} "
                                           f"(daemon.max_session_blocks): release or commit first")
        held = self.sessions.busy_by_ns.get(s.namespace, 0)
        if held + n > self.share_blocks:
            raise P.ProtocolError("quota", f"this namespace keeps {held} G2 blocks busy; at most {self.share_blocks} "
                                           f"(daemon.namespace_share of {self.top.capacity})")
        bound = self._owner_bound(s)
        held = self.sessions.busy_by_owner.get(s.owner, 0)
        if bound is not None and held + n > bound:
            what, key = ((f"tenant {s.tenant!r}", f"daemon.tenants.{s.tenant.split('~')[0]}.share") if s.tenant
                         else ("uid", "daemon.namespace_share"))
            raise P.ProtocolError("quota", f"this {what} keeps {held} G2 blocks busy; at most {bound} "
                                           f"({key} of {self.top.capacity})")

    def _owner_bound(self, s: Session) -> int | None:
        """G2 blocks all sessions of s's owner may keep busy; None: no bound but the namespace's.
        A named tenant: its own share (tenants.py). Else its uid: none for the daemon's own user,
        namespace_share for another user on the same-node socket, and for every default-tenant
        (daemon.token) client on tcp:// together (uid unknown, -1)."""
        if s.tenant:
            return self.tenant_blocks[s.tenant]
        return None if s.uid in self._own_uids else self.share_blocks

    def op_lookup(self, msg: dict, now: float) -> Any:
        s = self._session(msg, now)
        keys, skeys = self._keys(msg, s)
        n, where, deferred = self._lookup(msg, s, keys, skeys)
        return deferred if deferred is not None else self._lookup_reply(skeys, n, where)

    def _lookup(self, msg: dict, s: Any, keys: list, skeys: list) -> tuple[int, list, Any]:
        """(n, where, deferred): the local lookup, and the peers' deferred reply when the request
        asks them (`remote`, default true) and they may hold more of the prefix."""
        remote = P.field(msg, "remote", bool, required=False, default=True)
        n, where = self.manager.lookup(skeys)
        return n, where, (self._ask_peers(s, keys, skeys, n) if remote else None)

    def _lookup_reply(self, skeys: list, n: int, where: list) -> dict:
        self.counters["lookup_blocks"] += len(skeys)
        self.counters["prefix_hit_blocks"] += n
        return {"n": n, "where": where}

    def _store_fields(self, msg: dict, s: Session, n: int) -> tuple:
        """(server parent key, position, hints) of a store request."""
        parent = P.field(msg, "parent", bytes, required=False)
        if parent is not None and len(parent) != P.KEY_BYTES:
            raise P.ProtocolError("bad_field", f"field 'parent' must be {P.KEY_BYTES} bytes")
        position = P.integer(msg, "position", required=False, lo=0, hi=2**31)
        sparent = server_key(s.namespace, parent) if parent is not None else None
        retention = P.priorities(msg, "priorities", n)
        # with tenants each tier is partitioned by owner (tenants.partition_tiers): the blocks are s's tenant's
        return sparent, position, store_hints(retention, s.tenant if self.dcfg.tenants else None)

    def _scratch(self, s: Session, msg: dict, n: int) -> list[int]:
        """The scratch slots a one-shot op names, one per key (the session's own memory)."""
        if s.window is None:
            raise P.ProtocolError("bad_session", "this session has no window")
        try:
            return s.window.scratch_slots(msg.get("slots"), n)
        except ValueError as exc:
            raise P.ProtocolError("bad_field", str(exc)) from None

    def op_store(self, msg: dict, now: float) -> dict:
        """One-shot store: the client wrote each key's bytes into the scratch slot it names; the
        new blocks are copied into G2 and marked ready within this request."""
        s = self._session(msg, now)
        keys, skeys = self._keys(msg, s, unique=True)
        wslots = self._scratch(s, msg, len(keys))
        hashes = self._engine_hashes(msg, len(skeys))  # events.py: checked before anything is reserved
        fields = self._store_fields(msg, s, len(skeys))

        def answer() -> dict:
            job, slots, extra = self._reserve(skeys, *fields)
            self._adopt_hashes(s, skeys, job, hashes)
            if job is None:
                return {"stored": 0, "rejected": extra}
            if not job.runs:
                return {"stored": 0}
            want = [i for i, slot in enumerate(slots) if slot >= 0]
            # a guarded copy: a client that truncated its window fails its blocks (windows.py)
            try:
                torn = s.window.read_into([wslots[i] for i in want], self.pool.pool,
                                          self.pool.offsets([slots[i] for i in want]), self._inline(s))
            except WindowStalled as exc:
                self._window_stalled(s, exc, lambda: self._stored(self._rolled_back(job)))
            for i in want:
                self.origin[skeys[i]] = (s.namespace, keys[i])
            self.manager.complete_store(job, failed=set(extra).union(skeys[want[j]] for j in torn))
            return {"stored": self._stored(job)}

        later = self._defer_for_room(s, skeys, answer, op="store")  # onboard.py: G2 full, offloader behind
        return later if later is not None else answer()

    def _stored(self, job) -> int:
        for k in job.failed:  # rolled back: no event will ever name it again
            if k not in self.manager:
                self.origin.pop(k, None)
        stored = len(job.keys) - len(job.failed)
        self.counters["client_store_bytes"] += stored * self.nbytes
        return stored

    def op_load(self, msg: dict, now: float) -> Any:
        """One-shot load: the G2-ready prefix is copied into the scratch slots the client names."""
        s = self._session(msg, now)
        _, skeys = self._keys(msg, s, unique=True)
        wslots = self._scratch(s, msg, len(skeys))
        later = self._defer_for_lower(s, skeys, lambda: self._loaded(s, skeys, wslots), op="load")
        return later if later is not None else self._loaded(s, skeys, wslots)

    def _loaded(self, s: Session, skeys: list, wslots: list) -> dict:
        if s.window is None or s.sid not in self.sessions.by_id:  # closed while the request waited
            return {"n": 0}
        job = self._pin_in_g2(skeys)
        # a guarded copy: a full tmpfs fails the rest, a miss (windows.py)
        try:
            n = s.window.write_from(self.pool.pool, self.pool.offsets(list(job.slots)), wslots[:len(job.keys)],
                                    self._inline(s))
        except WindowStalled as exc:
            self._window_stalled(s, exc, lambda: self.manager.complete_load(job))
        self.manager.complete_load(job)
        self.counters["client_load_bytes"] += n * self.nbytes
        return {"n": n}

    def op_store_prepare(self, msg: dict, now: float) -> Any:
        s = self._session(msg, now)
        keys, skeys = self._keys(msg, s, unique=True, busy=True)
        hashes = self._engine_hashes(msg, len(skeys))  # events.py: checked before anything is reserved
        fields = self._store_fields(msg, s, len(skeys))
        later = self._defer_for_room(s, skeys, lambda: self._prepared(s, keys, skeys, fields, hashes, True),
                                     op="store_prepare")  # onboard.py: G2 full, offloader behind
        return later if later is not None else self._prepared(s, keys, skeys, fields, hashes)

    def _prepared(self, s: Session, keys: list, skeys: list, fields: tuple, hashes: Any,
                  waited: bool = False) -> dict:
        if waited:  # what the session holds may have grown while this request waited for room
            self._check_quota(s, len(keys))
        job, slots, extra = self._reserve(skeys, *fields)
        self._adopt_hashes(s, skeys, job, hashes)
        if job is None:
            return {"handle": 0, "slots": slots, "rejected": extra}
        if not job.runs:
            return {"handle": 0, "slots": slots}
        # The client writes its window, never G2: the bytes reach G2 in store_commit (a copy by
        # this thread), so a client frozen past its lease can only ever scribble on its own window.
        want = [i for i, slot in enumerate(slots) if slot >= 0]
        wslots = s.window.allocate(len(want))
        if wslots is None:
            self.manager.complete_store(job, failed=job.keys)
            raise P.ProtocolError("window_full", f"{len(want)} blocks do not fit the free slots of this "
                                                 f"session's window ({s.window.free_slots}): commit or release first")
        for i in want:
            self.origin[skeys[i]] = (s.namespace, keys[i])
        h = s.handle()
        s.stores[h] = Reservation(job, skeys, extra, want, [slots[i] for i in want], wslots,
                                  time.monotonic() + self.dcfg.reserve_s)
        self.sessions.charge(s, len(job.keys))
        self._undo_info = ("store", h)
        out = [-1] * len(skeys)
        for i, w in zip(want, wslots):
            out[i] = w
        return {"handle": h, "slots": out}

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
        r = s.stores.get(h)
        if r is None:
            raise P.ProtocolError("bad_handle", f"no reservation {h} in this session")
        job, skeys = r.job, r.skeys
        failed = {skeys[i] for i in P.indices(msg, "failed", len(skeys))}
        del s.stores[h]
        keep = [j for j, i in enumerate(r.want) if skeys[i] not in failed]
        # window -> G2, for the blocks the client says it wrote; a truncated window fails them
        try:
            torn = s.window.read_into([r.wslots[j] for j in keep], self.pool.pool,
                                      self.pool.offsets([r.gslots[j] for j in keep]), self._inline(s))
        except WindowStalled as exc:  # (the session's release uncharges this reservation too)
            self._window_stalled(s, exc, lambda: self._stored(self._rolled_back(job)))
        failed.update(skeys[r.want[keep[j]]] for j in torn)
        s.window.free(r.wslots)
        self.sessions.charge(s, -len(job.keys))
        self.manager.complete_store(job, failed=failed.union(r.extra))
        return {"stored": self._stored(job)}

    def op_load_prepare(self, msg: dict, now: float) -> Any:
        s = self._session(msg, now)
        _, skeys = self._keys(msg, s, unique=True)  # G2 is pinned only while this request copies
        later = self._defer_for_lower(s, skeys, lambda: self._load_prepared(s, skeys))  # onboard.py
        return later if later is not None else self._load_prepared(s, skeys)

    def _load_prepared(self, s: Session, skeys: list) -> dict:
        """Copy the G2-ready prefix into the session's window; G2 is pinned only for the copy."""
        if s.window is None or s.sid not in self.sessions.by_id:  # closed while the request waited
            return {"handle": 0, "slots": []}
        job = self._pin_in_g2(skeys)
        n = min(len(job.keys), s.window.free_slots)
        wslots = s.window.allocate(n) if n else []
        # a guarded copy: a full tmpfs fails the rest, a miss (windows.py)
        try:
            n = s.window.write_from(self.pool.pool, self.pool.offsets(list(job.slots)[:n]), wslots, self._inline(s))
        except WindowStalled as exc:
            self._window_stalled(s, exc, lambda: self.manager.complete_load(job))
        s.window.free(wslots[n:])
        wslots = wslots[:n]
        self.manager.complete_load(job)
        if not n:
            return {"handle": 0, "slots": []}
        h = s.handle()
        s.loads[h] = WindowLoad(wslots, time.monotonic() + self.dcfg.reserve_s)
        self._undo_info = ("load", h)
        self.counters["client_load_bytes"] += n * self.nbytes
        return {"handle": h, "slots": wslots}

    def _inline(self, s: Session) -> bool:
        """Copy through s's window on the loop thread, no copier hand-off: its client runs as the
        daemon's own user with no tenant token, so it could stop the daemon anyway (SIGSTOP,
        ptrace): out of the trust model's scope (SECURITY.md). The copy is still guarded (a
        truncated window fails its blocks, never the daemon); a hole punched under it can hold
        the loop. Every other client's copies go through the copier with its deadline."""
        return not s.tenant and s.uid in self._own_uids

    def _rolled_back(self, job):
        self.manager.complete_store(job, failed=job.keys)
        return job

    def _window_stalled(self, s: Session, exc: WindowStalled, finish) -> None:
        """A copy through s's window outlived its deadline (its client holds the file busy:
        fallocate, hole punching): s ends now and the request fails, so the loop goes on for
        everyone else. The copy still runs, so what it touches stays held until it ends: the
        window's descriptor and mapping (Window.close), and the G2 slots it reads or writes,
        which `finish` (the job's completion: a rollback, or a load's unpin) releases then, on
        the owner thread."""
        self.counters["window_stalls"] = self.counters.get("window_stalls", 0) + 1
        log.warning("%s: %s; session ended", s.label, exc)

        def later() -> None:
            try:
                self._owner(finish, wait=False)
            except Exception:  # shutting down: nothing left to release
                pass

        exc.task.then(later)
        if self.sessions.get(s.sid) is s:
            self._release(s)
        raise P.ProtocolError("window_stalled", f"{exc}; this session is ended: open a new one (hello)")

    def _pin_in_g2(self, skeys: list):
        """Pin the prefix of skeys ready in G2 (blocks below it come up off the loop: onboard.py)."""
        ready = self.top.ready
        k = 0
        while k < len(skeys) and skeys[k] in ready:
            k += 1
        return self.manager.prepare_load(skeys[:k])

    def op_load_release(self, msg: dict, now: float) -> dict:
        s = self._session(msg, now)
        h = P.integer(msg, "handle")
        ld = s.loads.pop(h, None)
        if ld is None:
            raise P.ProtocolError("bad_handle", f"no load {h} in this session")
        s.window.free(ld.wslots)
        return {}

    def op_lookup_pin(self, msg: dict, now: float) -> Any:
        """lookup, then pin the ready prefix's keys from index `pin_from` on, in one round trip
        (an engine's scheduler promises a hit and pins it; two round trips were ~0.7 ms of its
        thread per request). The pins are op_pin's: this session's, counted against its quotas,
        released by unpin, bye, lease expiry, the client's death or daemon.pin_s; a replay of the
        request id gets the first reply (no second pin); a cancel unpins them. Nothing is pinned
        when the quota refuses ("pinned": 0 and "quota": its message, the lookup still answered)
        or when the lookup waits on the peers (a deferred lookup's reply has no "pinned": the
        client pins with op pin). The lookup and the pin see the same tiers (one request of the
        loop): every block of the ready prefix is pinned."""
        s = self._session(msg, now)
        keys, skeys = self._keys(msg, s)
        start = P.integer(msg, "pin_from", required=False, lo=0, hi=len(skeys))
        n, where, deferred = self._lookup(msg, s, keys, skeys)
        if deferred is not None:
            return deferred
        reply = self._lookup_reply(skeys, n, where)
        if n <= start:
            reply["pinned"] = 0
            return reply
        try:
            reply["pinned"] = self._pin_keys(s, skeys[start:n], now)
        except P.ProtocolError as exc:
            if exc.code != "quota":
                raise
            reply.update(pinned=0, quota=str(exc))
        return reply

    def op_pin(self, msg: dict, now: float) -> dict:
        s = self._session(msg, now)
        _, skeys = self._keys(msg, s)
        return {"n": self._pin_keys(s, skeys, now)}

    def _pin_keys(self, s: Session, skeys: list, now: float) -> int:
        """Pin the ready prefix of skeys for session s; how many (ProtocolError quota: none)."""
        # A block this session pins again keeps no more of G2 busy: the quota and the charge
        # count its distinct pinned blocks (the count per key says how many unpins release it),
        # so requests sharing a prefix do not exhaust the quota with one block counted many times.
        self._check_quota(s, len(set(skeys).difference(s.pins)))
        n = self.manager.pin(skeys)
        new = 0
        for k in skeys[:n]:
            entry = s.pins.get(k)
            if entry is None:
                entry = s.pins[k] = [0, now]
                new += 1
            entry[0] += 1
        self.sessions.charge(s, new)
        self.counters["pinned_blocks"] += n  # pins taken, ever (stats: tests see a hit was pinned)
        self._undo_info = ("pin", skeys[:n])
        return n

    def op_unpin(self, msg: dict, now: float) -> dict:
        s = self._session(msg, now)
        _, skeys = self._keys(msg, s)
        return {"n": self._unpin_keys(s, skeys)}
