"""KV events: what the manager did to blocks, told to the namespace that owns them, and nobody else.

    topic_of(namespace) -> bytes      a namespace's topic on the PUB stream (`Client.topic`)
    new_epoch()                       a daemon run's identity on the stream (the seq frame's epoch)
    Origins                           server key -> (namespace, client key), bounded by what is held;
                                      .of(ns): one namespace's server keys (for snapshots)
    Events._init_events()             the event publisher (publisher.py: a child process holding the
                                      public event sockets), this stream's link to it, its numbering
                                      and replay (replay.py, daemon.events_replay)
    Events._service_events(now)       each tick: a dead publisher restarted (with backoff)
    Events._drain_events()            after every request: manager events -> rows per namespace ->
                                      the PUB stream, each session of that namespace, the sinks
    Events.add_event_sink(fn)         fn(namespace, rows) for every drained batch (other formats
                                      hook in here)
    Events.kv_events                  the vLLM-format publisher (kv_events.py) when daemon.kv_events
                                      is set: fed every drained batch, by engine block hashes
    Events.op_events                  a client takes its namespace's queued rows
    Events._block_meta(skey)          the blob G3 / G4 keep beside a block (see "After a restart")
    Events._close_events()            at shutdown

A row is [kind, client key, tier] with kind stored / removed / moved: the client's own key, as it
named the block. What a peer pull needs (the namespace id and the daemon's server key, derived
from it) is never published: the topic is a one-way hash of the namespace id, so a subscriber
that does not already know a namespace can neither name it nor derive its server keys, and the
`events` op returns only the caller's namespace's rows. Who may subscribe: anyone who can reach
the PUB address when no token is set (then it must be loopback or ipc://, see config.py); with
daemon.token (or daemon.events_token), only subscribers presenting it as ZMQ PLAIN credentials
(username `kvbm`). The public PUB socket lives in the event publisher, a child process
(publisher.py), which this process feeds over a private link: it is bound as the request socket
is (transport.bind: on ipc:// a 0600 file in a folder others cannot write), holds at most
event_gate.MAX_EVENT_PEERS connections, and whatever connects to it costs the daemon no file
descriptor. While the publisher is down (a flood killed it; restarted after a backoff) rows are
dropped, as past a subscriber's high-water mark; the `events` op's queues are not affected.

Sequence numbers (protocol.py has the wire format): each message is [topic, rows, seq frame], the
seq frame the namespace's sequence number and `events_epoch`, numbered here (_tell) before the
link, so whatever drops a message after that (the link while no publisher runs, a restarted
publisher, a subscriber's high-water mark) leaves a gap a subscriber sees; a restarted daemon has
another epoch. Numbers are per namespace (replay.py: a subscriber of one topic checks them, and
they never count another namespace's messages); the first of a stream is the wall clock in
microseconds, so a stream dropped while its namespace held nothing (at most MAX_IDLE_NAMESPACES
kept) comes back above its old numbers. With daemon.events_replay, the last kv_events_buffer
messages of each namespace are kept and a replay request naming a topic gets that topic's
messages from a seq on, or a snapshot (_events_snapshot: ["cleared"], then ["stored", client key,
tier] for each tier holding each of its blocks, at the seq it reflects). The replay ROUTER lives in
the publisher like the PUB (same PLAIN credential, transport.bind, MAX_EVENT_PEERS), so whoever may
subscribe to a topic may replay it, and nothing else. kvbm/follower.py is the subscriber side.

A tenant's own stream (daemon.tenants.<name>.events, .events_replay): PUB/SUB cannot filter per
subscriber, so the routers' stream (daemon.events, events_token) carries every namespace and a
tenant gets sockets of its own in the publisher, PLAIN with its own token: _tell sends each message
of a namespace whose tenant is known (a session of it was seen: _tenant_of) to that tenant's link
too, the same frames with the same numbers, so a gap there is a gap; its replay link is answered
(replay.Replay.add_link) only for topics of its namespaces, any other topic as one nobody has.
A recovered namespace (after a restart) is the tenant's once one of its clients said hello.

Moves: the manager's `moved` event (a block now in `tier`, come from `source`) reaches the rows as
["moved", key, tier] only when the block is in that tier alone right after it (_moves_after walks
the batch back from what the tiers hold); a move that left a copy behind (inclusive mode's
promotion, a pinned source) or after which another tier holds one is ["stored", key, tier] and,
when the source lost it, ["removed", key, source]: rows keep three fields and every reader's view
stays exact in either mode. The same walk keeps each namespace's blocks per tier
(tenants.tenant_stats).

After a restart: G3 and G4 keep, beside each block, a blob of (namespace id, engine hash, parent
hash, client key) that `_block_meta` gives them (kvbm/held.py format 2; G3 in its 0600 index, G4
sealed in the object's trailer). A restarted daemon accepts a recovered blob only when it decodes,
names a 16-byte namespace id and a client key, and that namespace and key derive the very server
key the block is stored under (leases.server_key): so a blob can only name the namespace whose key
space the block lives in, whatever a bucket holds; anything else names nothing (the block is
served, never published). Accepted blocks get their origin entry back, are named on the vLLM-format
stream (kv_events.py: published at once, as that namespace's first batch), and become that
namespace's first rows here: ["stored", client key, tier] for every tier holding them, published
on its topic and queued for its session when one of its clients says hello (drained before the
hello's answer; the PUB stream keeps no backlog, so a subscriber connected by then sees them;
until then the namespace's recovered keys are kept, at most what was recovered; rows describe what
the tiers hold at that moment, so rows before them, e.g. a recovered block evicted meanwhile, and
after them, leave a follower exact). Blocks whose tiers wrote no blob (a version 1 G3 index,
objects without a trailer) or a blob without a client key (format 1, G3 before this) recover
silently: served, never published.

The origin map gets an entry per block a client reserved or a pull landed and loses it when the
block leaves every tier. Paths that abandon a key without an event (a rolled-back reservation, a
failed pull) are covered by `Origins.sweep`: once the map holds more than twice what the manager
holds, it drops every key the manager no longer has, so its size stays bounded by the manager's
capacity.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import Any, Callable

import zmq

from . import protocol as P
from ..held import pack_meta, unpack_meta
from .leases import server_key
from .publisher import Publisher

log = logging.getLogger("kvbm.daemon")
MAX_EVENTS = 10_000  # per session, oldest dropped
PLAIN_USER = "kvbm"  # the event streams' PLAIN username; the password is daemon.subscriber_token
SWEEP_SLACK = 1024   # the origin map may exceed the manager's held keys by this before a sweep


def new_epoch() -> int:
    """A daemon run's identity on the `events` stream: 63 random bits, never 0."""
    return (int.from_bytes(os.urandom(8), "big") >> 1) or 1


def topic_of(namespace: bytes) -> bytes:
    """The PUB topic of a namespace: hex of a one-way hash of its id (the id itself keys blocks)."""
    return hashlib.blake2b(namespace, digest_size=16, person=b"kvbm-ev-topic").hexdigest().encode()


class Origins(dict):
    """server key -> (namespace, client key) for blocks the manager holds (or is about to);
    `.of(ns)`: the server keys of one namespace (an index kept beside the map, for snapshots)."""

    def __init__(self) -> None:
        super().__init__()
        self._by_ns: dict[bytes, set] = {}

    def __setitem__(self, key: Any, value: tuple) -> None:
        old = dict.get(self, key)
        if old is not None and old[0] != value[0]:
            self._unindex(key, old[0])
        dict.__setitem__(self, key, value)
        self._by_ns.setdefault(value[0], set()).add(key)

    def __delitem__(self, key: Any) -> None:
        ns = dict.__getitem__(self, key)[0]
        dict.__delitem__(self, key)
        self._unindex(key, ns)

    def pop(self, key: Any, *default: Any) -> Any:
        if key in self:
            value = dict.__getitem__(self, key)
            del self[key]
            return value
        if default:
            return default[0]
        raise KeyError(key)

    def _unindex(self, key: Any, ns: bytes) -> None:
        keys = self._by_ns.get(ns)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_ns[ns]

    def of(self, ns: bytes) -> set:
        return self._by_ns.get(ns, set())

    def sweep(self, manager: Any) -> int:
        """Drop keys the manager no longer holds (ready or in flight) once the map outgrows it;
        keys dropped. Amortised O(1) per abandoned key: a sweep (O(map)) runs only once the map
        holds more than twice what the manager holds, plus SWEEP_SLACK."""
        held = sum(len(t.ready) + len(t.pending) for t in manager.tiers)
        if len(self) <= 2 * held + SWEEP_SLACK:
            return 0
        gone = [k for k in self if not _held(manager, k)]
        for k in gone:
            del self[k]
        return len(gone)


def _held(manager: Any, key: Any) -> bool:
    return any(key in t.ready or key in t.pending for t in manager.tiers)


class Events:
    """Mixin of Daemon: event draining and publishing."""

    def _init_events(self) -> None:
        dcfg = self.dcfg
        self.origin = Origins()
        # per namespace: blocks per tier (kept from the rows told) and its tenant (once a session
        # of it was seen): what tenants.tenant_stats reports per tenant
        self._ns_blocks: dict[bytes, dict[str, int]] = {}
        self._ns_tenant: dict[bytes, str] = {}
        self._count_tenant: str | None = None  # a deferred reply's tenant, while it is answered
        # only with named tenants (without, the default tenant's row is the node's: tenant_stats);
        # the per-tenant counting costs the request loop a few us per request (bench/RESULTS.md)
        self._per_tenant = bool(getattr(dcfg, "tenants", None))
        if self._per_tenant and isinstance(getattr(self, "counters", None), dict):
            from .tenants import TenantCounters

            self.counters = TenantCounters(self.counters, self._counting_tenant)
        self._event_sinks: list[Callable[[bytes, list], None]] = []
        self.pub = None
        self.events_address = self.events_replay_address = ""
        self.events_epoch = new_epoch()  # this daemon run: a subscriber tells a restart from a gap
        self.events_replay: Any = None  # the `events` stream's numbering and replay (replay.py)
        self.publisher: Publisher | None = None
        self._tenant_pubs: dict[str, Any] = {}  # tenant -> link to its own stream (daemon.tenants.<name>.events)
        self.kv_events = None
        self._recovered_metas = self._recovered_origins(self.manager.kept_meta())
        for ns, keys in self._untold.items() if self._per_tenant else ():  # recovered blocks' tiers
            counts = self._ns_blocks.setdefault(ns, {})
            for t in self.manager.tiers:
                n = sum(1 for k in keys if k in t.ready)
                if n:
                    counts[t.name] = counts.get(t.name, 0) + n
        self.manager.keep_meta(self._block_meta)  # G3 and G4 keep each block's names (see the docstring)
        self.manager.take_events()  # the recovered blocks' "stored": told per namespace (_tell_recovered)
        replay = getattr(dcfg, "events_replay", "") if dcfg.events else ""
        streams = {"events": dcfg.events, "events_replay": replay, "kv_events": dcfg.kv_events,
                   "kv_events_replay": dcfg.kv_events_replay}
        own: dict[str, dict] = {}  # a tenant's own `events` stream (and replay): its namespaces only
        for t in getattr(dcfg, "tenants", {}).values():
            for what in ("events", "events_replay", "kv_events", "kv_events_replay"):
                if getattr(t, what, "") and getattr(dcfg, what.replace("_replay", "")):
                    own[f"{what}@{t.name}"] = {"address": getattr(t, what), "token": t.token,
                                               "key": f"{t.config_key}.{what}"}
        try:
            if any(streams.values()):
                # the public event sockets live in a child process (publisher.py): a connection
                # flood exhausts its descriptors, never this process's; a refused address fails
                # the start here, one line
                self.publisher = Publisher(streams, dcfg.subscriber_token, own=own)
            if dcfg.kv_events:
                from .kv_events import KVEventPublisher

                self.kv_events = KVEventPublisher(self)
            self._recovered_metas = {}
            if dcfg.events:
                from .replay import Replay

                self.pub = self.publisher.link("events", zmq.PUSH)  # -> the child's PUB (never blocks)
                self.events_address = self.publisher.endpoints["events"]
                link = self.publisher.link("events_replay", zmq.DEALER) if replay else None
                self.events_replay_address = self.publisher.endpoints.get("events_replay", "") if replay else ""
                epoch = self.events_epoch
                replays = link is not None or any(n.startswith("events_replay@") for n in own)
                # sequence numbers are assigned here, before the link: a publisher restart, a link
                # that drops, a subscriber past its high-water mark all show as gaps
                self.events_replay = Replay(self, link, dcfg.kv_events_buffer if replays else 1,
                                            snapshot=self._events_snapshot,
                                            first_seq=lambda: time.time_ns() // 1000 - 1,
                                            seq_frame=lambda seq: P.events_seq(seq, epoch),
                                            idle=lambda ns: not self.origin.of(ns), name="events")
                # each tenant's own stream: the same messages (the same numbers) of its namespaces
                self.tenant_events_addresses: dict[str, dict[str, str]] = {}
                for name in own:
                    what, tenant = name.split("@", 1)
                    if what.startswith("kv_"):
                        continue  # (kv_events.py)
                    self.tenant_events_addresses.setdefault(tenant, {})[what] = self.publisher.endpoints[name]
                    if what == "events":
                        self._tenant_pubs[tenant] = self.publisher.link(name, zmq.PUSH)
                    else:  # answered for the namespaces of that tenant only (read on the replay thread)
                        self.events_replay.add_link(self.publisher.link(name, zmq.DEALER),
                                                    lambda ns, tenant=tenant: self._ns_tenant.get(ns) == tenant)
        except BaseException:  # the child, the vLLM-format stream's thread and sockets go too
            self._close_events()
            raise

    def _service_events(self, now: float) -> None:
        """(Owner thread, each tick.) A dead event publisher is restarted (with backoff)."""
        pub = self.publisher
        if pub is not None:
            before = pub.restarts
            pub.service(now)
            if pub.restarts != before and hasattr(self, "counters"):
                self.counters["event_publisher_restarts"] = pub.restarts

    def _counting_tenant(self) -> str | None:
        """Whose per-tenant counters a count goes to: the request being handled (its token's
        tenant), a deferred reply's session's (_finisher), else nobody's (node-wide only)."""
        if self._count_tenant is not None:
            return self._count_tenant
        return self._tenant if getattr(self, "_current", None) is not None else None

    def _finisher(self, s: Any, op: str, answer: Callable[[], dict]) -> Callable[[], None]:
        """onboard.Onboarding._finisher, its answer counted for s's tenant: a deferred reply runs
        while another tenant's request may be the current one (server._tenant)."""
        tenant = getattr(s, "tenant", "")

        def attributed() -> dict:
            prev, self._count_tenant = self._count_tenant, tenant
            try:
                return answer()
            finally:
                self._count_tenant = prev

        return super()._finisher(s, op, attributed)  # type: ignore[misc]

    def _recovered_origins(self, metas: dict) -> dict:
        """The recovered blobs that name the namespace their block's server key derives from:
        their origins come back; -> {server key: blob} (for the vLLM-format stream)."""
        good: dict = {}
        self._untold: dict[bytes, list] = {}  # namespace -> recovered server keys, until told
        for skey, blob in metas.items():
            fields = unpack_meta(blob)
            if fields is None:
                continue
            ns, _, _, ck = fields
            if not (isinstance(ns, bytes) and len(ns) == 16 and isinstance(ck, bytes)
                    and server_key(ns, ck) == skey):
                continue  # a key space the block does not live in, or no client key: names nothing
            self.origin[skey] = (ns, ck)
            self._untold.setdefault(ns, []).append(skey)
            good[skey] = blob
        if good:
            log.info("events: %d recovered blocks of %d namespaces named again", len(good), len(self._untold))
        return good

    def _block_meta(self, skey: Any) -> bytes | None:
        """The blob G3 / G4 keep beside a block as they write it (maybe on a transfer thread):
        its origin and, when a client named it, its engine hash and parent hash."""
        origin = self.origin.get(skey)
        if origin is None:
            return None
        kv = self.kv_events
        e = kv.held.entries.get(skey) if kv is not None else None
        h, parent = (e[1], e[2]) if e is not None and e[0] == origin[0] else (None, None)
        return pack_meta(origin[0], h, parent, origin[1])

    def _tell_recovered(self) -> None:
        """The recovered blocks of the namespace whose client just said hello (the newest
        session), as its first rows: what the tiers hold of them now."""
        s = next(reversed(self.sessions.by_id.values()), None)
        keys = self._untold.pop(s.namespace, None) if s is not None else None
        if not keys:
            return
        ns, rows = s.namespace, []
        for t in self.manager.tiers:
            rows.extend(["stored", self.origin[k][1], t.name] for k in keys if k in t.ready and k in self.origin)
        if rows:
            self._tell(ns, rows)
        if self.__dict__.get("_per_tenant"):
            self._tenant_of(ns)

    def add_event_sink(self, fn: Callable[[bytes, list], None]) -> None:
        """fn(namespace id, rows) on the owner thread after each drained batch; it must not block."""
        self._event_sinks.append(fn)

    def _engine_hashes(self, msg: dict, n: int) -> tuple:
        """store / store_prepare's optional engine block hashes (kv_events.check_hashes)."""
        from .kv_events import check_hashes

        return check_hashes(msg, n)

    def _adopt_hashes(self, s: Any, skeys: list, job: Any, hashes: tuple) -> None:
        """A store's engine hashes name its keys on the vLLM-format stream (the session's own
        namespace: skeys are derived from it)."""
        if job is not None and hashes[0] is not None and self.kv_events is not None:
            self.kv_events.adopt(s.namespace, skeys, *hashes)

    def op_events(self, msg: dict, now: float) -> dict:
        s = self._session(msg, now)
        most = P.integer(msg, "max", required=False, default=1000, lo=1, hi=10_000)
        out, s.events = s.events[:most], s.events[most:]
        return {"events": out}

    def _drain_events(self) -> None:
        events = self.manager.take_events()
        kv = getattr(self, "kv_events", None)  # (absent in tests that build the mixin alone)
        if kv is not None and (events or kv.dirty):
            kv.changed(events)
        if not events:
            if getattr(self, "_untold", None):
                self._tell_recovered()
            if len(self.origin) > SWEEP_SLACK:
                self.origin.sweep(self.manager)
            return
        # (ns, tier) -> blocks gained, with named tenants (absent: a mixin built without _init_events)
        delta: dict | None = {} if self.__dict__.get("_per_tenant") else None
        by_ns: dict[bytes, list] = {}
        origins = [self.origin.get(ev.key) for ev in events]  # (before a removal forgets them)
        after = self._moves_after(events, origins)
        for i, ev in enumerate(events):
            origin = origins[i]
            if ev.kind == "removed" and ev.key not in self.manager:
                self.origin.pop(ev.key, None)
            if origin is None:
                continue
            ns, ck = origin
            rows = by_ns.get(ns)
            if rows is None:
                rows = by_ns[ns] = []
            if ev.kind == "moved" and ev.source is not None:
                held = after[i]  # the tiers holding the block right after this move (exact)
                kept = ev.source in held
                if held == {ev.tier}:  # only there now: the row old readers read right
                    rows.append(["moved", ck, ev.tier])
                else:  # a copy stayed (inclusive mode, a pinned source) or another tier holds one
                    rows.append(["stored", ck, ev.tier])
                    if not kept:
                        rows.append(["removed", ck, ev.source])
                if delta is not None:
                    k = (ns, ev.tier)
                    delta[k] = delta.get(k, 0) + 1
                    if not kept:
                        k = (ns, ev.source)
                        delta[k] = delta.get(k, 0) - 1
            else:
                rows.append([ev.kind, ck, ev.tier])
                if delta is not None:
                    k = (ns, ev.tier)
                    delta[k] = delta.get(k, 0) + (1 if ev.kind == "stored" else -1)
        if delta:
            self._count_blocks(delta)
        for ns, rows in by_ns.items():
            if delta is not None and ns not in self._ns_tenant:
                self._tenant_of(ns)
            self._tell(ns, rows)
        if getattr(self, "_untold", None):  # after this request's rows: what the tiers hold now
            self._tell_recovered()
        self.origin.sweep(self.manager)

    def _holding(self, key: Any) -> set:
        """The tiers that hold key now: ready, or the source of a demotion in flight (pending there
        and in a lower tier); a reservation or a promotion not landed yet holds nothing."""
        tiers, out = self.manager.tiers, set()
        for i, t in enumerate(tiers):
            if key in t.ready or (key in t.pending and any(key in u.pending for u in tiers[i + 1:])):
                out.add(t.name)
        return out

    def _moves_after(self, events: list, origins: list) -> dict[int, set]:
        """{index of a moved event: the tiers holding its block right after it}, walked back from
        what the tiers hold now through the batch's later events of that key. A move may leave a
        copy behind (inclusive mode's promotion; an exclusive promotion whose source is pinned,
        removed when released), and in inclusive mode a lower tier may hold one too: the row
        cannot say "only in tier" then (old readers took every moved row so: their view drifted)."""
        keys = {ev.key for ev, o in zip(events, origins) if ev.kind == "moved" and o is not None}
        if not keys:
            return {}
        state = {k: self._holding(k) for k in keys}
        out: dict[int, set] = {}
        for i in range(len(events) - 1, -1, -1):
            ev = events[i]
            held = state.get(ev.key)
            if held is None:
                continue
            if ev.kind == "stored":
                held.discard(ev.tier)
            elif ev.kind == "removed":
                held.add(ev.tier)
            elif ev.kind == "moved":
                out[i] = set(held)
                held.discard(ev.tier)
                if ev.source is not None:
                    held.add(ev.source)
        return out

    def _tenant_of(self, ns: bytes) -> str | None:
        """(Owner thread.) The tenant of namespace ns, once a session of it was seen; None before.
        Kept while the namespace holds blocks or has a stream: the others go once they are many
        (so the map stays bounded by what is held and the replay's streams)."""
        t = self._ns_tenant.get(ns)
        if t is None:
            ss = self.sessions.in_namespace(ns)
            if ss:
                t = self._ns_tenant[ns] = getattr(ss[0], "tenant", "")
                streams = self.events_replay.streams if getattr(self, "events_replay", None) is not None else {}
                if len(self._ns_tenant) > 2 * (len(self._ns_blocks) + len(streams)) + SWEEP_SLACK:
                    self._ns_tenant = {n: v for n, v in self._ns_tenant.items()
                                       if n == ns or n in self._ns_blocks or n in streams}
        return t

    def _count_blocks(self, delta: dict) -> None:
        """Each namespace's blocks per tier (tenants.tenant_stats), changed by a drained batch; a
        namespace holding nothing is forgotten (the map is bounded by what is held)."""
        nb = self._ns_blocks
        for (ns, tier), n in delta.items():
            if not n:
                continue
            counts = nb.get(ns)
            if counts is None:
                counts = nb[ns] = {}
            v = counts.get(tier, 0) + n
            if v > 0:
                counts[tier] = v
            else:
                counts.pop(tier, None)
                if not counts:
                    del nb[ns]

    def _events_snapshot(self, ns: bytes) -> tuple[int, bytes]:
        """(Owner thread.) (seq, one batch: ["cleared", b"", ""] then ["stored", client key, tier]
        for each tier holding each of ns's blocks ready) for a subscriber that lost track; what is
        pending is drained (numbered) first, so the batch is exactly the state at that seq."""
        self._drain_events()
        st = self.events_replay.streams.get(ns)
        if st is None or st.fresh:
            return -1, b""
        rows: list = [["cleared", b"", ""]]
        keys = list(self.origin.of(ns))
        for t in self.manager.tiers:
            rows.extend(["stored", self.origin[k][1], t.name] for k in keys if k in t.ready)
        return st.seq, P.pack(rows)

    def _tell(self, ns: bytes, rows: list) -> None:
        """Rows of one namespace: its PUB topic (numbered), its sessions' queues, the sinks."""
        if self.pub is not None:
            body = P.pack(rows)
            seq = self.events_replay.append(ns, body)
            frames = [topic_of(ns), body, P.events_seq(seq, self.events_epoch)]
            try:  # [topic, rows, seq + epoch]: a subscriber reading two frames reads what it did
                self.pub.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:  # no publisher, or the link is full: subscribers see the gap
                pass
            own = self._tenant_pubs.get(self._tenant_of(ns)) if self._tenant_pubs else None
            if own is not None:  # the tenant's own stream: the same message
                try:
                    own.send_multipart(frames, zmq.NOBLOCK)
                except zmq.Again:
                    pass
        for s in self.sessions.in_namespace(ns):
            s.events.extend(rows)
            if len(s.events) > MAX_EVENTS:
                del s.events[:len(s.events) - MAX_EVENTS]
        for fn in self._event_sinks:
            try:
                fn(ns, rows)
            except Exception:  # a sink's bug must not stop the loop
                log.exception("KV-event sink %r failed", fn)

    def _close_events(self) -> None:
        if getattr(self, "events_replay", None) is not None:
            self.events_replay.close()
            if self.events_replay.link is not None:
                self.events_replay.link.close(0)
            self.events_replay = None
        if getattr(self, "kv_events", None) is not None:
            self.kv_events.close()
            self.kv_events = None
        if getattr(self, "pub", None) is not None:
            self.pub.close(0)
            self.pub = None
        if getattr(self, "publisher", None) is not None:
            self.publisher.close()  # the child exits (its ipc files go), the links close
            self.publisher = None
