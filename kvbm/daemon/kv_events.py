"""vLLM-format KV events: which blocks kvbm's tiers hold, named by the engines' own block hashes.

    check_hashes(msg, n)            the optional `hashes` / `parent_hash` fields of store_prepare
    KVEventPublisher(daemon)        a PUB socket and a replay ROUTER (daemon.kv_events, .kv_events_replay)
      .adopt(ns, skeys, hashes, parent)   a client names its blocks' engine hashes (its own namespace only)
      .changed(events)                    after each drained batch: held media diffed (kvbm/held.py)
                                          -> one KVEventBatch per namespace that changed
      .view(ns)                           {(medium, locality): {hash}} as the tiers hold it now (owner thread)
      .op_view(msg, now)                  the `kv_view` op: that view of the caller's own namespace, as
                                          {medium: {locality: [hash]}} (what a subscriber must reach;
                                          tests and operators compare)
      .close()

The stream is vLLM's (vllm/distributed/kv_events.py), so a KV-aware router that follows vLLM
engines follows kvbm's tiers with the same decoder: each message is [topic, seq (8 bytes, big
endian), msgpack KVEventBatch [ts, [BlockStored | BlockRemoved | AllBlocksCleared]]], BlockStored
and BlockRemoved carry vLLM 0.32's `medium` and `locality` (kvbm/held.py: G2 host CPU/LOCAL, G3
disk STORAGE/LOCAL, G4 object STORAGE/REMOTE; a subscriber keys its view by the pair, since G3 and
G4 share a medium), `ownership` "kvbm" (a secondary tier with its own inventory, which no one
engine owns: held.py says why) and the engine's block hashes. Token ids are not sent (the daemon
never sees tokens).

What the events say is a diff of what the tiers hold: after every request the publisher compares,
for each block the request touched, the media whose tier holds it ready with what it last
published, and publishes the difference. A subscriber that applies every batch in order holds
exactly the daemon's view, whatever the manager did in between (cascades, promotions, rollbacks).

Per namespace, as for kvbm's own stream (events.py): the topic is `topic_of(namespace)` (a
one-way hash of the namespace id: `Client.topic`), each namespace has its own sequence numbers
(the first, a batch that starts with AllBlocksCleared and the namespace's blocks held so far, is
numbered by the wall clock in microseconds, so a restarted daemon's stream goes on above the one
it replaces: a subscriber that followed the old one sees a gap, replays, and gets a snapshot,
where numbers from 0 again would look like batches it already has) and its
own replay buffer, so no tenant sees another's batches, counts them through gaps, or replays
them (all buffers together hold at most MAX_REPLAY_BYTES: past it, the oldest batches of the
namespace that published least recently go, and a replay from one of them starts with a snapshot). A replay request names the topic: [b"", topic, start seq] from a DEALER socket (vLLM's
names none: it has one stream per engine; a REQ socket would take only the first of the many
replies); the answer is vLLM's, [b"", topic, seq, batch] per buffered batch from `start`, then
[b"", b"", -1, b""]. A start older than the buffer, or -1, is answered with
one snapshot batch (AllBlocksCleared, then BlockStored per place) at the latest seq. A topic the
publisher does not know gets the end marker only. vLLM's own request, [b"", start seq] with no
topic, is answered from the one namespace's stream while the publisher has exactly one (a
daemon serving one model: a subscriber written for a vLLM engine replays unchanged), else with
the end marker only; so is any request that cannot be parsed (a subscriber never hangs on it). With daemon.token both sockets take ZMQ PLAIN
peers only (username kvbm, password the token). Both live in the event publisher, a child process
(publisher.py: a connection flood exhausts its descriptors, not the daemon's), are bound as the
request socket is (ipc://: 0600, see transport.py) and hold at most event_gate.MAX_EVENT_PEERS
connections each; this process keeps the streams, buffers and snapshots, publishes over a private
link (dropped while the publisher is down: subscribers see the gap) and answers the replay requests
the publisher forwards. The numbering, the buffers and the replay thread are replay.py's (kvbm's
own `events` stream uses the same, events.py); the limits are read from this module. A replay
flood is paced: the replay thread rests 9x the CPU each answer took, and snapshot scans (owner
thread) are at least SNAPSHOT_EVERY_S apart per namespace and <= ~10% of the owner's time.

What a subscriber learns (the trust line): the stream is for routers, i.e. whoever holds the
token (or, without one, whoever reaches the loopback/ipc address: config.py refuses anything
wider). PUB/SUB cannot filter per peer, so a subscriber to the empty prefix receives every
namespace's batches: their topics (one-way hashes of namespace ids), their timing and the engine
block hashes in them, never a namespace id, a kvbm key, a server key or a byte of a block.
Engine hashes are the engines' own (vLLM: sha256 over the parent hash and the block's tokens,
rooted in a per-engine random seed unless PYTHONHASHSEED fixes it); with a known seed a
subscriber could test whether some namespace holds a guessed prefix, which is what a vLLM
engine's own KV-event stream discloses too. Tenants that must not be observed by the routers'
operator need a daemon (or no KV events) of their own. A replay request returns only the named
topic's batches; sequence numbers are per namespace, so gaps never count another's batches.

Hashes are attached by the client that stores a block (store_prepare's `hashes`, one per key:
bin of 1-64 bytes, an integer, or nil; `parent_hash` for the block before the first key). A
client can only name keys of its own namespace (server keys are derived from it), so a wrong
hash misleads that namespace's routers only. A hash is kept while its block is held in some
tier or in flight (kvbm/held.py), so what is kept is bounded by what the manager holds.

Across a restart: G3 and G4 write each block with a blob of (namespace id, engine hash, parent
hash, client key) from events.py's `_block_meta` (G3: in its index, tiers/disk_index.py version 2,
the daemon's own 0600 file; G4: sealed in the object's trailer, tiers/object_meta.py, so a bucket
reader learns nothing of it). A restarted daemon keeps only the blobs whose namespace and client key
derive the block's own server key (events.py), names those blocks before it serves anything, and
publishes them at once, each in its namespace's stream (the stream's first batch, a snapshot:
AllBlocksCleared then BlockStored per place, STORAGE/LOCAL for G3 and STORAGE/REMOTE for G4, a
block in both once per place, as the live stream does in inclusive mode), as if just stored; a
router that followed the old daemon sees the gap and replays it. Blocks stored without hashes, or
recovered without a blob (a version 1 index, an object without a trailer), are served as before,
never published.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import msgpack
import zmq

from . import protocol as P
from ..held import HeldMedia
from .events import topic_of
from .leases import PEER_NS
from .replay import (END_SEQ, MAX_IDLE_NAMESPACES, MAX_REPLAY_BYTES, REPLAY_SHARE_IDLE,  # noqa: F401 (limits,
                     SCAN_SHARE_IDLE, SNAPSHOT_EVERY_S, Replay)                         # read from here)

log = logging.getLogger("kvbm.daemon")
MAX_HASH_BYTES = 64


def _valid_hash(h: Any) -> bool:
    if isinstance(h, bytes):
        return 1 <= len(h) <= MAX_HASH_BYTES
    return isinstance(h, int) and not isinstance(h, bool) and -2**63 <= h < 2**64


def check_hashes(msg: dict, n: int) -> tuple[list | None, Any]:
    """(hashes, parent_hash) of a store_prepare: n entries (bin 1-64 bytes, int or nil) or absent."""
    hashes = P.field(msg, "hashes", list, required=False)
    if hashes is not None:
        if len(hashes) != n:
            raise P.ProtocolError("bad_field", f"field 'hashes' has {len(hashes)} entries for {n} keys")
        for h in hashes:
            if h is not None and not _valid_hash(h):
                raise P.ProtocolError("bad_field", f"field 'hashes': each is nil, bin of 1-{MAX_HASH_BYTES} "
                                                   f"bytes or an integer in [-2^63, 2^64)")
    parent = msg.get("parent_hash")
    if parent is not None and not _valid_hash(parent):
        raise P.ProtocolError("bad_field", f"field 'parent_hash' must be bin of 1-{MAX_HASH_BYTES} bytes or an integer")
    return hashes, parent


class KVEventPublisher:
    def __init__(self, daemon: Any) -> None:
        dcfg = daemon.dcfg
        self.daemon = daemon
        self.held = HeldMedia(daemon.manager, daemon.config.layout.block_size)
        # the public PUB and replay ROUTER live in the event publisher (publisher.py, a child
        # process: PLAIN with the token, transport.bind, at most MAX_EVENT_PEERS connections
        # each); here, links to them: a PUSH the owner thread publishes on (dropped while the
        # child is down or full: subscribers see the gap) and a DEALER the replay thread serves
        pub = daemon.publisher
        self.pub = pub.link("kv_events", zmq.PUSH)
        replay = pub.link("kv_events_replay", zmq.DEALER) if dcfg.kv_events_replay else None
        self.address = pub.endpoints["kv_events"]
        self.replay_address = pub.endpoints.get("kv_events_replay", "") if replay is not None else ""
        # per-namespace numbering, buffers and the replay thread (replay.py, shared with events.py);
        # the first seq of a stream is the wall clock in microseconds (see the docstring)
        self.replay = Replay(daemon, replay, dcfg.kv_events_buffer, snapshot=lambda ns: self._snapshot(ns),
                             first_seq=lambda: time.time_ns() // 1000 - 1, idle=lambda ns: not self.held.blocks(ns),
                             bare=True, name="kv-events", limits=sys.modules[__name__])
        self.streams, self.topics = self.replay.streams, self.replay.topics
        # each tenant's own vLLM-format stream (daemon.tenants.<name>.kv_events): its namespaces'
        # batches, the same numbers; its replay answers its topics only (events.py: the same way)
        self._own: dict[str, Any] = {}
        for t in getattr(dcfg, "tenants", {}).values():
            if t.kv_events:
                self._own[t.name] = pub.link(f"kv_events@{t.name}", zmq.PUSH)
            if t.kv_events_replay:
                self.replay.add_link(pub.link(f"kv_events_replay@{t.name}", zmq.DEALER),
                                     lambda ns, tenant=t.name: daemon._ns_tenant.get(ns) == tenant)
        self._recovered(getattr(daemon, "_recovered_metas", {}))  # verified there (events.py)

    @property
    def _snaps(self) -> dict:
        return self.replay._snaps

    @property
    def _thread(self) -> Any:
        return self.replay._thread

    # ---------------------------------------------------------------- owner thread

    @property
    def dirty(self) -> list:
        return self.held.dirty

    def adopt(self, ns: bytes, skeys: list, hashes: list | None, parent: Any) -> None:
        """Engine hashes for a store's keys (in the caller's namespace: skeys derive from it)."""
        if hashes is None:
            return
        self.replay.stream(ns)
        self.held.name(ns, skeys, hashes, parent)

    def _recovered(self, metas: dict) -> None:
        """Blocks G3 / G4 recovered with their names: published now, per namespace, as if just stored."""
        counts = self.held.recovered(metas, lambda ns: isinstance(ns, bytes) and len(ns) == 16 and ns != PEER_NS)
        for ns in counts:
            self.replay.stream(ns)
        if counts:
            log.info("KV events: %d recovered blocks of %d namespaces named again", sum(counts.values()), len(counts))
            self.changed([])

    def changed(self, events: list) -> None:
        """After a drained batch of manager events (and at any drain with adopted keys)."""
        for ns, evs in self.held.diff(ev.key for ev in events).items():
            self._publish(ns, evs)

    def view(self, ns: bytes) -> dict[tuple[str, str], set]:
        """{(medium, locality): {engine hash}} of the namespace's blocks as the tiers hold them now."""
        return self.held.view(ns)

    def op_view(self, msg: dict, now: float) -> dict:
        """`kv_view` -> view: {medium: {locality: [engine hash]}} of the session's namespace (no
        other's): nested, since msgpack map keys are strings and G3 / G4 share the medium STORAGE."""
        s = self.daemon._session(msg, now)
        out: dict[str, dict[str, list]] = {}
        for (medium, locality), hs in self.view(s.namespace).items():
            out.setdefault(medium, {})[locality] = list(hs)
        return {"view": out}

    def _snapshot(self, ns: bytes) -> tuple[int, bytes]:
        """(seq, one batch: AllBlocksCleared + what was published) for a subscriber that lost track."""
        st = self.streams.get(ns)
        return (st.seq if st is not None and not st.fresh else -1), _batch(self.held.snapshot(ns))

    def _publish(self, ns: bytes, evs: list) -> None:
        st = self.replay.stream(ns)
        if st.fresh:  # a new stream (daemon start, or a namespace back after a while): start clean
            evs = self.held.snapshot(ns)
        payload = _batch(evs)
        seq = self.replay.append(ns, payload)
        frames = [topic_of(ns), seq.to_bytes(8, "big"), payload]
        try:
            self.pub.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:  # a slow subscriber: it sees the gap and replays
            pass
        own = self._own.get(self.daemon._tenant_of(ns)) if self._own else None
        if own is not None:  # the tenant's own stream: the same batch
            try:
                own.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                pass

    def close(self) -> None:
        if getattr(self, "replay", None) is not None:
            self.replay.close()
        for sock in (getattr(self, "pub", None), getattr(getattr(self, "replay", None), "link", None)):
            if sock is not None:
                sock.close(0)  # (the links: the publisher's context ends with it, events.py)


def _batch(evs: list) -> bytes:
    return msgpack.packb([time.time(), evs], use_bin_type=True)
