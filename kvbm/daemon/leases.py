"""Client sessions: a namespace, a heartbeat deadline, and what the client holds.

    Sessions.open(namespace, lease_s) -> Session   at hello
    Session.renew(now)                              every request and heartbeat
    Sessions.expired(now) -> [Session]              the daemon rolls their holdings back

A session holds explicit pins (key -> count), reservations (store jobs awaiting commit) and
loads (pinned jobs awaiting release). When its lease runs out, because the client died or hung,
the daemon releases all of them, so a SIGKILLed engine never leaks pinned blocks.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

from ..blocks import check_name, fields

PEER_NS = b"peer"  # the namespace of a peer daemon's session (peer_* ops only)


@dataclass
class Session:
    sid: bytes
    namespace: bytes  # 16-byte namespace id: keys are mixed with it server-side
    label: str  # model name, for logs
    lease_s: float
    deadline: float
    pins: dict = field(default_factory=dict)  # server key -> count
    stores: dict = field(default_factory=dict)  # handle -> (StoreJob, client keys, extra failed)
    loads: dict = field(default_factory=dict)  # handle -> LoadJob
    crcs: dict = field(default_factory=dict)  # handle -> Future of crc32c per block (a peer's pull)
    events: list = field(default_factory=list)  # (kind, client key, tier), bounded
    next_handle: int = 1

    def renew(self, now: float) -> None:
        self.deadline = now + self.lease_s

    def handle(self) -> int:
        h = self.next_handle
        self.next_handle += 1
        return h

    @property
    def held(self) -> int:
        """Blocks this session keeps busy: pins, pinned loads, reservations."""
        return (sum(self.pins.values()) + sum(len(job.keys) for job in self.loads.values())
                + sum(len(job.keys) for job, _, _ in self.stores.values()))


class Sessions:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.by_id: dict[bytes, Session] = {}

    def __len__(self) -> int:
        return len(self.by_id)

    def open(self, namespace: bytes, label: str, lease_s: float, now: float) -> Session | None:
        if len(self.by_id) >= self.limit:
            return None
        s = Session(os.urandom(16), namespace, label, lease_s, now + lease_s)
        self.by_id[s.sid] = s
        return s

    def get(self, sid: Any) -> Session | None:
        if not isinstance(sid, bytes):
            return None
        return self.by_id.get(sid)

    def close(self, s: Session) -> None:
        self.by_id.pop(s.sid, None)

    def expired(self, now: float) -> list[Session]:
        return [s for s in self.by_id.values() if s.deadline < now]

    def in_namespace(self, ns: bytes) -> list[Session]:
        return [s for s in self.by_id.values() if s.namespace == ns]


def namespace_of(model: str, fingerprint: str, salt: str) -> bytes:
    """16-byte namespace id from model, layout fingerprint and salt (fields length-prefixed:
    two different triples never share an id). ValueError for a control character in model
    or salt."""
    check_name(model, "model")
    check_name(salt, "salt")
    return hashlib.blake2b(b"kvbm-daemon-ns\1" + fields(model, fingerprint, salt), digest_size=16).digest()


def server_key(namespace: bytes, key: bytes) -> bytes:
    """A client's key inside the daemon: two namespaces never address the same block."""
    return hashlib.blake2b(key, digest_size=16, key=namespace).digest()
