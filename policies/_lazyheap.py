"""Atomic victim selection from a lazy-deletion heap (shared by the heap-based policies).

Entries are tuples whose last element is the key; an entry is *live* while the policy's
own state still matches it (stale entries stay in the heap until popped).
"""

from __future__ import annotations

from heapq import heappop, heappush
from typing import Any, Callable, Collection


def pop_victims(heap: list, n: int, protected: Collection[Any],
                live: Callable[[tuple], bool], parked: dict | None = None) -> list[tuple] | None:
    """Pop the n smallest live entries whose keys are not protected; None (heap unchanged
    in content) if there are fewer. Protected entries are pushed back, or, given `parked` (a
    dict key -> entry the policy keeps, and clears when it rebuilds its heap), set aside there
    until a later call finds them unprotected: a manager that stores a long request run by
    run protects the run's blocks in every call, and pushing them through the heap each time
    was quadratic. The parked keys still protected are found by one set difference (C speed),
    not a Python loop over them per call."""
    if protected and not isinstance(protected, (set, frozenset, dict)):
        protected = set(protected)
    if parked:  # set aside by earlier calls: back into the heap once no longer protected
        back = parked.keys() - protected.keys() if isinstance(protected, dict) else (
            parked.keys() - protected if protected else list(parked))
        for key in back:
            heappush(heap, parked.pop(key))
    victims: list = []
    skipped: list = []
    seen: set = set()
    while heap and len(victims) < n:
        item = heappop(heap)
        key = item[-1]
        if key in seen or not live(item):
            continue  # stale: the key was accessed, removed or evicted since
        seen.add(key)
        (skipped if protected and key in protected else victims).append(item)
    if parked is None:
        for item in skipped:
            heappush(heap, item)
    else:
        for item in skipped:
            parked[item[-1]] = item
    if len(victims) < n:
        for item in victims:
            heappush(heap, item)
        return None
    return victims
