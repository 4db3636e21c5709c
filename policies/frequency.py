"""Least frequently used with exponential decay: evict the key whose decayed access count is lowest.

Every access adds 1 to a key's count and every count halves each `half_life` seconds, so a
block that was popular an hour ago does not squat in the tier forever (LFU with aging). This is
LRFU's "combined recency and frequency" value with F(x) = (1/2)^(x / half_life): Lee et al.,
"LRFU: A Spectrum of Policies that Subsumes the LRU and LFU Policies", IEEE Trans. Computers
50(12), 2001. `half_life=math.inf` gives plain LFU.

    weight   w = ln(count at time t) + lambda * t,  lambda = ln 2 / half_life
    decay    count(t') = exp(w - lambda * t'): every key decays alike, so w never changes
             between accesses and the min-heap on w stays valid without rescans
    access   w' = lambda * t + ln(1 + exp(w - lambda * t))      (decayed count + 1)
    ties     equal weights evict the least recently accessed key first

Heap entries are invalidated lazily (an access pushes a new entry); the heap is rebuilt when
stale entries outnumber live ones, so every operation is O(log n) amortized.
"""

from __future__ import annotations

import math
from heapq import heapify, heappush

from ._lazyheap import pop_victims
from .base import EvictionPolicy


def _log1p_exp(d: float) -> float:
    """ln(1 + e**d) without overflow."""
    return d + math.log1p(math.exp(-d)) if d > 0 else math.log1p(math.exp(d))


class FrequencyPolicy(EvictionPolicy):
    name = "frequency"

    def __init__(self, capacity, *, half_life=300.0, **kw):
        super().__init__(capacity, **kw)
        if isinstance(half_life, bool) or not isinstance(half_life, (int, float)) or not half_life > 0:
            raise ValueError(
                f"frequency policy: half_life={half_life!r} must be a number of seconds > 0 "
                f"(math.inf for no decay)"
            )
        self.half_life = float(half_life)
        self._rate = math.log(2) / self.half_life
        self._entry: dict = {}  # key -> (weight, seq) of its live heap entry
        self._heap: list = []  # (weight, seq, key); seq is unique, so keys are never compared
        self._seq = 0
        self._parked: dict = {}  # key -> protected entry set aside by evict (see pop_victims)

    def count(self, key) -> float:
        """The decayed access count of `key` now (0.0 if unknown)."""
        entry = self._entry.get(key)
        return 0.0 if entry is None else math.exp(entry[0] - self._rate * self.clock())

    def _access(self, key, entry) -> None:
        base = self._rate * self.clock()
        weight = base if entry is None else base + _log1p_exp(entry[0] - base)
        self._seq += 1
        self._entry[key] = (weight, self._seq)
        heappush(self._heap, (weight, self._seq, key))
        if len(self._heap) + len(self._parked) > 2 * len(self._entry) + 1024:
            self._heap = [(w, s, k) for k, (w, s) in self._entry.items()]
            heapify(self._heap)
            self._parked.clear()

    def insert(self, key, hints=None):
        self._access(key, self._entry.get(key))

    def touch(self, keys):
        # _access inlined: one clock read per call (it does not move within a call), no call
        # per key; a long request touches thousands of keys at once
        entries, heap = self._entry, self._heap
        base = self._rate * self.clock()
        seq = self._seq
        for key in keys:
            entry = entries.get(key)
            if entry is None:
                continue
            d = entry[0] - base
            weight = base + (d + math.log1p(math.exp(-d)) if d > 0 else math.log1p(math.exp(d)))
            seq += 1
            entries[key] = (weight, seq)
            heappush(heap, (weight, seq, key))
        self._seq = seq
        if len(heap) + len(self._parked) > 2 * len(entries) + 1024:
            self._heap = [(w, s, k) for k, (w, s) in entries.items()]
            heapify(self._heap)
            self._parked.clear()

    def remove(self, key):
        self._entry.pop(key, None)

    def evict(self, n, protected=()):
        if n <= 0:
            return []
        entries = self._entry
        victims = pop_victims(self._heap, n, protected, lambda it: entries.get(it[2]) == (it[0], it[1]),
                              self._parked)
        if victims is None:
            return None
        for _, _, key in victims:
            del entries[key]
        return [key for _, _, key in victims]

    def __len__(self):
        return len(self._entry)

    def __contains__(self, key):
        return key in self._entry
