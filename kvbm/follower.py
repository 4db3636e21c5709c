"""Follow a daemon's `events` stream: each namespace's resident blocks, with gaps seen, told and filled.

    Follower(events, replay="", topic=b"", token=None)   subscribe to one topic (`Client.topic`), or
                                                         b"": every namespace this credential sees
      .pump(quiet_ms) / .poll(ms)     take what arrived; each message checked by its sequence number
      .view(topic) -> {key: {tier}}   the namespace's blocks as the stream told them
      .gaps, .missed, .restarts, .resyncs, .unrecovered, .syncs    counters (stats() has them all)
      .close()
    python -m kvbm.follower EVENTS [--replay ADDR] [--topic HEX] [--token-file F]   rows as JSON lines

The stream (protocol.py's docstring): [topic, rows, seq frame]; the seq frame is the namespace's
sequence number and the daemon run's epoch. Per topic the follower keeps (epoch, last seq, view):
- seq == last + 1: the rows are applied.
- seq <= last: already applied (a replay overlapped the live stream): skipped.
- seq > last + 1: a gap (the event publisher restarted, this subscriber fell past its high-water
  mark, ...): counted in `gaps` (and the numbers lost in `missed`), logged as a warning, and filled
  from the replay socket (daemon.events_replay) from last + 1; a start the daemon no longer buffers
  is answered with a snapshot (["cleared"], then ["stored", key, tier] per block), so the view is
  exact again either way.
- another epoch: the daemon restarted (its numbers start afresh, the view is void): counted in
  `restarts`, logged, and the view rebuilt from a snapshot.
- a topic seen for the first time: its view is taken from a snapshot (`syncs`), since whatever
  it did before this follower joined is not on the live stream.
Without a replay address (or when the replay does not answer) a gap is counted in `unrecovered`
and logged as an error: the view may be wrong from there on, and the follower says so.

Row kinds: stored (the block is in `tier` now), removed (no longer in `tier`), moved (now in `tier`
and only there), cleared (snapshots only: forget everything known of the namespace). The daemon
tells a move as `moved` only when the block is in that one tier after it; a move that leaves a copy
behind (mode: inclusive promotes by copying; an exclusive promotion leaves a pinned source until
its release) or after which another tier still holds one comes as `stored` in the new tier (and
`removed` from the source when it lost its copy), so a view built from the rows is exact in either
mode (before session 13 such a move came as `moved`, and the lower copy dropped out of the view
until the next snapshot). A daemon before sequence numbers sends two frames: its rows
are applied, unchecked.

Trust: the follower sees what its credential lets it subscribe to; a replay request names one topic
and the daemon answers that topic's rows only (SECURITY.md). A tenant follows its own stream
(daemon.tenants.<name>.events / .events_replay) with its own token: its namespaces only.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import msgpack
import zmq

from .daemon.protocol import events_seq_of

log = logging.getLogger("kvbm.follower")
END_SEQ = (-1).to_bytes(8, "big", signed=True)


class _Topic:
    __slots__ = ("epoch", "last", "view")

    def __init__(self, epoch: int) -> None:
        self.epoch, self.last = epoch, -1
        self.view: dict[bytes, set] = {}


class Follower:
    def __init__(self, events: str, replay: str = "", *, topic: bytes = b"", token: str | None = None,
                 timeout: float = 30.0, ctx: zmq.Context | None = None,
                 on_rows: Callable[[bytes, list], None] | None = None) -> None:
        self.address, self.replay_address, self.topic, self.token = events, replay, topic, token
        self.timeout = timeout
        self.on_rows = on_rows
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.Context()
        self.topics: dict[bytes, _Topic] = {}
        self.gaps = self.missed = self.restarts = self.resyncs = self.unrecovered = self.syncs = 0
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self._creds(self.sub)
        self.sub.setsockopt(zmq.SUBSCRIBE, topic)
        try:
            self.sub.connect(events)
            if replay:  # a malformed replay address fails here, not at the first gap
                probe = self.ctx.socket(zmq.DEALER)
                probe.setsockopt(zmq.LINGER, 0)
                try:
                    probe.connect(replay)
                finally:
                    probe.close(0)
        except zmq.ZMQError:
            self.close()
            raise

    def _creds(self, sock: zmq.Socket) -> None:
        if self.token:
            sock.plain_username = b"kvbm"
            sock.plain_password = self.token.encode()

    # ---------------------------------------------------------------- the live stream

    def poll(self, timeout_ms: int = 0) -> int:
        """Take every message that arrives within timeout_ms (then whatever is queued); -> how many."""
        n = 0
        while self.sub.poll(timeout_ms if n == 0 else 0):
            self.on(self.sub.recv_multipart())
            n += 1
        return n

    def pump(self, quiet_ms: int = 300) -> int:
        """Take messages until none came for quiet_ms; -> how many."""
        n = 0
        while self.sub.poll(quiet_ms):
            self.on(self.sub.recv_multipart())
            n += 1
        return n

    def on(self, frames: list[bytes]) -> None:
        """One message of the stream: [topic, rows] or [topic, rows, seq frame]."""
        topic, rows = frames[0], msgpack.unpackb(frames[1], raw=False)
        parsed = events_seq_of(frames[2]) if len(frames) > 2 else None
        if parsed is None:  # a daemon without sequence numbers: nothing to check
            self._apply(self.topics.setdefault(topic, _Topic(0)), topic, rows)
            return
        seq, epoch = parsed
        st = self.topics.get(topic)
        if st is None:
            st = self.topics[topic] = _Topic(epoch)
            if self.replay_address:  # what it did before this follower joined: a snapshot
                self.syncs += 1
                self._resync(topic, st, -1, seq)
            else:
                st.last = seq - 1
        elif epoch != st.epoch:
            self.restarts += 1
            log.warning("events: topic %s: the daemon restarted (epoch %x -> %x); its view is rebuilt from a "
                        "snapshot", topic.decode(errors="replace"), st.epoch, epoch)
            st.epoch, st.last = epoch, -1
            st.view.clear()
            self._resync(topic, st, -1, seq)
        elif seq > st.last + 1:
            lost = seq - st.last - 1
            self.gaps += 1
            self.missed += lost
            log.warning("events: topic %s: gap of %d message(s) (seq %d to %d lost); replaying from %d",
                        topic.decode(errors="replace"), lost, st.last + 1, seq - 1, st.last + 1)
            self._resync(topic, st, st.last + 1, seq)
        if seq > st.last:
            self._apply(st, topic, rows)
            st.last = seq

    # ---------------------------------------------------------------- recovery

    def _resync(self, topic: bytes, st: _Topic, start: int, seq: int, again: bool = True) -> None:
        """Fill st from the replay socket from `start` (-1: a snapshot); past it, the live message
        `seq` (applied by the caller) goes on."""
        self.resyncs += 1
        answers = self.replay(topic, start) if self.replay_address else None
        if answers is None:
            self.unrecovered += 1
            log.error("events: topic %s: cannot replay from %d (%s); the view may be wrong from here on",
                      topic.decode(errors="replace"), start,
                      "no replay address" if not self.replay_address else "no answer")
            st.last = max(st.last, seq - 1)
            return
        for aseq, epoch, rows in answers:
            if epoch != st.epoch:  # the daemon restarted since the live message: start over there
                self.restarts += 1
                st.epoch, st.last = epoch, -1
                st.view.clear()
                if not (rows and rows[0][0] == "cleared") and again:
                    return self._resync(topic, st, -1, seq, again=False)
            if aseq > st.last:
                self._apply(st, topic, rows)
                st.last = aseq
        if st.last < seq - 1:  # the replay did not reach the live message: what is between is lost
            self.unrecovered += 1
            log.error("events: topic %s: the replay ended at seq %d, before %d; the view may be wrong",
                      topic.decode(errors="replace"), st.last, seq)
            st.last = seq - 1

    def replay(self, topic: bytes, start: int) -> list[tuple[int, int, list]] | None:
        """[(seq, epoch, rows)] of topic from `start` (-1: a snapshot), or None without an answer
        within the timeout."""
        req = self.ctx.socket(zmq.DEALER)
        req.setsockopt(zmq.LINGER, 0)
        self._creds(req)
        req.connect(self.replay_address)
        try:
            req.send_multipart([b"", topic, start.to_bytes(8, "big", signed=True)])
            out = []
            while True:
                if not req.poll(int(self.timeout * 1000)):
                    return None
                frames = req.recv_multipart()
                if len(frames) != 4:
                    continue
                _, t, seq, body = frames
                if seq == END_SEQ:
                    return out
                parsed = events_seq_of(seq)
                if parsed is None or t != topic:
                    continue
                out.append((parsed[0], parsed[1], msgpack.unpackb(body, raw=False)))
        finally:
            req.close(0)

    # ---------------------------------------------------------------- the view

    def _apply(self, st: _Topic, topic: bytes, rows: list) -> None:
        view = st.view
        for row in rows:
            kind, key, tier = row[0], row[1], row[2]
            if kind == "cleared":
                view.clear()
            elif kind == "stored":
                view.setdefault(key, set()).add(tier)
            elif kind == "moved":
                view[key] = {tier}
            elif kind == "removed":
                tiers = view.get(key)
                if tiers is not None:
                    tiers.discard(tier)
                    if not tiers:
                        del view[key]
        if self.on_rows is not None:
            self.on_rows(topic, rows)

    def view(self, topic: bytes) -> dict[bytes, set]:
        st = self.topics.get(topic)
        return {k: set(v) for k, v in st.view.items()} if st is not None else {}

    def last(self, topic: bytes) -> tuple[int, int] | None:
        """(epoch, last seq applied) of topic, or None before its first message."""
        st = self.topics.get(topic)
        return (st.epoch, st.last) if st is not None else None

    def stats(self) -> dict[str, int]:
        return {"gaps": self.gaps, "missed": self.missed, "restarts": self.restarts, "resyncs": self.resyncs,
                "unrecovered": self.unrecovered, "syncs": self.syncs, "topics": len(self.topics)}

    def close(self) -> None:
        self.sub.close(0)
        if self._own_ctx:
            self.ctx.term()

    def __enter__(self) -> "Follower":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import sys

    p = argparse.ArgumentParser(prog="python -m kvbm.follower",
                                description="follow a kvbm daemon's events stream (gaps counted and replayed)")
    p.add_argument("events", help="the daemon's events address (daemon.events)")
    p.add_argument("--replay", default="", help="its replay address (daemon.events_replay)")
    p.add_argument("--topic", default="", help="one namespace's topic (hex, Client.topic); default: all")
    p.add_argument("--token-file", default="", help="the event streams' token (daemon.events_token), or a "
                                                     "tenant's own token on its own stream (daemon.tenants.<name>.events)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = None
    if args.token_file:
        try:
            with open(args.token_file) as f:
                token = f.read().strip()
        except OSError as exc:
            print(f"kvbm.follower: cannot read --token-file {args.token_file}: {exc.strerror}", file=sys.stderr)
            return 2

    def show(topic: bytes, rows: list) -> None:
        for kind, key, tier, *_ in rows:
            print(json.dumps({"topic": topic.decode(errors="replace"), "kind": kind,
                              "key": key.hex() if isinstance(key, bytes) else key, "tier": tier}), flush=True)

    try:
        f = Follower(args.events, args.replay, topic=args.topic.encode(), token=token, on_rows=show)
    except zmq.ZMQError as exc:
        print(f"kvbm.follower: cannot connect to {args.events} / {args.replay or '-'}: {exc}; give the daemon's "
              f"daemon.events (and daemon.events_replay) address: tcp://HOST:PORT or ipc://PATH", file=sys.stderr)
        return 2
    try:
        while True:
            f.poll(1000)
    except KeyboardInterrupt:
        print(json.dumps(f.stats()), file=sys.stderr)
        return 0
    finally:
        f.close()


if __name__ == "__main__":
    raise SystemExit(main())
