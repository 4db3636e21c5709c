"""Routers see what a restarted daemon's G4 recovered, and kvbm's own stream sees it too (issue 14).

G4 keeps each block's blob (namespace id, engine hash, parent hash, client key: kvbm/held.py
format 2) in a sealed trailer after the object's payload (tiers/object_meta.py). After `kvbm
serve` restarts, the blocks G3 and G4 recovered are each namespace's first vLLM-format batch
(STORAGE/LOCAL for G3, STORAGE/REMOTE for G4, once per place a block is in) and its first
[stored, key, tier] rows. Here: the trailer at the storage (file:// and memory://, reopened),
every way a trailer can be wrong (each names nothing), the daemon's acceptance rule (a blob must
name the namespace whose key space the block lives in), two namespaces across a SIGTERM restart
with G2+G3+G4 (vLLM's decoder, kv_view, session events and the PUB rows agree, exactly), objects
without a trailer and tampered/foreign trailers at a real daemon, and an inclusive in-process
manager whose block is in G3 and G4 at once.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

zmq = pytest.importorskip("zmq")
msgspec = pytest.importorskip("msgspec")
kv_events = pytest.importorskip("vllm.distributed.kv_events")

from kvbm.daemon.events import Events, Origins  # noqa: E402
from kvbm.daemon.leases import PEER_NS, namespace_of, server_key  # noqa: E402
from kvbm.held import META_FORMAT_KEYED, HeldMedia, _field, pack_meta, unpack_meta  # noqa: E402
from kvbm.tiers.object import HEADER_MIN, ObjectStorage  # noqa: E402
from kvbm.tiers.object_meta import MAX_TRAILER, TAIL, trailer  # noqa: E402
from kvbm.tiers.seal import Seal, object_secret  # noqa: E402
from servedaemon import LAYOUT, LAYOUT_DICT, NB, Served, block, make_keys  # noqa: E402
from test_kv_events import DEADLINE_S, Follower, chain  # noqa: E402
from test_kv_events_restart import Tenant, caught_up, decoded, join  # noqa: E402

SECRET = b"s" * 32
PLACE = {"g2": ("CPU", "LOCAL"), "g3": ("STORAGE", "LOCAL"), "g4": ("STORAGE", "REMOTE")}
G3, G4 = ("STORAGE", "LOCAL"), ("STORAGE", "REMOTE")
BASE = HEADER_MIN + NB


def wait_for(what, check):
    deadline = time.monotonic() + DEADLINE_S
    while not (got := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return got


# ---------------------------------------------------------------- the trailer at the storage


@pytest.fixture(params=["file", "memory"])
def url(request, tmp_path):
    return f"file://{tmp_path}/g4" if request.param == "file" else f"memory://kvbm-h29-{uuid.uuid4().hex}"


def put_all(url: str, blobs: dict, n: int = 16) -> dict:
    st = ObjectStorage(n, NB, namespace="ns", url=url, secret=SECRET)
    st.meta_of = blobs.get
    slots = {k: st.allocate() for k in blobs}
    assert st.write([(k, s, block(k)) for k, s in slots.items()]) == [True] * len(slots)
    st.close()
    return slots


def reopen(url: str) -> tuple[ObjectStorage, dict]:
    st = ObjectStorage(16, NB, namespace="ns", url=url, secret=SECRET)
    return st, dict(st.recover())


def reads(st: ObjectStorage, got: dict) -> dict:
    bufs = {k: np.zeros(NB, np.uint8) for k in got}
    ok = st.read([(k, s, bufs[k]) for k, s in got.items()])
    return {k: good and np.array_equal(bufs[k], block(k)) for k, good in zip(got, ok)}


def test_g4_keeps_each_blob_in_its_object_across_a_reopen(url):
    blobs = {b"k0": b"blob-0", b"k1": b"x" * 4096, b"k2": None, b"k3": b"y" * 4097}  # k3: too long
    put_all(url, blobs)
    st, got = reopen(url)
    try:
        assert set(got) == set(blobs)
        sizes = {k: st.fs.info(st.path_of(k))["size"] for k in blobs}
        assert sizes[b"k2"] == sizes[b"k3"] == BASE  # no blob: exactly what kvbm wrote before trailers
        assert sizes[b"k0"] == BASE + 64 and BASE < sizes[b"k1"] <= BASE + MAX_TRAILER
        assert st.kept_meta() == {b"k0": b"blob-0", b"k1": b"x" * 4096}
        assert st.kept_meta() == {}  # read once, then forgotten
        assert reads(st, got) == dict.fromkeys(blobs, True)  # a get reads past the trailer, same bytes
    finally:
        st.close()


def test_objects_without_a_trailer_recover_with_no_blob(url):
    put_all(url, {b"k0": None, b"k1": None})  # nobody asked for blobs: what older kvbm wrote
    st, got = reopen(url)
    try:
        assert set(got) == {b"k0", b"k1"} and st.kept_meta() == {}
        assert reads(st, got) == {b"k0": True, b"k1": True}
    finally:
        st.close()


def test_every_wrong_trailer_names_nothing(url):
    keys = [b"k%d" % i for i in range(8)]
    put_all(url, {k: b"blob-" + k for k in keys})
    st = ObjectStorage(16, NB, namespace="ns", url=url, secret=SECRET)
    raw = {k: st.fs.cat_file(st.path_of(k)) for k in keys}
    body = {k: raw[k][:BASE] for k in keys}
    tail = {k: raw[k][BASE:] for k in keys}
    flipped = bytearray(tail[b"k0"])
    flipped[3] ^= 1
    junk = os.urandom(64 - TAIL.size)
    evil = {
        b"k0": body[b"k0"] + bytes(flipped),  # one bit of the sealed blob
        b"k1": body[b"k1"] + tail[b"k2"],  # another block's trailer
        b"k3": body[b"k3"] + trailer(Seal(b"t" * 32, "ns"), b"k3", b"blob-k3"),  # another secret
        b"k4": body[b"k4"] + trailer(Seal(SECRET, "other"), b"k4", b"blob-k4"),  # another namespace
        b"k5": body[b"k5"] + bytes(MAX_TRAILER + 64),  # past the bound: torn or foreign
        b"k6": body[b"k6"] + junk + TAIL.pack(len(junk), b"KVBm"),  # framed, not sealed
        b"k7": body[b"k7"] + tail[b"k7"][:-1],  # cut short
    }
    for k, data in evil.items():
        st.fs.pipe_file(st.path_of(k), data)
    st.close()
    st, got = reopen(url)
    try:
        assert set(got) == set(keys) - {b"k5"}
        assert st.kept_meta() == {b"k2": b"blob-k2"}  # only the intact one
        # a get refuses what is not this block's own trailer (tampered objects are misses)
        assert reads(st, got) == {k: k == b"k2" for k in got}
    finally:
        st.close()


def test_trailers_on_an_endpoint_that_never_answers_end_in_time(monkeypatch):
    """kept_meta() at a daemon's start reads each recovered object's trailer: on a G4 that never
    answers each read ends at the storage's timeout (and the endpoint is marked down): no blobs,
    no stall."""
    pytest.importorskip("s3fs")
    from s3server import FAKE_CREDENTIALS

    for name, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    with socket.socket() as hole:  # accepts connections (the kernel's backlog), never replies
        hole.bind(("127.0.0.1", 0))
        hole.listen(64)
        opts = {"endpoint_url": f"http://127.0.0.1:{hole.getsockname()[1]}",
                "config_kwargs": {"connect_timeout": 1, "read_timeout": 1}}
        st = ObjectStorage(8, NB, namespace="ns", url="s3://kvbm-test/p", storage_options=opts, timeout=2)
        try:
            for i in range(6):  # as recover() leaves six objects it listed with a trailer
                k = b"k%d" % i
                st._names[i] = st.path_of(k)
                st._trailers.found(k, st.path_of(k), BASE + 64, BASE)
            t0 = time.monotonic()
            assert st.kept_meta() == {}
            assert time.monotonic() - t0 < 20
        finally:
            st.close()


# ---------------------------------------------------------------- what a restarted daemon accepts


def test_a_recovered_blob_must_name_the_namespace_its_key_lives_in():
    ns_a, ns_b = namespace_of("tiny", LAYOUT.fingerprint, ""), namespace_of("tiny", LAYOUT.fingerprint, "b")
    ck, ck_b = b"\x01" * 16, b"\x02" * 16
    ska, skb = server_key(ns_a, ck), server_key(ns_b, ck_b)
    metas = {
        ska: pack_meta(ns_a, b"h" * 32, None, ck),  # the one good blob
        server_key(ns_a, b"\x03" * 16): pack_meta(ns_b, b"evil1", None, b"\x03" * 16),  # B on A's key
        server_key(ns_a, b"\x04" * 16): pack_meta(ns_b, b"evil2", None, ck_b),  # B's key, not this block's
        server_key(ns_a, b"\x05" * 16): pack_meta(ns_a, b"evil3", None),  # no client key: proves nothing
        server_key(PEER_NS, b"\x06" * 16): pack_meta(PEER_NS, b"evil4", None, b"\x06" * 16),  # the peer id
        skb: pack_meta(ns_b, b"h" * 32, None, ck_b)[:-1],  # does not decode
        b"\x07" * 16: b"\x02" + os.urandom(40),
    }
    d = Events.__new__(Events)
    d.origin = Origins()
    good = d._recovered_origins(metas)
    assert good == {ska: metas[ska]} and dict(d.origin) == {ska: (ns_a, ck)} and d._untold == {ns_a: [ska]}
    assert unpack_meta(metas[ska]) == (ns_a, b"h" * 32, None, ck)
    assert unpack_meta(META_FORMAT_KEYED + _field(ns_a) + _field(1) + _field(None) + _field(7)) is None  # key: bytes


# ---------------------------------------------------------------- a real daemon across a restart


def serve(tmp_path: Path, g3: bool = True) -> Served:
    d = tmp_path / "d"
    d.mkdir(exist_ok=True)
    secret = d / "g4.secret"
    if not secret.exists():
        secret.write_bytes(os.urandom(32).hex().encode())
        secret.chmod(0o600)
    # without G3, G2's offloader keeps room by demoting to G4 (the request loop never puts to G4)
    tiers = [{"name": "g2", "capacity": 4, "eviction": "lru", "storage": "host", **({} if g3 else {"headroom": 2})}]
    if g3:
        tiers.append({"name": "g3", "capacity": 8, "eviction": "lru", "headroom": 4,
                      "storage": {"name": "disk", "path": str(d / "g3")}})
    tiers.append({"name": "g4", "capacity": 64, "eviction": "lru",
                  "storage": {"name": "object", "url": f"file://{d}/g4", "secret_file": str(secret)}})
    s = Served(tmp_path, "kv", tiers=tiers, daemon={
        "kv_events": f"ipc://{d}/kv.sock", "kv_events_replay": f"ipc://{d}/kvr.sock", "kv_events_buffer": 64,
        "events": f"ipc://{d}/ev.sock"})
    s.kv, s.kvr, s.ev, s.bucket, s.secret = (f"ipc://{d}/kv.sock", f"ipc://{d}/kvr.sock", f"ipc://{d}/ev.sock",
                                             d / "g4", object_secret(secret_file=str(secret)))
    return s


class Tenant4(Tenant):
    def truth(self) -> dict:
        out: dict = {}
        for h, k in self.keys.items():
            n, where = self.c.lookup([k], remote=False)
            if n:
                out.setdefault(PLACE[where[0]], set()).add(h)
        return out

    @property
    def ns(self) -> bytes:
        return namespace_of("tiny", LAYOUT.fingerprint, self.salt)


def settled(d: Served, tenants: list) -> list:
    """Wait until the offloader is done (G3, or without it G2, within capacity - headroom) and every stream caught
    up (kv_view is the truth); -> each tenant's truth."""
    def done():
        st = tenants[0].c.stats()["tiers"]  # used = ready + in flight: a demotion counts until it landed
        if st["g3"]["used"] > 4 if "g3" in st else st["g2"]["used"] > 2:
            return None
        truths = [t.truth() for t in tenants]
        return truths if all(t.kv_view() == tr for t, tr in zip(tenants, truths)) else None
    return wait_for("the daemon never settled", done)


def published(ctx, d: Served, t: Tenant) -> tuple[dict, dict]:
    """({place: {hash}}, {hash: parent}) of a replay from -1 (one snapshot), by vLLM's decoder."""
    evs = decoded(ctx, d, t.c.topic)
    if not evs:
        return {}, {}
    assert isinstance(evs[0], kv_events.AllBlocksCleared)
    view: dict = {}
    parent_of: dict = {}
    for ev in evs[1:]:
        assert isinstance(ev, kv_events.BlockStored) and ev.ownership == "kvbm"
        for i, h in enumerate(ev.block_hashes):
            view.setdefault((ev.medium, ev.locality), set()).add(h)
            parent_of[h] = ev.block_hashes[i - 1] if i else ev.parent_block_hash
    return view, parent_of


def rows_view(rows, t: Tenant) -> dict:
    """[kind, client key, tier] rows -> {place: {engine hash}} (stored adds, moved moves, removed drops)."""
    hash_of = {k: h for h, k in t.keys.items()}
    out: dict = {}
    for kind, key, tier in rows:
        h = hash_of.get(bytes(key))
        if h is None:
            continue
        if kind == "moved":
            for place in out.values():
                place.discard(h)
        if kind in ("stored", "moved"):
            out.setdefault(PLACE[tier], set()).add(h)
        elif kind == "removed":
            out.get(PLACE[tier], set()).discard(h)
    return {p: hs for p, hs in out.items() if hs}


def test_recovered_g3_and_g4_blocks_reach_both_streams_per_namespace(tmp_path):
    d = serve(tmp_path).start()
    ctx = zmq.Context()
    a, b, c = Tenant4(d, ""), Tenant4(d, "tenant-b"), Tenant4(d, "tenant-c")
    try:
        a.store("p", chain("a", 8))
        b.store("q", [2**64 - 1 - i for i in range(6)], parent_hash=-5)
        before_a, before_b, _ = settled(d, [a, b, c])
        assert len(before_a.get(G4, ())) >= 2, before_a  # the oldest went down to G4
        assert before_a.get(G3) or before_b.get(G3), (before_a, before_b)
        d.stop()  # SIGTERM: G2 is gone; G3's index and G4's objects stay
        d.start()

        # kvbm's own PUB stream: a subscriber that hears C's rows is joined; A and B have not said
        # hello yet, so their recovered rows come after
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        for t in (a, b, c):
            sub.setsockopt(zmq.SUBSCRIBE, t.c.topic)
        sub.connect(d.ev)
        c.reconnect(d)
        deadline = time.monotonic() + DEADLINE_S
        while not sub.poll(100):
            assert time.monotonic() < deadline, "the events subscriber never joined"
            c.store(f"warm{time.monotonic_ns()}", chain(f"warm{time.monotonic_ns()}", 1))
        pub_rows: dict = {}
        for t in (a, b):
            t.reconnect(d)  # the hello: its namespace's recovered rows follow at once
            session_rows = t.c.events()
            after = t.truth()
            expected = {p: hs for p, hs in ((G3, (before_a if t is a else before_b).get(G3, set())),
                                            (G4, (before_a if t is a else before_b).get(G4, set()))) if hs}
            assert after == expected  # exactly G3's and G4's blocks came back, G2's did not
            assert {r[0] for r in session_rows} == {"stored"} and rows_view(session_rows, t) == after
            # the vLLM stream: a replay from -1 is exactly the recovered blocks, per place, with parents
            view, parent_of = published(ctx, d, t)
            assert view == after == t.kv_view()
            assert parent_of == {h: t.parents[h] for h in parent_of}
        deadline = time.monotonic() + DEADLINE_S
        while any(rows_view(pub_rows.get(t.c.topic, []), t) != t.truth() for t in (a, b)):
            assert sub.poll(max(1, int((deadline - time.monotonic()) * 1000))), pub_rows
            topic, payload = sub.recv_multipart()[:2]  # (the third frame: seq + epoch, test_events_seq.py)
            pub_rows.setdefault(topic, []).extend(__import__("msgpack").unpackb(payload, raw=False))
        assert not {bytes(r[1]) for r in pub_rows[a.c.topic]} & set(b.keys.values())
        assert not {bytes(r[1]) for r in pub_rows[b.c.topic]} & set(a.keys.values())
        sub.close(0)

        # a router built from vLLM's decoder, joining now, reaches the daemon's view (per topic)
        for t in (a, b):
            f = Follower(ctx, d.kv, d.kvr, t.c.topic)
            join(f, t)
            now = caught_up(f, t)
            assert f.held() == now == t.kv_view()
            other = b if t is a else a
            assert not set().union(*f.held().values()) & set(other.keys)
            f.sub.close(0)
    finally:
        for t in (a, b, c):
            t.c.close()
        ctx.term()
        d.stop()


def test_objects_without_or_with_a_wrong_trailer_are_served_or_missed_never_published(tmp_path):
    """G2 + G4: A's eight blocks reach G4, then each of seven gets its trailer removed (an
    object older kvbm wrote) or made wrong; only the intact ones are published, on their own topic."""
    d = serve(tmp_path, g3=False).start()
    ctx = zmq.Context()
    a, b = Tenant4(d, ""), Tenant4(d, "tenant-b")
    try:
        ha = chain("a", 8)
        a.store("p", ha)
        b.store("q", chain("b", 6))
        before_a, before_b = settled(d, [a, b])
        assert before_a == {G4: set(ha)} and len(before_b[G4]) >= 2, (before_a, before_b)
        d.stop()
        (prefix,) = [p for p in d.bucket.iterdir() if p.is_dir()]
        seal = Seal(d.secret, prefix.name)
        path = {h: prefix / seal.name(server_key(a.ns, a.keys[h])) for h in ha}
        raw = {h: path[h].read_bytes() for h in ha}
        body = {h: raw[h][:BASE] for h in ha}
        skey = {h: server_key(a.ns, a.keys[h]) for h in ha}
        ck_b = b.keys[chain("b", 6)[0]]
        flipped = bytearray(raw[ha[1]][BASE:])
        flipped[5] ^= 0x40
        wrong = {
            ha[0]: body[ha[0]],  # no trailer: as kvbm wrote it before trailers (served, unpublished)
            ha[1]: body[ha[1]] + bytes(flipped),
            ha[2]: body[ha[2]] + raw[ha[7]][BASE:],  # another block's trailer
            # sealed with the deployment's own secret, naming B: B's topic must not get it
            ha[3]: body[ha[3]] + trailer(seal, skey[ha[3]], pack_meta(b.ns, b"evil-3", None, a.keys[ha[3]])),
            ha[4]: body[ha[4]] + trailer(seal, skey[ha[4]], pack_meta(b.ns, b"evil-4", None, ck_b)),
            ha[5]: body[ha[5]] + trailer(Seal(b"f" * 32, prefix.name), skey[ha[5]], raw[ha[5]][BASE:]),
            ha[6]: body[ha[6]] + bytes(MAX_TRAILER + 64),  # oversized: never recovered
        }
        for h, data in wrong.items():
            path[h].write_bytes(data)
        d.start()
        a.reconnect(d)
        b.reconnect(d)
        assert a.truth() == {G4: set(ha) - {ha[6]}} and b.truth() == {G4: before_b[G4]}  # G2's are gone
        view_a, parents_a = published(ctx, d, a)
        view_b, _ = published(ctx, d, b)
        assert view_a == {G4: {ha[7]}} and parents_a == {ha[7]: ha[6]}  # the one intact trailer
        assert view_b == {G4: before_b[G4]}  # B's own blocks only: no evil-3 / evil-4
        assert a.kv_view() == view_a and b.kv_view() == view_b
        assert rows_view(a.c.events(), a) == view_a and rows_view(b.c.events(), b) == view_b
        # the block without a trailer is served with its own bytes; the tampered ones are misses
        for h, served in ((ha[0], True), (ha[1], False), (ha[7], True)):
            out = [np.zeros(NB, np.uint8)]
            assert (a.c.load([a.keys[h]], out) == 1) is served and (not served or np.array_equal(out[0], block(a.keys[h])))
    finally:
        for t in (a, b):
            t.c.close()
        ctx.term()
        d.stop()


# ---------------------------------------------------------------- in process: a block in G3 and G4


@pytest.mark.parametrize("g4", ["file", "memory"])
def test_an_inclusive_manager_publishes_a_block_once_per_place_it_recovered_in(tmp_path, g4):
    from kvbm.config import KVBMConfig
    from kvbm.manager import BlockManager

    secret = tmp_path / "s"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    g4_url = f"file://{tmp_path}/g4" if g4 == "file" else f"memory://kvbm-h29-{uuid.uuid4().hex}"

    def manager():
        m = BlockManager.from_config(KVBMConfig.from_dict({"layout": LAYOUT_DICT, "mode": "inclusive", "tiers": [
            {"name": "g2", "capacity": 2, "eviction": "lru", "storage": "host"},
            {"name": "g3", "capacity": 4, "eviction": "lru", "storage": {"name": "disk", "path": str(tmp_path / "g3")}},
            {"name": "g4", "capacity": 16, "eviction": "lru",
             "storage": {"name": "object", "url": g4_url, "secret_file": str(secret)}}]}))
        held = HeldMedia(m, 16)  # as the in-process connector does (manager_backend.take_events)
        m.keep_meta(held.meta)
        return m, held

    m, held = manager()
    keys, hashes = make_keys("x", 8), chain("x", 8)
    held.name(None, keys, hashes, None)
    for i in range(0, 8, 2):
        m.store(keys[i:i + 2], source=[block(k) for k in keys[i:i + 2]], parent=keys[i - 1] if i else None)
    m.load([keys[0]], destination=[np.zeros(NB, np.uint8)])  # G4 -> G2, a copy (G4 keeps it)
    m.store(make_keys("y", 2), source=[block(k) for k in make_keys("y", 2)])  # keys[0]: G2 -> G3
    where = {h: {t.name for t in m.tiers if k in t.ready} for h, k in zip(hashes, keys)}
    assert where[hashes[0]] == {"g3", "g4"}, where
    m.close()

    m, held = manager()
    try:
        recovered = [(e.kind, e.key, e.tier) for e in m.take_events()]  # kvbm's own events
        expect = {("stored", k, t) for h, k in zip(hashes, keys) for t in where[h] if t != "g2"}
        assert set(recovered) == expect and len(recovered) == len(expect)
        held.recovered(m.kept_meta(), lambda ns: ns is None)
        evs = held.diff([])[None]
        view, parent_of = {}, {}
        for ev in evs:
            assert ev["type"] == "BlockStored"
            for i, h in enumerate(ev["block_hashes"]):
                view.setdefault((ev["medium"], ev["locality"]), []).append(h)
                parent_of[h] = ev["block_hashes"][i - 1] if i else ev["parent_block_hash"]
        want = {PLACE[t]: {h for h in hashes if t in where[h]} for t in ("g3", "g4")}
        assert {p: set(hs) for p, hs in view.items()} == want
        assert all(len(hs) == len(set(hs)) for hs in view.values())  # once per place
        assert parent_of == {h: ([None] + hashes)[hashes.index(h)] for h in parent_of}
        assert held.view(None) == want
    finally:
        m.close()

