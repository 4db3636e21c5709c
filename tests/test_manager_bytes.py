"""The manager's invariants with real bytes and transfers in flight (a stateful property test).

G2 host, G3 O_DIRECT-or-buffered disk, G4 `memory://` objects; asynchronous stores and loads
(`submit_*`, completed by `poll`/`wait` in any order), pins, removals and background demotions
interleave. After every step: capacities hold; no slot is shared or leaked; a block in flight
is never served; and every load that completes returns exactly the bytes stored under its
keys (content derived from the key), in both modes. It found two manager bugs, narrated at
the end: a block promoted by two loads at once, and tickets compared by value.
"""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hypothesis_budget import examples
from kvbm import BlockManager, KVBMConfig, KVLayout
from kvbm.offload import complete_demote, prepare_demote, run_demote

LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=24, block_size=5, dtype="float32")  # 480 B
N = LAYOUT.block_nbytes
KEYS = st.integers(1, 30)
RUN = st.lists(KEYS, min_size=1, max_size=4, unique=True)


def content(key: int) -> np.ndarray:
    return np.random.default_rng(key).integers(0, 256, N, dtype=np.uint8)


def build(folder: Path, mode: str, eviction="lru", admission="always") -> BlockManager:
    """G2 host over G3 disk over G4 memory:// objects; `admission` guards G3 and G4."""
    cfg = KVBMConfig.from_dict({"mode": mode, "tiers": [
        {"name": "g2", "capacity": 4, "eviction": eviction, "storage": {"name": "host", "pin": "never"}},
        {"name": "g3", "capacity": 6, "eviction": eviction, "admission": admission,
         "storage": {"name": "disk", "path": str(folder / "g3")}},
        {"name": "g4", "capacity": 9, "eviction": eviction, "admission": admission,
         "storage": {"name": "object", "url": f"memory://kvbm-{uuid.uuid4().hex[:8]}"}},
    ]})
    cfg.layout = LAYOUT
    return BlockManager.from_config(cfg)


class BytesInFlight(RuleBasedStateMachine):
    mode = "exclusive"
    eviction = "lru"
    admission = "always"

    def __init__(self):
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.m = build(Path(self.dir.name), self.mode, self.eviction, self.admission)
        self.tickets: list = []  # (ticket, keys, buffers or None)
        self.demotions: list = []
        self.pinned: set = set()

    def teardown(self):
        for job in self.demotions:
            complete_demote(self.m, job, run_demote(self.m, job))
        for ticket, keys, bufs in self.tickets:
            self._finish(ticket, keys, bufs)
        self.m.close()
        self.dir.cleanup()

    def _finish(self, ticket, keys, bufs):
        try:
            job = self.m.wait(ticket)
        except Exception:  # a failed transfer: its blocks were rolled back, none served
            return
        if bufs is not None:
            for k, b in zip(keys[:job.loaded], bufs):
                assert np.array_equal(b, content(k)), f"block {k} loaded with wrong bytes"

    @rule(keys=RUN)
    def submit_store(self, keys):
        ticket = self.m.submit_store(keys, [content(k) for k in keys])
        self.tickets.append((ticket, keys, None))

    @rule(keys=RUN)
    def submit_load(self, keys):
        n, _ = self.m.lookup(keys)
        bufs = [np.zeros(N, np.uint8) for _ in range(n)]
        ticket = self.m.submit_load(keys[:n], bufs)
        self.tickets.append((ticket, keys[:n], bufs))

    @rule(keys=RUN)
    def store_now(self, keys):
        self.m.store(keys, source=[content(k) for k in keys])

    @precondition(lambda self: self.tickets)
    @rule(i=st.integers(0, 10))
    def wait_one(self, i):
        self._finish(*self.tickets.pop(i % len(self.tickets)))

    @rule()
    def poll(self):
        # Let every transfer in flight land first: which ones poll() completes must not depend
        # on thread timing, or Hypothesis cannot replay a failure. (wait_one completes them one
        # at a time in any order; the bytes still move on worker threads meanwhile.)
        for ticket, _, _ in self.tickets:
            if ticket.future is not None:
                ticket.future.exception()
        done = {id(t) for t in self.m.poll()}
        assert all(id(entry[0]) in done or entry[0].done for entry in self.tickets)
        for entry in self.tickets:
            self._finish(*entry)
        self.tickets = []

    @rule(tier=st.integers(0, 1), n=st.integers(1, 3))
    def demote(self, tier, n):
        self.demotions.append(prepare_demote(self.m, tier, n))

    @precondition(lambda self: self.demotions)
    @rule(i=st.integers(0, 10), fail=st.booleans())
    def finish_demotion(self, i, fail):
        job = self.demotions.pop(i % len(self.demotions))
        ok = run_demote(self.m, job)
        complete_demote(self.m, job, [False] * len(ok) if fail else ok)

    @rule(keys=RUN)
    def pin(self, keys):
        held = [k for k in keys if k in self.m and k not in self.pinned]
        if held:
            assert self.m.pin(held) == len(held)
            self.pinned.update(held)

    @precondition(lambda self: self.pinned)
    @rule()
    def unpin(self):
        self.m.unpin(sorted(self.pinned))
        self.pinned.clear()

    @rule(keys=RUN)
    def remove(self, keys):
        try:
            self.m.remove(keys)
        except RuntimeError as exc:  # busy (pinned or in flight): nothing removed, said so
            assert "pinned or in flight" in str(exc)

    @invariant()
    def slots_bounded_unshared_unleaked(self):
        for t in self.m.tiers:
            assert t.used <= t.capacity, t
            slots = list(t.ready.values()) + list(t.pending.values())
            assert None not in slots and len(slots) == len(set(slots)), f"{t.name}: a slot holds two blocks"
            held = t.storage.capacity_blocks - t.storage.free_slots
            assert held == len(slots), f"{t.name}: {held} slots allocated for {len(slots)} blocks"

    @invariant()
    def in_flight_never_served(self):
        for job in self.demotions:
            for k in job.keys:  # (inclusive mode may serve another tier's copy meanwhile)
                assert k not in job.src.ready and k not in job.dst.ready, f"block {k} is being demoted but served"
                assert k in job.src.pending and k in job.dst.pending


class BytesInFlightInclusive(BytesInFlight):
    mode = "inclusive"


SETTINGS = settings(max_examples=examples(60), stateful_step_count=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
BytesInFlight.TestCase.settings = SETTINGS
BytesInFlightInclusive.TestCase.settings = SETTINGS
test_exclusive = BytesInFlight.TestCase
test_inclusive = BytesInFlightInclusive.TestCase

# Other eviction and admission policies over the same bytes (priority_floor at 36 refuses every
# block of default priority 35: every victim of G2 is dropped, none written below).
VARIANTS = [("fifo", "n_hit", "exclusive"), ("auto", "second_chance", "exclusive"),
            ("auto", "n_hit", "inclusive"), ("fifo", "second_chance", "inclusive"),
            ("lru", {"name": "priority_floor", "floor": 36}, "exclusive")]


@pytest.mark.parametrize("eviction,admission,mode", VARIANTS, ids=lambda v: v["name"] if isinstance(v, dict) else v)
def test_policies(eviction, admission, mode):
    cls = type(f"Bytes_{eviction}_{mode}", (BytesInFlight,),
               {"eviction": eviction, "admission": admission, "mode": mode})
    cls.TestCase.settings = SETTINGS
    cls.TestCase().runTest()


# ---------------------------------------------------------------- what it found, narrated


def held(t) -> int:
    return t.storage.capacity_blocks - t.storage.free_slots


def test_two_loads_of_one_lower_block_promote_it_once(tmp_path):
    """Two requests share a prefix that sits in G3 and load it at the same time: the second
    load must not reserve a second G2 slot for a block already on its way up (it did, and
    the first slot leaked; completing both then failed on the shared pending entry)."""
    m = build(tmp_path, "exclusive")
    for k in range(1, 6):
        m.store([k], source=[content(k)])  # G2 holds 2..5, 1 went down to G3
    assert m.locate([1]) == [1]
    bufs = [[np.zeros(N, np.uint8)], [np.zeros(N, np.uint8)]]
    a = m.submit_load([1], bufs[0])
    b = m.submit_load([1], bufs[1])  # 1 is pending in G2 (a's promotion): b reads G3 only
    m.wait(b)
    m.wait(a)
    g2 = m.tiers[0]
    assert held(g2) == len(g2.ready) + len(g2.pending) and m.locate([1]) == [0]
    for buf in bufs:
        assert np.array_equal(buf[0], content(1))
    m.close()


def test_tickets_are_identities(tmp_path):
    """Two loads of nothing are equal field by field; waiting on the second must complete the
    second (it completed the first, and poll() then finished the second twice)."""
    m = build(tmp_path, "exclusive")
    a, b = m.submit_load([], []), m.submit_load([], [])
    m.wait(b)
    assert b.done and not a.done
    assert m.poll() == [a] and a.done
    m.close()
