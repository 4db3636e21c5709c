"""Routers see kvbm's tiers: the daemon's vLLM-format KV-event stream, read with vLLM's own decoder.

Issue 14 (5): two engines (connector halves over their own daemon clients) store and load
through one `kvbm serve` with a small G2 over a small G3 disk over a G4 object store, so blocks
are stored, demoted and promoted. A subscriber built from vLLM's KVEventBatch / BlockStored /
BlockRemoved / AllBlocksCleared classes follows the stream by sequence number; its view of which
engine block hashes kvbm holds, keyed by vLLM 0.32's (medium, locality) (G2 CPU/LOCAL, G3
STORAGE/LOCAL, G4 STORAGE/REMOTE: G3 and G4 share the medium), must equal the daemon's (each
block's tier, asked with a lookup), also after it drops its subscription and resyncs through the
replay socket. Every event says ownership "kvbm" (kvbm/held.py).
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections import defaultdict
from typing import Any, Union

import pytest

torch = pytest.importorskip("torch")
zmq = pytest.importorskip("zmq")
msgspec = pytest.importorskip("msgspec")
kv_events = pytest.importorskip("vllm.distributed.kv_events")

from kvbm.blocks import Namespace
from kvbm.connectors import core
from servedaemon import LAYOUT, Served

BS = LAYOUT.block_size
PLACE = {"g2": ("CPU", "LOCAL"), "g3": ("STORAGE", "LOCAL"), "g4": ("STORAGE", "REMOTE")}
ALL_EVENTS = {(t, *p, "kvbm") for t in ("BlockStored", "BlockRemoved") for p in PLACE.values()}
DEADLINE_S = 60.0
# G3 keeps G3_HEADROOM free by demoting to G4 on the daemon's offloader thread (the request loop
# never puts to G4: daemon/onboard.py); each prompt (<= 4 blocks) waits for that to finish, so
# G2's synchronous cascade into G3 always finds room and no block drops
G3, G3_HEADROOM = 8, 4


class Follower:
    """A router's view of one topic, from vLLM's decoder classes: {(medium, locality): {block hash}};
    `seen`: (type, medium, locality, ownership) of every BlockStored / BlockRemoved applied."""

    def __init__(self, ctx: zmq.Context, pub: str, replay: str, topic: bytes, token: str | None = None) -> None:
        self.ctx, self.pub_address, self.replay_address, self.topic, self.token = ctx, pub, replay, topic, token
        self.decoder = msgspec.msgpack.Decoder(type=kv_events.KVEventBatch)
        self.view: dict[tuple, set] = defaultdict(set)
        self.seen: set = set()
        self.last = -1
        self.resyncs = 0
        self.sub = None
        self.subscribe()

    def _creds(self, sock: zmq.Socket) -> None:
        if self.token is not None:
            sock.plain_username = b"kvbm"
            sock.plain_password = self.token.encode()

    def subscribe(self) -> None:
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self._creds(self.sub)
        self.sub.setsockopt(zmq.SUBSCRIBE, self.topic)
        self.sub.connect(self.pub_address)

    def drop(self) -> None:
        self.sub.close(0)
        self.sub = None

    def apply(self, payload: bytes) -> None:
        for ev in self.decoder.decode(payload).events:
            if isinstance(ev, kv_events.AllBlocksCleared):
                self.view.clear()
            else:
                place = (ev.medium, ev.locality)
                self.seen.add((type(ev).__name__, *place, ev.ownership))
                if isinstance(ev, kv_events.BlockStored):
                    self.view[place].update(ev.block_hashes)
                else:
                    self.view[place].difference_update(ev.block_hashes)

    def on(self, seq: int, payload: bytes) -> None:
        if seq <= self.last:
            return  # already applied (a replay overlaps the live stream)
        if seq > self.last + 1:  # a gap: what was missed comes from the replay socket first
            self.resync(self.last + 1)
            if seq <= self.last:
                return
        self.apply(payload)
        self.last = seq

    def resync(self, start: int) -> None:
        self.resyncs += 1
        for seq, payload in replay(self.ctx, self.replay_address, self.topic, start, self.token):
            if seq > self.last:
                self.apply(payload)
                self.last = seq

    def pump(self, quiet_ms: int = 300) -> None:
        while self.sub.poll(quiet_ms):
            topic, seq, payload = self.sub.recv_multipart()
            assert topic == self.topic
            self.on(int.from_bytes(seq, "big"), payload)

    def held(self) -> dict[tuple, set]:
        return {p: set(v) for p, v in self.view.items() if v}


def replay(ctx: zmq.Context, address: str, topic: bytes, start: int, token: str | None = None,
           request: list | None = None) -> list:
    """The batches from `start` on (a DEALER: vLLM's replay answers one request with many replies);
    `request`: other frames to send (vLLM's own form is [b"", start] with no topic)."""
    req = ctx.socket(zmq.DEALER)
    req.setsockopt(zmq.LINGER, 0)
    if token is not None:
        req.plain_username = b"kvbm"
        req.plain_password = token.encode()
    req.connect(address)
    try:
        req.send_multipart(request or [b"", topic, start.to_bytes(8, "big", signed=True)])
        out = []
        while True:
            assert req.poll(int(DEADLINE_S * 1000)), "no replay answer within the deadline"
            empty, t, seq, payload = req.recv_multipart()
            assert empty == b""
            seq = int.from_bytes(seq, "big", signed=True)
            if seq == -1:
                return out
            assert t == topic
            out.append((seq, payload))
    finally:
        req.close(0)


class Engine:
    """One engine's connector halves (scheduler + worker) over its own daemon clients."""

    def __init__(self, address: str, seed: int, salt: str = "", token: str | None = None) -> None:
        self.backend = core.DaemonBackend.connect(address, LAYOUT, "tiny", salt=salt, token=token)
        self.sched = core.SchedulerSide(self.backend, None, Namespace("tiny", LAYOUT, salt), BS)
        self.worker = core.WorkerSide(self.backend)
        g = torch.Generator().manual_seed(seed)
        self.worker.register([torch.randn(32, 2, 2, BS, 64, generator=g).to(torch.bfloat16) for _ in range(2)])
        self.keys: dict = {}  # engine hash -> kvbm key

    def prompt(self, req: str, hashes: list, blocks: list[int]) -> int:
        """Match (load what kvbm holds), then store the rest, as a request of len(hashes) blocks."""
        keys = self.sched.keys(req, hashes)
        self.keys.update(zip(hashes, keys))
        hit = self.sched.match(req, keys, len(hashes) * BS + 1, 0, must_compute_one=True) // BS
        plan = self.sched.plan_load(req, blocks, hit * BS)
        if plan is not None:
            self.worker.start_load(plan)
        store = self.sched.plan_store(req, blocks, len(hashes) * BS + 1)
        if store is not None:
            self.worker.start_store(store)
        self.worker.poll(wait=True)
        self.sched.finished(req)
        self.settle()
        return hit

    def hit(self, req: str, hashes: list, blocks: list[int]) -> int:
        """prompt() until every block is a hit: the daemon waits only 2 s for blocks coming up
        from G3/G4 (daemon/onboard.py), so a slow machine may miss once; they land in G2 anyway."""
        deadline = time.monotonic() + DEADLINE_S
        for i in itertools.count():
            n = self.prompt(f"{req}.{i}", hashes, blocks)
            if n == len(hashes) or time.monotonic() > deadline:
                return n
            time.sleep(0.1)

    def settle(self) -> None:
        """Until the offloader has made G3's headroom (its demotions to G4 complete: a block on
        its way stays counted in G3 until it is ready in G4)."""
        deadline = time.monotonic() + DEADLINE_S
        while self.backend.client.stats()["tiers"]["g3"]["used"] > G3 - G3_HEADROOM:
            assert time.monotonic() < deadline, "G3 never got its headroom back"
            time.sleep(0.02)

    def close(self) -> None:
        self.backend.close()


def truth(engines: list[Engine]) -> dict[tuple, set]:
    """Where the daemon holds each engine hash the engines stored, by lookups (not the stream)."""
    out: dict[tuple, set] = defaultdict(set)
    e = engines[0]
    for h, k in {h: k for en in engines for h, k in en.keys.items()}.items():
        n, where = e.backend.client.lookup([k], remote=False)
        if n:
            out[PLACE[where[0]]].add(h)
    return dict(out)


def kv_view(e: Engine) -> dict[tuple, set]:
    """The daemon's view of the engine's namespace, {medium: {locality: [engine hash]}} from the
    kv_view op, as {(medium, locality): {engine hash}}."""
    return places(e.backend.client.call("kv_view")["view"])


def places(view: dict) -> dict[tuple, set]:
    """The kv_view op's {medium: {locality: [hash]}} as {(medium, locality): {hash}}."""
    return {(m, loc): set(hs) for m, by in view.items() for loc, hs in by.items() if hs}


def chain(tag: str, n: int) -> list[bytes]:
    """Engine block hashes as vLLM 0.32 makes them: 32 bytes each."""
    return [uuid.uuid5(uuid.NAMESPACE_OID, f"{tag}/{i}").bytes * 2 for i in range(n)]


@pytest.fixture
def daemon(tmp_path):
    made = []

    def start(token: str | None = None) -> Served:
        d = tmp_path / "d"
        d.mkdir(exist_ok=True)
        extra = {"token": token} if token else {}
        served = Served(tmp_path, "kv", tiers=[
            {"name": "g2", "capacity": 6, "eviction": "lru", "storage": "host"},
            {"name": "g3", "capacity": G3, "eviction": "lru", "headroom": G3_HEADROOM,
             "storage": {"name": "disk", "path": str(d / "g3")}},
            {"name": "g4", "capacity": 64, "eviction": "lru",
             "storage": {"name": "object", "url": f"file://{d}/g4"}}],
            daemon={"kv_events": f"ipc://{d}/kv.sock", "kv_events_replay": f"ipc://{d}/kvr.sock",
                    "kv_events_buffer": 32, **extra}).start()
        served.kv, served.kvr = f"ipc://{d}/kv.sock", f"ipc://{d}/kvr.sock"
        made.append(served)
        return served

    yield start
    core.release_managers()
    for s in made:
        s.stop()


def _until_joined(f: Follower, e: Engine) -> None:
    """PUB/SUB joins late: store throw-away blocks until the follower hears one (then it resyncs
    from seq 0 through the replay socket, as a router joining a running daemon would)."""
    deadline = time.monotonic() + DEADLINE_S
    i = 0
    while not f.sub.poll(100):
        assert time.monotonic() < deadline, "the subscriber never joined"
        e.prompt(f"warm{i}", chain(f"warm{uuid.uuid4()}", 1), [31])
        i += 1
    f.pump()


def test_a_vllm_subscriber_follows_two_engines_per_medium_and_resyncs(daemon):
    d = daemon()
    a, b = Engine(d.address, 1), Engine(d.address, 2)
    ctx = zmq.Context()
    f = Follower(ctx, d.kv, d.kvr, a.backend.client.topic)
    try:
        _until_joined(f, a)
        assert f.last >= 0
        # engine A: four 4-block prompts (16 blocks > G2's 6 + G3's 4 kept: the oldest demote to
        # G3, STORAGE/LOCAL, and on to G4, STORAGE/REMOTE)
        for i in range(4):
            assert a.prompt(f"a{i}", chain(f"p{i}", 4), [0, 1, 2, 3]) == 0
        # engine B: prompt 0 again (a G4 hit: promoted back to G2), and a prompt of its own
        assert b.hit("b0", chain("p0", 4), [4, 5, 6, 7]) == 4  # A's blocks, loaded by B
        assert set(chain("p0", 4)) <= truth([a, b])[("CPU", "LOCAL")]  # promoted out of G4
        b.prompt("b1", chain("q", 4), [8, 9, 10, 11])
        f.pump()
        want = truth([a, b])
        assert set(want) == set(PLACE.values()), want  # every tier is in play, two of them STORAGE
        stored = {h for e in (a, b) for h in e.keys}  # none dropped: G2 6, G3 4, G4 the rest
        assert {p: len(hs) for p, hs in want.items()} == {
            ("CPU", "LOCAL"): 6, ("STORAGE", "LOCAL"): G3 - G3_HEADROOM, ("STORAGE", "REMOTE"): len(stored) - 10}
        assert f.seen == ALL_EVENTS  # stored in and removed from each place, all owned by kvbm
        assert f.held() == want
        assert kv_view(b) == want  # the daemon's own view (the kv_view op) says the same
        # the replay socket's snapshot (start -1) is the same view
        snap = Follower.__new__(Follower)
        snap.decoder, snap.view, snap.seen = f.decoder, defaultdict(set), set()
        for _, payload in replay(ctx, d.kvr, f.topic, -1):
            snap.apply(payload)
        assert snap.held() == want

        # the subscription drops; traffic goes on (fewer batches than the replay buffer's 32)
        f.drop()
        last, resyncs = f.last, f.resyncs
        assert a.hit("a3", chain("p1", 4), [0, 1, 2, 3]) == 4  # from G3 / G4: promoted
        b.prompt("b2", chain("r", 2), [4, 5])
        missed = replay(ctx, d.kvr, f.topic, last + 1)  # the buffered batches, in order, no snapshot
        assert [s for s, _ in missed] == list(range(last + 1, last + 1 + len(missed))) and missed
        # vLLM's own replay request names no topic: with one namespace on the daemon, the same answer
        assert replay(ctx, d.kvr, f.topic, 0, request=[b"", (last + 1).to_bytes(8, "big")]) == missed
        f.subscribe()
        _until_joined(f, b)  # the first live batch shows the gap: replayed from last + 1
        assert f.resyncs == resyncs + 1 and f.last > last
        f.pump()
        b.prompt("b3", chain("s", 2), [6, 7])
        f.pump()
        assert f.held() == truth([a, b])

        # dropped for longer than the buffer: the replay answers with a snapshot at the latest seq
        f.drop()
        last = f.last
        for i in range(40):
            b.prompt(f"long{i}", chain(f"long{i}", 1), [8])
        missed = replay(ctx, d.kvr, f.topic, last + 1)
        assert len(missed) == 1 and missed[0][0] > last + 32  # one snapshot batch, at the latest seq
        f.subscribe()
        _until_joined(f, a)
        f.pump()
        assert f.resyncs == resyncs + 2
        assert f.held() == truth([a, b])
    finally:
        f.sub is not None and f.sub.close(0)
        a.close()
        b.close()
        ctx.term()


@pytest.mark.parametrize("spill", [0, 10])
def test_a_subscriber_follows_a_restarted_daemon(daemon, spill):
    """spill: one-block prompts stored before the restart beyond what G2 (6) holds: they reach G3
    and G4, survive the restart and come back to the follower as recovered blocks per medium."""
    d = daemon()
    a = Engine(d.address, 6)
    ctx = zmq.Context()
    f = Follower(ctx, d.kv, d.kvr, a.backend.client.topic)
    b = None
    try:
        _until_joined(f, a)
        for i in range(spill):
            a.prompt(f"spill{i}", chain(f"spill{i}", 1), [31])
        a.prompt("old", chain("old", 3), [0, 1, 2])
        f.pump()
        assert set(chain("old", 3)) <= f.held()[("CPU", "LOCAL")]
        last, resyncs = f.last, f.resyncs
        a.close()
        # a's hashes stay known: on a loaded box _until_joined stores more throw-away blocks than
        # G2 holds, the oldest reach G3, and G3's survive the restart (published as recovered)
        gone, a = a, None
        d.stop()
        d.start()  # the same sockets; G2 (host memory) starts empty: the old blocks are gone
        b = Engine(d.address, 7)
        # the new daemon's stream numbers on above the old one's (not from 0 again, which the
        # subscriber would drop as batches it has): a gap, so it replays and gets a snapshot
        _until_joined(f, b)
        assert f.last > last and f.resyncs == resyncs + 1
        b.prompt("new", chain("new", 2), [3, 4])
        f.pump()
        want = truth([b, gone])
        assert set(chain("new", 2)) <= want[("CPU", "LOCAL")] and not set(chain("old", 3)) & set().union(*want.values())
        assert not set(gone.keys) & want.get(("CPU", "LOCAL"), set())  # G2 is memory: nothing of a's there
        if spill:  # what G3 and G4 held survived, each in its own medium
            assert set(chain("spill0", 1)) <= want[("STORAGE", "REMOTE")] and want[("STORAGE", "LOCAL")]
        assert f.held() == want == kv_view(b)
    finally:
        f.sub.close(0)
        for e in (a, b):
            e is not None and e.close()
        ctx.term()

def test_a_tenant_sees_and_replays_nothing_of_another(daemon):
    d = daemon()
    a, other = Engine(d.address, 3), Engine(d.address, 4, salt="tenant-b")
    ctx = zmq.Context()
    fa = Follower(ctx, d.kv, d.kvr, a.backend.client.topic)
    fb = Follower(ctx, d.kv, d.kvr, other.backend.client.topic)
    try:
        assert fa.topic != fb.topic
        _until_joined(fa, a)
        a.prompt("x", chain("secret", 3), [0, 1, 2])
        fa.pump()
        assert set(chain("secret", 3)) <= set().union(*fa.held().values())
        # tenant b's topic carries nothing of a's, live or replayed, and its seq starts at its own 0
        assert not fb.sub.poll(300)
        assert replay(ctx, d.kvr, fb.topic, 0) == []
        _until_joined(fb, other)
        assert fb.last >= 0
        assert all(h not in fb.view[m] for m in fb.view for h in chain("secret", 3))
        # the kv_view op answers with the caller's own namespace only
        assert set(chain("secret", 3)) <= set().union(*kv_view(a).values())
        assert all(h not in v for v in kv_view(other).values() for h in chain("secret", 3))
        # a replay naming an unknown topic gets the end marker only; so does vLLM's topic-less
        # request with two namespaces on the daemon (which one it means is unknown), and garbage
        assert replay(ctx, d.kvr, b"not-a-topic", 0) == []
        assert replay(ctx, d.kvr, b"", 0, request=[b"", (0).to_bytes(8, "big")]) == []
        assert replay(ctx, d.kvr, b"", 0, request=[b"", b"x"]) == []
        assert replay(ctx, d.kvr, b"", 0, request=[b"", b"a", b"b", b"c"]) == []
    finally:
        for f in (fa, fb):
            f.sub.close(0)
        a.close()
        other.close()
        ctx.term()


def test_store_prepare_checks_the_hashes_field(daemon):
    from kvbm.client import RemoteError

    d = daemon()
    with d.client() as c:
        k = [uuid.uuid4().bytes for _ in range(2)]
        with pytest.raises(RemoteError, match="hashes"):
            c.call("store_prepare", keys=k, hashes=[b"x"])  # one hash for two keys
        with pytest.raises(RemoteError, match="hashes"):
            c.call("store_prepare", keys=k, hashes=[b"x" * 65, None])
        with pytest.raises(RemoteError, match="hashes"):
            c.call("store_prepare", keys=k, hashes=[1.5, None])
        with pytest.raises(RemoteError, match="parent_hash"):
            c.call("store_prepare", keys=k, hashes=[1, 2], parent_hash=b"")
        assert c.stats()["daemon"]["state"]["reservations"] == 0  # refused before anything was reserved


def test_with_a_token_both_sockets_take_plain_peers_only(daemon):
    from test_daemon_events import _handshake

    d = daemon(token="kv-token")
    a = Engine(d.address, 5, token="kv-token")
    ctx = zmq.Context()
    try:
        for address in (d.kv, d.kvr):
            for creds, outcome in ((None, "failed"), ("wrong", "failed"), ("kv-token", "ok")):
                sock = ctx.socket(zmq.SUB if address == d.kv else zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                if creds is not None:
                    sock.plain_username, sock.plain_password = b"kvbm", creds.encode()
                assert _handshake(sock, address) == outcome, (address, creds)
                sock.close(0)
        f = Follower(ctx, d.kv, d.kvr, a.backend.client.topic, token="kv-token")
        _until_joined(f, a)
        a.prompt("t", chain("tok", 2), [0, 1])
        f.pump()
        assert f.held() == truth([a])
        f.sub.close(0)
    finally:
        a.close()
        ctx.term()


def test_config_names_a_bad_kv_events_key():
    from kvbm.config import ConfigError
    from kvbm.daemon.config import DaemonConfig

    with pytest.raises(ConfigError, match="daemon.kv_events "):
        DaemonConfig.from_dict({"kv_events": "http://127.0.0.1:5560"})
    with pytest.raises(ConfigError, match="daemon.kv_events_replay needs daemon.kv_events"):
        DaemonConfig.from_dict({"kv_events_replay": "tcp://127.0.0.1:5561"})
    with pytest.raises(ConfigError, match="daemon.kv_events 'tcp://0.0.0.0:5560' is reachable"):
        DaemonConfig.from_dict({"kv_events": "tcp://0.0.0.0:5560"})  # beyond loopback: a token first
    with pytest.raises(ConfigError, match="kv_events_buffer"):
        DaemonConfig.from_dict({"kv_events": "tcp://127.0.0.1:5560", "kv_events_buffer": 0})
    ok = DaemonConfig.from_dict({"kv_events": "tcp://0.0.0.0:5560", "kv_events_replay": "tcp://0.0.0.0:5561",
                                 "token": "t"})
    assert (ok.kv_events, ok.kv_events_replay, ok.kv_events_buffer) == ("tcp://0.0.0.0:5560", "tcp://0.0.0.0:5561",
                                                                        10_000)



class _OldStored(msgspec.Struct, omit_defaults=True, tag="BlockStored"):
    """vLLM's BlockStored before locality / ownership (an older router's decoder)."""
    block_hashes: list
    parent_block_hash: Any
    token_ids: list
    block_size: int
    lora_id: Any
    medium: Any
    lora_name: Any = None


class _OldRemoved(msgspec.Struct, omit_defaults=True, tag="BlockRemoved"):
    block_hashes: list
    medium: Any


class _OldCleared(msgspec.Struct, omit_defaults=True, tag="AllBlocksCleared"):
    pass


class _OldBatch(msgspec.Struct, array_like=True, omit_defaults=True):
    ts: float
    events: list[Union[_OldStored, _OldRemoved, _OldCleared]]


def test_a_decoder_of_an_older_vllm_reads_the_batches():
    """A vLLM before 0.32 has BlockStored / BlockRemoved without locality and ownership: its
    decoder (msgspec ignores unknown fields) reads kvbm's batches, medium and hashes intact."""
    from kvbm.daemon.kv_events import _batch

    evs = [{"type": "AllBlocksCleared"},
           {"type": "BlockStored", "block_hashes": [b"a", b"b"], "parent_block_hash": None, "token_ids": [],
            "block_size": BS, "lora_id": None, "medium": "STORAGE", "lora_name": None,
            "locality": "REMOTE", "ownership": "kvbm"},
           {"type": "BlockRemoved", "block_hashes": [b"a"], "medium": "CPU", "locality": "LOCAL", "ownership": "kvbm"}]
    old = msgspec.msgpack.Decoder(type=_OldBatch).decode(_batch(evs)).events
    assert old == [_OldCleared(), _OldStored([b"a", b"b"], None, [], BS, None, "STORAGE"), _OldRemoved([b"a"], "CPU")]
    new = msgspec.msgpack.Decoder(type=kv_events.KVEventBatch).decode(_batch(evs)).events
    assert [(type(e).__name__, getattr(e, "medium", None), getattr(e, "locality", None),
             getattr(e, "ownership", None)) for e in new] == [
        ("AllBlocksCleared", None, None, None), ("BlockStored", "STORAGE", "REMOTE", "kvbm"),
        ("BlockRemoved", "CPU", "LOCAL", "kvbm")]
