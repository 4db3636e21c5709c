"""KV events: what the manager did to blocks, told to the namespace that owns them.

    Events._drain_events()   after every request: manager events -> rows per namespace, published
                             on the PUB stream (topic: the namespace id in hex) and queued per session
    Events.op_events         a client takes its namespace's queued rows

`Daemon.origin` maps a server key to (namespace, client key): an event names the client's own
key and goes to its namespace only.
"""

from __future__ import annotations

import zmq

from . import protocol as P

MAX_EVENTS = 10_000  # per session, oldest dropped


class Events:
    """Mixin of Daemon: event draining and publishing."""

    def op_events(self, msg: dict, now: float) -> dict:
        s = self._session(msg, now)
        most = P.integer(msg, "max", required=False, default=1000, lo=1, hi=10_000)
        out, s.events = s.events[:most], s.events[most:]
        return {"events": out}

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
