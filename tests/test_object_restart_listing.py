"""A G4 restart lists its prefix before anything else (recover()); a bucket writer can stuff
that prefix with foreign objects. Before, recover() listed the whole prefix into memory at once
(fs.ls) and only then examined it, with no bound: millions of foreign names held the daemon's
start for as long as the listing took (and its memory for all of them), an endpoint that
answered pages forever held it for good. Now the listing streams (file://: scandir; s3: page by
page) into a heap of at most the free handles, and stops at LIST_BUDGET_S (what was not listed
by then is listed again in the background after the start, object_resume.py: ours found then are
adopted by the manager through the tier's policy, the surplus beyond the handles deleted)."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import numpy as np
import pytest

from kvbm.tiers import object_meta
from kvbm.tiers.object import ObjectStorage
from kvbm.tiers.object_meta import Listing

NB = 4096
SECRET = "restart-listing-secret-0123456789"


def storage(url: str, n: int = 8) -> ObjectStorage:
    return ObjectStorage(n, NB, namespace="ns", url=url, secret=SECRET)


def payload(i: int) -> np.ndarray:
    return np.full(NB, i % 251, np.uint8)


def returns_within(fn, limit_s: float = 120.0):
    """fn()'s result, run in a thread: a recover() that never returns fails here, not hangs the suite."""
    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault("out", fn()), daemon=True)
    t.start()
    t.join(limit_s)
    assert not t.is_alive(), "recover() did not return"
    return box["out"]


def test_a_prefix_stuffed_with_foreign_files_recovers_the_newest_of_ours(tmp_path):
    url = f"file://{tmp_path}/g4"
    st = storage(url, n=12)
    keys = [f"k{i}".encode() for i in range(12)]
    assert st.write([(k, st.allocate(), payload(i)) for i, k in enumerate(keys)]) == [True] * 12
    for i, k in enumerate(keys):  # oldest first
        os.utime(st.path_of(k), (1_000_000 + i, 1_000_000 + i))
    st.close()
    prefix = f"{tmp_path}/g4/ns"
    fake = b"\0" * (64 + NB)
    for i in range(5000):  # a bucket writer's objects, sized like ours, under hex names
        with open(f"{prefix}/{os.urandom(32).hex()}", "wb") as f:
            f.write(fake)
    again = storage(url, n=8)
    got = returns_within(again.recover)
    assert again.listing_complete
    assert [k for k, _ in got] == keys[4:]  # the 8 newest of ours, oldest first; no foreign name
    assert again.errors.foreign_objects == 5000
    out = [np.zeros(NB, np.uint8) for _ in got]
    assert again.read([(k, slot, o) for (k, slot), o in zip(got, out)]) == [True] * 8
    assert all(np.array_equal(o, payload(4 + i)) for i, o in enumerate(out))
    again.close()


def test_the_listing_keeps_at_most_the_free_handles_in_memory(tmp_path):
    st = storage(f"file://{tmp_path}/g4", n=8)
    sink = Listing(st, set(), limit=8)
    base = 64 + NB
    for i in range(20_000):  # ours (valid sealed names) and foreign ones, interleaved
        name = st.path_of(f"key-{i}".encode()) if i % 2 else f"{tmp_path}/g4/ns/{os.urandom(32).hex()}"
        sink.add({"name": name, "type": "file", "size": base, "mtime": float(i)})
        assert len(sink.heap) <= 8
    found, foreign, complete = sink.result()
    assert complete and foreign == 10_000
    assert [k for k, _, _ in found] == [f"key-{i}".encode() for i in range(19_999, 19_999 - 16, -2)]
    st.close()


def test_a_listing_that_never_ends_stops_at_the_budget_with_what_it_saw(monkeypatch):
    """An s3 endpoint (or a prefix) that pages foreign names forever: recover() returns after
    LIST_BUDGET_S with the objects of ours it saw; before, it listed on (and held every name)."""
    monkeypatch.setattr(object_meta, "LIST_BUDGET_S", 1.0)
    st = ObjectStorage(8, NB, namespace="ns", url="s3://bucket/run", secret=SECRET,
                       storage_options={"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s"})
    ours = [f"ours-{i}".encode() for i in range(3)]
    base = 64 + NB
    yielded = []

    async def endless(bucket, max_items=None, delimiter="/", prefix="", versions=False):
        assert (bucket, prefix) == ("bucket", "run/ns/")
        for i, k in enumerate(ours):
            yield {"name": st.path_of(k), "type": "file", "size": base, "LastModified": float(i)}
        while True:  # then a page of foreign names after another
            for _ in range(1000):
                yielded.append(1)
                yield {"name": f"bucket/run/ns/{os.urandom(32).hex()}", "type": "file", "size": base}
            await asyncio.sleep(0)

    monkeypatch.setattr(st.fs, "_iterdir", endless)
    got = returns_within(st.recover)
    assert not st.listing_complete
    assert sorted(k for k, _ in got) == sorted(ours)
    assert 0 < st.errors.foreign_objects <= len(yielded)  # (the background listing pages on meanwhile)
    assert st._resume is not None and not st._resume.done.is_set()
    st.close()  # ends the background listing, which would page on for RESUME_BUDGET_S
    assert st._resume.done.is_set()


def test_an_ls_that_hangs_stops_at_the_budget(monkeypatch):
    """Filesystems without a paged listing: one ls in a thread, waited for until the budget."""
    monkeypatch.setattr(object_meta, "LIST_BUDGET_S", 1.0)
    st = storage(f"memory://hang-{os.urandom(4).hex()}")
    never = threading.Event()
    monkeypatch.setattr(st.fs, "ls", lambda *a, **k: never.wait())
    t0 = time.monotonic()
    assert returns_within(st.recover) == []
    assert not st.listing_complete and time.monotonic() - t0 < 120
    never.set()
    st.close()


@pytest.mark.parametrize("where", ["file", "memory"])
def test_an_honest_restart_still_recovers_everything(tmp_path, where):
    url = f"file://{tmp_path}/g4" if where == "file" else f"memory://honest-{os.urandom(4).hex()}"
    st = storage(url, n=4)
    keys = [f"h{i}".encode() for i in range(4)]
    assert st.write([(k, st.allocate(), payload(i)) for i, k in enumerate(keys)]) == [True] * 4
    st.close()
    again = storage(url, n=4)
    got = again.recover()
    assert again.listing_complete and sorted(k for k, _ in got) == sorted(keys)
    again.close()


# ---------------------------------------------------------------- what the cut-short listing missed
# Before, the objects of ours that recover() did not list (its budget ran out, the listing hung or
# never ended, more of ours than handles) stayed in the bucket for good: never served, never
# counted against capacity, so every such restart and the stores after it grew the prefix past
# its bound. Now the listing resumes in the background (object_resume.py) and the manager adopts
# what it finds (BlockManager.adopt_found, from poll() and the daemon's tick).

BLOCK_CFG = {"num_layers": 1, "kv_factor": 1, "num_kv_heads": 1, "head_dim": 1024, "block_size": 1, "dtype": "float32"}


def g4_manager(tmp_path, g4_capacity: int = 8, g2_capacity: int = 2):
    from kvbm.config import KVBMConfig
    from kvbm.manager import BlockManager

    secret = tmp_path / "secret"
    if not secret.exists():
        secret.write_text(SECRET)
        secret.chmod(0o600)
    return BlockManager.from_config(KVBMConfig.from_dict({"layout": BLOCK_CFG, "tiers": [
        {"name": "g2", "capacity": g2_capacity, "eviction": "lru", "storage": "host"},
        {"name": "g4", "capacity": g4_capacity, "eviction": "lru",
         "storage": {"name": "object", "url": f"file://{tmp_path}/g4", "secret_file": str(secret)}}]}))


def block_of(key: bytes) -> np.ndarray:
    return np.frombuffer((key * (NB // len(key) + 1))[:NB], np.uint8).copy()


def ours_in(st: ObjectStorage) -> set:
    """The names in the prefix that unseal to a key of ours (what counts against the bound)."""
    return {e.name for e in os.scandir(st.prefix) if st._seal.key_of(e.name) is not None}


def adopted(m, keys, limit_s: float = 120.0) -> None:
    """poll() until the background listing has ended and every object it found is adopted."""
    st = m.tiers[-1].storage
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        m.poll()
        if st._resume is not None and st._resume.done.is_set() and not st.found_waiting:
            return
        time.sleep(0.02)
    raise AssertionError(f"the background listing did not end: {st.found_waiting} waiting")


def g4_keys(n: int, tag: str) -> list:
    return [f"{tag}-{i:04d}".encode().ljust(16, b".") for i in range(n)]


def fill_g4(tmp_path, keys) -> None:
    """One run stores keys; exclusive mode demotes all but G2's 2 into G4."""
    m = g4_manager(tmp_path)
    for k in keys:
        m.store([k], source=[block_of(k)])
    assert sum(k in m.tiers[1].ready for k in keys) == len(keys) - 2
    m.close()


def test_own_objects_a_cut_short_listing_missed_are_found_and_served_byte_for_byte(tmp_path, monkeypatch):
    keys = g4_keys(10, "a")
    fill_g4(tmp_path, keys)
    in_g4 = keys[:8]
    prefix = f"{tmp_path}/g4"
    folder = next(os.scandir(prefix)).path  # the namespace's folder
    fake = b"\0" * (64 + NB)
    for _ in range(2000):  # a bucket writer's objects, sized like ours
        with open(f"{folder}/{os.urandom(32).hex()}", "wb") as f:
            f.write(fake)
    monkeypatch.setattr(object_meta, "LIST_BUDGET_S", 0.0)  # the listing stops at its first entry
    m = g4_manager(tmp_path)
    st = m.tiers[1].storage
    assert not st.listing_complete and m.tiers[1].stats.recovered <= 1
    adopted(m, in_g4)
    g4 = m.tiers[1]
    assert set(g4.ready) == set(in_g4) and g4.stats.recovered == 8
    assert st.errors.foreign_objects == 2000  # counted once: at start, or by the resumed listing
    for k in in_g4:  # served from G4, each with its own bytes
        out = np.zeros(NB, np.uint8)
        assert m.load([k], destination=[out]).loaded == 1
        assert np.array_equal(out, block_of(k))
    assert len(ours_in(st)) <= 8
    m.close()


def test_a_tampered_object_found_late_is_a_miss_and_foreign_names_are_never_adopted(tmp_path, monkeypatch):
    keys = g4_keys(6, "t")
    fill_g4(tmp_path, keys)
    probe = ObjectStorage(8, NB, namespace="x", url=f"file://{tmp_path}/g4", secret=SECRET)
    probe.close()
    m0 = g4_manager(tmp_path)  # find the namespace's folder and our names through a manager
    st0 = m0.tiers[1].storage
    bad, good = keys[0], keys[1:4]
    with open(st0.path_of(bad), "r+b") as f:  # a bucket writer flips a payload byte
        f.seek(64 + 100)
        f.write(b"\xff" if f.read(1) != b"\xff" else b"\0")
    folder = st0.prefix
    m0.close()
    other = ObjectStorage(8, NB, namespace=os.path.basename(folder), url=f"file://{tmp_path}/g4",
                          secret="another-deployments-secret-0123")
    theirs = g4_keys(3, "o")
    assert other.write([(k, other.allocate(), block_of(k)) for k in theirs]) == [True] * 3
    other.close()
    monkeypatch.setattr(object_meta, "LIST_BUDGET_S", 0.0)
    m = g4_manager(tmp_path)
    st = m.tiers[1].storage
    adopted(m, keys)
    assert not any(k in m.tiers[1].ready for k in theirs)  # another secret's names: never ours
    assert st.errors.foreign_objects >= 3
    out = np.zeros(NB, np.uint8)
    assert m.load([bad], destination=[out]).loaded == 0  # found, then refused by its MAC
    assert bad not in m and st.errors.checksum_errors == 1
    for k in good:
        out = np.zeros(NB, np.uint8)
        assert m.load([k], destination=[out]).loaded == 1 and np.array_equal(out, block_of(k))
    m.close()


def test_objects_found_late_count_against_capacity(tmp_path, monkeypatch):
    """The restart stores new blocks before the listing finds the old ones: G4 fills, and each
    object found then makes room through the tier's policy. Neither the tier nor the prefix ever
    holds more than its capacity (before: 8 unlisted + 8 new in a prefix bounded at 8)."""
    old = g4_keys(10, "old")
    fill_g4(tmp_path, old)
    monkeypatch.setattr(object_meta, "LIST_BUDGET_S", 0.0)
    from kvbm.tiers.object_resume import Resume

    gate = threading.Event()
    real = Resume._take

    def held_back(self, item, deadline):  # what the listing finds comes only once the new blocks are in
        gate.wait()
        return real(self, item, deadline)

    monkeypatch.setattr(Resume, "_take", held_back)
    m = g4_manager(tmp_path)
    g4, st = m.tiers[1], m.tiers[1].storage
    new = g4_keys(10, "new")
    for k in new:
        m.store([k], source=[block_of(k)])
    assert g4.used == 8
    gate.set()
    adopted(m, old)
    assert g4.used <= 8 and len(g4.ready) == 8
    for k in list(g4.ready):  # whatever the policy kept is served with its own bytes
        if k not in m:  # a load before this one promoted into G2, whose victim took its room
            continue
        out = np.zeros(NB, np.uint8)
        assert m.load([k], destination=[out]).loaded == 1 and np.array_equal(out, block_of(k))
    assert g4.stats.load_failures == 0 and st.errors.io_errors == st.errors.checksum_errors == 0
    deadline = time.monotonic() + 60
    while len(ours_in(st)) > 8 and time.monotonic() < deadline:  # the victims' deletes land
        time.sleep(0.02)
    assert len(ours_in(st)) <= 8
    m.close()


def test_more_of_ours_than_handles_the_oldest_go(tmp_path):
    """A prefix holding more of our objects than the tier has room for (a smaller capacity now, or
    leaks of an older kvbm): the newest are recovered, the older surplus is deleted in the
    background (before: left in the bucket, unserved and uncounted, for good)."""
    url = f"file://{tmp_path}/g4"
    st = storage(url, n=12)
    keys = [f"k{i}".encode() for i in range(12)]
    assert st.write([(k, st.allocate(), payload(i)) for i, k in enumerate(keys)]) == [True] * 12
    for i, k in enumerate(keys):  # oldest first
        os.utime(st.path_of(k), (1_000_000 + i, 1_000_000 + i))
    st.close()
    again = storage(url, n=8)
    got = again.recover()
    assert again.listing_complete and [k for k, _ in got] == keys[4:]
    assert again._resume.join(60)
    assert ours_in(again) == {again.path_of(k).rsplit("/", 1)[1] for k in keys[4:]}
    assert again.found_waiting == 0 and again._resume.deleted == 4
    again.close()


def test_s3_objects_of_ours_past_the_budget_are_found_by_the_background_listing(monkeypatch):
    """s3: the listing at start ends at its budget in a run of foreign pages; the background one
    lists on (a page at a time from the IO loop) and queues ours for the manager."""
    monkeypatch.setattr(object_meta, "LIST_BUDGET_S", 0.2)
    st = ObjectStorage(8, NB, namespace="ns", url="s3://bucket/run", secret=SECRET,
                       storage_options={"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s"})
    ours = [f"late-{i}".encode() for i in range(3)]
    base = 64 + NB
    first = threading.Event()

    async def slow_then_ours(bucket, max_items=None, delimiter="/", prefix="", versions=False):
        for _ in range(5):  # foreign pages, slower than the budget the first time round
            for _ in range(1000):
                yield {"name": f"bucket/run/ns/{os.urandom(32).hex()}", "type": "file", "size": base}
            if not first.is_set():
                await asyncio.sleep(0.1)
        for i, k in enumerate(ours):
            yield {"name": st.path_of(k), "type": "file", "size": base, "LastModified": float(i)}

    monkeypatch.setattr(st.fs, "_iterdir", slow_then_ours)
    monkeypatch.setattr(st, "_exists", lambda path: True)  # (no endpoint here to ask)
    assert returns_within(st.recover) == [] and not st.listing_complete
    first.set()
    assert st._resume.join(120)
    assert sorted(k for k, _ in st.take_found(8)) == sorted(ours)
    st.close()
