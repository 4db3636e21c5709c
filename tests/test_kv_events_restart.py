"""Routers see what a restarted daemon's G3 recovered (issue 14, item 5).

G3 writes each block with a blob of (namespace id, engine hash, parent hash) in its index
(tiers/disk_index.py version 2, kvbm/held.py), so after `kvbm serve` restarts on the same G3
folder the blocks it recovers are published in their own namespace's vLLM-format stream, as
BlockStored STORAGE/LOCAL with the hashes and parents they were stored under, exactly as if just
stored. Here a daemon with G2 (4 blocks, lost at a restart) over G3 (32) stores hashed blocks for
two namespaces (bytes hashes for one, integer hashes for the other, negative parent included), is
stopped with SIGTERM and started again. A router built from vLLM's own decoder (test_kv_events's
Follower) then sees each namespace's recovered blocks, and only its own topic's, whether it joins
after the restart (a replay from -1: one snapshot) or followed the old daemon (a gap, then a
replay). G4's counterpart, and kvbm's own stream, are in test_kv_events_restart_g4.py; here too the
in-process connector over a memory:// G4. A version 1 index (no blobs) still recovers its blocks, served with their bytes, and
publishes nothing; a torn or garbled version 2 record ends the replay of the index cleanly.
"""

from __future__ import annotations

import os
import struct
import time

import numpy as np
import pytest

zmq = pytest.importorskip("zmq")
msgspec = pytest.importorskip("msgspec")
kv_events = pytest.importorskip("vllm.distributed.kv_events")

from kvbm.held import HeldMedia, unpack_meta  # noqa: E402
from kvbm.tiers import disk_index as di  # noqa: E402
from kvbm.tiers.disk import DiskStorage  # noqa: E402
from servedaemon import NB, Served, block, make_keys  # noqa: E402
from test_kv_events import DEADLINE_S, Follower, chain, places, replay  # noqa: E402

G2, G3 = 4, 32
STORAGE_LOCAL = ("STORAGE", "LOCAL")


def serve(tmp_path) -> Served:
    d = tmp_path / "d"
    d.mkdir(exist_ok=True)
    s = Served(tmp_path, "kv", tiers=[
        {"name": "g2", "capacity": G2, "eviction": "lru", "storage": "host"},
        {"name": "g3", "capacity": G3, "eviction": "lru", "storage": {"name": "disk", "path": str(d / "g3")}}],
        daemon={"kv_events": f"ipc://{d}/kv.sock", "kv_events_replay": f"ipc://{d}/kvr.sock",
                "kv_events_buffer": 64})
    s.kv, s.kvr, s.g3 = f"ipc://{d}/kv.sock", f"ipc://{d}/kvr.sock", d / "g3"
    return s


class Tenant:
    """One namespace's client; `parents`: engine hash -> the parent hash it was stored under."""

    def __init__(self, d: Served, salt: str) -> None:
        self.salt, self.c = salt, d.client(salt=salt)
        self.keys: dict = {}  # engine hash -> client key
        self.parents: dict = {}

    def store(self, tag: str, hashes: list, parent_hash=None) -> None:
        """A chain of blocks, two per store (G2 holds 4), each with its engine hash."""
        keys = make_keys(f"{self.salt}/{tag}", len(hashes))
        for i in range(0, len(keys), 2):
            part = keys[i:i + 2]
            assert self.c.store(part, [block(k) for k in part], parent=keys[i - 1] if i else None,
                                hashes=hashes[i:i + 2], parent_hash=hashes[i - 1] if i else parent_hash) == len(part)
        self.keys.update(zip(hashes, keys))
        self.parents.update(zip(hashes, [parent_hash, *hashes[:-1]]))

    def reconnect(self, d: Served) -> None:
        self.c.close()
        self.c = d.client(salt=self.salt)

    def truth(self) -> dict:
        """{place: {engine hash}} of this namespace, from lookups (not the stream)."""
        place = {"g2": ("CPU", "LOCAL"), "g3": STORAGE_LOCAL}
        out: dict = {}
        for h, k in self.keys.items():
            n, where = self.c.lookup([k], remote=False)
            if n:
                out.setdefault(place[where[0]], set()).add(h)
        return out

    def kv_view(self) -> dict:
        return places(self.c.call("kv_view")["view"])


def decoded(ctx, d: Served, topic: bytes, start: int = -1) -> list:
    """The events of the batches a replay from `start` returns, by vLLM's decoder."""
    dec = msgspec.msgpack.Decoder(type=kv_events.KVEventBatch)
    return [ev for _, payload in replay(ctx, d.kvr, topic, start) for ev in dec.decode(payload).events]


def caught_up(f: Follower, t: Tenant) -> dict:
    """Pump until the follower's view is the tenant's truth (a batch may still be on its way: the
    daemon publishes after it answers); -> that truth."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        f.pump(100)
        truth = t.truth()
        if f.held() == truth or time.monotonic() > deadline:
            return truth


def join(f: Follower, t: Tenant) -> None:
    """PUB/SUB joins late: store throw-away hashed blocks until the follower hears one."""
    deadline = time.monotonic() + DEADLINE_S
    while not f.sub.poll(100):
        assert time.monotonic() < deadline, "the subscriber never joined"
        t.store(f"warm{time.monotonic_ns()}", chain(f"warm{t.salt}{time.monotonic_ns()}", 1))
    f.pump()


def test_recovered_g3_blocks_are_published_per_namespace_after_a_restart(tmp_path):
    d = serve(tmp_path).start()
    ctx = zmq.Context()
    a, b = Tenant(d, ""), Tenant(d, "tenant-b")
    fa = Follower(ctx, d.kv, d.kvr, a.c.topic)  # a router that follows A's stream across the restart
    try:
        join(fa, a)
        # A: 8 blocks with vLLM-style 32-byte hashes; B: 6 with integer hashes (the largest
        # unsigned, and a negative parent hash): 14 blocks > G2's 4, so most are demoted to G3
        a.store("p", chain("a", 8))
        b.store("q", [2**64 - 1 - i for i in range(6)], parent_hash=-5)
        before_a, before_b = caught_up(fa, a), b.truth()
        assert fa.held() == before_a == a.kv_view()  # the stream is right before the restart
        assert len(before_a[STORAGE_LOCAL]) >= 4 and len(before_b[STORAGE_LOCAL]) >= 2, (before_a, before_b)
        last, resyncs = fa.last, fa.resyncs

        d.stop()  # SIGTERM: G2 (host memory) is gone, G3's index is flushed
        d.start()  # the same config: the same G3 folder and the same sockets
        a.reconnect(d)
        b.reconnect(d)
        after_a, after_b = a.truth(), b.truth()
        # only G3's blocks came back (at least those that were there; a demotion in flight at
        # the stop may have landed too)
        assert set(after_a) == {STORAGE_LOCAL} and after_a[STORAGE_LOCAL] >= before_a[STORAGE_LOCAL]
        assert set(after_b) == {STORAGE_LOCAL} and after_b[STORAGE_LOCAL] >= before_b[STORAGE_LOCAL]
        assert after_a[STORAGE_LOCAL] <= set().union(*before_a.values())
        assert after_b[STORAGE_LOCAL] <= set().union(*before_b.values())

        # a router joining now: a replay from -1 is one snapshot batch of exactly what was recovered,
        # BlockStored STORAGE/LOCAL owned by kvbm, each hash under the parent it was stored under
        for t, after, other in ((a, after_a, after_b), (b, after_b, after_a)):
            evs = decoded(ctx, d, t.c.topic)
            assert isinstance(evs[0], kv_events.AllBlocksCleared)
            stored = evs[1:]
            assert stored and all(isinstance(ev, kv_events.BlockStored) for ev in stored)
            assert {(ev.medium, ev.locality, ev.ownership, ev.block_size) for ev in stored} == {
                ("STORAGE", "LOCAL", "kvbm", 16)}
            parent_of = {}
            for ev in stored:
                for i, h in enumerate(ev.block_hashes):
                    parent_of[h] = ev.block_hashes[i - 1] if i else ev.parent_block_hash
            assert set(parent_of) == after[STORAGE_LOCAL]  # its own namespace's blocks, all of them
            assert parent_of == {h: t.parents[h] for h in parent_of}
            assert not set(parent_of) & other[STORAGE_LOCAL]
            assert t.kv_view() == after  # the daemon's own view says the same
        assert 2**64 - 1 in after_b[STORAGE_LOCAL] and b.parents[2**64 - 1] == -5  # (checked above)

        # the router that followed the old daemon: the new stream's first live batch shows a gap,
        # the replay brings the recovered blocks, and its view is the daemon's
        join(fa, a)
        assert fa.last > last and fa.resyncs == resyncs + 1
        now_a = caught_up(fa, a)
        assert fa.held() == now_a == a.kv_view()
        assert now_a[STORAGE_LOCAL] >= after_a[STORAGE_LOCAL]  # the recovered blocks, still in G3
        assert not set().union(*fa.held().values()) & set(b.keys)  # nothing of B on A's topic
        # a router of B's topic joining now (its first live batch: a gap from nothing, so a replay)
        fb = Follower(ctx, d.kv, d.kvr, b.c.topic)
        join(fb, b)
        now_b = caught_up(fb, b)
        assert fb.held() == now_b == b.kv_view() and now_b[STORAGE_LOCAL] >= after_b[STORAGE_LOCAL]
        assert not set().union(*fb.held().values()) & set(a.keys)  # nothing of A on B's topic
        fb.sub.close(0)
    finally:
        fa.sub.close(0)
        for t in (a, b):
            t.c.close()
        ctx.term()
        d.stop()


# ---------------------------------------------------------------- a version 1 index


def as_version_1(index) -> None:
    """Rewrite a version 2 index.log as version 1 (what kvbm wrote before the blobs), by hand."""
    data = index.read_bytes()
    at = di.FRAME.size + di.HEAD.size
    magic, version, nbytes, capacity = di.HEADER_BODY.unpack_from(data, at)
    assert (magic, version) == (di.MAGIC, 2)
    out = [di.frame(di.HEADER, 0, di.HEADER_BODY.pack(di.MAGIC, 1, nbytes, capacity))]
    for kind, seq, body in di.replay(data, index, nbytes, capacity):
        if kind == di.PUT:
            names = [(slot, crc, (k.hex() if isinstance(k, bytes) else f"i{k}").encode()) for slot, crc, k, _ in body]
            out.append(di.frame(di.PUT, seq, b"".join(struct.pack("<IIH", s, c, len(n)) + n for s, c, n in names)))
        elif kind == di.DELETE:
            out.append(di.delete_record(seq, body))
    index.write_bytes(b"".join(out))


def test_a_version_1_index_recovers_its_blocks_and_publishes_nothing(tmp_path):
    d = serve(tmp_path).start()
    ctx = zmq.Context()
    a = Tenant(d, "")
    try:
        a.store("v1", chain("v1", 8))
        in_g3 = a.truth()[STORAGE_LOCAL]
        assert len(in_g3) >= 4
        d.stop()
        (index,) = d.g3.glob("*/index.log")
        as_version_1(index)
        d.start()
        a.reconnect(d)
        assert a.truth()[STORAGE_LOCAL] >= in_g3  # recovered from the version 1 index
        assert "has no readable header" not in d.stderr()
        # served with their own bytes (loads promote them into G2: still no names, no events)
        keys = [a.keys[h] for h in chain("v1", 8) if h in in_g3]
        for k in keys:
            out = [np.zeros(NB, np.uint8)]
            deadline = time.monotonic() + DEADLINE_S
            while a.c.load([k], out) != 1:  # G3 -> G2 comes up on a transfer thread
                assert time.monotonic() < deadline, "a recovered block was never served"
                time.sleep(0.05)
            assert np.array_equal(out[0], block(k))
        assert a.kv_view() == {}
        assert replay(ctx, d.kvr, a.c.topic, -1) == []  # no stream at all for this namespace
    finally:
        a.c.close()
        ctx.term()
        d.stop()


def test_a_version_1_index_at_the_storage(tmp_path):
    store = DiskStorage(8, NB, path=tmp_path, namespace="ns")
    store.meta_of = {b"k0": b"blob0"}.get
    slots = [store.allocate() for _ in range(2)]
    assert store.write([(k, s, block(k)) for k, s in zip((b"k0", b"k1"), slots)]) == [True, True]
    store.close()
    as_version_1(tmp_path / "ns" / "index.log")
    store = DiskStorage(8, NB, path=tmp_path, namespace="ns")
    try:
        assert store.recover() == [(b"k0", slots[0]), (b"k1", slots[1])]
        assert store.kept_meta() == {}  # version 1 kept no blobs
        bufs = [np.zeros(NB, np.uint8) for _ in slots]
        assert store.read([(k, s, buf) for k, s, buf in zip((b"k0", b"k1"), slots, bufs)]) == [True, True]
        assert all(np.array_equal(buf, block(k)) for k, buf in zip((b"k0", b"k1"), bufs))
    finally:
        store.close()
    # the open rewrote it as version 2
    assert di.HEADER_BODY.unpack_from((tmp_path / "ns" / "index.log").read_bytes(), di.FRAME.size + di.HEAD.size)[1] == 2


# ---------------------------------------------------------------- torn and garbled version 2 records


def _three_batches(tmp_path) -> tuple[dict, dict]:
    store = DiskStorage(8, NB, path=tmp_path, namespace="ns")
    blobs = {b"k%d" % i: b"blob-%d" % i * (i + 1) for i in range(5)}
    store.meta_of = blobs.get
    slots = {}
    for batch in ((b"k0", b"k1"), (b"k2",), (b"k3", b"k4")):
        got = {k: store.allocate() for k in batch}
        assert store.write([(k, s, block(k)) for k, s in got.items()]) == [True] * len(batch)
        slots.update(got)
    store.close()
    return slots, blobs


def test_a_torn_version_2_record_ends_the_replay(tmp_path, caplog):
    """The last record cut at every length (a crash mid-append): the earlier batches come back
    with their blobs, the torn one is not there, nothing raises."""
    slots, blobs = _three_batches(tmp_path)
    index = tmp_path / "ns" / "index.log"
    data = index.read_bytes()
    last = di.FRAME.size + di.HEAD.size + sum(di.PUT_ENTRY.size + len(k.hex()) + len(blobs[k]) for k in (b"k3", b"k4"))
    assert di.FRAME.unpack_from(data, len(data) - last)[0] == last - di.FRAME.size  # it is the last record
    for cut in range(1, last + 1):
        index.write_bytes(data[:-cut])
        caplog.clear()
        store = DiskStorage(8, NB, path=tmp_path, namespace="ns")
        try:
            assert store.recover() == [(k, slots[k]) for k in (b"k0", b"k1", b"k2")], cut
            assert store.kept_meta() == {k: blobs[k] for k in (b"k0", b"k1", b"k2")}, cut
            assert cut == last or "torn or garbled index records" in caplog.text
        finally:
            store.close()


def test_a_garbled_blob_length_ends_the_replay(tmp_path, caplog):
    slots, blobs = _three_batches(tmp_path)
    index = tmp_path / "ns" / "index.log"
    name = b"k9".hex().encode()
    # a well-framed record whose entry claims a blob longer than the record holds, then a good one
    bad = di.frame(di.PUT, 50, di.PUT_ENTRY.pack(5, 0, len(name), 200) + name + b"x" * 10)
    good = di.put_record(51, [(6, 0, name, b"late")])
    index.write_bytes(index.read_bytes() + bad + good)
    store = DiskStorage(8, NB, path=tmp_path, namespace="ns")
    try:
        assert [k for k, _ in store.recover()] == [b"k0", b"k1", b"k2", b"k3", b"k4"]  # nothing after it
        assert store.kept_meta() == blobs
        assert "malformed record" in caplog.text
    finally:
        store.close()


def test_a_blob_that_does_not_decode_names_nothing():
    class Manager:
        tiers: list = []

    held = HeldMedia(Manager(), 16)
    held.name(b"n" * 16, [b"k0", b"k1"], [b"h" * 32, 7], -3)
    blob0, blob1 = held.meta(b"k0"), held.meta(b"k1")
    assert unpack_meta(blob0) == (b"n" * 16, b"h" * 32, -3, None) and unpack_meta(blob1) == (b"n" * 16, 7, b"h" * 32, None)
    assert held.meta(b"unnamed") is None
    fresh = HeldMedia(Manager(), 16)
    metas = {b"k0": blob0, b"k1": blob1[:-1], b"k2": b"\x02" + blob0[1:], b"k3": b"", b"k4": blob0 + b"x"}
    assert fresh.recovered(metas, lambda ns: True) == {b"n" * 16: 1}  # only the intact blob
    assert fresh.recovered({b"k5": blob0}, lambda ns: ns is None) == {}  # another namespace's: refused
    assert set(fresh.entries) == {b"k0"}


# ---------------------------------------------------------------- the in-process connector


def _in_process(path):
    """An in-process manager (G2 of 2 over G3 of 8 at `path`) and its connector halves."""
    from kvbm.blocks import Namespace
    from kvbm.config import KVBMConfig
    from kvbm.connectors import core
    from kvbm.manager import BlockManager
    from servedaemon import LAYOUT, LAYOUT_DICT

    torch = pytest.importorskip("torch")
    manager = BlockManager.from_config(KVBMConfig.from_dict({
        "layout": LAYOUT_DICT, "tiers": [
            {"name": "g2", "capacity": 2, "eviction": "lru", "storage": "host"},
            {"name": "g3", "capacity": 8, "eviction": "lru", "storage": {"name": "disk", "path": str(path)}}]}))
    lock = __import__("threading").RLock()
    sched = core.SchedulerSide(manager, lock, Namespace("tiny", LAYOUT), LAYOUT.block_size)
    worker = core.WorkerSide(manager, lock)
    g = torch.Generator().manual_seed(0)
    worker.register([torch.randn(16, 2, 2, LAYOUT.block_size, 64, generator=g).to(torch.bfloat16) for _ in range(2)])
    return manager, sched, worker


def test_the_in_process_connector_publishes_what_g3_recovered(tmp_path):
    from kvbm.connectors.vllm import _vllm_events

    bs = 16
    manager, sched, worker = _in_process(tmp_path / "g3")
    assert sched.take_events() == []  # the first call starts naming blocks (vLLM calls it every step)
    parents, names = {}, {}
    for r in "abc":  # three 2-block prompts through a 2-block G2: the first two go down to G3
        hashes = chain(f"inproc-{r}", 2)
        names.update(zip(hashes, sched.keys(r, hashes)))
        parents.update(zip(hashes, [None, hashes[0]]))
        worker.start_store(sched.plan_store(r, [0, 1], 2 * bs + 1))
        worker.poll(wait=True)
        sched.finished(r)
        sched.take_events()
    in_g3 = {h for h, k in names.items() if manager.lookup([k])[1] == ["g3"]}
    assert in_g3 == set(chain("inproc-a", 2)) | set(chain("inproc-b", 2))
    manager.close()  # the engine goes away; G3's index stays

    manager, sched, worker = _in_process(tmp_path / "g3")
    try:
        assert sched.take_events() == []
        evs = _vllm_events(sched.take_events())  # the next step: what G3 recovered, as just stored
        assert {(type(ev).__name__, ev.medium, ev.locality, ev.ownership) for ev in evs} == {
            ("BlockStored", "STORAGE", "LOCAL", "kvbm")}
        parent_of = {}
        for ev in evs:
            for i, h in enumerate(ev.block_hashes):
                parent_of[h] = ev.block_hashes[i - 1] if i else ev.parent_block_hash
        assert parent_of == {h: parents[h] for h in in_g3}
    finally:
        manager.close()


def test_the_in_process_connector_publishes_what_g4_recovered(tmp_path):
    """vLLM's in-process connector over G2 (2) + G4 (8, memory://): after a restart of the engine
    its next step publishes what G4 recovered, as BlockStored STORAGE/REMOTE with parents."""
    from kvbm.blocks import Namespace
    from kvbm.config import KVBMConfig
    from kvbm.connectors import core
    from kvbm.connectors.vllm import _vllm_events
    from kvbm.manager import BlockManager
    from servedaemon import LAYOUT, LAYOUT_DICT

    torch = pytest.importorskip("torch")
    secret = tmp_path / "s"
    secret.write_bytes(b"s" * 32)
    secret.chmod(0o600)
    url = f"memory://kvbm-test-{os.urandom(8).hex()}"
    bs = LAYOUT.block_size

    def engine():
        manager = BlockManager.from_config(KVBMConfig.from_dict({"layout": LAYOUT_DICT, "tiers": [
            {"name": "g2", "capacity": 2, "eviction": "lru", "storage": "host"},
            {"name": "g4", "capacity": 8, "eviction": "lru",
             "storage": {"name": "object", "url": url, "secret_file": str(secret)}}]}))
        lock = __import__("threading").RLock()
        sched = core.SchedulerSide(manager, lock, Namespace("tiny", LAYOUT), bs)
        worker = core.WorkerSide(manager, lock)
        g = torch.Generator().manual_seed(0)
        worker.register([torch.randn(16, 2, 2, bs, 64, generator=g).to(torch.bfloat16) for _ in range(2)])
        return manager, sched, worker

    manager, sched, worker = engine()
    assert sched.take_events() == []
    parents, names = {}, {}
    for r in "abc":
        hashes = chain(f"g4-{r}", 2)
        names.update(zip(hashes, sched.keys(r, hashes)))
        parents.update(zip(hashes, [None, hashes[0]]))
        worker.start_store(sched.plan_store(r, [0, 1], 2 * bs + 1))
        worker.poll(wait=True)
        sched.finished(r)
        sched.take_events()
    in_g4 = {h for h, k in names.items() if manager.lookup([k])[1] == ["g4"]}
    assert in_g4 == set(chain("g4-a", 2)) | set(chain("g4-b", 2))
    manager.close()

    manager, sched, worker = engine()
    try:
        assert sched.take_events() == []
        evs = _vllm_events(sched.take_events())
        assert {(type(ev).__name__, ev.medium, ev.locality, ev.ownership) for ev in evs} == {
            ("BlockStored", "STORAGE", "REMOTE", "kvbm")}
        parent_of = {}
        for ev in evs:
            for i, h in enumerate(ev.block_hashes):
                parent_of[h] = ev.block_hashes[i - 1] if i else ev.parent_block_hash
        assert parent_of == {h: parents[h] for h in in_g4}
    finally:
        manager.close()
