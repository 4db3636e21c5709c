"""A tenant's own `events` stream (daemon.tenants.<name>.events / .events_replay) on a real daemon.

Before, `daemon.events_token` was one credential for the whole stream: a tenant could be given
none (its token refused: session 12) or the routers' (every tenant's rows). PUB/SUB cannot filter
per subscriber, so a tenant now gets a socket of its own: the same messages (the same per-namespace
sequence numbers) as the main stream, for its namespaces only, its own token as the PLAIN password;
its replay socket answers its namespaces' topics only (any other: the end marker, as a topic no
one has). The main stream keeps the routers' credential. Every wait is on a condition.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

import msgpack
import pytest

zmq = pytest.importorskip("zmq")

from daemonproc import wait_until  # noqa: E402
from kvbm.daemon.protocol import events_seq_of  # noqa: E402
from kvbm.follower import Follower  # noqa: E402
from servedaemon import TCP_TOKEN, Served, block, make_keys  # noqa: E402

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdef00"
ROUTERS = "kvbm-events-token-0123456789"
DEADLINE_S = 120.0
END = (-1).to_bytes(8, "big", signed=True)


def _served(tmp_path: Path) -> tuple[Served, Path, Path]:
    runtime = Path(f"/tmp/kvbm-rt-{uuid.uuid4().hex[:8]}")  # (short: ipc paths hold 107 bytes)
    runtime.mkdir(mode=0o700)
    f = Path(f"/tmp/kvbm-te-{uuid.uuid4().hex[:8]}")
    f.mkdir(mode=0o700)
    d = Served(tmp_path, "te", tiers=[{"name": "g2", "capacity": 64, "eviction": "lru", "storage": "host"}],
               daemon={"address": "tcp://127.0.0.1:0", "token": TCP_TOKEN, "events_token": ROUTERS,
                       "events": f"ipc://{f}/ev", "events_replay": f"ipc://{f}/evr",
                       "tenants": {"alice": {"token": ALICE, "events": f"ipc://{f}/a", "events_replay": f"ipc://{f}/ar"},
                                   "bob": {"token": BOB, "events": f"ipc://{f}/b"}}},
               env={"XDG_RUNTIME_DIR": str(runtime)})
    return d.start(), runtime, f


def _sub(ctx, address: str, token: str) -> zmq.Socket:
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.LINGER, 0)
    s.plain_username, s.plain_password = b"kvbm", token.encode()
    s.setsockopt(zmq.SUBSCRIBE, b"")  # everything this credential may see
    s.connect(address)
    return s


def _drain(s, into: list, ms: int = 100) -> None:
    while s.poll(ms):
        into.append(s.recv_multipart())
        ms = 0


def _replay(ctx, address: str, token: str, topic: bytes, start: int = -1, wait_s: float = DEADLINE_S) -> list | None:
    """[(topic, seq, rows)] up to the end marker; None when nothing answers within wait_s (a refused
    handshake: the test waits 3 s there, asserting only that nothing came)."""
    req = ctx.socket(zmq.DEALER)
    req.setsockopt(zmq.LINGER, 0)
    req.plain_username, req.plain_password = b"kvbm", token.encode()
    req.connect(address)
    try:
        req.send_multipart([b"", topic, start.to_bytes(8, "big", signed=True)])
        out = []
        while True:
            if not req.poll(int(wait_s * 1000)):
                return None
            _, t, seq, body = req.recv_multipart()
            if seq == END:
                return out
            out.append((t, events_seq_of(seq)[0], msgpack.unpackb(body, raw=False)))
    finally:
        req.close(0)


def test_a_tenant_subscriber_gets_its_own_namespaces_rows_only(tmp_path):
    """alice (two salts), bob and the operator store, interleaved. alice's own stream (her token,
    subscribed to everything) carries exactly her two topics, with the main stream's sequence
    numbers for them, consecutive; bob's his one; a router on the main stream all four. Her token
    opens neither bob's socket nor the main one; the routers' credential opens neither tenant's.
    Her replay socket answers her topics (a snapshot of her blocks) and, for bob's topic or the
    operator's, only the end marker; a Follower on her socket, with her token, keeps an exact view."""
    d, runtime, folder = _served(tmp_path)
    ctx = zmq.Context()
    socks, clients, f = [], [], None
    try:
        a1, a2 = d.client(token=ALICE, salt="s1"), d.client(token=ALICE, salt="s2")
        b, op = d.client(token=BOB, salt="s1"), d.client(salt="s1")
        clients += [a1, a2, b, op]
        mine, main, bobs = (_sub(ctx, f"ipc://{folder}/{n}", t) for n, t in (("a", ALICE), ("ev", ROUTERS), ("b", BOB)))
        wrong = [_sub(ctx, f"ipc://{folder}/b", ALICE), _sub(ctx, f"ipc://{folder}/ev", ALICE),
                 _sub(ctx, f"ipc://{folder}/a", ROUTERS), _sub(ctx, f"ipc://{folder}/a", BOB)]
        socks += [mine, main, bobs, *wrong]
        heard: dict[str, list] = {"mine": [], "main": [], "bobs": [], "wrong": []}
        f = Follower(f"ipc://{folder}/a", f"ipc://{folder}/ar", token=ALICE, timeout=DEADLINE_S)
        # PUB/SUB joins late: store until every subscriber (and the follower) has heard something
        n = 0
        deadline = time.monotonic() + DEADLINE_S
        while not (heard["mine"] and heard["main"] and heard["bobs"] and a1.topic in f.topics):
            assert time.monotonic() < deadline, {k: len(v) for k, v in heard.items()}
            for c in (a1, b):
                k = make_keys(f"join-{c.tenant}-{n}", 1)
                assert c.store(k, [block(k[0])]) == 1
            n += 1
            for s, name in ((mine, "mine"), (main, "main"), (bobs, "bobs")):
                _drain(s, heard[name])
            f.poll(50)
        stored = {c.topic: [] for c in clients}
        for i in range(12):
            for c in clients:
                k = make_keys(f"{c.tenant}-{c.topic[:6].decode()}-{i}", 2)
                assert c.store(k, [block(x) for x in k]) == 2
                stored[c.topic] += k
        last = {c.topic: stored[c.topic][-1] for c in clients}

        def has_last(frames: list, topic: bytes) -> bool:
            return any(fr[0] == topic and last[topic] in [r[1] for r in msgpack.unpackb(fr[1], raw=False)] for fr in frames)

        def caught_up() -> bool:
            for s, name in ((mine, "mine"), (main, "main"), (bobs, "bobs")):
                _drain(s, heard[name], 10)
            f.poll(10)
            return (all(has_last(heard["main"], c.topic) for c in clients) and has_last(heard["mine"], a1.topic)
                    and has_last(heard["mine"], a2.topic) and has_last(heard["bobs"], b.topic)
                    and last[a2.topic] in f.view(a2.topic))
        assert wait_until(caught_up, DEADLINE_S), {k: len(v) for k, v in heard.items()}
        assert {fr[0] for fr in heard["mine"]} == {a1.topic, a2.topic}
        assert {fr[0] for fr in heard["bobs"]} == {b.topic}
        assert {fr[0] for fr in heard["main"]} >= {a1.topic, a2.topic, b.topic, op.topic}
        for s in wrong:
            _drain(s, heard["wrong"], 200)
        assert heard["wrong"] == []  # no handshake with another's credential: nothing at all
        # the same messages, the same numbers: what alice heard is the main stream's, for her topics
        main_of = {(fr[0], fr[2]): fr[1] for fr in heard["main"]}
        for fr in heard["mine"]:
            if (fr[0], fr[2]) in main_of:
                assert main_of[(fr[0], fr[2])] == fr[1]
        for topic in (a1.topic, a2.topic):
            seqs = [events_seq_of(fr[2])[0] for fr in heard["mine"] if fr[0] == topic]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
        # her replay: her topics (a snapshot of exactly her blocks); bob's and the operator's: the end only
        got = _replay(ctx, f"ipc://{folder}/ar", ALICE, a2.topic)
        assert got and {t for t, *_ in got} == {a2.topic}
        snap = {r[1] for *_, rows in got for r in rows if r[0] == "stored"}  # (G2 is shared: some evicted)
        assert snap and snap <= set(stored[a2.topic])
        assert wait_until(lambda: f.poll(10) is not None and f.last(a2.topic)[1] == got[-1][1], DEADLINE_S)
        assert snap == set(f.view(a2.topic))
        assert _replay(ctx, f"ipc://{folder}/ar", ALICE, b.topic) == []
        assert _replay(ctx, f"ipc://{folder}/ar", ALICE, op.topic) == []
        assert _replay(ctx, f"ipc://{folder}/ar", ALICE, os.urandom(16).hex().encode()) == []
        assert _replay(ctx, f"ipc://{folder}/ar", BOB, a1.topic, wait_s=3) is None  # bob's token: no handshake
        assert _replay(ctx, f"ipc://{folder}/evr", ALICE, a1.topic, wait_s=3) is None  # the routers' replay: not hers
        # the follower on her socket: both her topics, exact, never a row of bob's
        assert set(f.topics) == {a1.topic, a2.topic} and f.unrecovered == 0
        assert not set(f.view(a1.topic)) & set(stored[b.topic])
    finally:
        if f is not None:
            f.close()
        for s in socks:
            s.close(0)
        for c in clients:
            c.close()
        ctx.term()
        d.stop()
        shutil.rmtree(runtime, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)


def test_bad_tenant_stream_config_is_one_line_naming_the_key(tmp_path):
    from kvbm.config import ConfigError
    from kvbm.daemon.config import DaemonConfig

    base = {"address": "tcp://127.0.0.1:0", "token": TCP_TOKEN, "events_token": ROUTERS, "events": "ipc:///tmp/x-ev"}
    for tenants, extra, want in (
            ({"alice": {"token": ALICE, "events": "udp://x"}}, {}, "daemon.tenants.alice.events"),
            ({"alice": {"token": ALICE, "events_replay": "ipc:///tmp/x-ar"}}, {}, "daemon.tenants.alice.events_replay needs"),
            ({"alice": {"token": ALICE, "events": "ipc:///tmp/x-ev"}}, {}, "daemon.tenants.alice.events"),
            ({"alice": {"token": ALICE, "events": "ipc:///tmp/x-a"}, "bob": {"token": BOB, "events": "ipc:///tmp/x-a"}},
             {}, "daemon.tenants.bob.events"),
            ({"alice": {"token": ALICE, "events": "ipc:///tmp/x-a"}}, {"events": ""}, "needs daemon.events")):
        with pytest.raises(ConfigError) as exc:
            DaemonConfig.from_dict({**base, **extra, "tenants": tenants})
        msg = str(exc.value)
        assert want in msg and "\n" not in msg and ALICE not in msg, msg


def test_a_tenant_gets_its_own_vllm_format_stream(tmp_path):
    """daemon.tenants.alice.kv_events (and _replay): vLLM-format batches of her namespaces only,
    her token; bob's engine hashes never reach it. Her replay, asked as vLLM asks ([start seq], no
    topic), answers from her one stream, never bob's; bob's token opens neither socket."""
    runtime = Path(f"/tmp/kvbm-rt-{uuid.uuid4().hex[:8]}")
    runtime.mkdir(mode=0o700)
    folder = Path(f"/tmp/kvbm-te-{uuid.uuid4().hex[:8]}")
    folder.mkdir(mode=0o700)
    d = Served(tmp_path, "kv", tiers=[{"name": "g2", "capacity": 64, "eviction": "lru", "storage": "host"}],
               daemon={"address": "tcp://127.0.0.1:0", "token": TCP_TOKEN, "events_token": ROUTERS, "events": "",
                       "kv_events": f"ipc://{folder}/kv", "kv_events_replay": f"ipc://{folder}/kvr",
                       "tenants": {"alice": {"token": ALICE, "kv_events": f"ipc://{folder}/akv",
                                             "kv_events_replay": f"ipc://{folder}/akvr"},
                                   "bob": {"token": BOB}}},
               env={"XDG_RUNTIME_DIR": str(runtime)}).start()
    ctx = zmq.Context()
    socks, clients = [], []
    try:
        a, b = d.client(token=ALICE, salt="s"), d.client(token=BOB, salt="s")
        clients += [a, b]
        mine, wrong = _sub(ctx, f"ipc://{folder}/akv", ALICE), _sub(ctx, f"ipc://{folder}/akv", BOB)
        socks += [mine, wrong]
        heard: list = []
        n, deadline = 0, time.monotonic() + DEADLINE_S
        ah, bh = [], []  # engine hashes: alice's small, bob's large (told apart in the batches)
        while not heard:
            assert time.monotonic() < deadline, "alice's own stream never spoke"
            for c, hs, base in ((a, ah, 1000), (b, bh, 10**9)):
                k = make_keys(f"kv-{c.tenant}-{n}", 1)
                hs.append(base + n)
                assert c.store(k, [block(k[0])], hashes=[base + n]) == 1
            n += 1
            _drain(mine, heard, 100)
        for i in range(5):
            for c, hs, base in ((a, ah, 1000), (b, bh, 10**9)):
                k = make_keys(f"kv-{c.tenant}-x{i}", 1)
                hs.append(base + 100 + i)
                assert c.store(k, [block(k[0])], hashes=[base + 100 + i]) == 1

        def stored_hashes(frames: list) -> set:
            return {h for fr in frames for ev in msgpack.unpackb(fr[2], raw=False)[1]
                    if isinstance(ev, dict) and ev.get("type") == "BlockStored" for h in ev["block_hashes"]}
        assert wait_until(lambda: _drain(mine, heard, 10) or ah[-1] in stored_hashes(heard), DEADLINE_S)
        assert {fr[0] for fr in heard} == {a.topic}
        assert not stored_hashes(heard) & set(bh)
        seqs = [int.from_bytes(fr[1], "big") for fr in heard]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        got: list = []
        _drain(wrong, got, 300)
        assert got == []
        # vLLM's replay request: [start seq] only, answered from her one stream
        req = ctx.socket(zmq.DEALER)
        req.setsockopt(zmq.LINGER, 0)
        req.plain_username, req.plain_password = b"kvbm", ALICE.encode()
        req.connect(f"ipc://{folder}/akvr")
        socks.append(req)
        req.send_multipart([b"", seqs[0].to_bytes(8, "big")])
        frames, deadline = [], time.monotonic() + DEADLINE_S
        while True:
            assert req.poll(int(max(1, deadline - time.monotonic()) * 1000))
            fr = req.recv_multipart()
            if fr[2] == END:
                break
            frames.append(fr[1:])
        assert frames and {fr[0] for fr in frames} == {a.topic}
        assert ah[-1] in stored_hashes([(fr[0], fr[1], fr[2]) for fr in frames])
        assert not stored_hashes([(fr[0], fr[1], fr[2]) for fr in frames]) & set(bh)
    finally:
        for s in socks:
            s.close(0)
        for c in clients:
            c.close()
        ctx.term()
        d.stop()
        shutil.rmtree(runtime, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)


def test_a_killed_publisher_comes_back_with_the_tenants_sockets_and_the_follower_fills_the_gap(tmp_path):
    """The event publisher (a child holding every event socket, the tenants' own included) is
    SIGKILLed while alice stores: the daemon restarts it on the same endpoints, alice's follower
    (her socket, her token) reconnects by itself, sees the gap in her topic's numbers, replays it
    through her replay socket, and its view equals the daemon's (her lookups)."""
    import signal

    from test_event_publisher import alive, publishers

    d, runtime, folder = _served(tmp_path)
    c = f = None
    try:
        c = d.client(token=ALICE, salt="k")
        f = Follower(f"ipc://{folder}/a", f"ipc://{folder}/ar", token=ALICE, timeout=DEADLINE_S)
        stored, n, deadline = [], 0, time.monotonic() + DEADLINE_S
        while c.topic not in f.topics:
            assert time.monotonic() < deadline, "the follower never heard her stream"
            k = make_keys(f"k-join-{n}", 1)
            assert c.store(k, [block(k[0])]) == 1
            stored += k
            n += 1
            f.poll(100)
        lost = False
        for attempt in range(6):  # until a store surely went nowhere (no publisher ran meanwhile)
            assert wait_until(lambda: len(publishers(d.proc.pid)) == 1, DEADLINE_S)
            (pid,) = publishers(d.proc.pid)
            os.kill(pid, signal.SIGKILL)
            assert wait_until(lambda: not alive(pid), DEADLINE_S)
            keys = make_keys(f"k-down-{attempt}", 4)
            assert c.store(keys, [block(k) for k in keys]) == 4
            stored += keys
            if not publishers(d.proc.pid):
                lost = True
                break
        assert lost, "a new publisher always ran before the store"
        deadline = time.monotonic() + DEADLINE_S
        while f.gaps == 0:
            assert time.monotonic() < deadline, "no message reached the follower after the restart"
            k = make_keys(f"k-after-{n}", 1)
            assert c.store(k, [block(k[0])]) == 1
            stored += k
            n += 1
            f.poll(200)

        def exact() -> bool:
            f.poll(100)
            view = f.view(c.topic)
            return stored[-1] in view and view == {k: {"g2"} for k in stored if c.lookup([k], remote=False)[0]}
        assert wait_until(exact, DEADLINE_S)
        assert f.gaps >= 1 and f.missed >= 1 and f.unrecovered == 0
    finally:
        for x in (c, f):
            if x is not None:
                x.close()
        d.stop()
        shutil.rmtree(runtime, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
