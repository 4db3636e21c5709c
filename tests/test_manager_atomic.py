"""Every public BlockManager verb is atomic: if it raises, the manager is as it was before.

A stateful property test drives a two-tier metadata-only manager (every registered eviction
policy, both modes) with requests, two-phase stores and loads, pins and removals, while a
fault injector makes the n-th call into a policy, an admission policy or a storage raise,
before or after that call did its work (n drawn per step). After a step that raised, every
tier's ready / pending / busy / pins, the policies' tracked keys, hints, counters and events
are compared with the state before it; after one that did not, the invariants are checked.

Examples: 30 per case in CI; `KVBM_HYPOTHESIS_EXAMPLES=2000` runs 2,000 per case
(tests/hypothesis_budget.py). Failures found earlier are replayed first from tests/.hypothesis-db
(read-only; see tests/conftest.py for how to keep a new one).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hypothesis_budget import examples
from kvbm.journal import Journal
from kvbm.manager import BlockManager, Tier
from kvbm.policies.base import Hints
from kvbm.registry import ADMISSION, EVICTION
from kvbm.tiers.null import NullStorage

UNIVERSE = range(10)
KEYS = st.lists(st.sampled_from(UNIVERSE), min_size=1, max_size=5, unique=True)
# None: no fault; (n, after): the n-th call into a policy or storage raises, before or after it ran
FAULT = st.one_of(st.none(), st.tuples(st.integers(0, 25), st.booleans()))
# a store's retention priority (None: no hints), which priority_floor admission and priority eviction read
PRIORITY = st.one_of(st.none(), st.integers(0, 100))


def hints(priority):
    return None if priority is None else Hints(priority=priority)


class Injected(Exception):
    """The fault the injector raises."""


class Faults:
    def __init__(self):
        self.countdown = None
        self.after = False

    def arm(self, fault):
        self.countdown, self.after = fault if fault is not None else (None, False)

    def call(self, fn, *args):
        if self.countdown is None:
            return fn(*args)
        if self.countdown > 0:
            self.countdown -= 1
            return fn(*args)
        self.countdown = None  # one fault per step
        if self.after:
            fn(*args)
        raise Injected()


ARMED: list = []  # the injector of the running step


def _rollback_unarmed(self, _rollback=Journal.rollback):
    """One fault per step, in the verb: a rollback's own calls (after remove() refused a busy
    block, say) are not faulted. A second fault while rolling back is out of scope."""
    for faults in ARMED:
        faults.arm(None)
    _rollback(self)


Journal.rollback = _rollback_unarmed


class FaultyPolicy:
    """An eviction policy whose every mutating call may raise; queries never do."""

    def __init__(self, inner, faults):
        self.inner, self.faults = inner, faults

    def __getattr__(self, name):  # class flags (wants_structure, filters_inserts, name, ...)
        return getattr(self.inner, name)

    def insert(self, key, hints=None):
        self.faults.call(self.inner.insert, key, hints)

    def insert_many(self, keys, hints=None):
        self.faults.call(self.inner.insert_many, keys, hints)

    def touch(self, keys):
        self.faults.call(self.inner.touch, list(keys))

    def remove(self, key):
        self.faults.call(self.inner.remove, key)

    def evict(self, n, protected=()):
        return self.faults.call(self.inner.evict, n, protected)

    def accepts(self, key, hints=None):
        return self.faults.call(self.inner.accepts, key, hints)

    def batch_stored(self, keys):
        self.faults.call(self.inner.batch_stored, keys)

    def __len__(self):
        return len(self.inner)

    def __contains__(self, key):
        return key in self.inner


class FaultyAdmission:
    def __init__(self, inner, faults):
        self.inner, self.faults = inner, faults

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def admit(self, key, hints=None):
        return self.faults.call(self.inner.admit, key, hints)

    def observe(self, keys):
        self.faults.call(self.inner.observe, keys)

    def forget(self, key):
        self.faults.call(self.inner.forget, key)


class FaultyNull(NullStorage):
    faults: Faults

    def allocate(self):
        return self.faults.call(super().allocate)

    def free(self, slot):
        self.faults.call(super().free, slot)


def build(policy: str, admission: str, mode: str, faults: Faults) -> BlockManager:
    tiers = []
    for name, cap in (("g2", 3), ("g3", 5)):
        kwargs = {"future": [], "now": lambda: 0} if EVICTION.get(policy).simulation_only else {}
        p = FaultyPolicy(EVICTION.get(policy)(cap, clock=lambda: 0.0, **kwargs), faults)
        a = FaultyAdmission(ADMISSION.get(admission)(clock=lambda: 0.0), faults)
        s = FaultyNull(cap)
        s.faults = faults
        tiers.append(Tier(name, cap, p, a, s))
    return BlockManager(tiers, mode=mode, events=True)


def state(m: BlockManager):
    return (
        [dict(t.ready) for t in m.tiers],
        [dict(t.pending) for t in m.tiers],
        [set(t.busy) for t in m.tiers],
        [dict(t.pins) for t in m.tiers],
        [({k for k in UNIVERSE if k in t.policy}, len(t.policy)) for t in m.tiers],
        dict(m._hints), dict(m._parents),
        {name: {k: v for k, v in tier.items() if k != "transfers"} for name, tier in m.stats()["tiers"].items()},
        list(m._events),
    )


class AtomicVerbs(RuleBasedStateMachine):
    policy = "lru"
    admission = "always"
    mode = "exclusive"

    def __init__(self):
        super().__init__()
        self.faults = Faults()
        ARMED[:] = [self.faults]
        self.m = build(self.policy, self.admission, self.mode, self.faults)
        self.stores: list = []  # prepared store jobs
        self.loads: list = []  # prepared load jobs
        self.pinned: list = []

    def _call(self, fault, verb, *args, **kwargs):
        """Run one verb with a fault armed; True when it completed."""
        before = state(self.m)
        self.faults.arm(fault)
        try:
            verb(*args, **kwargs)
        except (Injected, RuntimeError) as exc:  # RuntimeError: remove() of a busy block
            self.faults.arm(None)
            after = state(self.m)
            assert after == before, f"{verb.__name__} raised {exc!r} and changed the manager"
            if isinstance(exc, RuntimeError):
                raise
            return False
        self.faults.arm(None)
        return True

    @rule(keys=KEYS, fault=FAULT)
    def serve(self, keys, fault):
        self._call(fault, self.m.serve, keys)

    @rule(keys=KEYS, fault=FAULT, priority=PRIORITY)
    def store(self, keys, fault, priority):
        self._call(fault, self.m.store, keys, hints(priority))

    @rule(keys=KEYS, fault=FAULT)
    def load(self, keys, fault):
        n, _ = self.m.lookup(keys)
        self._call(fault, self.m.load, keys[:n])

    @rule(keys=KEYS, fault=FAULT, priority=PRIORITY)
    def prepare_store(self, keys, fault, priority):
        out = []
        if self._call(fault, lambda: out.append(self.m.prepare_store(keys, hints(priority)))):
            self.stores.append(out[0])

    @precondition(lambda self: self.stores)
    @rule(i=st.integers(0, 9), fail=st.sets(st.sampled_from(UNIVERSE)), fault=FAULT)
    def complete_store(self, i, fail, fault):
        job = self.stores[i % len(self.stores)]
        if self._call(fault, self.m.complete_store, job, failed=fail):
            self.stores.remove(job)

    @rule(keys=KEYS, fault=FAULT)
    def prepare_load(self, keys, fault):
        out = []
        if self._call(fault, lambda: out.append(self.m.prepare_load(keys))):
            self.loads.append(out[0])

    @precondition(lambda self: self.loads)
    @rule(i=st.integers(0, 9), fail=st.sets(st.sampled_from(UNIVERSE)), fault=FAULT)
    def complete_load(self, i, fail, fault):
        job = self.loads[i % len(self.loads)]
        if self._call(fault, self.m.complete_load, job, failed=fail & set(job.keys)):
            self.loads.remove(job)

    @rule(keys=KEYS, fault=FAULT)
    def pin(self, keys, fault):
        out = []
        if self._call(fault, lambda: out.append(self.m.pin(keys))):
            self.pinned.append(keys[:out[0]])

    @precondition(lambda self: self.pinned)
    @rule(fault=FAULT)
    def unpin(self, fault):
        if self._call(fault, self.m.unpin, self.pinned[0]):
            self.pinned.pop(0)

    @rule(keys=KEYS, fault=FAULT)
    def remove(self, keys, fault):
        try:
            self._call(fault, self.m.remove, keys)
        except RuntimeError as exc:  # a busy key: refused, and nothing removed
            assert "pinned or in flight" in str(exc)

    @rule(keys=KEYS, i=st.integers(0, 4))
    def repeated_key(self, keys, i):
        before = state(self.m)
        keys = keys + [keys[i % len(keys)]]
        for verb in (self.m.serve, self.m.store, self.m.load, self.m.prepare_store, self.m.prepare_load):
            with pytest.raises(ValueError, match="appears twice in one request"):
                verb(keys)
        assert state(self.m) == before

    @invariant()
    def bounded_and_tracked(self):
        for t in self.m.tiers:
            assert t.used <= t.capacity, t
            assert not set(t.ready) & set(t.pending)
            assert len(t.policy) == t.used, f"{t.name}: policy tracks {len(t.policy)} of {t.used} blocks"
            assert all(k in t.policy for k in list(t.ready) + list(t.pending))
            assert set(t.pending) | set(t.pins) <= t.busy


def machine(policy: str, admission: str, mode: str):
    cls = type(f"Atomic_{policy}_{admission}_{mode}", (AtomicVerbs,),
               {"policy": policy, "admission": admission, "mode": mode})
    cls.TestCase.settings = settings(settings(), max_examples=EXAMPLES, stateful_step_count=20, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    return cls


# CI: 30 random runs of 20 steps per case (about a minute for all on two busy cores);
# KVBM_HYPOTHESIS_EXAMPLES=2000: 2,000 per case.
EXAMPLES = examples(30)
# every eviction policy over `always`; every admission policy under lru, fifo and auto (both modes)
CASES = [(p, "always", "exclusive") for p in EVICTION.names()] + [
    (p, a, mode) for p in ("lru", "fifo", "auto") for a in ADMISSION.names() if a != "always"
    for mode in ("exclusive", "inclusive")] + [
    ("lru", "always", "inclusive"), ("fifo", "always", "inclusive"), ("auto", "always", "inclusive"),
    ("arc", "n_hit", "inclusive")]


@pytest.mark.parametrize("policy,admission,mode", CASES)
def test_a_verb_that_raises_changes_nothing(policy, admission, mode):
    machine(policy, admission, mode).TestCase().runTest()


def test_the_issue_13_requests():
    """One LRU tier of 3: serve (0, 2, 3) then (1, 0, 0) raised KeyError in complete_store."""
    faults = Faults()
    m = build("lru", "always", "exclusive", faults)
    m.serve((0, 2, 3))
    before = state(m)
    with pytest.raises(ValueError, match=r"block 0 appears twice in one request \(positions 1 and 2\)"):
        m.serve((1, 0, 0))
    assert state(m) == before


def test_a_failed_insert_after_evictions_puts_the_victims_back():
    """store [3, 4] into a full g2 of 3 over a full g3 of 5: the victims cascade, then the
    insert of the new run raises; afterwards every block is where it was."""
    faults = Faults()
    m = build("lru", "always", "exclusive", faults)
    m.store([0, 1, 2])
    m.store([5, 6, 7])  # 0, 1, 2 -> g3
    before = state(m)
    calls = []
    real = m.tiers[0].policy.inner.insert_many

    def boom(keys, hints=None):
        calls.append(list(keys))
        real(keys, hints)
        raise Injected()
    m.tiers[0].policy.inner.insert_many = boom
    with pytest.raises(Injected):
        m.store([3, 4])
    assert calls == [[3, 4]]
    assert state(m) == before
    assert sorted(m.tiers[0].ready) == [5, 6, 7] and sorted(m.tiers[1].ready) == [0, 1, 2]


def test_the_committed_examples_are_only_read():
    """tests/.hypothesis-db replays old failures on every run; hypothesis deletes an entry that no
    longer fails, so the suite only reads it (a clean clone was left dirty by CI, and the replay
    set shrank). New finds go to .hypothesis/examples, which git ignores."""
    from pathlib import Path

    committed = Path(__file__).parent / ".hypothesis-db"
    before = sorted(p.relative_to(committed) for p in committed.rglob("*"))
    db = settings.default.database
    assert f"ReadOnlyDatabase(DirectoryBasedExampleDatabase({committed!r}))" in repr(db), repr(db)
    key = b"kvbm-test-the-committed-examples-are-only-read"
    db.save(key, b"\x01")
    assert b"\x01" in list(db.fetch(key))
    db.delete(key, b"\x01")
    assert list(db.fetch(key)) == []
    assert sorted(p.relative_to(committed) for p in committed.rglob("*")) == before
