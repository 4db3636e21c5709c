"""hitdensity: narrated behaviour, the eviction contract, and the targets on the shared trace."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm.cli import BUNDLED
from kvbm.policies.base import Hints
from kvbm.policies.hitdensity import HitDensityPolicy
from kvbm.policies.lru import LRUPolicy
from kvbm.registry import EVICTION
from kvbm.sim.replay import simulate, single_tier
from kvbm.sim.traces import load_trace


def inserted(*keys, capacity=8):
    policy = HitDensityPolicy(capacity)
    for key in keys:
        policy.insert(key, Hints())
    return policy


def test_registered():
    assert EVICTION.get("hitdensity") is HitDensityPolicy


def test_cold_start_is_lru():
    # insert [1, 2, 3]; touch [1]; no statistics yet, so every class scores 0
    policy = inserted(1, 2, 3)
    policy.touch([1])
    # evict 1 -> [2] (the least recently used)
    assert policy.evict(1) == [2]
    # evict 2 -> [3, 1]
    assert policy.evict(2) == [3, 1]
    assert len(policy) == 0


def test_touch_makes_the_first_block_the_most_recent():
    # a request touches its blocks in order [1, 2, 3]; the deepest one is the least useful
    # without the others, so it goes first (LRU would evict 1 and strand 2 and 3)
    policy = inserted(1, 2, 3)
    policy.touch([1, 2, 3])
    assert policy.evict(1) == [3]


def test_a_batch_goes_deepest_first():
    # insert_many [1, 2, 3, 4] (one request's new blocks, 4 the partial tail), no statistics:
    # the deepest block is the oldest of its batch, so eviction takes 4, 3, 2, then 1 (LRU
    # would evict 1 first and strand 2, 3 and 4 behind a missing parent)
    policy = HitDensityPolicy(8)
    policy.insert_many([1, 2, 3, 4])
    assert policy.evict(4) == [4, 3, 2, 1]


def test_classes():
    policy = HitDensityPolicy(8)
    # insert_many [1, 2, 3]: a stored batch; its last block is the partial tail
    policy.insert_many([1, 2, 3])
    assert [policy.class_of(k) for k in (1, 2, 3)] == ["new", "new", "tail"]
    # new blocks are classed by the length of the run that stored them: 3 -> "new[2-3]"
    assert policy.class_of(1, detail=True) == "new[2-3]"
    # touch [1, 3] -> reused once; touch [1] again -> reused many times
    policy.touch([1, 3])
    policy.touch([1])
    assert [policy.class_of(k) for k in (1, 2, 3)] == ["many", "new", "once"]
    # a key inserted alone (a demotion, a hinted store) is a body block
    policy.insert(4)
    assert policy.class_of(4) == "new" and policy.class_of(4, detail=True) == "new[1]"
    assert policy.class_of(99) is None
    policy.insert_many(range(100, 200))
    assert policy.class_of(100, detail=True) == "new[64-127]"


def test_blocks_inserted_one_by_one_can_be_regrouped_as_their_run():
    # vLLM's CachePolicy inserts block by block: 1, 2, 3, 4 arrive alone ("new[1]"), 2 is
    # reused meanwhile; at the request's end the adapter says [1, 2, 3, 4] were one run
    policy = inserted(1, 2, 3, 4)
    policy.touch([2])
    policy.batch_stored([1, 2, 3, 4])
    # 2 was reused (stays "once"); 1, 3, 4 become the run insert_many would have made:
    # 4 its tail, 1 and 3 a run of 3, the deepest block the oldest
    assert [policy.class_of(k, detail=True) for k in (1, 2, 3, 4)] == ["new[2-3]", "once", "new[2-3]", "tail"]
    assert policy.evict(4) == [4, 3, 1, 2]


def test_a_ghost_remembers_the_reuse():
    policy = inserted(1, 2, capacity=2)
    # evict 1 -> [1]; 1 is a ghost now
    assert policy.evict(1) == [1]
    assert 1 not in policy
    # insert 1 again: a reuse the tier missed, so it comes back as "once", not "new"
    policy.insert(1)
    assert policy.class_of(1) == "once"


def test_evict_is_atomic_and_respects_protected():
    policy = inserted(1, 2, 3)
    # 3 victims outside protected {2} do not exist -> None, nothing changes
    assert policy.evict(3, protected={2}) is None
    assert len(policy) == 3 and all(k in policy for k in (1, 2, 3))
    # evict 2 with {1} protected -> [2, 3]
    assert policy.evict(2, protected={1}) == [2, 3]
    assert policy.evict(0) == []
    assert list(k for k in (1, 2, 3) if k in policy) == [1]


def test_remove():
    policy = inserted(1, 2)
    policy.remove(1)
    policy.remove(42)  # unknown: no-op
    assert 1 not in policy and len(policy) == 1
    assert policy.evict(1) == [2]


def test_rejects_bad_capacity_and_options():
    with pytest.raises(ValueError, match="capacity"):
        HitDensityPolicy(-1)
    with pytest.raises(TypeError, match="unknown option"):
        HitDensityPolicy(8, ghost_ratio=2)


def _request(policy, body, fresh, *more):
    """One request as the manager drives a policy: touch the cached part of `body`, then store
    what it missed plus `fresh` as one run, and each run of `more` (evict room, insert_many).
    Returns the body hits if the whole body was cached (a prefix hit), else 0."""
    found = [k for k in body if k in policy]
    policy.touch(found)
    for run in ([k for k in body if k not in found] + fresh, *more):
        room = len(policy) + len(run) - policy.capacity
        if room > 0:
            assert policy.evict(room) is not None
        policy.insert_many(run)
    return len(found) if found == body else 0


def _chat_turns(policy, turns=1500, conversations=20):
    """Conversations take turns; each turn reloads its body, then stores a fresh partial tail.

    Returns the body hits of the last 500 turns (out of 1000 body reloads) — tails are never
    reused.
    """
    hits = 0
    for turn in range(turns):
        conv = turn % conversations
        body = [("body", conv, 0), ("body", conv, 1)]
        found = _request(policy, body, [("tail", conv, turn)])
        hits += found if turn >= turns - 500 else 0
    return hits


def test_learns_that_tails_never_return():
    # 20 conversations x 2 body blocks = 40 blocks reused every 20 turns, plus one new tail a
    # turn; capacity 45. LRU sees 19 tails and 38 body touches between two turns of one
    # conversation, more than 45, so it evicts every body just before its reuse.
    assert _chat_turns(LRUPolicy(45)) == 0
    # hitdensity starts as LRU, learns from ghost hits that bodies return at age ~20 inserts
    # and from ghost expiries that tails never do, then keeps every body.
    policy = HitDensityPolicy(45)
    assert _chat_turns(policy) == 1000
    # what it holds: the 40 body blocks, and the few newest tails in the slots left over
    tails = [("tail", turn % 20, turn) for turn in range(1500)]
    assert sum(t in policy for t in tails) == len(policy) - 40 <= 5
    # what it learned (policy.learned(), for notebooks): tails are worth nothing at any age,
    # bodies reused many times hold the 40 slots that matter
    learned = policy.learned()
    assert learned["tail"]["index"] == [] and learned["tail"]["blocks"] == len(policy) - 40
    assert learned["many"]["blocks"] == 40 and max(learned["many"]["index"]) > 0


def _follow_ups(policy, turns=3000, conversations=10, document=16):
    """Conversations take turns, each followed by a one-off document that never returns.

    A turn loads the 2 message blocks its conversation stored last turn, then stores 2 fresh
    ones and a tail (a run of 3, plus any message block it had to store again); the document
    stores 16 blocks and a tail (a run of 17). Returns the message hits of the last 1000 turns.
    """
    hits, last = 0, {}
    for turn in range(turns):
        conv = turn % conversations
        fresh = [("msg", conv, turn, 0), ("msg", conv, turn, 1)]
        document_run = [("doc", turn, i) for i in range(document)] + [("doc-tail", turn)]
        found = _request(policy, last.get(conv, []), fresh + [("tail", conv, turn)], document_run)
        hits += found if turn >= turns - 1000 else 0
        last[conv] = fresh
    return hits


def test_learns_that_short_runs_return_and_long_ones_do_not():
    # 10 conversations: a message block returns 200 inserts after it was stored (10 turns x
    # 20 blocks), more than the 150 slots, so LRU evicts every one just before its reuse.
    # One class for all new blocks could not tell the 2 message blocks of a turn from the 16
    # blocks of the document beside it (same age, same reuse count).
    assert _follow_ups(LRUPolicy(150)) == 0
    # hitdensity learns per run length: blocks stored in runs of 2-7 return at age ~200,
    # blocks stored in runs of 16-31 never do; it keeps every message block
    policy = HitDensityPolicy(150)
    assert _follow_ups(policy) == 2000
    assert policy._score(policy._class[("msg", 9, 2999, 0)], 100) > 0
    assert all(policy.class_of(("doc", turn, 0)) is None for turn in range(2900, 2990))


@pytest.fixture(scope="module")
def shared_ratio():
    """Prefix hit ratio of hitdensity on the shared trace, by capacity (each replay runs once)."""
    trace, ratios = load_trace(BUNDLED["mooncake"]), {}

    def ratio(capacity):
        if capacity not in ratios:
            result = simulate(trace, single_tier(capacity, "hitdensity"), progress=False)
            ratios[capacity] = result.prefix_hit_ratio
        return ratios[capacity]

    return ratio


# Measured: 0.0559 / 0.2357 / 0.3326 / 0.3548 / 0.3642 at 1k / 10k / 30k / 50k / 100k blocks
# (session 12, with the once floor; 0.0531 / 0.2363 / 0.3325 / 0.3551 / 0.3643 before it)
# (LRU 0.0445 / 0.2112 / 0.3257 / 0.3546 / 0.3637 from ../shared/traces/README.md, Belady
# 0.366 from 10k on). Issue 7: never below LRU at any capacity of the reference table.
@pytest.mark.slow
@pytest.mark.parametrize("capacity, lru", [
    (1_000, 0.0445), (10_000, 0.2112), (30_000, 0.3257), (50_000, 0.3546), (100_000, 0.3637)])
def test_never_below_lru_on_the_shared_trace(shared_ratio, capacity, lru):
    assert shared_ratio(capacity) >= lru + 0.00005  # strictly above LRU's 4-decimal figure


# Issue 7's targets: 0.235 at 10,000 blocks (LRU 0.211, ARC 0.222), 0.330 at 30,000 (LRU 0.326).
@pytest.mark.slow
@pytest.mark.parametrize("capacity, target", [(10_000, 0.235), (30_000, 0.330)])
def test_issue_targets_on_the_shared_trace(shared_ratio, capacity, target):
    assert shared_ratio(capacity) >= target


def _check_books(policy):
    """Internal bookkeeping agrees with itself: queues, classes, ghosts and their age index."""
    assert sum(len(q) for q in policy._queues) == len(policy._class) == len(policy)
    for c, queue in enumerate(policy._queues):
        assert all(policy._class[k] == c for k in queue)
        lasts = list(queue.values())
        assert lasts == sorted(lasts)  # the bisect in _ongoing relies on access order
    assert len(policy._ghosts) <= policy._max_ghosts
    assert not set(policy._ghosts) & set(policy._class)
    epochs = [{} for _ in policy._queues]
    for c, last in policy._ghosts.values():
        e = last >> policy._shift
        epochs[c][e] = epochs[c].get(e, 0) + 1
    assert epochs == policy._ghost_epochs
    live = policy._ongoing()
    assert sum(map(sum, live)) == len(policy) + len(policy._ghosts)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 40))
def test_long_random_runs_keep_the_books(seed, capacity):
    # thousands of operations, so the tables update, ghosts expire and lives get censored
    rng = random.Random(seed)
    policy = HitDensityPolicy(capacity)
    universe = range(4 * capacity + 8)
    for step in range(3000):
        op = rng.random()
        if op < 0.45:  # a request: touch what is cached, store the rest as one batch
            keys = rng.sample(universe, rng.randint(1, min(12, len(universe))))
            cached = [k for k in keys if k in policy]
            policy.touch(cached)
            new = [k for k in keys if k not in policy]
            room = len(policy) + len(new) - capacity
            if room > 0:
                protected = set(cached)
                victims = policy.evict(room, protected)
                if victims is None:
                    assert len(policy) - len(protected & set(policy._class)) < room
                    continue
                assert len(victims) == len(set(victims)) == room
                assert not set(victims) & protected and not any(v in policy for v in victims)
            policy.insert_many(new)
        elif op < 0.6:
            key = rng.choice(universe)
            if key not in policy and len(policy) < capacity:
                policy.insert(key)
        elif op < 0.65:
            policy.remove(rng.choice(universe))
        elif op < 0.7:  # keys inserted one by one, told afterwards to be one run
            policy.batch_stored(rng.sample(universe, rng.randint(1, 6)))
        elif op < 0.9:
            policy.touch(rng.sample(universe, 3))
        else:
            n = rng.randint(0, 3)
            before = len(policy)
            victims = policy.evict(n)
            assert (victims is None and before < n) or (len(victims) == n and len(policy) == before - n)
        assert len(policy) <= capacity
    _check_books(policy)
