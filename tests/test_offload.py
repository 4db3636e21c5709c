"""Background offload (kvbm.offload): demotions in three phases, off the engine's thread.

Narrated: victims are pending in both tiers while their bytes move (served by neither, never
reused), then ready below; a failed copy drops them; busy blocks are never chosen; the last
tier makes room by dropping. Then the Offloader thread: stores from "the engine" find room
without demoting on their own thread, and under a concurrent stress every block that is
served has exactly its own bytes.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from kvbm import BlockManager, KVBMConfig, KVLayout
from kvbm.config import ConfigError
from kvbm.offload import Offloader, complete_demote, demote, prepare_demote, run_demote

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, block_size=8, dtype="float16")  # 2 KiB
N = LAYOUT.block_nbytes


def content(key: int) -> np.ndarray:
    return np.random.default_rng(key).integers(0, 256, N, dtype=np.uint8)


def manager(tmp_path, g2=8, g3=32, g4=None, **kw) -> BlockManager:
    # LRU everywhere: the tests narrate LRU victims (the default, `auto`, picks a policy itself)
    tiers = [{"name": "g2", "capacity": g2, "eviction": "lru", "storage": {"name": "host", "pin": "never"}},
             {"name": "g3", "capacity": g3, "eviction": "lru", "storage": {"name": "disk", "path": str(tmp_path / "g3")}}]
    if g4:
        tiers.append({"name": "g4", "capacity": g4, "eviction": "lru",
                      "storage": {"name": "object", "url": f"file://{tmp_path / 'g4'}"}})
    cfg = KVBMConfig.from_dict({"tiers": tiers, **kw})
    cfg.layout = LAYOUT
    return BlockManager.from_config(cfg)


def store(m, keys):
    job = m.store(list(keys), source=[content(k) for k in keys])
    assert job.rejected is None and not job.failed


def read_back(m, keys) -> list[bool]:
    out = [np.zeros(N, np.uint8) for _ in keys]
    job = m.load(list(keys), destination=out)
    return [i < job.loaded and np.array_equal(o, content(k)) for i, (k, o) in enumerate(zip(keys, out))]


def test_victims_are_pending_in_both_tiers_until_the_copy_lands(tmp_path):
    m = manager(tmp_path)
    store(m, range(1, 9))  # G2 full: 1..8
    g2, g3 = m.tiers
    # prepare: LRU victims 1, 2, 3 leave G2's policy; slots kept, room reserved in G3
    job = prepare_demote(m, 0, 3)
    assert job.keys == [1, 2, 3]
    assert m.lookup([1, 2, 3]) == (0, [])  # served by neither while in flight
    assert g2.used == 8 and g3.used == 3 and {1, 2, 3} <= g2.busy and {1, 2, 3} <= g3.busy
    assert g2.storage.free_slots == 0  # nobody can take (and overwrite) a victim's slot yet
    # run (no lock needed), complete: ready in G3, three free slots in G2
    ok = run_demote(m, job)
    complete_demote(m, job, ok)
    assert ok == [True] * 3
    assert m.locate(range(1, 9)) == [1, 1, 1, 0, 0, 0, 0, 0]
    assert g2.used == 5 and g2.storage.free_slots == 3 and not g2.busy and not g3.busy
    assert g3.stats.demotions_in == 3
    assert [e.kind for e in m.take_events()[-3:]] == ["moved"] * 3
    assert all(read_back(m, range(1, 9)))


def test_a_failed_copy_drops_the_victims_and_frees_both_slots(tmp_path):
    m = manager(tmp_path)
    store(m, range(1, 9))
    job = prepare_demote(m, 0, 2)
    ok = run_demote(m, job)
    complete_demote(m, job, [False, ok[1]])  # as if block 1's write had failed
    assert m.locate([1, 2]) == [-1, 1]
    g2, g3 = m.tiers
    assert g2.storage.free_slots == 2 and g3.used == 1 and g3.stats.failed == 1 and g2.stats.drops == 1
    assert 1 not in g3.policy and read_back(m, [2]) == [True]


def test_busy_blocks_are_never_victims(tmp_path):
    m = manager(tmp_path)
    store(m, range(1, 9))
    m.pin([1, 2])
    assert demote(m, 0, 3) == 3
    assert m.locate([1, 2, 3, 4, 5]) == [0, 0, 1, 1, 1]
    m.unpin([1, 2])


def test_a_full_last_tier_drops_its_own_victims_to_make_room(tmp_path):
    m = manager(tmp_path, g2=4, g3=4)
    store(m, range(1, 5))
    assert demote(m, 0, 4) == 4  # G3 holds 1..4
    store(m, range(5, 9))
    assert demote(m, 0, 2) == 2  # G3 full: its LRU blocks 1, 2 leave the hierarchy
    assert m.locate(range(1, 9)) == [-1, -1, 1, 1, 1, 1, 0, 0]
    assert all(read_back(m, range(3, 9)))


def test_a_middle_tier_only_fills_the_room_below(tmp_path):
    m = manager(tmp_path, g2=4, g3=4, g4=64)
    store(m, range(1, 5))
    assert demote(m, 0, 4) == 4
    store(m, range(5, 9))
    assert demote(m, 0, 2) == 0  # G3 is full and not the last tier: no I/O cascade under the lock
    assert demote(m, 1, 2) == 2  # clean G3 into G4 first (the offloader goes bottom-up)
    assert demote(m, 0, 2) == 2
    assert m.locate(range(1, 9)) == [2, 2, 1, 1, 1, 1, 0, 0]
    assert all(read_back(m, range(1, 9)))


def test_only_a_tier_with_one_below_demotes(tmp_path):
    m = manager(tmp_path)
    with pytest.raises(ValueError, match="only a tier with a tier below it can demote"):
        prepare_demote(m, 1, 1)


# ---------------------------------------------------------------- the offloader thread


def test_stores_find_room_without_demoting_on_their_own_thread(tmp_path, monkeypatch):
    m = manager(tmp_path, g2=16, g3=256)
    lock = threading.RLock()
    moves_by_thread = []
    real = m._move
    monkeypatch.setattr(m, "_move", lambda *a: (moves_by_thread.append(threading.current_thread().name),
                                                real(*a))[1])
    off = Offloader(m, lock, {0: 8})
    try:
        for r in range(12):  # an engine storing 4 blocks a step, the offloader between steps
            with lock:
                store(m, range(100 * r, 100 * r + 4))
            off.kick()
            assert off.wait_idle(180)
            assert m.tiers[0].capacity - m.tiers[0].used >= 8
    finally:
        off.close()
    assert moves_by_thread == []  # no store ever demoted synchronously
    assert off.moved == 12 * 4 - 8
    keys = [100 * r + i for r in range(12) for i in range(4)]
    assert all(read_back(m, keys))


def test_concurrent_stores_and_offload_never_serve_wrong_bytes(tmp_path):
    m = manager(tmp_path, g2=24, g3=48)
    lock = threading.RLock()
    off = Offloader(m, lock, {0: 10})
    rng = np.random.default_rng(7)
    try:
        for step in range(150):
            keys = [int(k) for k in rng.choice(400, size=int(rng.integers(1, 6)), replace=False)]
            with lock:
                m.store(keys, source=[content(k) for k in keys])
            off.kick()
            if step % 10 == 0:  # the engine reads while the offloader moves
                probe = [int(k) for k in rng.choice(400, size=20, replace=False)]
                with lock:
                    where = m.locate(probe)
                    held = [k for k, w in zip(probe, where) if w >= 0]
                    assert all(read_back(m, held))
        assert off.wait_idle(180)  # (a condition: returns once the offloader is idle)
    finally:
        off.close()
    with lock:
        for t in m.tiers:
            assert t.used <= t.capacity and not t.pending and not t.busy
        held = [k for k in range(400) if k in m]
        assert len(held) > 40 and all(read_back(m, held))


def test_headroom_config(tmp_path):
    def tier(h):
        return KVBMConfig.from_dict({"tiers": [{"name": "g2", "capacity": 1000, "headroom": h}]}).tiers[0]

    assert tier(64).offload_headroom == 64
    assert tier("5%").offload_headroom == 50
    assert KVBMConfig.from_dict({"tiers": [{"name": "g2", "capacity": 1000}]}).tiers[0].offload_headroom == 62
    with pytest.raises(ConfigError, match="must be below the tier's capacity"):
        tier(1000)
    with pytest.raises(ConfigError, match="cannot read 'lots%'"):
        tier("lots%")


# ---------------------------------------------------------------- property: interleavings

from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule  # noqa: E402

KEYS = st.integers(1, 40)


class OffloadInterleavings(RuleBasedStateMachine):
    """Stores, loads, pins and demotions in flight, in any order (demotions stop halfway:
    prepared, maybe copied, completed later, maybe as failed). Whatever happens, a block that
    is served carries its own bytes, an in-flight block is never served, capacities hold and
    no slot is shared or leaked. (It found a manager bug: an exclusive promotion that must leave
    a pinned source in G3 keeps two copies, and demoting the upper one overwrote the lower
    one's slot, leaking it; _evicted_all now drops the upper copy.)"""

    def __init__(self):
        super().__init__()
        import tempfile
        from pathlib import Path

        self.dir = tempfile.TemporaryDirectory()
        self.m = manager(Path(self.dir.name), g2=6, g3=10)
        self.jobs = []  # (job, ok or None): prepared, maybe copied
        self.pinned: set = set()

    def teardown(self):
        for job, ok in self.jobs:
            complete_demote(self.m, job, ok if ok is not None else run_demote(self.m, job))
        self.m.close()
        self.dir.cleanup()

    @rule(keys=st.lists(KEYS, min_size=1, max_size=4, unique=True))
    def store(self, keys):
        self.m.store(keys, source=[content(k) for k in keys])

    @rule(keys=st.lists(KEYS, min_size=1, max_size=4, unique=True))
    def load(self, keys):
        n, _ = self.m.lookup(keys)
        out = [np.zeros(N, np.uint8) for _ in keys[:n]]
        job = self.m.load(keys[:n], destination=out)
        for k, o in zip(keys[:job.loaded], out):
            assert np.array_equal(o, content(k)), f"block {k} served with wrong bytes"

    @rule(n=st.integers(1, 4))
    def prepare(self, n):
        job = prepare_demote(self.m, 0, n)
        for k in job.keys:
            assert k not in self.m, f"block {k} in flight but served"
        self.jobs.append((job, None))

    @precondition(lambda self: any(ok is None for _, ok in self.jobs))
    @rule(i=st.integers(0, 10))
    def copy(self, i):
        todo = [j for j, (_, ok) in enumerate(self.jobs) if ok is None]
        j = todo[i % len(todo)]
        self.jobs[j] = (self.jobs[j][0], run_demote(self.m, self.jobs[j][0]))

    @precondition(lambda self: self.jobs)
    @rule(i=st.integers(0, 10), fail=st.booleans())
    def complete(self, i, fail):
        job, ok = self.jobs.pop(i % len(self.jobs))
        ok = ok if ok is not None else run_demote(self.m, job)
        complete_demote(self.m, job, [False] * len(ok) if fail else ok)

    @rule(keys=st.lists(KEYS, min_size=1, max_size=3, unique=True))
    def pin(self, keys):
        held = [k for k in keys if k in self.m and k not in self.pinned]
        if held:
            self.m.pin(held)
            self.pinned.update(held)

    @precondition(lambda self: self.pinned)
    @rule()
    def unpin(self):
        self.m.unpin(sorted(self.pinned))
        self.pinned.clear()

    @invariant()
    def bounded_and_unshared(self):
        for t in self.m.tiers:
            assert t.used <= t.capacity
            slots = list(t.ready.values()) + list(t.pending.values())
            assert len(slots) == len(set(slots)) and None not in slots, f"{t.name}: a slot holds two blocks"
            held = t.storage.capacity_blocks - t.storage.free_slots
            assert held == len(slots), f"{t.name}: {held} slots allocated for {len(slots)} blocks (a leak)"
        flying = {k for job, _ in self.jobs for k in job.keys}
        for k in flying:
            assert k not in self.m

    @invariant()
    def pinned_blocks_stay(self):
        for k in self.pinned:
            assert k in self.m.tiers[0].ready or any(k in t.ready for t in self.m.tiers)


OffloadInterleavings.TestCase.settings = settings(max_examples=100, stateful_step_count=30, deadline=None,
                                                  suppress_health_check=[HealthCheck.too_slow])
test_offload_interleavings = OffloadInterleavings.TestCase
