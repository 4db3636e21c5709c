"""Attacks on a restarted G4 by someone who can write the shared bucket but holds no secret.

An object's name is its block key sealed under the deployment secret (seal.py), so a bucket
writer cannot make a name of ours: they can only copy, rename, replace or delete the objects
we wrote. Each test here is one such move against `recover()` (what a restart lists and takes
back) and the blocks served after it: a block comes back with its own bytes, or is a miss,
and a foreign object never takes the place of ours.
"""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest

from kvbm import BlockManager, KVBMConfig, KVLayout
from kvbm.demo import block_content
from kvbm.tiers.object import HEADER_MIN, ObjectStorage
from kvbm.tiers.object_meta import MAX_TRAILER

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, block_size=16)
SECRET = b"q" * 32


def manager(url: str, g4: int = 16) -> BlockManager:
    cfg = KVBMConfig.from_dict({
        "namespace": {"model": "attacked-model"},
        "tiers": [{"name": "g2", "capacity": 2, "storage": {"name": "host", "pin": "never"}},
                  {"name": "g4", "capacity": g4, "storage": {"name": "object", "url": url,
                                                             "secret": SECRET.decode()}}]})
    cfg.layout = LAYOUT
    return BlockManager.from_config(cfg)


def loads(m: BlockManager, keys: list) -> dict:
    """{key: True when it loads with its own bytes} for the keys the manager holds."""
    n = LAYOUT.block_nbytes
    out = {}
    for k in keys:
        if k not in m:
            continue
        buf = np.zeros(n, np.uint8)
        job = m.load([k], destination=[buf])
        out[k] = job.loaded == 1 and np.array_equal(buf, block_content(k, n))
    return out


def case_variants(name: str, n: int) -> list[str]:
    """n spellings of a hex name that bytes.fromhex() reads as the same bytes (letters upper-cased)."""
    letters = [i for i, c in enumerate(name) if c in "abcdef"]
    out = []
    for v in range(1, 2 ** len(letters)):
        chars = list(name)
        for bit, i in enumerate(letters):
            if v >> bit & 1:
                chars[i] = chars[i].upper()
        out.append("".join(chars))
        if len(out) == n:
            break
    return out


@pytest.fixture(params=["file", "memory"])
def url(request, tmp_path):
    return f"file://{tmp_path}/g4" if request.param == "file" else f"memory://kvbm-attack-{uuid.uuid4().hex}"


def test_copies_of_our_objects_under_other_spellings_of_their_names_are_foreign(url):
    """A bucket writer copies each of our objects to an upper-cased spelling of its name (hex:
    the same bytes to a lenient parser), older than ours, and floods more copies of one object.
    Before: recover() read each copy as the same key: the copies took the recovery slots, the
    manager kept the older copy and freed our object as a duplicate, i.e. DELETED it, and the
    block, looked up under its real name, was a miss. Now only the canonical name is ours."""
    keys = list(range(1, 11))
    n = LAYOUT.block_nbytes
    m = manager(url)
    for k in keys:  # 10 blocks through a 2-block G2: 8 cascade into G4
        m.store([k], source=[block_content(k, n)])
    g4 = m.tiers[1]
    in_g4 = sorted(g4.ready)
    st: ObjectStorage = g4.storage
    ours = {k: st.path_of(k) for k in in_g4}
    m.close()
    assert len(in_g4) == 8

    fs = st.fs
    copies = []
    for k, path in ours.items():
        head, name = path.rsplit("/", 1)
        for variant in case_variants(name, 3 if k != in_g4[0] else 24):
            fs.pipe_file(f"{head}/{variant}", fs.cat_file(path))
            copies.append(f"{head}/{variant}")
    if url.startswith("file://"):  # ours newer than the copies: a recency order keeps the copy first
        for i, p in enumerate(copies):
            os.utime(p, (1_000_000 + i, 1_000_000 + i))

    m = manager(url)
    try:
        g4 = m.tiers[1]
        assert sorted(g4.ready) == in_g4, "the copies took the place of our objects"
        assert g4.stats.recovered == 8
        for k, path in ours.items():
            assert fs.exists(path), f"block {k}: our object was deleted at the restart"
        got = loads(m, in_g4)  # (exclusive: each load moves its block up, and another back down)
        assert got == dict.fromkeys(in_g4, True)
        assert m.stats()["tiers"]["g4"]["foreign_objects"] >= len(copies)
    finally:
        m.close()


def test_an_object_swapped_for_a_huge_one_after_the_listing_is_read_bounded(url):
    """Between the listing (a right-sized object) and the get, the writer replaces our object
    with one far longer than a block: the get reads at most a header, a block and MAX_TRAILER
    (+1 to see it is longer) and the block is a miss, never served, never a memory blow-up."""
    n = LAYOUT.block_nbytes
    st = ObjectStorage(4, n, namespace="ns", url=url, secret=SECRET)
    slot = st.allocate()
    assert st.write([(7, slot, block_content(7, n))]) == [True]
    st.close()
    st = ObjectStorage(4, n, namespace="ns", url=url, secret=SECRET)
    try:
        got = dict(st.recover())
        assert list(got) == [7]
        path = st.path_of(7)
        body = st.fs.cat_file(path)
        st.fs.pipe_file(path, body + bytes(8 << 20))  # 8 MiB past the payload
        buf = np.zeros(n, np.uint8)
        assert st.read([(7, got[7], buf)]) == [False]
        assert st.errors.checksum_errors == 1
    finally:
        st.close()


def test_the_async_get_asks_for_at_most_one_object_s_worth(monkeypatch):
    """An async filesystem other than s3fs gets the whole object with _cat_file: ranged, so a
    swapped-in huge object costs at most a header, a block and a trailer (+1 byte) of memory."""
    import asyncio

    n = LAYOUT.block_nbytes
    st = ObjectStorage(4, n, namespace="ns", url=f"memory://kvbm-attack-{uuid.uuid4().hex}", secret=SECRET)
    asked = []

    async def cat_file(path, start=None, end=None, **kw):
        asked.append((start, end))
        return b""

    monkeypatch.setattr(st.fs, "_cat_file", cat_file, raising=False)
    try:
        asyncio.run(st._aget("x"))
        assert asked == [(0, HEADER_MIN + n + MAX_TRAILER + 1)]
    finally:
        st.close()


def test_blocks_recovered_at_a_restart_are_nobody_s_busy_blocks_and_leave_like_any_other(tmp_path):
    """After a restart with G3 and G4 blocks recovered (and published), nothing is pinned,
    reserved or counted busy for anyone (no owner-less state: every per-client map at its
    baseline), and the recovered blocks are evicted as any other: another tenant pushing more
    blocks than the tiers hold takes all of them out (G4 included: a restart does not make them
    stick), and what the daemon keeps for them (origins,
    engine hashes) goes with them (bounded by what the tiers hold)."""
    from test_kv_events import chain
    from test_kv_events_restart_g4 import Tenant4, serve, settled

    d = serve(tmp_path).start()
    try:
        a = Tenant4(d, "")
        a.store("p", chain("a", 12))
        settled(d, [a])
        d.stop()
        d.start()
        a.reconnect(d)  # (its hello drains the recovered rows)
        other = Tenant4(d, "tenant-z")  # a namespace that had nothing before
        st = other.c.stats()
        recovered = sum(t["recovered"] for t in d.info["tiers"].values())
        assert recovered >= 8, d.info
        state = st["daemon"]["state"]
        assert {k: state[k] for k in ("reservations", "loads", "pins", "busy_blocks", "g2_pinned", "g2_pending",
                                      "busy_namespaces", "busy_uids")} == dict.fromkeys(
            ("reservations", "loads", "pins", "busy_blocks", "g2_pinned", "g2_pending", "busy_namespaces",
             "busy_uids"), 0)
        assert st["daemon"]["pinned_blocks"] == 0
        assert a.kv_view(), "the recovered blocks were not published"
        # 300 new blocks through 4 + 8 + 64 (LRU: lookups count as uses, so no lookup of A's meanwhile):
        # every recovered block is pushed out
        other.store("flood", chain("z", 300))
        settled(d, [other])
        assert a.truth() == {} and a.kv_view() == {}
        st = other.c.stats()
        held = sum(t["used"] for t in st["tiers"].values())
        assert st["daemon"]["origin_keys"] <= held + 1024  # (Origins.sweep's slack)
        assert st["daemon"]["state"]["busy_blocks"] == 0
    finally:
        d.stop()
