"""The `events` stream's sequence numbers: a lost message is a visible gap, and a subscriber recovers.

Before, kvbm's own [topic, rows] stream carried no sequence numbers: a restarted event publisher
(publisher.py: on death or past its memory cap), a subscriber past its high-water mark or a link
down (ZMQ_IMMEDIATE drops) lost rows, and no subscriber could tell. Now every message carries
[topic, rows, seq + epoch] (protocol.py), numbered per namespace in the daemon before the link, and
daemon.events_replay answers a topic's buffered messages (or a snapshot) like kv_events_replay
(replay.py). kvbm.follower.Follower checks the numbers, counts and logs gaps, and recovers.

- Under normal traffic the numbers of one topic are consecutive, one epoch, no gap.
- A killed publisher loses the messages published while it is down: the follower sees the gap,
  replays it, and its view of the namespace's blocks equals the daemon's (asked by lookups).
- A replay (and a snapshot) of one topic carries that namespace's rows only.
- A daemon restart is a new epoch: told apart from a gap, the view rebuilt from a snapshot.

Every wait is on a condition with a generous deadline (the box is loaded).
"""

from __future__ import annotations

import os
import shutil
import signal
import time
import uuid
from pathlib import Path

import msgpack
import numpy as np
import pytest

zmq = pytest.importorskip("zmq")

from daemonproc import wait_until  # noqa: E402
from kvbm.daemon.protocol import events_seq_of  # noqa: E402
from kvbm.follower import Follower  # noqa: E402
from servedaemon import NB, Served, block, make_keys  # noqa: E402
from test_event_publisher import alive, publishers  # noqa: E402

DEADLINE_S = 120.0
END = (-1).to_bytes(8, "big", signed=True)


def served(tmp_path: Path, name: str, capacity: int = 16, **daemon) -> tuple[Served, Path]:
    """A daemon with `events` and `events_replay` on ipc:// and its own runtime folder."""
    runtime = Path(f"/tmp/kvbm-rt-{uuid.uuid4().hex[:8]}")  # (short: ipc paths hold 107 bytes)
    runtime.mkdir(mode=0o700)
    folder = tmp_path / name
    d = Served(tmp_path, name, tiers=[{"name": "g2", "capacity": capacity, "eviction": "lru", "storage": "host"}],
               daemon={"events": f"ipc://{folder}/ev.sock", "events_replay": f"ipc://{folder}/evr.sock", **daemon},
               env={"XDG_RUNTIME_DIR": str(runtime)})
    return d, runtime


def follower(d: Served, topic: bytes, **kw) -> Follower:
    return Follower(f"ipc://{d.dir}/ev.sock", f"ipc://{d.dir}/evr.sock", topic=topic, timeout=DEADLINE_S, **kw)


def join(f: Follower, c, tag: str) -> list[bytes]:
    """PUB/SUB joins late: store one key per request until the follower has heard the topic."""
    keys, deadline = [], time.monotonic() + DEADLINE_S
    while c.topic not in f.topics:
        assert time.monotonic() < deadline, "the follower never heard the stream"
        k = make_keys(f"{tag}-join-{len(keys)}", 1)
        assert c.store(k, [block(k[0])]) == 1
        keys += k
        f.poll(100)
    return keys


def truth(c, keys: list[bytes]) -> dict[bytes, set]:
    """The daemon's resident set among `keys`, each with its tier, asked one lookup per key."""
    out = {}
    for k in dict.fromkeys(keys):
        n, where = c.lookup([k])
        if n:
            out[k] = {where[0]}
    return out


def caught_up(f: Follower, topic: bytes, key: bytes) -> bool:
    f.poll(100)
    return key in f.view(topic)


def replay_raw(ctx: zmq.Context, address: str, topic: bytes, start: int) -> list[tuple[bytes, int, int, list]]:
    """[(topic, seq, epoch, rows)] a replay request answers, up to its end marker."""
    req = ctx.socket(zmq.DEALER)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(address)
    try:
        req.send_multipart([b"", topic, start.to_bytes(8, "big", signed=True)])
        out = []
        while True:
            assert req.poll(int(DEADLINE_S * 1000)), "no replay answer within the deadline"
            empty, t, seq, body = req.recv_multipart()
            assert empty == b""
            if seq == END:
                assert t == b"" and body == b""
                return out
            parsed = events_seq_of(seq)
            assert parsed is not None, seq
            out.append((t, parsed[0], parsed[1], msgpack.unpackb(body, raw=False)))
    finally:
        req.close(0)


def test_numbers_are_consecutive_with_one_epoch_under_normal_traffic(tmp_path):
    d, runtime = served(tmp_path, "seq", capacity=64)
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    c = f = None
    try:
        d.start()
        c = d.client()
        f = follower(d, c.topic)
        sub.setsockopt(zmq.SUBSCRIBE, c.topic)
        sub.connect(f"ipc://{d.dir}/ev.sock")
        stored = join(f, c, "seq")
        heard: list[list] = []
        deadline = time.monotonic() + DEADLINE_S
        while not sub.poll(100):  # the raw subscriber too
            assert time.monotonic() < deadline
            k = make_keys(f"seq-raw-{len(stored)}", 1)
            assert c.store(k, [block(k[0])]) == 1
            stored += k
        batches = [make_keys(f"seq-{i}", 1 + i % 3) for i in range(40)]  # 80 blocks into 64: evictions
        for keys in batches:
            assert c.store(keys, [block(k) for k in keys]) == len(keys)
            stored += keys
        last = batches[-1][-1]
        while True:  # every message up to the one with the last key
            assert sub.poll(int(DEADLINE_S * 1000)), "the last store's message never came"
            frames = sub.recv_multipart()
            heard.append(frames)
            if last in [r[1] for r in msgpack.unpackb(frames[1], raw=False)]:
                break
        assert all(len(fr) == 3 and fr[0] == c.topic for fr in heard)
        nums = [events_seq_of(fr[2]) for fr in heard]
        seqs, epochs = [s for s, _ in nums], {e for _, e in nums}
        assert len(epochs) == 1 and 0 not in epochs
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs  # consecutive: no gap, no repeat
        # the last 40 messages are the 40 stores, in order, each with its keys stored
        tail = [msgpack.unpackb(fr[1], raw=False) for fr in heard[-40:]]
        assert [[r[1] for r in rows if r[0] == "stored"] for rows in tail] == batches
        assert any(r[0] == "removed" for rows in tail for r in rows)  # G2 evicted meanwhile
        assert wait_until(lambda: caught_up(f, c.topic, last), DEADLINE_S)
        f.pump(300)
        assert f.gaps == 0 and f.missed == 0 and f.restarts == 0 and f.unrecovered == 0
        assert f.last(c.topic)[0] == epochs.pop()
        assert f.view(c.topic) == truth(c, stored)
        assert len(f.view(c.topic)) == 64  # G2 full
    finally:
        for x in (c, f):
            if x is not None:
                x.close()
        sub.close(0)
        ctx.term()
        d.stop()
        shutil.rmtree(runtime, ignore_errors=True)


@pytest.mark.parametrize("buffer", [10_000, 1])
def test_a_killed_publisher_is_a_gap_the_follower_fills(tmp_path, buffer):
    """The publisher is SIGKILLed; what the daemon publishes before the next one runs is lost. The
    follower sees the gap at the next message and replays it: from the buffer (10,000 messages
    per namespace), or, with a 1-message buffer, from a snapshot. Either way its view equals the
    daemon's, keys stored and evicted while the stream was down included."""
    d, runtime = served(tmp_path, f"kill{buffer}", kv_events_buffer=buffer)
    c = f = None
    try:
        d.start()
        c = d.client()
        seen: list = []
        f = follower(d, c.topic, on_rows=lambda t, rows: seen.extend(rows))
        stored = join(f, c, "kill")
        before = make_keys("before", 8)
        assert c.store(before, [block(k) for k in before]) == 8
        stored += before
        assert wait_until(lambda: caught_up(f, c.topic, before[-1]), DEADLINE_S)
        assert f.gaps == 0

        lost: list[bytes] = []
        for attempt in range(6):  # until a store surely went nowhere (no publisher ran meanwhile)
            assert wait_until(lambda: len(publishers(d.proc.pid)) == 1, DEADLINE_S)
            (pid,) = publishers(d.proc.pid)
            os.kill(pid, signal.SIGKILL)
            assert wait_until(lambda: not alive(pid), DEADLINE_S)
            keys = make_keys(f"down-{attempt}", 20)  # 20 into a G2 of 16: evicts everything before
            assert c.store(keys, [block(k) for k in keys]) == 20
            stored += keys
            if not publishers(d.proc.pid):
                lost = keys
                break
        assert lost, "a new publisher always ran before the store"
        assert wait_until(lambda: c.stats()["daemon"].get("event_publisher_restarts", 0) >= 1, DEADLINE_S)

        # the follower reconnects by itself; the next message it hears is past the gap
        n, deadline = 0, time.monotonic() + DEADLINE_S
        while f.gaps == 0:
            assert time.monotonic() < deadline, "no message reached the follower after the restart"
            k = make_keys(f"after-{n}", 1)
            assert c.store(k, [block(k[0])]) == 1
            stored += k
            n += 1
            f.poll(200)
        assert wait_until(lambda: caught_up(f, c.topic, stored[-1]), DEADLINE_S)
        f.pump(300)
        assert f.gaps >= 1 and f.missed >= 1 and f.resyncs >= 2 and f.unrecovered == 0 and f.restarts == 0
        view = f.view(c.topic)
        assert view == truth(c, stored)
        assert not set(before) & set(view)  # evicted while the stream was down (20 into 16)
        if buffer == 1:
            assert ["cleared", b"", ""] in seen  # the replay started with a snapshot
        else:  # replayed message by message: what was stored and evicted while the stream was down
            assert {r[1] for r in seen if r[0] == "stored"} >= set(lost)
            assert {r[1] for r in seen if r[0] == "removed"} >= set(before)
    finally:
        for x in (c, f):
            if x is not None:
                x.close()
        d.stop()
        shutil.rmtree(runtime, ignore_errors=True)


def test_a_replay_carries_the_named_namespace_only(tmp_path):
    d, runtime = served(tmp_path, "iso", capacity=64, kv_events_buffer=4)
    ctx = zmq.Context()
    c = a = b = f = None
    try:
        d.start()
        a, b = d.client(salt="tenant-a"), d.client(salt="tenant-b")
        f = follower(d, a.topic)
        a_keys, b_keys = join(f, a, "a"), []
        for i in range(10):  # interleaved: each namespace's numbers count its own messages only
            ka, kb = make_keys(f"a{i}", 2), make_keys(f"b{i}", 2)
            assert a.store(ka, [block(k) for k in ka]) == 2 and b.store(kb, [block(k) for k in kb]) == 2
            a_keys += ka
            b_keys += kb
        assert wait_until(lambda: caught_up(f, a.topic, a_keys[-1]), DEADLINE_S)
        address = f"ipc://{d.dir}/evr.sock"
        for start in (-1, 0, f.last(a.topic)[1] - 2):  # a snapshot, older than the buffer, buffered
            got = replay_raw(ctx, address, a.topic, start)
            assert got and {t for t, *_ in got} == {a.topic}
            keys = {r[1] for *_, rows in got for r in rows if r[1]}
            assert keys and keys <= set(a_keys) and not keys & set(b_keys)
            seqs = [s for _, s, _, _ in got]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # a's numbers: consecutive
        snap = replay_raw(ctx, address, a.topic, -1)
        assert len(snap) == 1 and snap[0][3][0] == ["cleared", b"", ""]
        assert {r[1] for r in snap[0][3][1:]} == set(truth(a, a_keys)) == set(f.view(a.topic))
        assert snap[0][1] == f.last(a.topic)[1]  # the snapshot is at the last seq published
        # b's replay is b's; a topic no namespace has, and the empty prefix, get the end marker only
        b_snap = {r[1] for *_, rows in replay_raw(ctx, address, b.topic, -1) for r in rows if r[1]}
        assert b_snap == set(truth(b, b_keys)) and b_snap and not b_snap & set(a_keys)
        assert replay_raw(ctx, address, os.urandom(16).hex().encode(), -1) == []
        assert replay_raw(ctx, address, b"", -1) == []
        assert replay_raw(ctx, address, a.topic[:8], -1) == []
        # the follower of a's topic never heard a row of b's
        assert set(f.view(a.topic)) <= set(a_keys) and list(f.topics) == [a.topic]
    finally:
        for x in (a, b, c, f):
            if x is not None:
                x.close()
        ctx.term()
        d.stop()
        shutil.rmtree(runtime, ignore_errors=True)


def test_a_daemon_restart_is_a_new_epoch_not_a_gap(tmp_path):
    d, runtime = served(tmp_path, "epoch", capacity=64)
    c = f = None
    try:
        d.start()
        c = d.client()
        f = follower(d, c.topic)
        old = join(f, c, "old")
        assert wait_until(lambda: caught_up(f, c.topic, old[-1]), DEADLINE_S)
        epoch0 = f.last(c.topic)[0]
        c.close()
        c = None
        d.stop()
        d.start()  # the same config: the same event addresses; G2 (host) starts empty
        c = d.client()
        new, n, deadline = [], 0, time.monotonic() + DEADLINE_S
        while f.restarts == 0:  # the follower reconnects by itself
            assert time.monotonic() < deadline, "the follower never heard the new daemon"
            k = make_keys(f"new-{n}", 1)
            assert c.store(k, [block(k[0])]) == 1
            new += k
            n += 1
            f.poll(200)
        assert wait_until(lambda: caught_up(f, c.topic, new[-1]), DEADLINE_S)
        f.pump(300)
        assert f.restarts == 1 and f.gaps == 0 and f.unrecovered == 0
        assert f.last(c.topic)[0] != epoch0
        assert f.view(c.topic) == truth(c, old + new) and set(f.view(c.topic)) == set(new)
    finally:
        if c is not None:
            c.close()
        if f is not None:
            f.close()
        d.stop()
        shutil.rmtree(runtime, ignore_errors=True)


def test_the_replay_socket_takes_the_streams_credential_only(tmp_path):
    """With daemon.events_token the replay ROUTER, like the PUB, takes PLAIN peers presenting it:
    a replay without it, or with the client token, never gets a handshake, so never a row."""
    from test_daemon_events import _handshake

    d, runtime = served(tmp_path, "tok", capacity=64, events_token="router-secret")
    ctx = zmq.Context()
    c = f = None
    socks = []
    try:
        d.start()
        c = d.client()
        f = follower(d, c.topic, token="router-secret")
        keys = join(f, c, "tok")
        assert wait_until(lambda: caught_up(f, c.topic, keys[-1]), DEADLINE_S)
        assert f.view(c.topic) == truth(c, keys) and f.unrecovered == 0
        for creds in (None, "wrong", "router-secret"):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            if creds is not None:
                s.plain_username, s.plain_password = b"kvbm", creds.encode()
            socks.append(s)
            want = "ok" if creds == "router-secret" else "failed"
            assert _handshake(s, f"ipc://{d.dir}/evr.sock", DEADLINE_S) == want, creds
    finally:
        for s in socks:
            s.close(0)
        for x in (c, f):
            if x is not None:
                x.close()
        ctx.term()
        d.stop()
        shutil.rmtree(runtime, ignore_errors=True)


# ---------------------------------------------------------------- the follower's rules, without a daemon

def _msg(topic: bytes, seq: int, epoch: int, rows: list) -> list[bytes]:
    from kvbm.daemon.protocol import events_seq

    return [topic, msgpack.packb(rows, use_bin_type=True), events_seq(seq, epoch)]


class _Scripted(Follower):
    """A follower whose replay socket answers from a script: {start: [(seq, epoch, rows)]}."""

    def __init__(self, tmp_path: Path, answers: dict) -> None:
        super().__init__(f"ipc://{tmp_path}/none.sock", f"ipc://{tmp_path}/none-r.sock", topic=b"t")
        self.answers, self.asked = answers, []

    def replay(self, topic, start):
        self.asked.append((topic, start))
        return self.answers.get(start)


def test_the_follower_counts_gaps_skips_repeats_and_tells_restarts(tmp_path):
    k = [bytes([i]) * 16 for i in range(6)]
    f = _Scripted(tmp_path, {
        -1: [(10, 7, [["cleared", b"", ""], ["stored", k[0], "g2"]])],                       # first sight
        12: [(12, 7, [["stored", k[2], "g2"]]), (13, 7, [["removed", k[0], "g2"]])],          # the gap
    })
    try:
        f.on(_msg(b"t", 10, 7, [["stored", k[0], "g2"]]))  # first sight: a snapshot at 10 covers it
        assert f.asked == [(b"t", -1)] and f.syncs == 1 and f.last(b"t") == (7, 10)
        f.on(_msg(b"t", 11, 7, [["stored", k[1], "g2"]]))
        f.on(_msg(b"t", 11, 7, [["removed", k[1], "g2"]]))  # a repeat: skipped
        assert f.view(b"t") == {k[0]: {"g2"}, k[1]: {"g2"}}
        f.on(_msg(b"t", 14, 7, [["moved", k[1], "g3"]]))  # 12 and 13 lost: replayed first
        assert f.asked[-1] == (b"t", 12) and (f.gaps, f.missed, f.unrecovered) == (1, 2, 0)
        assert f.view(b"t") == {k[1]: {"g3"}, k[2]: {"g2"}} and f.last(b"t") == (7, 14)
        f.answers[-1] = [(3, 8, [["cleared", b"", ""], ["stored", k[5], "g2"]])]
        f.on(_msg(b"t", 3, 8, [["stored", k[5], "g2"]]))  # another epoch: a restart, not a gap
        assert (f.restarts, f.gaps) == (1, 1) and f.view(b"t") == {k[5]: {"g2"}} and f.last(b"t") == (8, 3)
        f.on(_msg(b"t", 6, 8, []))  # a gap the replay cannot fill: said so, and the stream goes on
        assert (f.gaps, f.unrecovered) == (2, 1) and f.last(b"t") == (8, 6)
        f.on([b"t", msgpack.packb([["stored", k[4], "g2"]], use_bin_type=True)])  # a daemon before seqs
        assert k[4] in f.view(b"t") and f.stats()["gaps"] == 2
    finally:
        f.close()


def test_a_stream_dropped_while_idle_comes_back_above_its_numbers():
    """Streams of namespaces that hold nothing are dropped past MAX_IDLE_NAMESPACES; one that comes
    back starts above every number a dropped stream reached, even with the clock stepped back (a
    subscriber would take lower numbers for repeats and skip them)."""
    import types

    from kvbm.daemon import replay as R

    limits = types.SimpleNamespace(**{k: getattr(R, k) for k in dir(R) if k.isupper()})
    limits.MAX_IDLE_NAMESPACES = 1
    clock = [1000]
    r = R.Replay(None, None, 4, snapshot=lambda ns: (-1, b""), first_seq=lambda: clock[0],
                 idle=lambda ns: True, limits=limits)
    a, b, c = b"A" * 16, b"B" * 16, b"C" * 16
    assert [r.append(a, b"x") for _ in range(5)] == [1001, 1002, 1003, 1004, 1005]
    clock[0] = 10  # the wall clock stepped back
    r.stream(b)
    r.stream(c)  # two idle streams beside c: the oldest, a, goes
    assert a not in r.streams and list(r.streams) == [b, c]
    assert r.append(a, b"y") == 1006  # above 1005, not 11
    assert all(len(st.buffer) <= 4 for st in r.streams.values())
    r.close()


def _rows_view(rows: list, view: dict | None = None) -> dict:
    """A reader of session 12 (three fields a row; moved: now in that tier only)."""
    view = {} if view is None else view
    for kind, key, tier in rows:
        if kind == "cleared":
            view.clear()
        elif kind == "stored":
            view.setdefault(key, set()).add(tier)
        elif kind == "moved":
            view[key] = {tier}
        elif kind == "removed" and key in view:
            view[key].discard(tier)
            if not view[key]:
                del view[key]
    return view


def test_inclusive_mode_copies_keep_every_reader_exact(tmp_path):
    """mode: inclusive keeps lower copies: a block promoted from G3 to G2 stays in G3, and a G2
    victim G3 already holds is only removed from G2. Before, the daemon told a promotion as
    ["moved", key, "g2"] (now only in G2): a follower, and any reader of the rows, dropped the G3
    copy from its view until the next snapshot. Now a move whose source keeps its copy, or after
    which another tier holds one, is told as ["stored", key, tier] (and ["removed", key, source]
    when the source lost it), so rows of three fields stay exact for every reader: the follower's
    view, and a view built from the `events` op's rows, equal the daemon's snapshot, with blocks
    held in both tiers among them."""
    runtime = Path(f"/tmp/kvbm-rt-{uuid.uuid4().hex[:8]}")
    runtime.mkdir(mode=0o700)
    folder = tmp_path / "incl"
    d = Served(tmp_path, "incl", tiers=[
        {"name": "g2", "capacity": 8, "eviction": "lru", "storage": "host"},
        {"name": "g3", "capacity": 64, "eviction": "lru", "storage": {"name": "disk", "path": str(folder / "g3")}}],
        daemon={"events": f"ipc://{folder}/ev.sock", "events_replay": f"ipc://{folder}/evr.sock"},
        env={"XDG_RUNTIME_DIR": str(runtime)})
    import yaml

    cfg = yaml.safe_load(d.config.read_text())
    cfg["mode"] = "inclusive"
    d.config.write_text(yaml.safe_dump(cfg))
    ctx = zmq.Context()
    c = f = None
    try:
        d.start()
        c = d.client()
        seen: list = []
        f = follower(d, c.topic, on_rows=lambda t, rows: seen.extend(rows))
        stored = join(f, c, "incl")
        keys = make_keys("incl", 24)  # 24 into a G2 of 8: most go down to G3
        for i in range(0, 24, 4):
            assert c.store(keys[i:i + 4], [block(k) for k in keys[i:i + 4]]) == 4
        stored += keys

        def in_g3_only() -> list:
            return [k for k in keys if truth(c, [k]).get(k) == {"g3"}]
        assert wait_until(lambda: len(in_g3_only()) >= 8, DEADLINE_S)
        up = in_g3_only()[:4]
        out = [np.zeros(NB, np.uint8) for _ in up]
        assert c.load(up, out) == 4 and all(np.array_equal(o, block(k)) for o, k in zip(out, up))

        def snapshot() -> tuple[int, dict]:
            got = replay_raw(ctx, f"ipc://{folder}/evr.sock", c.topic, -1)  # a snapshot, then what came after
            assert got[0][3][0] == ["cleared", b"", ""]
            view: dict = {}
            for *_, rows in got:
                _rows_view(rows, view)
            return got[-1][1], view

        def exact() -> bool:
            f.poll(100)
            seq, view = snapshot()
            return f.last(c.topic)[1] == seq and f.view(c.topic) == view

        assert wait_until(exact, DEADLINE_S), (f.view(c.topic), snapshot())
        view = f.view(c.topic)
        both = {k for k, tiers in view.items() if tiers == {"g2", "g3"}}
        assert set(up) <= both  # promoted: in G2, and still in G3
        assert all(k in view for k in keys)  # G3 holds 64: nothing left the node
        assert f.unrecovered == 0 and f.gaps == 0
        assert all(len(r) == 3 for r in seen)  # three fields a row, as before
        assert _rows_view(c.events()) == view  # the `events` op's rows, read the old way
    finally:
        for x in (c, f):
            if x is not None:
                x.close()
        ctx.term()
        d.stop()
        shutil.rmtree(runtime, ignore_errors=True)
