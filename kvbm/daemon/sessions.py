"""Session ops of the daemon: hello, heartbeat, bye, cancel, and the bounds that release what a
silent, slow or greedy client holds.

    SessionOps.op_hello / op_heartbeat / op_bye / op_cancel
    SessionOps._session(msg, now)      the request's session, renewed (no_session if unknown, or
                                       opened under another tenant's token: tenants.py)
    SessionOps._replayed / _remember   a retried request id gets its first reply (idempotence)
    SessionOps._release(s)             roll back reservations, free window slots, drop pins
    SessionOps._expire(now)            leases, reservations past daemon.reserve_s, pins past pin_s

The session table and what a session holds are in leases.py; its window in windows.py.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from ..blocks import KVLayout
from . import protocol as P
from .events import topic_of
from .leases import PEER_NS, Reservation, Session, WindowLoad, namespace_of
from .transport import alive, peer_credentials
from .windows import Window

log = logging.getLogger("kvbm.daemon")
_LAYOUT_FIELDS = {f.name: f.type for f in dataclasses.fields(KVLayout)}
REPLAYED_OPS = frozenset({"store_prepare", "store_commit", "load_prepare", "load_release", "pin", "unpin",
                          "lookup_pin"})


class SessionOps:
    """Mixin of Daemon: sessions and leases."""

    def _own_session(self, msg: dict) -> Session | None:
        """The session the request names, if the request's tenant opened it: another tenant's
        token never reaches it (not even to learn that it exists: the same no_session)."""
        s = self.sessions.get(msg.get("session"))
        return s if s is not None and s.tenant == self._tenant else None

    def _session(self, msg: dict, now: float, peer: bool = False) -> Session:
        s = self._own_session(msg)
        if s is None:
            raise P.ProtocolError("no_session", "unknown or expired session; say hello again")
        if (s.namespace == PEER_NS) != peer:
            raise P.ProtocolError("bad_session", "this op is not allowed for this session kind")
        s.renew(now)
        s.active, s.used = now, True
        if s.window is not None and s.window.linked:
            s.window.unlink()  # the client has mapped it by now: no one else may open it
        return s

    def op_hello(self, msg: dict, now: float) -> dict:
        model = P.string(msg, "model")
        salt = P.string(msg, "salt", required=False)
        if not model:
            raise P.ProtocolError("bad_field", "field 'model' must name the model")
        layout = _layout(P.field(msg, "layout", dict))
        if layout.block_nbytes != self.nbytes:
            raise P.ProtocolError("layout_mismatch", f"this daemon holds blocks of {self.nbytes} bytes; "
                                                     f"the layout gives {layout.block_nbytes}")
        tenant = self._tenant  # the request's token's (server.handle): its namespaces are its own
        try:
            ns = namespace_of(model, layout.fingerprint, salt, tenant)
        except ValueError as exc:
            raise P.ProtocolError("bad_field", str(exc)) from None
        uid, pid = self._peer_credentials()
        s, evicted = self.sessions.open(ns, model, self.dcfg.lease_s, now, uid=uid, pid=pid, tenant=tenant)
        if s is None:
            raise P.ProtocolError("busy", f"too many clients with work in flight ({self.dcfg.max_clients} in "
                                          f"all, {self.sessions.bound(tenant if tenant else uid)} for this "
                                          f"{'tenant' if tenant else 'uid'}): release or close some")
        if evicted is not None:
            self.counters["sessions_evicted"] += 1
            self._release(evicted)
        try:
            s.window = Window.create(self.dcfg.shm_name, self.window_slots, self.pool.stride, self.nbytes,
                                     self.scratch_slots, self.dcfg.window_copy_deadline_s)
            if uid >= 0 and uid != os.getuid() and os.getuid() == 0:
                os.fchown(s.window.fd, uid, -1)  # another user let in on the socket: its window is its own
        except OSError as exc:
            self.sessions.close(s)
            raise P.ProtocolError("busy", f"cannot create a staging window: {exc.strerror}") from None
        return {"session": s.sid, "window_path": s.window.path, "window_bytes": s.window.nbytes,
                "window_slots": s.window.slots, "scratch": [s.window.slots, s.window.scratch], "stride": self.pool.stride, "block_nbytes": self.nbytes,
                "lease_s": self.dcfg.lease_s, "max_keys": self.dcfg.max_keys, "capacity": self.top.capacity,
                "max_session_blocks": self.dcfg.max_session_blocks,
                "share_blocks": min(self.share_blocks, self._owner_bound(s) or self.share_blocks),
                "topic": topic_of(ns), "tenant": tenant or "default"}

    def op_heartbeat(self, msg: dict, now: float) -> dict:
        s = self._own_session(msg)
        if s is None:
            raise P.ProtocolError("no_session", "unknown or expired session; say hello again")
        s.renew(now)
        return {}

    def op_bye(self, msg: dict, now: float) -> dict:
        s = self._own_session(msg)
        if s is not None:
            self._release(s)
        return {}

    def op_cancel(self, msg: dict, now: float) -> dict:
        """The client gave up waiting for request id `cancels`: undo it, or refuse it when it comes."""
        s = self._session(msg, now)
        rid = P.integer(msg, "cancels", lo=1, hi=2**63 - 1)
        done = s.replies.pop(rid, None)
        if done is None:
            s.cancel_early(rid)
            return {"undone": False}
        op, _, undo = done
        if undo is not None:
            self._undo(s, undo)
        self.counters["cancelled"] += 1
        return {"undone": undo is not None}

    def _undo(self, s: Session, undo: tuple) -> None:
        kind, arg = undo
        if kind == "store" and arg in s.stores:
            self._rollback_store(s, s.stores.pop(arg))
        elif kind == "load" and arg in s.loads:
            s.window.free(s.loads.pop(arg).wslots)
        elif kind == "pin":
            self._unpin_keys(s, arg)

    def _peer_credentials(self) -> tuple[int, int]:
        """(uid, pid) of the client sending the current request; (-1, 0) when unknown (tcp)."""
        return peer_credentials(self._last_frame) if self._last_frame is not None else (-1, 0)

    # ---------------------------------------------------------------- request ids

    def _replayed(self, msg: dict, op: str, rid: int, now: float) -> bytes | None:
        """A cached reply when this session already answered request `rid` (a client's retry);
        a `cancelled` error when the client cancelled it before it arrived."""
        if op not in REPLAYED_OPS or not rid:
            return None
        s = self._own_session(msg)
        if s is None:
            return None
        if rid in s.cancelled:
            del s.cancelled[rid]
            return P.error_reply(rid, "cancelled", "this request was cancelled by the client")
        done = s.replies.get(rid)
        if done is None or done[0] != op:
            return None
        s.renew(now)
        return done[1]

    def _remember(self, msg: dict, op: str, rid: int, out: bytes, undo: tuple | None) -> None:
        if op in REPLAYED_OPS and rid:
            # Not _own_session: the op that made this reply already took the session (_session,
            # under the request's token), and a deferred reply (onboard.py's finisher) is made
            # later, while another tenant's request may be the current one: checking that
            # request's token dropped the reply, so the owner's retry ran again, its cancel undid nothing
            s = self.sessions.get(msg.get("session"))
            if s is not None:
                s.remember(rid, op, out, undo)

    # ---------------------------------------------------------------- release paths

    def _rollback_store(self, s: Session, r: Reservation) -> None:
        self.manager.complete_store(r.job, failed=r.job.keys)
        self.sessions.charge(s, -len(r.job.keys))
        s.window.free(r.wslots)
        for k in r.job.keys:  # rolled back: no event will ever name it again
            if k not in self.manager:
                self.origin.pop(k, None)

    def _unpin_keys(self, s: Session, skeys: list) -> int:
        n = 0
        for k in skeys:  # only what this session pinned
            entry = s.pins.get(k)
            if entry:
                self.manager.unpin([k])
                n += 1
                entry[0] -= 1
                if not entry[0]:
                    del s.pins[k]
                    self.sessions.charge(s, -1)  # a distinct pinned block (dataplane.op_pin)
        return n

    def _release(self, s: Session) -> None:
        """Roll back every reservation, finish every load, drop every pin of s, close its window."""
        m = self.manager
        for r in list(s.stores.values()):
            self._rollback_store(s, r)
        for ld in s.loads.values():
            if not isinstance(ld, WindowLoad):  # a peer's pinned load
                m.complete_load(ld)
        s.crcs.clear()
        for key, (count, _) in s.pins.items():
            for _ in range(count):
                m.unpin([key])
        self.sessions.charge(s, -s.busy)
        s.stores.clear()
        s.loads.clear()
        s.pins.clear()
        s.replies.clear()
        if s.window is not None:
            s.window.close()
        self.sessions.close(s)
        drop = getattr(self, "_drop_deferred", None)  # its waiting requests: answered no_session now
        if drop is not None:
            drop(s)

    def _expire(self, now: float) -> None:
        for s in [s for s in self.sessions.by_id.values() if s.pid > 0 and not alive(s.pid)]:
            self.counters["dead_clients"] += 1  # its process is gone: no need to wait out the lease
            self._release(s)
        for s in self.sessions.expired(now):
            if s.held or s.stores:
                log.warning("lease of %s expired: releasing %d pins and %d reservations", s.label,
                            sum(c for c, _ in s.pins.values()), len(s.stores))
            self.counters["lease_expiries"] += 1
            self._release(s)
        pin_s = self.dcfg.pin_s
        for s in list(self.sessions.by_id.values()):
            for h in [h for h, r in s.stores.items() if r.deadline < now]:
                self._rollback_store(s, s.stores.pop(h))  # committed too late: the client gave up
                self.counters["reservation_expiries"] += 1
            for h in [h for h, ld in s.loads.items() if isinstance(ld, WindowLoad) and ld.deadline < now]:
                s.window.free(s.loads.pop(h).wslots)
                self.counters["reservation_expiries"] += 1
            if s.pins:
                old = [k for k, (_, since) in s.pins.items() if now - since > pin_s]
                for k in old:  # a pin is a hint for a while, not a claim on G2 forever
                    self.counters["pin_expiries"] += s.pins[k][0]
                    self._unpin_keys(s, [k] * s.pins[k][0])
        self._drain_events()


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
