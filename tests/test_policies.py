"""Each built-in policy's own behaviour, narrated: `# operations -> result`."""

from __future__ import annotations

import json
import math
import random
import sys
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import pytest  # noqa: E402

from kvbm.policies.admission import AlwaysAdmission, NHitAdmission, PriorityFloorAdmission  # noqa: E402
from kvbm.policies.arc import ARCPolicy  # noqa: E402
from kvbm.policies.base import Hints  # noqa: E402
from kvbm.policies.belady import BeladyPolicy  # noqa: E402
from kvbm.policies.frequency import FrequencyPolicy  # noqa: E402
from kvbm.policies.lru import LRUPolicy  # noqa: E402
from kvbm.policies.prefix import PrefixPolicy  # noqa: E402
from kvbm.policies.priority import PriorityPolicy, block_priorities  # noqa: E402
from kvbm.policies.s3fifo import S3FIFOPolicy  # noqa: E402


class FakeClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def insert_all(policy, keys, hints=None):
    for key in keys:
        policy.insert(key, hints)
    return policy


def drain(policy):
    victims = []
    while (v := policy.evict(1)) is not None:
        victims += v
    return victims


# -------------------------------------------------------------------- frequency

def test_frequency_evicts_the_least_used():
    # insert [1, 2, 3], touch 1 twice, touch 2 once -> evict 3 -> [3, 2, 1]
    policy = insert_all(FrequencyPolicy(8, clock=FakeClock()), [1, 2, 3])
    policy.touch([1, 1, 2])
    assert policy.evict(3) == [3, 2, 1]


def test_frequency_ties_go_to_the_least_recent():
    # insert [1, 2, 3] at one instant: equal counts -> evict 1 -> [1] (the oldest)
    policy = insert_all(FrequencyPolicy(8, clock=FakeClock()), [1, 2, 3])
    assert policy.evict(1) == [1]
    # insert 4, touch 2 and 4 (counts 2:2, 3:1, 4:2) -> evict 2 -> [3, 2] (2 touched before 4)
    policy.insert(4)
    policy.touch([2, 4])
    assert policy.evict(2) == [3, 2]


def test_frequency_counts_decay_with_half_life():
    # t=0: insert 1, touch 1 x3 (count 4); t=30 (three half-lives): count 0.5; insert 2 (count 1)
    # -> evict 1 -> [1]
    clock = FakeClock()
    policy = FrequencyPolicy(8, clock=clock, half_life=10.0)
    policy.insert(1)
    policy.touch([1, 1, 1])
    assert policy.count(1) == pytest.approx(4.0)
    clock.t = 30.0
    assert policy.count(1) == pytest.approx(0.5)
    policy.insert(2)
    assert policy.evict(1) == [1]
    # same history, but touch 1 at t=30: 0.5 + 1 = 1.5 beats 2's 1 -> evict 1 -> [2];
    # t=40: 1 has decayed to 0.75, a fresh 3 has 1 -> evict 1 -> [1]
    clock.t = 0.0
    policy = FrequencyPolicy(8, clock=clock, half_life=10.0)
    policy.insert(1)
    policy.touch([1, 1, 1])
    clock.t = 30.0
    policy.insert(2)
    policy.touch([1])
    assert policy.count(1) == pytest.approx(1.5)
    assert policy.evict(1) == [2]
    clock.t = 40.0
    policy.insert(3)
    assert policy.evict(1) == [1]


def test_frequency_without_decay_is_plain_lfu():
    # half_life=inf: the same history keeps 1 (count 4 forever) -> evict 1 -> [2]
    clock = FakeClock()
    policy = FrequencyPolicy(8, clock=clock, half_life=math.inf)
    policy.insert(1)
    policy.touch([1, 1, 1])
    clock.t = 1e6
    policy.insert(2)
    assert policy.evict(1) == [2]


def test_frequency_heap_stays_bounded_under_touches():
    policy = insert_all(FrequencyPolicy(8, clock=FakeClock(), half_life=60.0), range(10))
    for _ in range(5000):
        policy.touch(range(10))
    assert len(policy._heap) <= 2 * len(policy) + 1024
    assert sorted(drain(policy)) == list(range(10))


@pytest.mark.parametrize("bad", [0, -1.0, "10", float("nan"), None, True])
def test_frequency_rejects_bad_half_life(bad):
    with pytest.raises(ValueError, match="half_life"):
        FrequencyPolicy(8, half_life=bad)


# -------------------------------------------------------------------- priority

def test_priority_lowest_first():
    # insert 1 (p=80), 2 (p=35), 3 (p=10) -> evict 3 -> [3, 2, 1]
    policy = PriorityPolicy(8, clock=FakeClock())
    policy.insert(1, Hints(priority=80))
    policy.insert(2, Hints(priority=35))
    policy.insert(3, Hints(priority=10))
    assert policy.evict(3) == [3, 2, 1]


def test_priority_lru_within_a_priority():
    # insert [1, 2, 3] at p=50, touch 1 -> evict 2 -> [2, 3]; a p=20 newcomer still goes before them
    policy = insert_all(PriorityPolicy(8, clock=FakeClock()), [1, 2, 3], Hints(priority=50))
    policy.touch([1])
    assert policy.evict(2) == [2, 3]
    policy.insert(4, Hints(priority=20))
    assert policy.evict(2) == [4, 1]


def test_priority_reverts_to_default_after_duration():
    # t=0 insert 1 (p=90 for 10 s); insert 2, 3 (p=50); t=5: evict 1 -> [2]; t=11: 1 is 35 -> evict 1 -> [1]
    clock = FakeClock()
    policy = PriorityPolicy(8, clock=clock)
    policy.insert(1, Hints(priority=90, duration=10.0))
    policy.insert(2, Hints(priority=50))
    policy.insert(3, Hints(priority=50))
    clock.t = 5.0
    assert policy.priority(1) == 90
    assert policy.evict(1) == [2]
    clock.t = 11.0
    assert policy.priority(1) == 35
    assert policy.evict(1) == [1]
    assert policy.evict(1) == [3]


def test_priority_expired_block_keeps_its_lru_place():
    # t=0 insert 1 (p=90, 10 s), t=1 insert 2 (p=35); t=20: both 35, 1 is older -> evict 1 -> [1]
    clock = FakeClock()
    policy = PriorityPolicy(8, clock=clock)
    policy.insert(1, Hints(priority=90, duration=10.0))
    clock.t = 1.0
    policy.insert(2)
    clock.t = 20.0
    assert policy.evict(1) == [1]
    # same, but touch 1 at t=15 (after expiry) -> evict 1 -> [2]
    clock.t = 0.0
    policy = PriorityPolicy(8, clock=clock)
    policy.insert(1, Hints(priority=90, duration=10.0))
    clock.t = 1.0
    policy.insert(2)
    clock.t = 15.0
    policy.touch([1])
    assert policy.evict(1) == [2]


def test_priority_failed_evict_that_applies_expiry_changes_no_order():
    # t=0 insert 1 (p=90, 5 s), insert 2; t=10: evict 3 -> None (but 1 has expired);
    # touch 2 -> evict 2 -> [1, 2] exactly as if the failed evict never happened
    clock = FakeClock()
    twins = [PriorityPolicy(8, clock=clock), PriorityPolicy(8, clock=clock)]
    for policy in twins:
        policy.insert(1, Hints(priority=90, duration=5.0))
        policy.insert(2)
    clock.t = 10.0
    assert twins[0].evict(3) is None
    for policy in twins:
        policy.touch([2])
    assert twins[0].evict(2) == twins[1].evict(2) == [1, 2]


def test_priority_duration_edge_cases():
    # zero duration reverts at once; a duration on the default priority changes nothing;
    # re-inserting restarts the duration
    clock = FakeClock()
    policy = PriorityPolicy(8, clock=clock)
    policy.insert(1, Hints(priority=90, duration=0.0))
    policy.insert(2, Hints(priority=35, duration=1.0))
    policy.insert(3, Hints(priority=90, duration=10.0))
    assert (policy.priority(1), policy.priority(2), policy.priority(3)) == (35, 35, 90)
    clock.t = 8.0
    policy.insert(3, Hints(priority=90, duration=10.0))
    clock.t = 12.0
    assert policy.priority(3) == 90
    clock.t = 18.0
    assert policy.priority(3) == 35
    assert policy.priority(99) is None


def test_block_priorities_follow_tensorrt_llm():
    # Cases from TensorRT-LLM's KvCacheRetentionConfigTest.BlockConfigTest (None there = default 35):
    # a block takes the range that holds its first token.
    def prios(ranges, block_size, num_blocks, **kw):
        return [h.priority for h in block_priorities(ranges, block_size, num_blocks, **kw)]

    assert prios([(0, 64, 80, None), (64, 128, 50, None)], 64, 4) == [80, 50, 35, 35]
    assert prios([(0, 63, 80, None), (63, 127, 30, None)], 32, 4) == [80, 80, 30, 30]
    assert prios([(0, 1, 80, None), (1, 2, 5, None)], 32, 4) == [80, 35, 35, 35]
    assert prios([(0, 128, 80, None)], 256, 1) == [80]
    assert prios([(0, 65, 80, None), (65, 129, 30, None)], 64, 3) == [80, 80, 30]
    assert prios([(0, 64, 80, None), (129, None, 50, None)], 64, 4) == [80, 35, 35, 50]
    assert prios([(0, 64, 80, None), (66, 67, 50, None)], 64, 4) == [80, 35, 35, 35]
    assert prios([(127, 193, 80, None)], 64, 4) == [35, 35, 80, 80]
    assert prios([(1, None, 80, None)], 64, 2) == [35, 80]
    # the alternative rule: the highest priority among ranges touching any token of the block
    assert prios([(127, 193, 80, None)], 64, 4, rule="max_overlap") == [35, 80, 80, 80]
    assert prios([(0, 64, 80, None), (66, 67, 50, None)], 64, 4, rule="max_overlap") == [80, 50, 35, 35]
    assert prios([(0, 1, 20, None), (1, 2, 60, None)], 32, 2, rule="max_overlap") == [60, 35]


def test_block_priorities_durations_positions_and_trtllm_objects():
    hints = block_priorities([(0, 64, 80, 30.0), (64, None, 60, timedelta(milliseconds=1500))], 64, 3)
    assert [(h.priority, h.duration, h.position) for h in hints] == [(80, 30.0, 0), (60, 1.5, 1), (60, 1.5, 2)]
    trt = SimpleNamespace(token_start=0, token_end=None, priority=90, duration_ms=timedelta(seconds=2))
    assert [(h.priority, h.duration) for h in block_priorities([trt], 16, 2)] == [(90, 2.0), (90, 2.0)]
    assert block_priorities([], 16, 2) == [Hints(position=0), Hints(position=1)]


@pytest.mark.parametrize(
    "ranges, match",
    [
        ([(0, 64, 80, None), (60, 128, 80, None)], "overlap"),
        ([(0, None, 80, None), (64, 128, 80, None)], "end at None"),
        ([(64, 32, 80, None)], "token_start < token_end"),
        ([(-1, 32, 80, None)], "token_start < token_end"),
        ([(0, 32, 101, None)], "priority"),
    ],
)
def test_block_priorities_rejects_what_tensorrt_llm_rejects(ranges, match):
    with pytest.raises(ValueError, match=match):
        block_priorities(ranges, 32, 4)


# -------------------------------------------------------------------- arc

def test_arc_survives_a_scan():
    # capacity 4: insert [1, 2], touch [1, 2] (T2); scan [10, 11, 12, 13] evicting 1 per insert at capacity
    # -> only scan keys are evicted (T1 is over its target p=0), 1 and 2 stay
    policy = ARCPolicy(4, clock=FakeClock())
    insert_all(policy, [1, 2])
    policy.touch([1, 2])
    victims = []
    for key in [10, 11, 12, 13]:
        if len(policy) >= 4:
            victims += policy.evict(1)
        policy.insert(key)
    assert victims == [10, 11] and 1 in policy and 2 in policy


def test_arc_ghost_hits_adapt_the_target():
    # capacity 4: insert [1, 2, 3, 4], touch 3; evict 1 -> [1] (T1 over p=0, 1 -> ghost B1)
    policy = insert_all(ARCPolicy(4, clock=FakeClock()), [1, 2, 3, 4])
    policy.touch([3])
    assert policy.evict(1) == [1] and policy.p == 0
    # insert 1 again: a B1 ghost hit -> p grows to 1, 1 enters T2 (frequent)
    policy.insert(1)
    assert policy.p == 1 and 1 in policy
    # T1 = [2, 4] is over p=1 -> evict 1 -> [2]; then |T1| = 1 = p -> T2's LRU goes: evict 1 -> [3]
    assert policy.evict(1) == [2]
    assert policy.evict(1) == [3]
    # insert 3 again: a B2 ghost hit -> p shrinks by max(1, |B1|/|B2|) = 1 back to 0
    policy.insert(3)
    assert policy.p == 0
    # now T1 = [4] is over p=0 -> evict 1 -> [4]
    assert policy.evict(1) == [4]


def test_arc_ghosts_stay_bounded_by_capacity():
    policy = ARCPolicy(5, clock=FakeClock())
    for key in range(200):
        for k in (key, key // 2) if key % 3 == 0 else (key,):  # key // 2: some ghost hits
            if k not in policy and len(policy) >= 5:
                policy.evict(1)
            policy.insert(k)
        policy.touch([key])
        assert len(policy._b1) + len(policy._b2) <= 5 and len(policy._t1) + len(policy._b1) <= 5
    assert policy.p > 0 and len(policy) == 5
    assert len(policy._b1) + len(policy._b2) <= 5 and len(policy._t1) + len(policy._b1) <= 5


# -------------------------------------------------------------------- s3fifo

def _stream(policy, keys, capacity):
    victims = []
    for key in keys:
        if key not in policy and len(policy) >= capacity:
            victims += policy.evict(1)
        policy.insert(key)
    return victims


def test_s3fifo_filters_one_hit_wonders():
    # capacity 10: insert hot [h0..h4], touch each once; then 100 one-hit wonders stream through.
    # The hot keys move S -> M when S overflows; the wonders pass through S and out.
    hot = [f"h{i}" for i in range(5)]
    wonders = list(range(100, 200))
    s3 = insert_all(S3FIFOPolicy(10, clock=FakeClock()), hot)
    s3.touch(hot)
    victims = _stream(s3, wonders, 10)
    assert all(key in s3 for key in hot)
    assert set(victims) <= set(wonders) and len(victims) == 95
    # LRU, same stream: the hot keys are flushed by the scan
    lru = insert_all(LRUPolicy(10, clock=FakeClock()), hot)
    lru.touch(hot)
    _stream(lru, wonders, 10)
    assert not any(key in lru for key in hot)


def test_s3fifo_ghost_hit_enters_main():
    # capacity 10 (ghost holds 9): stream [100..114] -> 100..104 evicted from S into the ghost;
    # insert 100 again -> it enters M and survives the next 50 one-hit wonders
    policy = S3FIFOPolicy(10, clock=FakeClock())
    assert _stream(policy, range(100, 115), 10) == [100, 101, 102, 103, 104]
    _stream(policy, [100], 10)
    assert 100 in policy._main
    _stream(policy, range(200, 250), 10)
    assert 100 in policy


def test_s3fifo_main_reinserts_accessed_keys():
    # capacity 10 (S target 1): insert [a, b, c], touch a, b; evict 1 -> a, b move to M, c -> [c]
    policy = insert_all(S3FIFOPolicy(10, clock=FakeClock()), ["a", "b", "c"])
    policy.touch(["a", "b"])
    assert policy.evict(1) == ["c"]
    # M = [a, b], both freq 0; touch a -> evict 1 -> [b] (a goes round again, freq back to 0)
    policy.touch(["a"])
    assert policy.evict(1) == ["b"]
    assert policy.evict(1) == ["a"]


def test_s3fifo_frequency_is_capped_at_three():
    # M = [a, b]; touch a 10 times (capped at 3) -> b, then a after three more rounds
    policy = insert_all(S3FIFOPolicy(10, clock=FakeClock()), ["a", "b", "c"])
    policy.touch(["a", "b"])
    policy.evict(1)
    policy.touch(["a"] * 10)
    assert policy._main["a"] == 3
    assert policy.evict(2) == ["b", "a"]


@pytest.mark.parametrize(
    "options, match",
    [({"small_ratio": 0}, "small_ratio"), ({"small_ratio": 1.5}, "small_ratio"),
     ({"ghost_ratio": -1}, "ghost_ratio"), ({"move_to_main_threshold": 0}, "move_to_main_threshold")],
)
def test_s3fifo_rejects_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        S3FIFOPolicy(10, **options)


# -------------------------------------------------------------------- prefix

def chain(policy, keys, parent=None):
    for position, key in enumerate(keys):
        policy.insert(key, Hints(parent=parent, position=position))
        parent = key
    return policy


def test_prefix_evicts_leaves_first():
    # insert 1, 2 (parent 1), 3 (parent 2), 4 (parent 1): leaves 3, 4
    # evict 4 -> [3, 2, 4, 1]: 3 is the oldest leaf, then 2 becomes a leaf older than 4; 1 goes last
    policy = chain(PrefixPolicy(8, clock=FakeClock()), [1, 2, 3])
    policy.insert(4, Hints(parent=1, position=1))
    assert PrefixPolicy.wants_structure
    assert policy.evict(4) == [3, 2, 4, 1]


def test_prefix_lru_among_leaves():
    # two sequences a0-a1 and b0-b1, touch a-path -> b1, b0 go first (LRU among leaves)
    policy = chain(PrefixPolicy(8, clock=FakeClock()), ["a0", "a1"])
    chain(policy, ["b0", "b1"])
    policy.touch(["a0", "a1"])
    assert policy.evict(2) == ["b1", "b0"]


@pytest.mark.parametrize("native", [True, False])
def test_prefix_a_protected_leaf_leaves_its_parent_evictable_when_no_leaf_is_left(native):
    # insert 1, 2 (parent 1), 3 (parent 2); evict 1 with 3 protected -> no unprotected leaf, so
    # the oldest unprotected inner block goes: [1] (2 stays, an orphan; 3 still its child)
    policy = chain(PrefixPolicy(8, clock=FakeClock(), native=native), [1, 2, 3])
    assert policy.evict(1, {3}) == [1]
    assert len(policy) == 2 and 2 in policy and 3 in policy
    # 2 is still inner (3's parent): with 3 protected it goes next; then nothing is left
    assert policy.evict(1, {3}) == [2]
    assert policy.evict(1, {3}) is None and len(policy) == 1
    # once released, 3 is a plain leaf
    assert policy.evict(1) == [3] and len(policy) == 0


@pytest.mark.parametrize("native", [True, False])
def test_prefix_parents_linked_in_a_cycle_are_evicted(native):
    # a client names parents: 1's parent 2, then 2's parent 1 -> neither is ever a leaf; a tier
    # full of such pairs must still give room, oldest first
    policy = PrefixPolicy(4, clock=FakeClock(), native=native)
    policy.insert(1, Hints(parent=2))
    policy.insert(2, Hints(parent=1))
    policy.insert(3, Hints(parent=4))
    policy.insert(4, Hints(parent=3))
    assert policy.evict(1) == [1]  # then 2 has no tracked child: a leaf, the oldest
    assert policy.evict(2) == [2, 3]
    assert policy.evict(1) == [4] and len(policy) == 0


def test_prefix_failed_evict_undoes_its_cascade():
    # insert 1, 2 (parent 1), 3 (alone, protected); evict 3 -> None after trying 2 then 1;
    # nothing changed: evict 2 -> [2, 1]
    policy = chain(PrefixPolicy(8, clock=FakeClock()), [1, 2])
    policy.insert(3)
    assert policy.evict(3, {3}) is None
    assert len(policy) == 3 and all(k in policy for k in (1, 2, 3))
    assert policy.evict(2, {3}) == [2, 1]


def test_prefix_remove_of_inner_node_orphans_children():
    # chain 1-2-3; remove 2 -> 1 is a leaf again and 3 an evictable orphan -> evict 2 -> [1, 3]
    policy = chain(PrefixPolicy(8, clock=FakeClock()), [1, 2, 3])
    policy.remove(2)
    assert policy.evict(2) == [1, 3]


def test_prefix_parent_elsewhere_and_parent_arriving_later():
    # 5's parent 99 is not in this tier: 5 is a leaf -> evict 1 -> [5]
    policy = PrefixPolicy(8, clock=FakeClock())
    policy.insert(5, Hints(parent=99))
    assert policy.evict(1) == [5]
    # 2 (parent 1) arrives before 1: when 1 arrives it is an inner block -> evict 1 -> [2]
    policy.insert(2, Hints(parent=1))
    policy.insert(1)
    assert policy.evict(1) == [2]


# -------------------------------------------------------------------- belady

def belady(future, capacity=8):
    cursor = SimpleNamespace(r=0)
    return BeladyPolicy(capacity, future=future, now=lambda: cursor.r), cursor


def test_belady_evicts_the_farthest_next_use():
    # future [[1, 2, 3], [1], [2], [3]]; at request 0 holding 1, 2, 3 -> evict 3 -> [3, 2, 1]
    policy, _ = belady([[1, 2, 3], [1], [2], [3]])
    insert_all(policy, [1, 2, 3])
    assert policy.evict(3) == [3, 2, 1]
    assert BeladyPolicy.simulation_only


def test_belady_never_used_again_goes_first():
    # future [[1, 2, 4], [1], [2]]: 4 is never used again -> evict 1 -> [4]
    policy, _ = belady([[1, 2, 4], [1], [2]])
    insert_all(policy, [1, 2, 4])
    assert policy.evict(1) == [4]


def test_belady_keys_outside_the_future_go_first():
    # future [[1, 2]]: 7 is not in the trace at all -> evict 1 -> [7]
    policy, _ = belady([[1, 2], [1, 2]])
    insert_all(policy, [1, 7, 2])
    assert policy.next_use(7) == (2, 0)
    assert policy.evict(1) == [7]


def test_belady_ties_go_to_the_later_block_position():
    # future [[1, 2, 3], [1], [3, 2]]: 2 and 3 are both next used by request 2, 2 later in it
    policy, _ = belady([[1, 2, 3], [1], [3, 2]])
    insert_all(policy, [1, 2, 3])
    assert policy.evict(2) == [2, 3]


def test_belady_rereads_next_use_as_time_passes():
    # future [[1, 2], [1], [2], [1]]: at request 0 -> 2 is farther (request 2 vs 1)
    # at request 1, 1 was served elsewhere (no touch here): its next use is now request 3 -> evict 1 -> [1]
    policy, cursor = belady([[1, 2], [1], [2], [1]])
    insert_all(policy, [1, 2])
    assert policy.next_use(2) == (2, 0)
    cursor.r = 1
    assert policy.evict(1) == [1]
    cursor.r = 3
    assert policy.next_use(2) == (4, 0)  # never again: one past the last request


def test_belady_next_use_on_a_large_trace():
    # 300k accesses (build speed is measured in bench/, not asserted here)
    rng = random.Random(1)
    future = [[rng.randrange(200_000) for _ in range(25)] for _ in range(12_000)]
    p = BeladyPolicy(10_000, future=future, now=lambda: 0)
    key = future[5000][3]
    first = next(r for r in range(1, len(future)) if key in future[r])
    assert p.next_use(key, 0)[0] == first
    assert p.next_use(-1, 0)[0] == len(future)  # never used again: later than any request


def test_belady_needs_a_callable_now():
    with pytest.raises(TypeError, match="now"):
        BeladyPolicy(8, future=[], now=0)


TRACE = _ROOT / "kvbm" / "sim" / "data" / "mooncake_conversation.jsonl"  # bundled: never skipped


@pytest.mark.slow
@pytest.mark.parametrize("capacity, expected", [(1_000, 0.191), (10_000, 0.366)])
def test_belady_reproduces_the_trace_ceiling(capacity, expected):
    # README semantics: look every block up, then touch hits / insert misses in block order,
    # evicting one block per insert at capacity
    future = [json.loads(line)["hash_ids"] for line in TRACE.open()]
    cursor = SimpleNamespace(r=0)
    policy = BeladyPolicy(capacity, future=future, now=lambda: cursor.r)
    hits = total = 0
    for cursor.r, keys in enumerate(future):
        hits += sum(key in policy for key in keys)
        total += len(keys)
        for key in keys:
            if key in policy:
                policy.touch((key,))
                continue
            if len(policy) >= capacity:
                policy.evict(1)
            policy.insert(key)
    assert hits / total == pytest.approx(expected, abs=5e-4)


# -------------------------------------------------------------------- admission

def test_always_admits():
    assert AlwaysAdmission().admit("k") and AlwaysAdmission().admit("k", Hints(priority=0))


def test_n_hit_admits_after_n_observations():
    # n=2: observe [1] -> refuse 1; observe [1] -> admit 1; forget 1 -> refuse 1
    policy = NHitAdmission()
    assert policy.observes and policy.n == 2
    policy.observe([1])
    assert not policy.admit(1)
    policy.observe([1, 2])
    assert policy.admit(1) and not policy.admit(2)
    policy.forget(1)
    assert not policy.admit(1)


def test_n_hit_table_is_bounded():
    # max_tracked=2: observe [1, 1, 2, 3] -> 1 is the least recently observed and forgotten
    policy = NHitAdmission(n=1, max_tracked=2)
    policy.observe([1, 1, 2, 3])
    assert (policy.count(1), policy.count(2), policy.count(3)) == (0, 1, 1)
    policy.observe([2, 4])  # 3 is now the oldest
    assert not policy.admit(3) and policy.admit(2) and policy.admit(4)


@pytest.mark.parametrize("options, match", [({"n": 0}, "n="), ({"max_tracked": 0}, "max_tracked")])
def test_n_hit_rejects_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        NHitAdmission(**options)


def test_priority_floor():
    # floor 50: p=80 in, p=35 out, no hints (default 35) out; default floor 35 admits no hints
    policy = PriorityFloorAdmission(floor=50)
    assert policy.admit(1, Hints(priority=80)) and policy.admit(1, Hints(priority=50))
    assert not policy.admit(1, Hints(priority=35)) and not policy.admit(1)
    assert PriorityFloorAdmission().admit(1) and not PriorityFloorAdmission().admit(1, Hints(priority=34))
    with pytest.raises(ValueError, match="floor"):
        PriorityFloorAdmission(floor=101)
