"""Long stores: blocks protected through many evict() calls are not walked past every time.

A manager storing a 10,000-block request run by run keeps the run's earlier blocks protected
(busy) until it completes; s3fifo and frequency used to pop and push them back on every call.
"""

import kvbm.policies._lazyheap as lazyheap
from kvbm.policies.frequency import FrequencyPolicy
from kvbm.policies.s3fifo import S3FIFOPolicy


def test_s3fifo_parks_protected_keys_and_still_tracks_them():
    p = S3FIFOPolicy(10)
    for k in range(10):
        p.insert(k)
    busy = set(range(5))
    # evict 5 with 0..4 busy -> 5 (0..4 parked beside the queues, still tracked)
    assert p.evict(1, busy) == [5]
    assert len(p) == 9 and all(k in p for k in busy) and set(p._parked) == busy
    p.touch([0])  # a touch reaches a parked key
    assert p._parked[0][1] == 1
    # the next evict does not look at them again -> 6
    assert p.evict(1, busy) == [6]
    # released: 7, 8, 9 go first, then the parked keys return and 0 (touched) outlives 1..4
    assert p.evict(6, ()) == [7, 8, 9, 1, 2, 3]
    assert not p._parked and len(p) == 2


def test_frequency_does_not_push_protected_entries_through_the_heap_each_call(monkeypatch):
    clock = [0.0]
    p = FrequencyPolicy(3000, clock=lambda: clock[0])
    p.insert_many(list(range(3000)))
    busy = set(range(2000))  # the lowest-weight 2000 keys are busy
    pops = [0]
    real = lazyheap.heappop

    def counting(heap):
        pops[0] += 1
        return real(heap)

    monkeypatch.setattr(lazyheap, "heappop", counting)
    victims = [p.evict(1, busy)[0] for _ in range(200)]
    assert not busy & set(victims) and len(set(victims)) == 200
    assert pops[0] < 2000 + 2 * 200  # once past each busy entry, not once per call (400,000)
