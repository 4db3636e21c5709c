"""G2 host, G3 disk and G4 objects together, through the transfer layer and the BlockManager.

Every block's bytes derive from its key (kvbm.demo.block_content), so a block served from
the wrong slot, a torn write or a stale object shows up as a mismatch.
"""

import sys
from pathlib import Path

import fsspec
import numpy as np
import pytest

from kvbm import BlockManager, KVBMConfig, KVLayout
from kvbm.demo import block_content
from kvbm.tiers.disk import DiskStorage
from kvbm.tiers.host import HostStorage
from kvbm.tiers.object import ObjectStorage
from kvbm.transfer import transfer

sys.path.insert(0, str(Path(__file__).parent))

LAYOUTS = [
    KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, block_size=16),  # 16 KiB
    KVLayout(num_layers=3, num_kv_heads=5, head_dim=7, block_size=13),  # 5,460 B: not 4 KiB aligned
    KVLayout(num_layers=32, num_kv_heads=1, head_dim=128, block_size=16),  # 256 KiB (Llama-8B, TP 8)
]


def manager(tmp_path, layout, g2=4, g3=8, g4=32, url=None, storage_options=None, **kw):
    cfg = KVBMConfig.from_dict({
        "namespace": {"model": "test-model"},
        "tiers": [
            {"name": "g2", "capacity": g2, "storage": {"name": "host", "pin": "never"}},
            {"name": "g3", "capacity": g3, "storage": {"name": "disk", "path": str(tmp_path / "g3")}},
            {"name": "g4", "capacity": g4, "storage": {
                "name": "object", "url": url or f"file://{tmp_path / 'g4'}",
                **({"storage_options": storage_options} if storage_options else {})}},
        ],
        **kw,
    })
    cfg.layout = layout
    return BlockManager.from_config(cfg)


def store(m, keys, n):
    for k in keys:  # one at a time, like an engine storing block by block
        job = m.store([k], source=[block_content(k, n)])
        assert not job.rejected


def load_and_check(m, keys, n):
    out = [np.zeros(n, np.uint8) for _ in keys]
    job = m.load(keys, destination=out)
    for k, buf in zip(keys[:job.loaded], out):
        assert np.array_equal(buf, block_content(k, n)), f"block {k} came back with wrong bytes"
    return job


def where(m, keys):
    return [m.tiers[i].name if i >= 0 else None for i in m.locate(keys)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"{l.block_nbytes}B")
def test_g2_g3_g4_g3_g2_round_trip_returns_identical_bytes(tmp_path, layout):
    n, keys = layout.block_nbytes, list(range(100, 106))
    g2 = HostStorage(16, n, pin="never")
    g3 = DiskStorage(8, n, namespace="ns", path=str(tmp_path / "g3"))
    g4 = ObjectStorage(8, n, namespace="ns", url=f"file://{tmp_path / 'g4'}")
    s2 = [g2.allocate() for _ in keys]
    for k, s in zip(keys, s2):
        g2.view(s)[:] = block_content(k, n)
    hops = [(g2, s2)]
    for dst in (g3, g4, g3, g2):  # G2 -> G3 -> G4 -> G3 -> G2
        src, src_slots = hops[-1]
        if dst is g3 and src is g4:  # G3's first copies were freed, as a demotion frees them
            for s in hops[1][1]:
                g3.free(s)
        slots = [dst.allocate() for _ in keys]
        assert transfer(src, src_slots, dst, slots, keys) == [True] * len(keys)
        hops.append((dst, slots))
    for k, s in zip(keys, hops[-1][1]):
        assert np.array_equal(g2.view(s), block_content(k, n))
    for s in (g2, g3, g4):
        assert s.errors.io_errors == s.errors.checksum_errors == 0
        s.close()


@pytest.mark.parametrize("layout", LAYOUTS[:2], ids=lambda l: f"{l.block_nbytes}B")
def test_blocks_cascade_down_and_come_back_intact(tmp_path, layout):
    n = layout.block_nbytes
    m = manager(tmp_path, layout)
    keys = list(range(1, 31))
    store(m, keys, n)
    # 30 blocks over 4 + 8 + 32 slots: the newest in G2, then G3, the oldest in G4
    assert where(m, keys) == ["g4"] * 18 + ["g3"] * 8 + ["g2"] * 4
    assert m.tiers[2].stats.demotions_in == 18 and m.tiers[1].stats.demotions_in == 26
    # load in chunks that fit G2: each chunk is read from its tier and promoted into G2
    for i in range(0, 30, 3):
        job = load_and_check(m, keys[i:i + 3], n)
        assert job.loaded == 3
    assert sum(t.stats.promotions_out for t in m.tiers[1:]) > 0
    assert all(k in m for k in keys)  # nothing fell off: 30 blocks fit in 44 slots
    load_and_check(m, keys[::7], n)
    m.close()


def test_restart_finds_g3_and_g4_blocks_and_serves_identical_bytes(tmp_path):
    layout = LAYOUTS[0]
    n = layout.block_nbytes
    m = manager(tmp_path, layout)
    keys = list(range(1, 21))
    store(m, keys, n)
    before = where(m, keys)
    m.close()
    # G2 is memory: its 4 blocks are gone; G3 and G4 recover theirs
    m2 = manager(tmp_path, layout)
    assert where(m2, keys) == [w if w != "g2" else None for w in before]
    assert m2.tiers[1].stats.recovered == 8 and m2.tiers[2].stats.recovered == 8
    held = [k for k in keys if k in m2]
    for i in range(0, len(held), 4):
        assert load_and_check(m2, held[i:i + 4], n).loaded == len(held[i:i + 4])
    m2.close()


def test_a_namespace_change_shares_no_blocks(tmp_path):
    layout = LAYOUTS[0]
    m = manager(tmp_path, layout)
    store(m, list(range(1, 21)), layout.block_nbytes)
    m.close()
    other = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, block_size=16, dtype="float16")
    m2 = manager(tmp_path, other)  # same size, different dtype: a different layout fingerprint
    assert not any(k in m2 for k in range(1, 21))
    m2.close()


def flip_g3(m, key):
    t = m.tiers[1]
    region = t.storage.describe(t.ready[key])[0]
    with open(region.address, "r+b") as f:
        f.seek(region.offset + 100)
        b = f.read(1)
        f.seek(region.offset + 100)
        f.write(bytes([b[0] ^ 0xFF]))


def flip_g4(m, key):
    t = m.tiers[2]
    region = t.storage.describe(t.ready[key])[0]
    fs, path = fsspec.core.url_to_fs(region.address)
    data = bytearray(fs.cat_file(path))
    data[region.offset + 100] ^= 0xFF
    fs.pipe_file(path, bytes(data))


@pytest.mark.parametrize("tier, flip", [(1, flip_g3), (2, flip_g4)], ids=["g3", "g4"])
def test_a_flipped_byte_is_a_counted_miss_never_served(tmp_path, tier, flip):
    layout = LAYOUTS[0]
    n = layout.block_nbytes
    m = manager(tmp_path, layout)
    keys = list(range(1, 21))
    store(m, keys, n)
    victim = next(k for k in keys if m.locate([k]) == [tier])
    flip(m, victim)
    i = keys.index(victim)
    chunk = keys[i:i + 3]
    out = [np.zeros(n, np.uint8) for _ in chunk]
    job = m.load(chunk, destination=out)
    # the corrupt block cuts the usable prefix at 0; the blocks after it still read fine
    assert job.loaded == 0 and job.failed == [victim]
    assert m.tiers[tier].storage.errors.checksum_errors == 1
    assert m.tiers[tier].stats.load_failures == 1
    assert victim not in m  # dropped: never served again
    for k, buf in zip(chunk[1:], out[1:]):
        assert np.array_equal(buf, block_content(k, n))
    m.close()


def test_g4_endpoint_dies_g2_and_g3_keep_serving(tmp_path, monkeypatch):
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    from s3server import FAKE_CREDENTIALS, MotoServer

    for name, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    layout = LAYOUTS[0]
    n = layout.block_nbytes
    with MotoServer() as s3:
        fsspec.filesystem("s3", endpoint_url=s3.endpoint, skip_instance_cache=True).mkdir("kvbm")
        # no promotion: loads must not reshuffle the tiers while we check what each one holds
        m = manager(tmp_path, layout, url="s3://kvbm/g4", storage_options={"endpoint_url": s3.endpoint},
                    promote_on_hit=False)
        store(m, list(range(1, 21)), n)
        in_g4 = [k for k in range(1, 21) if m.locate([k]) == [2]]
        assert len(in_g4) == 8
        load_and_check(m, in_g4[:2], n)  # S3 serves while it is up
        s3.stop()
        # G3's victims can no longer land in G4: they drop, counted, and nothing raises
        store(m, list(range(21, 41)), n)
        assert m.tiers[2].stats.failed > 0
        assert m.tiers[2].storage.errors.io_errors > 0
        # everything G2 and G3 hold is served intact
        for t in m.tiers[:2]:
            held = list(t.ready)
            for i in range(0, len(held), 4):
                assert load_and_check(m, held[i:i + 4], n).loaded == len(held[i:i + 4])
        # a block still listed in G4 is a miss now, never wrong bytes
        left = [k for k in m.tiers[2].ready]
        if left:
            job = load_and_check(m, left[:1], n)
            assert job.loaded == 0 and job.failed == left[:1]
        m.close()


def test_byte_capacities_hold_on_every_tier_under_a_random_workload(tmp_path):
    layout = LAYOUTS[1]
    n = layout.block_nbytes
    cfg = KVBMConfig.from_dict({
        "layout": {"num_layers": 3, "num_kv_heads": 5, "head_dim": 7, "block_size": 13},
        "tiers": [
            {"name": "g2", "capacity": f"{5 * n}B", "storage": {"name": "host", "pin": "never"}},
            {"name": "g3", "capacity": f"{9 * n + 10}B", "storage": {"name": "disk", "path": str(tmp_path / "g3")}},
            {"name": "g4", "capacity": f"{20 * n}B", "storage": {"name": "object", "url": f"file://{tmp_path / 'g4'}"}},
        ],
    })
    m = BlockManager.from_config(cfg)
    assert [t.capacity for t in m.tiers] == [5, 9, 20]
    rng = np.random.default_rng(1)
    verified = 0
    for _ in range(250):
        keys = [int(k) for k in rng.choice(80, size=int(rng.integers(1, 4)), replace=False)]
        if rng.random() < 0.5:
            m.store(keys, source=[block_content(k, n) for k in keys])
        else:
            hit, _ = m.lookup(keys)
            verified += load_and_check(m, keys[:hit], n).loaded
        for t in m.tiers:
            assert t.used <= t.capacity
            assert t.storage.capacity_blocks - t.storage.free_slots == t.used
        files = list((tmp_path / "g4").rglob("*"))
        assert sum(1 for f in files if f.is_file() and not f.name.startswith(".")) <= 20 + 4  # deletes run behind
    assert verified > 50
    m.close()
