"""Per-namespace sequence numbers, bounded replay buffers and a paced replay thread: what both event
streams (kvbm's own `events`, events.py; the vLLM-format `kv_events`, kv_events.py) need so that a
subscriber sees a gap and fills it.

    Replay(daemon, link, buffer, snapshot=, first_seq=, seq_frame=, idle=, bare=, name=, limits=)
      .add_link(link, allow)              another replay socket (a tenant's own): allow(ns) says which
                                          namespaces it is answered for
      .stream(ns) -> _Stream              the namespace's numbering and buffer (made on first use)
      .append(ns, payload) -> seq         (owner thread) number a batch and buffer it
      .topics                             topic -> namespace, for replay requests
      .close()

A replay request comes from the event publisher (publisher.py: the public ROUTER lives there) over
`link`, a DEALER: [peer id, b"", topic, start seq (8 bytes, big endian, signed)]; the answer is
[peer id, b"", topic, seq_frame(seq), batch] per buffered batch of that topic's namespace from
`start` on, then [peer id, b"", b"", END_SEQ, b""]. A start older than the buffer (or -1) gets one
snapshot batch first, at the seq it reflects (`snapshot(ns)` -> (seq, batch), seq -1 when there is
none: run on the owner thread, so it is consistent with what was numbered). A topic no namespace
has gets the end marker only. With `bare` (the vLLM-format stream) vLLM's own [start seq] request,
with no topic, is answered from the one namespace's stream while there is exactly one.

Sequence numbers are per namespace (a subscriber of one topic checks them; gaps never count another
namespace's batches), and a replay carries the named topic's batches only. Bounds (SECURITY.md, "A
hostile subscriber"): `buffer` batches per namespace and MAX_REPLAY_BYTES for all of one stream's
namespaces together, each batch counted with ENTRY_BYTES beside its payload (past it the oldest
batches of the namespace that published least recently go; a replay from one of them starts with a
snapshot); at most MAX_IDLE_NAMESPACES streams of namespaces `idle(ns)` says hold nothing; the replay thread rests REPLAY_SHARE_IDLE times the CPU
each answer took; snapshot scans are at least SNAPSHOT_EVERY_S apart per namespace and leave the
owner thread SCAN_SHARE_IDLE times the last scan's time between any two. These limits are read,
when used, from `limits` (a module: this one, or kv_events.py, whose tests lower them).
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time
from typing import Any, Callable

import zmq

from .events import topic_of

log = logging.getLogger("kvbm.daemon")
END_SEQ = (-1).to_bytes(8, "big", signed=True)
MAX_IDLE_NAMESPACES = 256  # namespace streams kept with nothing held (their seq survives)
MAX_REPLAY_BYTES = 256 << 20  # one stream's replay buffers together (a tenant can make many namespaces)
SNAPSHOT_EVERY_S = 1.0  # per namespace, at most one owner-thread scan for replays this often
REPLAY_SHARE_IDLE = 9.0  # the replay thread rests 9x the CPU each answer took: <= 10% of a core
SCAN_SHARE_IDLE = 9.0  # after a scan, the owner thread has 9x its time to itself: scans take <= 10% of it
ENTRY_BYTES = 120  # what a buffered batch costs beyond its payload (tuple, int, bytes header): counted


class _Stream:
    """One namespace's sequence numbers and replay buffer."""

    def __init__(self, seq: int, buffer: int) -> None:
        self.seq = seq  # last published
        self.fresh = True  # nothing published yet
        self.buffer: collections.deque = collections.deque(maxlen=buffer)  # (seq, payload)


class Replay:
    def __init__(self, daemon: Any, link: Any, buffer: int, *, snapshot: Callable[[bytes], tuple[int, bytes]],
                 first_seq: Callable[[], int], seq_frame: Callable[[int], bytes] = lambda s: s.to_bytes(8, "big"),
                 idle: Callable[[bytes], bool] = lambda ns: False, bare: bool = False, name: str = "events",
                 limits: Any = None) -> None:
        self.daemon = daemon
        self.k = limits if limits is not None else sys.modules[__name__]
        self.link = link  # DEALER to the publisher's replay ROUTER, or None (numbering and buffers only)
        # every replay link, with who may be answered on it: None = any namespace (the stream's
        # credential), else allow(ns) (a tenant's own replay socket: its namespaces only)
        self.links: list[tuple[Any, Callable[[bytes], bool] | None]] = [(link, None)] if link is not None else []
        self.snapshot, self.first_seq, self.seq_frame, self.idle, self.bare = snapshot, first_seq, seq_frame, idle, bare
        self.streams: collections.OrderedDict[bytes, _Stream] = collections.OrderedDict()
        self.topics: dict[bytes, bytes] = {}  # topic -> namespace, for replay requests
        self.buffer = buffer
        self._floor = 0  # the highest seq of a stream dropped while idle: new streams start above it
        # every namespace's replay buffer together holds at most MAX_REPLAY_BYTES (_trim); the
        # namespaces with batches buffered, least recently published first
        self._buffered = 0
        self._nonempty: collections.OrderedDict[bytes, _Stream] = collections.OrderedDict()
        self._lock = threading.Lock()  # streams' buffers: the owner thread appends, replay reads
        self._stop = threading.Event()
        self._snaps: dict[bytes, tuple] = {}  # ns -> (taken at, seq, payload): the replay thread's
        self._scan_due = 0.0  # no snapshot scan before this (monotonic): the replay thread's
        self._thread = None
        self._name = name
        if link is not None:
            self._start()

    def add_link(self, link: Any, allow: Callable[[bytes], bool]) -> None:
        """Another replay socket (a tenant's own): a request on it is answered only for a topic of
        a namespace allow(ns) admits; any other topic gets the end marker, as a topic nobody has
        (so it learns no topic it could not subscribe to). Before the first request."""
        self.links.append((link, allow))
        if self._thread is None:
            self._start()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name=f"kvbm-{self._name}-replay", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- owner thread

    def stream(self, ns: bytes) -> _Stream:
        st = self.streams.get(ns)
        if st is None:
            # above every number a dropped stream reached, whatever the wall clock did meanwhile
            st = self.streams[ns] = _Stream(max(self.first_seq(), self._floor), self.buffer)
            self.topics[topic_of(ns)] = ns
            idle = [n for n in self.streams if n != ns and self.idle(n)]
            for n in idle[:max(0, len(idle) - self.k.MAX_IDLE_NAMESPACES)]:
                with self._lock:
                    gone = self.streams.pop(n)
                    self._buffered -= sum(_cost(p) for _, p in gone.buffer)
                    self._nonempty.pop(n, None)
                self._floor = max(self._floor, gone.seq)
                self.topics.pop(topic_of(n), None)
        return st

    def append(self, ns: bytes, payload: bytes) -> int:
        """Number one batch of ns and buffer it; -> its seq."""
        st = self.stream(ns)
        st.fresh = False
        with self._lock:
            st.seq += 1
            if len(st.buffer) == st.buffer.maxlen:  # the append drops the oldest
                self._buffered -= _cost(st.buffer[0][1])
            st.buffer.append((st.seq, payload))
            self._buffered += _cost(payload)
            seq = st.seq
            self._nonempty[ns] = st
            self._nonempty.move_to_end(ns)
            self._trim(st)
        self.streams.move_to_end(ns)
        return seq

    def _trim(self, keep: _Stream) -> None:
        """(Under the lock.) All replay buffers together within MAX_REPLAY_BYTES: the oldest batches
        of the namespace that published least recently go first (never `keep`'s newest). A replay
        from a batch that went gets a snapshot first (_from), so a subscriber stays exact."""
        while self._buffered > self.k.MAX_REPLAY_BYTES and self._nonempty:
            ns, st = next(iter(self._nonempty.items()))
            if st is keep and len(st.buffer) <= 1:
                break
            self._buffered -= _cost(st.buffer.popleft()[1])
            if not st.buffer:
                del self._nonempty[ns]

    def _timed_snapshot(self, ns: bytes) -> tuple[tuple[int, bytes], float, float]:
        """(Owner thread.) snapshot(ns), its CPU time, when it began."""
        started, t0 = time.monotonic(), time.perf_counter()
        out = self.snapshot(ns)
        return out, time.perf_counter() - t0, started

    # ---------------------------------------------------------------- replay thread

    def _serve(self) -> None:
        poller = zmq.Poller()
        known = 0
        while not self._stop.is_set():
            links = list(self.links)
            for link, _ in links[known:]:  # (add_link may come after the thread started)
                poller.register(link, zmq.POLLIN)
            known = len(links)
            try:
                ready = dict(poller.poll(100))
            except zmq.ZMQError:
                if self._stop.is_set():
                    return
                continue
            for link, allow in links:  # one request per ready link a round: none starves another
                if link not in ready:
                    continue
                try:
                    frames = link.recv_multipart(zmq.NOBLOCK)
                except zmq.ZMQError:
                    if self._stop.is_set():
                        return
                    continue
                cpu = time.thread_time()
                try:
                    self._answer(frames, link, allow)
                except Exception:  # a bad request or a daemon shutting down: the loop goes on
                    log.exception("event replay request failed")
                # rest in proportion to the CPU that answer took: a flood of requests (each up to a
                # whole buffer of sends, on a thread sharing the interpreter with the owner thread)
                # gets this thread at most 1 / (1 + REPLAY_SHARE_IDLE) of a core
                self._stop.wait(self.k.REPLAY_SHARE_IDLE * (time.thread_time() - cpu))

    def _answer(self, frames: list[bytes], link: Any = None, allow: Callable[[bytes], bool] | None = None) -> None:
        link = self.link if link is None else link
        ident, rest = frames[0], frames[1:]
        if rest and rest[0] == b"":  # a REQ socket's delimiter
            rest = rest[1:]
        if self.bare and len(rest) == 1 and len(rest[0]) == 8:  # vLLM's [start seq]: one stream per engine
            topics = [t for t, ns in list(self.topics.items()) if allow is None or allow(ns)]
            rest = [topics[0] if len(topics) == 1 else b"", rest[0]]
        ns, out = None, []
        if len(rest) == 2 and len(rest[1]) == 8:  # else not [topic, start seq]: the end marker only
            topic, start = rest[0], int.from_bytes(rest[1], "big", signed=True)
            ns = self.topics.get(topic)
            if ns is not None and allow is not None and not allow(ns):
                ns = None  # another tenant's topic: as one nobody has
        if ns is not None:
            out = self._from(ns, start)
        try:  # to the publisher, which routes it to the peer (a full link or no publisher: dropped)
            for seq, payload in out:
                link.send_multipart([ident, b"", topic, self.seq_frame(seq), payload], zmq.NOBLOCK)
            link.send_multipart([ident, b"", b"", END_SEQ, b""], zmq.NOBLOCK)
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
        every = self.k.SNAPSHOT_EVERY_S
        now = time.monotonic()
        cached = self._snaps.get(ns)
        if cached is not None and now - cached[0] < every and cached[1] >= first - 1:
            return cached[1], cached[2]
        due = max(self._scan_due, cached[0] + every if cached is not None else 0.0)
        if due > now and self._stop.wait(due - now):
            return -1, b""  # shutting down
        # t0: when the scan itself began on the owner thread (not when it was asked for: the
        # next one is due SNAPSHOT_EVERY_S after it, however late the owner thread took this one)
        (seq, payload), took, t0 = self.daemon._owner(self._timed_snapshot, ns)  # consistent with the owner's seq
        now = time.monotonic()
        self._scan_due = now + self.k.SCAN_SHARE_IDLE * took
        # a snapshot serves (and paces its namespace's next scan) for SNAPSHOT_EVERY_S only: older
        # ones go, so what is kept is what the paced scans of the last second made (a tenant with
        # many namespaces, each scanned once, no longer leaves a snapshot of each behind)
        self._snaps = {n: v for n, v in self._snaps.items() if now - v[0] < every}
        self._snaps[ns] = (t0, seq, payload)
        return seq, payload

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


def _cost(payload: bytes) -> int:
    """A buffered batch's share of MAX_REPLAY_BYTES: its payload and what holding it costs (the
    `events` stream's batches are a few dozen bytes: counting payloads alone would let a buffer
    of them take several times the budget)."""
    return len(payload) + ENTRY_BYTES
