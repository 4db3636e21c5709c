"""The compiled policy cores own their keys: refcounts, stale slots and errors mid-call.

csrc/hitdensity_core.cpp, csrc/prefix_core.hpp, csrc/s3fifo_core.hpp and auto's mini feed
(csrc/auto_core.cpp) keep Python keys in per-slot arrays and two dicts. Checked here:

- refcounts: random insert/touch/evict/remove/batch_stored over unique key objects; while the
  policy lives every key the core knows is held exactly twice (its slot + its dict entry) and
  every other key not at all (a stale slot shows as 1); after the policy is dropped every key
  is back to its baseline; repeated create/destroy does not grow traced memory.
- bounds: evict(n > len), evict(0), protected holding every key, re-insert of a resident key,
  remove of an unknown key, more keys than the capacity, ghost FIFO wraparound.
- errors mid-call: a countdown makes one key's __hash__ raise at the k-th hash of the run, for
  every k: the exception propagates (a TypeError here), and afterwards the core's queues agree
  with its dicts, later calls work and no reference leaks. Unhashable keys raise TypeError and
  change nothing. (The Python versions raise the same exception from the same place; what a
  half-done evict leaves behind may differ: the cores keep each key's state whole.)
"""

from __future__ import annotations

import gc
import random
import sys
import tracemalloc

import pytest

from kvbm.policies import _hitdensity_native, _policy_native
from kvbm.policies.auto import AutoPolicy
from kvbm.policies.base import Hints
from kvbm.policies.hitdensity import HitDensityPolicy
from kvbm.policies.prefix import PrefixPolicy
from kvbm.policies.s3fifo import S3FIFOPolicy

NATIVE = bool(_hitdensity_native._core_class()) and bool(_policy_native._lookup("PrefixCore"))
pytestmark = pytest.mark.skipif(not NATIVE, reason="kvbm._native has no policy cores")


@pytest.fixture(autouse=True)
def _older_objects_frozen():
    """The tests below call gc.collect() to see that no cycle keeps a key alive. In the full
    suite the process also holds torch's and vLLM's objects, and each full collection walked them
    all (~0.5 s each under load; this file took 250 s in CI instead of ~25). Frozen
    (gc.freeze) after one collection, what existed before the test is skipped; everything the
    test makes is collected as before."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


_FUSE = [0]  # > 0: hashes left before one raises (0: never)


class K:
    """A unique key object; hashes and compares by its number (collisions on purpose)."""

    __slots__ = ("i",)

    def __init__(self, i):
        self.i = i

    def __hash__(self):
        if _FUSE[0] > 0:
            _FUSE[0] -= 1
            if _FUSE[0] == 0:
                raise TypeError("fuse")
        return hash(self.i * 0x9E3779B1) if self.i % 7 else 7  # every 7th key collides

    def __eq__(self, other):
        return isinstance(other, K) and other.i == self.i

    def __repr__(self):
        return f"K({self.i})"


def _refs(keys):
    """Each key's refcount, counted the same way every time (no loop variable holds one)."""
    return [sys.getrefcount(keys[i]) for i in range(len(keys))]


def _make(name, capacity):
    if name == "hitdensity":
        p = HitDensityPolicy(capacity, native=True)
    elif name == "prefix":
        p = PrefixPolicy(capacity, native=True)
    elif name == "s3fifo":
        p = S3FIFOPolicy(capacity, native=True)
    else:
        p = AutoPolicy(capacity, sample_slots=4, candidates=("prefix", "s3fifo", "hitdensity"))
        assert p._feeder is not None  # every mini compiled: the mini feed runs in C++
    return p


def _known(p, name):
    """The keys the core holds (resident, ghost or parent-only): each must be held twice."""
    c = p._core
    if name == "hitdensity":
        return set(c.resident()) | {k for k, _, _ in c.ghosts()}
    if name == "prefix":
        return set(c.tracked()) | set(getattr(c, "parents_only", c.children)())  # (an old build: children)
    return set(c.resident()) | set(c.queue(2))


def _check(p, name, keys, base):
    """The core's queues agree with its dicts; every key held 0 or 2 times (no stale slot)."""
    c = p._core
    if name == "hitdensity":
        assert sum(c.queue_len(i) for i in range(16)) == len(c.resident())
        assert len(c.classes()) == len(c.resident())
        assert len(c.ghosts()) == c.ghost_count() <= c.max_ghosts()
    elif name == "prefix":
        assert set(c.seqs()) == set(c.tracked())
        if hasattr(c, "parents_only"):
            assert not set(c.tracked()) & set(c.parents_only())
            assert set(c.children()) <= set(c.tracked()) | set(c.parents_only())
        for k in list(c.tracked()):
            c.parent_of(k)
        k = None
    else:
        qs = [c.queue(i) for i in range(4)]
        assert [len(q) for q in qs] == [c.count(i) for i in range(4)]
        assert set(qs[0]) | set(qs[1]) | set(qs[3]) == set(c.resident())
        assert len(qs[0]) + len(qs[1]) + len(qs[3]) == len(c.resident())
        del qs
    known = {id(k) for k in _known(p, name)}  # ids: no reference held here
    now = _refs(keys)
    for i in range(len(keys)):
        held = 2 if id(keys[i]) in known else 0
        assert now[i] - base[i] == held, (keys[i], now[i] - base[i], held)


def _ops(p, name, keys, rng, steps, structured):
    """Random verbs; returns how many raised (only the fuse makes them raise)."""
    raised = 0
    for _ in range(steps):
        op = rng.random()
        try:
            if op < 0.4:
                start = rng.randrange(len(keys))
                run = keys[start:start + rng.randrange(1, 6)]
                if structured:
                    hints = [Hints(parent=keys[start - 1] if start else None)]
                    hints += [Hints(parent=k) for k in run[:-1]]
                    p.insert_many(run, hints)
                else:
                    p.insert_many(run)
                if rng.random() < 0.5:
                    p.batch_stored(run)
            elif op < 0.6:
                p.touch(rng.sample(keys, rng.randrange(1, 5)))
            elif op < 0.75:
                p.remove(rng.choice(keys))
            elif op < 0.8:
                p.insert(rng.choice(keys))  # often a resident key again
            else:
                n = rng.choice((0, 1, 2, 3, len(p) + 1, 10 * len(keys)))
                prot = rng.choice((None, (), set(rng.sample(keys, 3)), list(rng.sample(keys, 2)), set(keys)))
                got = p.evict(n, prot) if prot is not None else p.evict(n)
                if got is not None:
                    assert len(got) == max(n, 0) and len(set(got)) == len(got)
                    if prot:
                        assert not set(got) & set(prot)
        except TypeError as exc:
            assert str(exc) == "fuse"
            raised += 1
    return raised


NAMES = ("hitdensity", "prefix", "s3fifo")
NAMES_SEEDS = {"hitdensity": 10, "prefix": 20, "s3fifo": 30, "auto": 40}


@pytest.mark.parametrize("name", NAMES + ("auto",))
@pytest.mark.parametrize("structured", [False, True])
def test_every_key_is_released_when_the_policy_goes(name, structured):
    rng = random.Random(NAMES_SEEDS[name] + structured)
    keys = [K(i) for i in range(60)]
    base = _refs(keys)
    p = _make(name, 8)  # 60 keys through 8 slots: evictions, ghosts wrapping, reuse of slots
    for _ in range(6):
        _ops(p, name, keys, rng, 150, structured)
        if name != "auto":
            _check(p, name, keys, base)
        else:
            for mini, mname in zip(p._minis, p.names):
                _check(mini, mname, [], [])  # the minis' own queues (sampled keys: refs shared)
            mini = None  # the loop variable would keep the last mini alive
    del p
    gc.collect()
    assert _refs(keys) == base


@pytest.mark.parametrize("name", NAMES)
def test_bounds_evict_more_than_held_all_protected_unknown_remove(name):
    keys = [K(i) for i in range(20)]
    base = _refs(keys)
    p = _make(name, 4)
    p.insert_many(keys[:10])  # more keys than the capacity, as the manager may hold transiently
    assert len(p) == 10
    assert p.evict(0) == [] and p.evict(-1) == []
    assert p.evict(11) is None and len(p) == 10  # atomic: nothing evicted
    assert p.evict(1, set(keys[:10])) is None and p.evict(1, list(keys[:10])) is None
    assert len(p) == 10
    p.remove(keys[15])  # never seen
    p.insert(keys[3])  # resident again
    assert len(p) == 10
    got = p.evict(10, set())
    assert sorted(k.i for k in got) == list(range(10)) and len(p) == 0
    del got
    assert p.evict(1) is None
    for i in range(10, 20):  # the ghosts wrap around
        p.insert(keys[i])
        p.evict(1)
    _check(p, name, keys, base)
    del p
    gc.collect()
    assert _refs(keys) == base


@pytest.mark.parametrize("name", NAMES)
def test_unhashable_keys_raise_and_change_nothing(name):
    keys = [K(i) for i in range(6)]
    base = _refs(keys)
    p = _make(name, 4)
    p.insert_many(keys[:4])
    before = sorted(k.i for k in p._core.resident()) if name != "prefix" else sorted(k.i for k in p._core.tracked())
    for call in (lambda: p.insert([1]), lambda: p.insert_many([keys[4], [2]]), lambda: p.touch([{}]),
                 lambda: p.remove([3])):
        with pytest.raises(TypeError):
            call()
    del call  # its closure holds p
    _check(p, name, keys, base)
    assert {k.i for k in _known(p, name)} >= set(before)
    del p
    gc.collect()
    assert _refs(keys) == base


@pytest.mark.parametrize("name", NAMES + ("auto",))
@pytest.mark.parametrize("structured", [False, True])
def test_a_hash_that_raises_mid_call_leaves_the_core_whole(name, structured):
    """For k = 1, 2, ...: the k-th hash of the run raises; the core stays consistent."""
    keys = [K(i) for i in range(24)]
    base = _refs(keys)
    hits = 0
    for fuse in range(1, 200, 5):
        rng = random.Random(fuse)
        p = _make(name, 5)
        _FUSE[0] = fuse
        try:
            hits += _ops(p, name, keys, rng, 40, structured)
        finally:
            _FUSE[0] = 0
        if name != "auto":
            _check(p, name, keys, base)
        _ops(p, name, keys, rng, 40, structured)  # later calls work
        if name != "auto":
            _check(p, name, keys, base)
        del p
        gc.collect()
        assert _refs(keys) == base, fuse
    assert hits > 20  # the fuse went off inside the calls


@pytest.mark.parametrize("name", NAMES + ("auto",))
def test_create_and_destroy_does_not_grow_memory(name):
    keys = [K(i) for i in range(200)]

    def cycle():
        p = _make(name, 32)
        rng = random.Random(5)
        _ops(p, name, keys, rng, 200, False)
        del p
        gc.collect()

    cycle()
    tracemalloc.start()
    try:
        cycle()
        first = tracemalloc.get_traced_memory()[0]
        for _ in range(8):
            cycle()
        grown = tracemalloc.get_traced_memory()[0] - first
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, grown


def _armed(fuse, call):
    """call() with the fuse set: the fuse-th hash from now raises TypeError("fuse")."""
    _FUSE[0] = fuse
    try:
        with pytest.raises(TypeError, match="fuse"):
            call()
    finally:
        _FUSE[0] = 0


def test_s3fifo_a_protected_check_that_raises_keeps_the_key_queued():
    # before the fix: the head of small left its queue before `key in protected` was asked;
    # the error left it resident in no queue, and remove() then unlinked it from list 4 (past
    # the four lists: it wrote tail[0] and small_target)
    keys = [K(i) for i in range(6)]
    base = _refs(keys)
    p = _make("s3fifo", 4)
    p.insert_many(keys[:4])
    prot = {keys[5]}
    _armed(1, lambda: p.evict(1, prot))  # the first hash: `keys[0] in protected`
    del prot
    _check(p, "s3fifo", keys, base)
    assert list(p._core.queue(0)) == keys[:4]
    p.remove(keys[0])
    _check(p, "s3fifo", keys, base)
    assert p.evict(3) == keys[1:4]
    del p
    gc.collect()
    assert _refs(keys) == base


def test_hitdensity_a_remove_that_raises_changes_nothing():
    # before the fix: remove() took the key out of its queue, then the map's delete raised:
    # resident in no queue; the next touch unlinked it again and broke its class's list
    keys = [K(i) for i in range(6)]
    base = _refs(keys)
    p = _make("hitdensity", 4)
    p.insert_many(keys[:4])
    _armed(2, lambda: p.remove(keys[1]))  # hash 1: the lookup, hash 2: the delete
    _check(p, "hitdensity", keys, base)
    p.touch([keys[1]])
    _check(p, "hitdensity", keys, base)
    assert sorted(k.i for k in p.evict(4)) == [0, 1, 2, 3]
    del p
    gc.collect()
    assert _refs(keys) == base


def test_prefix_an_evict_that_raises_puts_every_victim_back():
    # before the fix: a raise inside evict's loop left the victims so far marked `evicting`,
    # out of the heap: never evictable again, and their keys "changed from outside"
    keys = [K(i) for i in range(6)]
    base = _refs(keys)
    p = _make("prefix", 4)
    p.insert_many(keys[:4])
    prot = {keys[5]}
    _armed(2, lambda: p.evict(3, prot))  # keys[0] taken, then `keys[1] in protected` raises
    del prot
    _check(p, "prefix", keys, base)
    assert len(p) == 4
    assert p.evict(4) == keys[:4]
    del p
    gc.collect()
    assert _refs(keys) == base
