"""Client sessions: a namespace, a heartbeat deadline, and what the client holds.

    Sessions.open(namespace, label, lease_s, now, uid=, tenant=) -> Session | None   at hello
    Session.renew(now)                              every request and heartbeat
    Sessions.expired(now) -> [Session]              the daemon rolls their holdings back
    Sessions.extend(dt)                             the daemon itself stalled for dt: no one's fault

A session holds explicit pins (key -> count), reservations (store jobs awaiting commit), loads
(window slots awaiting release; pinned jobs for a peer), its staging window, and the replies of
its last requests (a retried request id gets the same answer; a cancelled one is undone). When
its lease runs out, because the client died or hung, the daemon releases all of it, so a
SIGKILLed engine never leaks pinned blocks. Every map here is bounded: by the session's quota,
its window, or a fixed count.

The table is bounded too, per owner (a named tenant, else the uid; a named tenant at most half the
table) and in all: an owner at its bound has its own least recently active empty session closed to
make room (its client says hello again on its next call); a full table closes an empty session of
the owner holding the most (Sessions._fairest), so hellos alone cannot lock anyone out and one
tenant's hellos never close a session of a tenant holding as many or fewer. Busy blocks are kept
per namespace and per owner too, for the quotas (dataplane._check_quota).
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ..blocks import check_name, fields

PEER_NS = b"peer"  # the namespace of a peer daemon's session (peer_* ops only)
MAX_REPLIES = 32  # request ids whose replies a session keeps, for retries and cancels
MAX_CANCELLED = 256  # ids cancelled before they arrived


@dataclass
class Reservation:
    """A store in flight: G2 slots reserved by `job`, the client writes `wslots` of its window."""

    job: Any
    skeys: list
    extra: list  # keys reserved below G2 (admission said so): rolled back at commit
    want: list  # indices into skeys of the keys with a G2 slot
    gslots: list  # G2 slot per `want` entry
    wslots: list  # window slot per `want` entry
    deadline: float  # rolled back if not committed by then, heartbeats or not


@dataclass
class WindowLoad:
    """A client's load: its bytes were copied into `wslots`; freed at release or deadline."""

    wslots: list
    deadline: float


@dataclass
class Session:
    sid: bytes
    namespace: bytes  # 16-byte namespace id: keys are mixed with it server-side
    label: str  # model name, for logs
    lease_s: float
    deadline: float
    uid: int = -1  # the client's uid (SO_PEERCRED on the same-node socket); -1: unknown (tcp)
    pid: int = 0
    tenant: str = ""  # the tenant whose token opened it (tenants.py); "": daemon.token's, or no token
    window: Any = None  # windows.Window: the only daemon memory this client maps
    pins: dict = field(default_factory=dict)  # server key -> [count, time of the first pin]
    stores: dict = field(default_factory=dict)  # handle -> Reservation
    loads: dict = field(default_factory=dict)  # handle -> WindowLoad (client) | LoadJob (peer)
    crcs: dict = field(default_factory=dict)  # handle -> (crc32c per block, indices pending, Future) (a peer's pull)
    events: list = field(default_factory=list)  # (kind, client key, tier), bounded
    replies: OrderedDict = field(default_factory=OrderedDict)  # request id -> (op, reply, undo)
    cancelled: OrderedDict = field(default_factory=OrderedDict)  # request ids cancelled early
    busy: int = 0  # G2 blocks held: pins + reservations + a peer's pinned loads
    active: float = 0.0  # last request other than a heartbeat
    used: bool = False  # made a request after hello (a hello flood's sessions never do)
    deferred: int = 0  # its requests waiting (for G2 room, for G3/G4 blocks): onboard.SESSION_DEFERRED at most
    next_handle: int = 1

    def renew(self, now: float) -> None:
        self.deadline = now + self.lease_s

    def handle(self) -> int:
        h = self.next_handle
        self.next_handle += 1
        return h

    @property
    def owner(self) -> int | str:
        """Whose quota and session-table bound it counts in: its named tenant, else its uid
        (-1: every default-tenant client on tcp://, as one)."""
        return self.tenant if self.tenant else self.uid

    @property
    def held(self) -> int:
        """Blocks this session keeps busy in G2 (quota unit)."""
        return self.busy

    @property
    def empty(self) -> bool:
        return not (self.busy or self.stores or self.loads or self.pins)

    def remember(self, rid: int, op: str, reply: bytes, undo: Any) -> None:
        self.replies[rid] = (op, reply, undo)
        if len(self.replies) > MAX_REPLIES:
            self.replies.popitem(last=False)

    def cancel_early(self, rid: int) -> None:
        self.cancelled[rid] = None
        if len(self.cancelled) > MAX_CANCELLED:
            self.cancelled.popitem(last=False)


_OWN_UID = os.getuid()


class Sessions:
    def __init__(self, limit: int, per_uid: int | None = None, windows: int | None = None) -> None:
        self.limit = limit
        self.room = min(limit, windows or limit)  # sessions that can be open at once (each has a window)
        self.per_uid = per_uid or limit  # sessions per owner (Session.owner: a tenant, else a uid)
        self.by_id: dict[bytes, Session] = {}
        self.count_by_owner: dict[int | str, int] = {}
        self.busy_by_ns: dict[bytes, int] = {}
        self.busy_by_owner: dict[int | str, int] = {}

    def __len__(self) -> int:
        return len(self.by_id)

    def bound(self, owner: int | str) -> int:
        """Sessions `owner` may hold. A named tenant (a str), or a uid other than the daemon's own
        (let in on the socket), at most half the table (or of the windows that can be open) too:
        its busy sessions (which no hello closes) never fill it, whatever max_sessions_per_uid
        says. The daemon's own uid (and -1, the default tenant on tcp) are the operator's:
        max_sessions_per_uid alone."""
        if (isinstance(owner, str) and owner) or (isinstance(owner, int) and owner not in (-1, _OWN_UID)):
            return min(self.per_uid, max(1, self.room // 2))
        return self.per_uid

    def open(self, namespace: bytes, label: str, lease_s: float, now: float, *, uid: int = -1,
             pid: int = 0, tenant: str = "") -> tuple[Session | None, Session | None]:
        """-> (new session or None when full of busy sessions, the idle session closed for it)."""
        evicted = None
        owner = tenant if tenant else uid
        if self.count_by_owner.get(owner, 0) >= self.bound(owner):
            evicted = self._idlest(owner)
            if evicted is None:
                return None, None
        elif len(self.by_id) >= self.limit:
            evicted = self._fairest(owner)
            if evicted is None:
                return None, None
        if evicted is not None:
            self.close(evicted)
        s = Session(os.urandom(16), namespace, label, lease_s, now + lease_s, uid=uid, pid=pid, tenant=tenant,
                    active=now)
        self.by_id[s.sid] = s
        self.count_by_owner[owner] = self.count_by_owner.get(owner, 0) + 1
        return s, evicted

    def _idlest(self, owner: int | str) -> Session | None:
        """owner's empty session to close: one never used since its hello first, then the one idle
        longest; None when every one holds something."""
        best = None
        for s in self.by_id.values():
            if s.empty and s.namespace != PEER_NS and s.owner == owner and (
                    best is None or (s.used, s.active) < (best.used, best.active)):
                best = s
        return best

    def _fairest(self, owner: int | str) -> Session | None:
        """The full table's empty session to close for `owner`: one of the owner (tenant or uid)
        holding the most sessions, counting `owner` with the one it opens (a tie: its own), then
        never used, then idle longest. So a tenant's hellos close its own sessions before any of
        a tenant holding as many or fewer: alice cannot evict bob's idle session to seat hers.
        None when every session holds something."""
        best, best_key = None, None
        counts = self.count_by_owner
        for s in self.by_id.values():
            if not s.empty or s.namespace == PEER_NS:
                continue
            mine = s.owner == owner
            key = (-(counts.get(s.owner, 0) + mine), not mine, s.used, s.active)
            if best_key is None or key < best_key:
                best, best_key = s, key
        return best

    def get(self, sid: Any) -> Session | None:
        if not isinstance(sid, bytes):
            return None
        return self.by_id.get(sid)

    def close(self, s: Session) -> None:
        if self.by_id.pop(s.sid, None) is not None:
            left = self.count_by_owner[s.owner] - 1
            if left:
                self.count_by_owner[s.owner] = left
            else:
                del self.count_by_owner[s.owner]

    def charge(self, s: Session, n: int) -> None:
        """s holds n more (or -n fewer) G2 blocks; kept per namespace and per owner for quotas."""
        s.busy += n
        for table, k in ((self.busy_by_ns, s.namespace), (self.busy_by_owner, s.owner)):
            v = table.get(k, 0) + n
            if v:
                table[k] = v
            else:
                table.pop(k, None)

    def expired(self, now: float) -> list[Session]:
        return [s for s in self.by_id.values() if s.deadline < now]

    def extend(self, dt: float) -> None:
        """The daemon did not run for dt seconds (stopped, swapped, a long step): clients could
        not be heard meanwhile, so nobody's lease counts that time."""
        for s in self.by_id.values():
            s.deadline += dt
            for r in s.stores.values():
                r.deadline += dt
            for ld in s.loads.values():
                if isinstance(ld, WindowLoad):
                    ld.deadline += dt

    def in_namespace(self, ns: bytes) -> list[Session]:
        return [s for s in self.by_id.values() if s.namespace == ns]


def owner_may_take(in_use: int, mine: int, cap: int, per_owner: int) -> bool:
    """Whether an owner (Session.owner: a tenant, a uid) holding `mine` of a shared pool's `cap`
    slots (`in_use` taken in all) may take one more: at most per_owner each, and the last cap // 8
    only for owners holding none, so two owners at their share still leave a third room
    (onboarding slots, pending peer pulls)."""
    return in_use < cap and mine < per_owner and (mine == 0 or in_use < cap - cap // 8)


def namespace_of(model: str, fingerprint: str, salt: str, tenant: str = "") -> bytes:
    """16-byte namespace id from model, layout fingerprint and salt (fields length-prefixed:
    two different triples never share an id), and the tenant whose token opened the session
    (tenants.py): a named tenant's ids have its name mixed in, under their own prefix, so two
    tenants never share an id whatever model and salt they send; the default tenant ("") keeps
    the ids of kvbm before tenants. ValueError for a control character in model or salt."""
    check_name(model, "model")
    check_name(salt, "salt")
    if tenant:
        return hashlib.blake2b(b"kvbm-daemon-tenant-ns\1" + fields(tenant, model, fingerprint, salt),
                               digest_size=16).digest()
    return hashlib.blake2b(b"kvbm-daemon-ns\1" + fields(model, fingerprint, salt), digest_size=16).digest()


def server_key(namespace: bytes, key: bytes) -> bytes:
    """A client's key inside the daemon: two namespaces never address the same block."""
    return hashlib.blake2b(key, digest_size=16, key=namespace).digest()
