"""Atomic victim selection from a lazy-deletion heap (shared by the heap-based policies).

Entries are tuples whose last element is the key; an entry is *live* while the policy's
own state still matches it (stale entries stay in the heap until popped).
"""

from __future__ import annotations

from heapq import heappop, heappush
from typing import Any, Callable, Collection


def pop_victims(heap: list, n: int, protected: Collection[Any],
                live: Callable[[tuple], bool]) -> list[tuple] | None:
    """Pop the n smallest live entries whose keys are not protected; None (heap unchanged
    in content) if there are fewer. Protected entries are pushed back."""
    if protected and not isinstance(protected, (set, frozenset, dict)):
        protected = set(protected)
    victims: list = []
    skipped: list = []
    seen: set = set()
    while heap and len(victims) < n:
        item = heappop(heap)
        key = item[-1]
        if key in seen or not live(item):
            continue  # stale: the key was accessed, removed or evicted since
        seen.add(key)
        (skipped if key in protected else victims).append(item)
    for item in skipped:
        heappush(heap, item)
    if len(victims) < n:
        for item in victims:
            heappush(heap, item)
        return None
    return victims
