"""Belady's offline optimum: evict the key whose next use lies farthest in the future.

Belady, "A study of replacement algorithms for a virtual-storage computer", IBM Systems
Journal 5(2), 1966 (MIN). No online policy can beat its hit ratio, so the simulator uses it as
the ceiling a real policy is measured against. It needs the whole trace: simulator only.

    future    the trace: one sequence of keys per request, in block order
    now()     the index of the request being replayed
    next use  of key k at request r: the first request after r that holds k (never = inf),
              then k's block position inside that request; the victim has the largest
              (request, position), so among keys next used by the same request the one
              needed last goes first; keys never used again go first, oldest insert first
    bypass    a full cache refuses a new key whose next use is farther than every held key's
              (accepts), as MIN does when the incoming block is the farthest
    cost      occurrence lists per key built once (a 300k-access trace in well under a
              second); a max-heap on next use, and a min-heap of "due" times that re-reads
              next use lazily for keys whose next use has passed without a touch
"""

from __future__ import annotations

from bisect import bisect_right
from heapq import heapify, heappop, heappush

from ._lazyheap import pop_victims
from .base import EvictionPolicy


class BeladyPolicy(EvictionPolicy):
    name = "belady"
    simulation_only = True
    filters_inserts = True  # MIN also chooses not to cache a block needed later than all others

    def __init__(self, capacity, *, future, now, **kw):
        super().__init__(capacity, **kw)
        if not callable(now):
            raise TypeError(f"belady policy: now={now!r} must be a zero-argument callable returning the request index")
        requests: dict = {}  # key -> request indices holding it, ascending
        positions: dict = {}  # key -> its first block position in each of those requests
        r = -1
        for r, keys in enumerate(future):
            for pos, key in enumerate(keys):
                seen = requests.get(key)
                if seen is None:
                    requests[key] = [r]
                    positions[key] = [pos]
                elif seen[-1] != r:
                    seen.append(r)
                    positions[key].append(pos)
        self.now = now
        self._never = r + 1  # later than any request
        self._requests, self._positions = requests, positions
        self._next: dict = {}  # tracked key -> (next request, position, insert seq)
        self._heap: list = []  # (-request, -position, seq, key): farthest next use on top
        self._due: list = []  # (request, seq, key): when that next use stops being the next
        self._seq = 0

    def next_use(self, key, r: int | None = None) -> tuple[int, int]:
        """(request index, block position) of key's next use after request r (default now)."""
        r = self.now() if r is None else r
        found = self._requests.get(key)
        i = -1 if found is None else bisect_right(found, r)
        if i < 0 or i == len(found):
            return self._never, 0
        return found[i], self._positions[key][i]

    def _track(self, key, seq, r) -> None:
        request, position = self.next_use(key, r)
        self._next[key] = (request, position, seq)
        heappush(self._heap, (-request, -position, seq, key))
        if request < self._never:
            heappush(self._due, (request, seq, key))
        if len(self._heap) + len(self._due) > 4 * len(self._next) + 1024:
            self._heap = [(-q, -p, s, k) for k, (q, p, s) in self._next.items()]
            self._due = [(q, s, k) for k, (q, p, s) in self._next.items() if q < self._never]
            heapify(self._heap)
            heapify(self._due)

    def insert(self, key, hints=None):
        self._seq += 1
        self._track(key, self._seq, self.now())

    def touch(self, keys):
        r, tracked = self.now(), self._next
        for key in keys:
            state = tracked.get(key)
            if state is not None and state[0] <= r:
                self._track(key, state[2], r)

    def remove(self, key):
        self._next.pop(key, None)

    def _refresh(self, r) -> None:
        """Re-read next uses that have passed without a touch."""
        tracked = self._next
        while self._due and self._due[0][0] <= r:
            request, seq, key = heappop(self._due)
            state = tracked.get(key)
            if state is not None and state[0] == request and state[2] == seq:
                self._track(key, seq, r)

    def accepts(self, key, hints=None):
        """Bypass: a full cache takes a new key only if it is needed before the farthest one held."""
        if len(self._next) < self.capacity:
            return True
        r = self.now()
        self._refresh(r)
        heap, tracked = self._heap, self._next
        while heap:
            request, position, seq, top = heap[0]
            if tracked.get(top) == (-request, -position, seq):
                return self.next_use(key, r) < (-request, -position)
            heappop(heap)  # stale entry
        return True

    def evict(self, n, protected=()):
        if n <= 0:
            return []
        tracked = self._next
        self._refresh(self.now())
        victims = pop_victims(self._heap, n, protected,
                              lambda it: tracked.get(it[3]) == (-it[0], -it[1], it[2]))
        if victims is None:
            return None
        for item in victims:
            del tracked[item[3]]
        return [item[3] for item in victims]

    def __len__(self):
        return len(self._next)

    def __contains__(self, key):
        return key in self._next
