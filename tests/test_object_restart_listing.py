"""A G4 restart lists its prefix before anything else (recover()); a bucket writer can stuff
that prefix with foreign objects. Before, recover() listed the whole prefix into memory at once
(fs.ls) and only then examined it, with no bound: millions of foreign names held the daemon's
start for as long as the listing took (and its memory for all of them), an endpoint that
answered pages forever held it for good. Now the listing streams (file://: scandir; s3: page by
page) into a heap of at most the free handles, and stops at LIST_BUDGET_S (what was not listed
by then is not recovered: misses, never wrong bytes)."""

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
    assert st.errors.foreign_objects == len(yielded) > 0
    st.close()


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
