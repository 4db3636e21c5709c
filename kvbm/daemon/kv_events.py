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
the publisher forwards. A replay
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

import collections
import logging
import threading
import time
from typing import Any

import msgpack
import zmq

from . import protocol as P
from ..held import HeldMedia
from .events import topic_of
from .leases import PEER_NS

log = logging.getLogger("kvbm.daemon")
END_SEQ = (-1).to_bytes(8, "big", signed=True)
MAX_HASH_BYTES = 64
MAX_IDLE_NAMESPACES = 256  # namespace streams kept with no hashed block held (their seq survives)
MAX_REPLAY_BYTES = 256 << 20  # all namespaces' replay buffers together (a tenant can make many namespaces)
SNAPSHOT_EVERY_S = 1.0  # per namespace, at most one owner-thread scan for replays this often
REPLAY_SHARE_IDLE = 9.0  # the replay thread rests 9x the CPU each answer took: <= 10% of a core
SCAN_SHARE_IDLE = 9.0  # after a scan, the owner thread has 9x its time to itself: scans take <= 10% of it


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


class _Stream:
    """One namespace's sequence numbers and replay buffer."""

    def __init__(self, buffer: int) -> None:
        self.seq = time.time_ns() // 1000 - 1  # last published (the first is "now": see the docstring)
        self.fresh = True  # nothing published yet
        self.buffer: collections.deque = collections.deque(maxlen=buffer)  # (seq, payload)


class KVEventPublisher:
    def __init__(self, daemon: Any) -> None:
        dcfg = daemon.dcfg
        self.daemon = daemon
        self.held = HeldMedia(daemon.manager, daemon.config.layout.block_size)
        self.streams: collections.OrderedDict[bytes, _Stream] = collections.OrderedDict()
        self.topics: dict[bytes, bytes] = {}  # topic -> namespace, for replay requests
        self.buffer = dcfg.kv_events_buffer
        # every namespace's replay buffer together holds at most MAX_REPLAY_BYTES (_trim); the
        # namespaces with batches buffered, least recently published first
        self._buffered = 0
        self._nonempty: collections.OrderedDict[bytes, _Stream] = collections.OrderedDict()
        self._lock = threading.Lock()  # streams' buffers: the owner thread appends, replay reads
        # the public PUB and replay ROUTER live in the event publisher (publisher.py, a child
        # process: PLAIN with the token, transport.bind, at most MAX_EVENT_PEERS connections
        # each); here, links to them: a PUSH the owner thread publishes on (dropped while the
        # child is down or full: subscribers see the gap) and a DEALER the replay thread serves
        pub = daemon.publisher
        self.pub = pub.link("kv_events", zmq.PUSH)
        self.replay = pub.link("kv_events_replay", zmq.DEALER) if dcfg.kv_events_replay else None
        self.address = pub.endpoints["kv_events"]
        self.replay_address = pub.endpoints.get("kv_events_replay", "") if self.replay is not None else ""
        self._recovered(getattr(daemon, "_recovered_metas", {}))  # verified there (events.py)
        self._stop = threading.Event()
        self._snaps: dict[bytes, tuple] = {}  # ns -> (taken at, seq, payload): the replay thread's
        self._scan_due = 0.0  # no snapshot scan before this (monotonic): the replay thread's
        self._thread = None
        if self.replay is not None:
            self._thread = threading.Thread(target=self._serve_replay, name="kvbm-kv-events-replay", daemon=True)
            self._thread.start()

    # ---------------------------------------------------------------- owner thread

    @property
    def dirty(self) -> list:
        return self.held.dirty

    def adopt(self, ns: bytes, skeys: list, hashes: list | None, parent: Any) -> None:
        """Engine hashes for a store's keys (in the caller's namespace: skeys derive from it)."""
        if hashes is None:
            return
        self._stream(ns)
        self.held.name(ns, skeys, hashes, parent)

    def _recovered(self, metas: dict) -> None:
        """Blocks G3 / G4 recovered with their names: published now, per namespace, as if just stored."""
        counts = self.held.recovered(metas, lambda ns: isinstance(ns, bytes) and len(ns) == 16 and ns != PEER_NS)
        for ns in counts:
            self._stream(ns)
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
        st = self._stream(ns)
        if st.fresh:  # a new stream (daemon start, or a namespace back after a while): start clean
            evs, st.fresh = self.held.snapshot(ns), False
        payload = _batch(evs)
        with self._lock:
            st.seq += 1
            if len(st.buffer) == st.buffer.maxlen:  # the append drops the oldest
                self._buffered -= len(st.buffer[0][1])
            st.buffer.append((st.seq, payload))
            self._buffered += len(payload)
            seq = st.seq
            self._nonempty[ns] = st
            self._nonempty.move_to_end(ns)
            self._trim(st)
        self.streams.move_to_end(ns)
        try:
            self.pub.send_multipart([topic_of(ns), seq.to_bytes(8, "big"), payload], zmq.NOBLOCK)
        except zmq.Again:  # a slow subscriber: it sees the gap and replays
            pass

    def _stream(self, ns: bytes) -> _Stream:
        st = self.streams.get(ns)
        if st is None:
            st = self.streams[ns] = _Stream(self.buffer)
            self.topics[topic_of(ns)] = ns
            idle = [n for n in self.streams if n != ns and not self.held.blocks(n)]
            for n in idle[:max(0, len(idle) - MAX_IDLE_NAMESPACES)]:
                with self._lock:
                    self._buffered -= sum(len(p) for _, p in self.streams.pop(n).buffer)
                    self._nonempty.pop(n, None)
                self.topics.pop(topic_of(n), None)
        return st

    def _trim(self, keep: _Stream) -> None:
        """(Under the lock.) All replay buffers together within MAX_REPLAY_BYTES: the oldest batches
        of the namespace that published least recently go first (never `keep`'s newest). A replay
        from a batch that went gets a snapshot first (_from), so a subscriber stays exact."""
        while self._buffered > MAX_REPLAY_BYTES and self._nonempty:
            ns, st = next(iter(self._nonempty.items()))
            if st is keep and len(st.buffer) <= 1:
                break
            self._buffered -= len(st.buffer.popleft()[1])
            if not st.buffer:
                del self._nonempty[ns]

    # ---------------------------------------------------------------- replay thread

    def _serve_replay(self) -> None:
        poller = zmq.Poller()
        poller.register(self.replay, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                if not poller.poll(100):
                    continue
                frames = self.replay.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:
                if self._stop.is_set():
                    return
                continue
            cpu = time.thread_time()
            try:
                self._answer(frames)
            except Exception:  # a bad request or a daemon shutting down: the loop goes on
                log.exception("KV-event replay request failed")
            # rest in proportion to the CPU that answer took: a flood of requests (each up to a
            # whole buffer of sends, on a thread sharing the interpreter with the owner thread)
            # gets this thread at most 1 / (1 + REPLAY_SHARE_IDLE) of a core
            self._stop.wait(REPLAY_SHARE_IDLE * (time.thread_time() - cpu))

    def _answer(self, frames: list[bytes]) -> None:
        ident, rest = frames[0], frames[1:]
        if rest and rest[0] == b"":  # a REQ socket's delimiter
            rest = rest[1:]
        if len(rest) == 1 and len(rest[0]) == 8:  # vLLM's [start seq]: its publisher has one stream
            topics = list(self.topics)
            rest = [topics[0] if len(topics) == 1 else b"", rest[0]]
        ns, out = None, []
        if len(rest) == 2 and len(rest[1]) == 8:  # else not [topic, start seq]: the end marker only
            topic, start = rest[0], int.from_bytes(rest[1], "big", signed=True)
            ns = self.topics.get(topic)
        if ns is not None:
            out = self._from(ns, start)
        try:  # to the publisher, which routes it to the peer (a full link or no publisher: dropped)
            for seq, payload in out:
                self.replay.send_multipart([ident, b"", topic, seq.to_bytes(8, "big"), payload], zmq.NOBLOCK)
            self.replay.send_multipart([ident, b"", b"", END_SEQ, b""], zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _from(self, ns: bytes, start: int) -> list:
        """[(seq, batch)] of ns from `start`: buffered, or a snapshot first when `start` is older."""
        with self._lock:
            st = self.streams.get(ns)
            batches = list(st.buffer) if st is not None else []
        first = batches[0][0] if batches else (st.seq + 1 if st is not None else 0)
        if start >= first:
            return [b for b in batches if b[0] >= start]
        seq, payload = self._snapshot_for(ns, first)
        if seq < 0:
            return []
        with self._lock:
            batches = list(st.buffer) if st is not None else []
        return [(seq, payload)] + [b for b in batches if b[0] > seq]

    def _snapshot_for(self, ns: bytes, first: int) -> tuple[int, bytes]:
        """A snapshot taken on the owner thread (a scan of what is held): a recent one (under
        SNAPSHOT_EVERY_S) serves while the buffer holds every batch after it; a new scan of a
        namespace waits (here, on the replay thread) until its last one is SNAPSHOT_EVERY_S old, and
        any scan until the owner thread has had SCAN_SHARE_IDLE times the last scan's time to itself.
        So a flood of replay requests, however it races the publishes (a buffer that rolls faster
        than a snapshot ages), costs the owner thread at most one scan per namespace per second and
        a bounded share of its time; only the flooded replays wait."""
        now = time.monotonic()
        cached = self._snaps.get(ns)
        if cached is not None and now - cached[0] < SNAPSHOT_EVERY_S and cached[1] >= first - 1:
            return cached[1], cached[2]
        due = max(self._scan_due, cached[0] + SNAPSHOT_EVERY_S if cached is not None else 0.0)
        if due > now and self._stop.wait(due - now):
            return -1, b""  # shutting down
        # t0: when the scan itself began on the owner thread (not when it was asked for: the
        # next one is due SNAPSHOT_EVERY_S after it, however late the owner thread took this one)
        (seq, payload), took, t0 = self.daemon._owner(self._timed_snapshot, ns)  # consistent with the owner's seq
        now = time.monotonic()
        self._scan_due = now + SCAN_SHARE_IDLE * took
        # a snapshot serves (and paces its namespace's next scan) for SNAPSHOT_EVERY_S only: older
        # ones go, so what is kept is what the paced scans of the last second made (a tenant with
        # many namespaces, each scanned once, no longer leaves a snapshot of each behind)
        self._snaps = {n: v for n, v in self._snaps.items() if now - v[0] < SNAPSHOT_EVERY_S}
        self._snaps[ns] = (t0, seq, payload)
        return seq, payload

    def _timed_snapshot(self, ns: bytes) -> tuple[tuple[int, bytes], float, float]:
        started, t0 = time.monotonic(), time.perf_counter()
        out = self._snapshot(ns)
        return out, time.perf_counter() - t0, started

    def close(self) -> None:
        self._stop = getattr(self, "_stop", threading.Event())
        self._stop.set()
        if getattr(self, "_thread", None) is not None:
            self._thread.join(5)
        for sock in (getattr(self, "pub", None), getattr(self, "replay", None)):
            if sock is not None:
                sock.close(0)  # (the links: the publisher's context ends with it, events.py)


def _batch(evs: list) -> bytes:
    return msgpack.packb([time.time(), evs], use_bin_type=True)
