"""Data-plane ops of the daemon: lookups, two-phase stores and loads over the shared G2 pool, pins.

    lookup          the longest ready prefix (a local miss may go to the peers: Peering._ask_peers)
    store_prepare   reserve G2 slots the client writes; store_commit marks them ready or rolls back
    load_prepare    pin the ready prefix in G2 (G3/G4 blocks come up first, off the loop: onboard.py)
    pin / unpin     explicit pins, counted per session

Keys are namespaced server-side (leases.server_key): two namespaces never address the same block.
"""

from __future__ import annotations

import logging
from typing import Any

from ..policies.base import Hints
from . import protocol as P
from .leases import Session, server_key

log = logging.getLogger("kvbm.daemon")


class DataPlane:
    """Mixin of Daemon: the block ops."""

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
        if remote:
            deferred = self._ask_peers(s, keys, skeys, n)
            if deferred is not None:
                return deferred
        return self._lookup_reply(skeys, n, where)

    def _lookup_reply(self, skeys: list, n: int, where: list) -> dict:
        self.counters["lookup_blocks"] += len(skeys)
        self.counters["prefix_hit_blocks"] += n
        return {"n": n, "where": where}

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

    def op_load_prepare(self, msg: dict, now: float) -> Any:
        s = self._session(msg, now)
        _, skeys = self._keys(msg, s, unique=True, busy=True)
        later = self._defer_for_lower(s, skeys, lambda: self._load_prepared(s, skeys))  # onboard.py
        return later if later is not None else self._load_prepared(s, skeys)

    def _load_prepared(self, s: Session, skeys: list) -> dict:
        job = self._pin_in_g2(skeys)
        if not job.keys:
            self.manager.complete_load(job)
            return {"handle": 0, "slots": []}
        h = s.handle()
        s.loads[h] = job
        self.counters["client_load_bytes"] += len(job.keys) * self.nbytes
        return {"handle": h, "slots": list(job.slots)}

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
        job = s.loads.pop(h, None)
        if job is None:
            raise P.ProtocolError("bad_handle", f"no load {h} in this session")
        s.crcs.pop(h, None)
        self.manager.complete_load(job)
        return {}

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
