"""hitdensity: narrated behaviour, the eviction contract, and the targets on the shared trace."""

from __future__ import annotations

import pytest

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


def test_classes():
    policy = HitDensityPolicy(8)
    # insert_many [1, 2, 3]: a stored batch; its last block is the partial tail
    policy.insert_many([1, 2, 3])
    assert [policy.class_of(k) for k in (1, 2, 3)] == ["new", "new", "tail"]
    # touch [1, 3] -> reused once; touch [1] again -> reused many times
    policy.touch([1, 3])
    policy.touch([1])
    assert [policy.class_of(k) for k in (1, 2, 3)] == ["many", "new", "once"]
    # a key inserted alone (a demotion, a hinted store) is a body block
    policy.insert(4)
    assert policy.class_of(4) == "new"
    assert policy.class_of(99) is None


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


def _chat_turns(policy, turns=1500, conversations=20):
    """Conversations take turns; each turn reloads its body, then stores a fresh partial tail.

    The manager's calls: touch(body hits), evict(room), insert_many(new keys). Returns the body
    hits of the last 500 turns (out of 1000 body reloads) — tails are never reused.
    """
    hits = 0
    for turn in range(turns):
        conv = turn % conversations
        body = [("body", conv, 0), ("body", conv, 1)]
        found = [k for k in body if k in policy]
        if turn >= turns - 500:
            hits += len(found) if found == body else 0
        policy.touch(found)
        new = [k for k in body if k not in policy] + [("tail", conv, turn)]
        room = len(policy) + len(new) - policy.capacity
        if room > 0:
            assert policy.evict(room) is not None
        policy.insert_many(new)
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


# Measured: 0.2339 at 10,000 blocks (LRU 0.2112, ARC 0.2227, Belady 0.3664), 0.3312 at 30,000
# (LRU 0.3257). The floors guard that level; issue 7's 10,000-block target (0.235) is not met,
# so that case is a strict xfail: it turns red the day the target is reached.
@pytest.mark.slow
@pytest.mark.parametrize("capacity, lru, floor", [(10_000, 0.2112, 0.233), (30_000, 0.3257, 0.330)])
def test_beats_lru_on_the_shared_trace(shared_ratio, capacity, lru, floor):
    assert shared_ratio(capacity) >= floor > lru


@pytest.mark.slow
@pytest.mark.parametrize("capacity, target", [
    pytest.param(10_000, 0.235, marks=pytest.mark.xfail(
        strict=True, reason="issue 7 target 0.235 at 10,000 blocks not reached (0.2339)")),
    (30_000, 0.330),
])
def test_issue_targets_on_the_shared_trace(shared_ratio, capacity, target):
    assert shared_ratio(capacity) >= target
