"""Session ops of the daemon: hello, heartbeat, bye, and the lease that releases what a silent
client held.

    SessionOps.op_hello / op_heartbeat / op_bye
    SessionOps._session(msg, now)   the request's session, renewed (no_session if unknown)
    SessionOps._release(s)          roll back reservations, finish loads, drop pins
    SessionOps._expire(now)         release every session whose lease ran out

The session table and what a session holds are in leases.py.
"""

from __future__ import annotations

import dataclasses
import logging

from ..blocks import KVLayout
from . import protocol as P
from .leases import PEER_NS, Session, namespace_of

log = logging.getLogger("kvbm.daemon")
_LAYOUT_FIELDS = {f.name: f.type for f in dataclasses.fields(KVLayout)}


class SessionOps:
    """Mixin of Daemon: sessions and leases."""

    def _session(self, msg: dict, now: float, peer: bool = False) -> Session:
        s = self.sessions.get(msg.get("session"))
        if s is None:
            raise P.ProtocolError("no_session", "unknown or expired session; say hello again")
        if (s.namespace == PEER_NS) != peer:
            raise P.ProtocolError("bad_session", "this op is not allowed for this session kind")
        s.renew(now)
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
        try:
            namespace = namespace_of(model, layout.fingerprint, salt)
        except ValueError as exc:  # a control character in model or salt
            raise P.ProtocolError("bad_field", str(exc)) from None
        s = self.sessions.open(namespace, model, self.dcfg.lease_s, now)
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
