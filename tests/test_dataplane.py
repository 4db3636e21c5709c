"""Real bytes through the BlockManager: G1 (a CPU tensor standing in for HBM) and G2 host.

Every block gets content derived from its key, so any mix-up of slots shows as a mismatch.
"""

import numpy as np
import pytest

from kvbm import BlockManager, KVBMConfig, KVLayout

LAYOUTS = [
    KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, block_size=16, dtype="float32"),  # 1 KiB
    KVLayout(num_layers=3, num_kv_heads=5, head_dim=7, block_size=13, dtype="bfloat16"),  # odd: 5,460 B
    KVLayout(num_layers=4, num_kv_heads=2, head_dim=64, block_size=32, dtype="bfloat16"),  # 64 KiB
]


def content(key: int, nbytes: int) -> np.ndarray:
    return np.random.default_rng(key).integers(0, 256, nbytes, dtype=np.uint8)


def make(layout, tiers, **kw):
    cfg = KVBMConfig.from_dict({"tiers": tiers, **kw})
    cfg.layout = layout
    # re-resolve byte capacities is not needed: tiers here are in blocks
    return BlockManager.from_config(cfg)


def g1g2(layout, g1=4, g2=8, **kw):
    return make(layout, [
        # LRU named: the narrated victims below are LRU's (the default eviction is 'auto')
        {"name": "g1", "capacity": g1, "eviction": "lru", "storage": {"name": "device", "device": "cpu"}},
        {"name": "g2", "capacity": g2, "eviction": "lru", "storage": "host"},
    ], **kw)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"{l.block_nbytes}B")
def test_g1_g2_round_trip_identical_bytes(layout):
    n = layout.block_nbytes
    m = g1g2(layout, g1=4, g2=5)
    keys = list(range(1, 11))
    # store 1..10 in runs that fit g1 (4): the older ones are demoted to g2 (5), 1 dropped
    for i in range(0, 10, 2):
        m.store(keys[i:i + 2], source=[content(k, n) for k in keys[i:i + 2]])
    where = [m.tiers[i].name if i >= 0 else None for i in m.locate(keys)]
    assert where == [None] + ["g2"] * 5 + ["g1"] * 4
    # load 2..10 into fresh buffers: identical bytes, from both tiers
    out = [np.zeros(n, np.uint8) for _ in keys[1:]]
    job = m.load(keys[1:], destination=out)
    assert job.loaded == 9 and not job.failed
    for k, buf in zip(keys[1:], out):
        assert np.array_equal(buf, content(k, n)), k
    # load 2, 3 alone: promoted into g1 (its LRU blocks demoted), bytes still right everywhere
    out = [np.zeros(n, np.uint8) for _ in range(2)]
    assert m.load([2, 3], destination=out).loaded == 2
    assert m.locate([2, 3]) == [0, 0]
    assert m.tiers[1].stats.promotions_out == 2
    # g1's two victims went to g2 while 2 and 3 still sat there (pinned, being copied): g2 had
    # to drop its LRU blocks, 4 and 5, to stay within capacity. All still held reads back right.
    held = [k for k in keys if k in m]
    assert held == [2, 3, 6, 7, 8, 9, 10]
    out2 = [np.zeros(n, np.uint8) for _ in held]
    assert m.load(held, destination=out2).loaded == len(held)
    assert all(np.array_equal(b, content(k, n)) for k, b in zip(held, out2))
    m.close()


def test_async_store_and_load_complete_on_poll():
    layout = LAYOUTS[2]
    n = layout.block_nbytes
    m = g1g2(layout, g1=8, g2=8)
    t = m.submit_store([1, 2, 3], [content(k, n) for k in (1, 2, 3)])
    # in flight until poll()/wait() completes it on this thread, however fast the copy ran:
    # reserved (pending), never served
    assert m.lookup([1, 2, 3]) == (0, [])
    assert all(k in m.tiers[0].pending for k in (1, 2, 3))
    m.wait(t)
    assert m.lookup([1, 2, 3])[0] == 3
    out = [np.zeros(n, np.uint8) for _ in range(3)]
    t = m.submit_load([1, 2, 3], out)
    assert all(k in m.tiers[0].busy for k in (1, 2, 3))  # pinned while the copy runs
    job = m.wait(t)
    assert job.loaded == 3 and not m.tiers[0].busy
    assert all(np.array_equal(b, content(k, n)) for k, b in zip((1, 2, 3), out))
    m.close()


def test_store_without_source_or_with_wrong_size_is_refused_cleanly():
    layout = LAYOUTS[0]
    m = g1g2(layout)
    with pytest.raises(ValueError, match="needs `source`"):
        m.store([1])
    with pytest.raises(ValueError, match="contiguous block of 1024 bytes"):
        m.store([1], source=[np.zeros(100, np.uint8)])
    # nothing half-stored: the reservation rolled back
    assert m.lookup([1]) == (0, []) and m.tiers[0].used == 0 and not m.tiers[0].busy


def test_byte_capacities_hold_under_a_random_workload():
    layout = LAYOUTS[1]
    n = layout.block_nbytes
    cfg = KVBMConfig.from_dict({
        "layout": {"num_layers": 3, "num_kv_heads": 5, "head_dim": 7, "block_size": 13},
        "tiers": [
            {"name": "g1", "capacity": f"{6 * n}B", "storage": {"name": "device", "device": "cpu"}},
            {"name": "g2", "capacity": f"{15 * n + n // 2}B", "storage": "host"},
        ],
    })
    m = BlockManager.from_config(cfg)
    assert [t.capacity for t in m.tiers] == [6, 15]
    rng = np.random.default_rng(0)
    for _ in range(300):
        keys = [int(k) for k in rng.choice(60, size=int(rng.integers(1, 5)), replace=False)]
        if rng.random() < 0.5:
            m.store(keys, source=[content(k, n) for k in keys])
        else:
            hit, _ = m.lookup(keys)
            out = [np.zeros(n, np.uint8) for _ in range(hit)]
            job = m.load(keys[:hit], destination=out)
            assert all(np.array_equal(b, content(k, n)) for k, b in zip(job.keys[:job.loaded], out))
        for t in m.tiers:
            assert t.used <= t.capacity
            assert t.storage.capacity_blocks - t.storage.free_slots == t.used if hasattr(t.storage, "free_slots") else True
    m.close()


def test_device_storage_rejects_a_bad_copy_ctas():
    from kvbm.tiers.device import DeviceStorage

    with pytest.raises(ValueError, match="copy_ctas must be an int >= 0"):
        DeviceStorage(4, 64, device="cpu", copy_ctas=-1)
    assert DeviceStorage(4, 64, device="cpu").copy_ctas == 8


def test_demoting_a_block_the_lower_tier_still_holds_leaks_no_slot(tmp_path):
    """Exclusive mode keeps a pinned G3 source when its block is promoted (a reader holds it),
    so the block briefly lives in G2 and G3. When G2 later evicts it, G3's copy stays and G2's
    slot is freed: moving it would have given G3 a second slot for one key and leaked the first."""
    layout = LAYOUTS[0]
    n = layout.block_nbytes
    m = make(layout, [{"name": "g2", "capacity": 2, "storage": {"name": "host", "pin": "never"}},
                      {"name": "g3", "capacity": 4, "storage": {"name": "disk", "path": str(tmp_path)}}])
    for k in (1, 2, 3):
        m.store([k], source=[content(k, n)])  # G2 holds 2, 3; 1 was demoted to G3
    assert m.locate([1, 2, 3]) == [1, 0, 0]
    m.pin([1])  # a reader holds 1 in G3
    out = np.zeros(n, np.uint8)
    assert m.load([1], destination=[out]).loaded == 1  # promoted; the pinned G3 copy stays
    g2, g3 = m.tiers
    assert 1 in g2.ready and 1 in g3.ready
    m.store([4, 5], source=[content(4, n), content(5, n)])  # G2 evicts 1 (and 3)
    held = g3.storage.capacity_blocks - g3.storage.free_slots
    assert held == len(g3.ready) + len(g3.pending)  # no leaked slot
    assert g2.storage.free_slots == 2 - len(g2.ready) - len(g2.pending)
    m.unpin([1])
    outs = [np.zeros(n, np.uint8) for _ in range(5)]
    assert m.load([1, 2, 3, 4, 5], destination=outs).loaded == 5
    for k, o in zip(range(1, 6), outs):
        assert np.array_equal(o, content(k, n)), k
