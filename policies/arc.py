"""Adaptive Replacement Cache: balance recency against frequency with ghost lists that learn.

Megiddo and Modha, "ARC: A Self-Tuning, Low Overhead Replacement Cache", FAST'03.

    T1   resident keys seen once recently (LRU order)       B1   ghosts evicted from T1
    T2   resident keys seen at least twice (LRU order)      B2   ghosts evicted from T2
    p    target size of T1, in 0..capacity

    touch    a hit in T1 or T2 moves the key to T2's MRU end
    insert   a miss: into T1; a ghost hit in B1 grows p by max(1, |B2|/|B1|) (recency was
             undervalued), in B2 shrinks p by max(1, |B1|/|B2|); either way the key enters T2
    evict    REPLACE: take T1's LRU while |T1| > p (or T2 has nothing to give), else T2's;
             the victim's key is kept as a ghost in B1 or B2
    ghosts   |T1| + |B1| <= capacity and |B1| + |B2| <= capacity, oldest ghosts dropped first

Departure from the paper: the manager evicts before it inserts, so REPLACE cannot see the
incoming key and the tie case "x in B2 and |T1| == p" evicts from T2 rather than T1.
"""

from __future__ import annotations

from collections import OrderedDict

from .base import EvictionPolicy


class ARCPolicy(EvictionPolicy):
    name = "arc"

    def __init__(self, capacity, **kw):
        super().__init__(capacity, **kw)
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"arc policy: capacity={capacity!r} must be an int >= 0 (it sizes the ghost lists)")
        self.p = 0.0
        self._t1: OrderedDict = OrderedDict()
        self._t2: OrderedDict = OrderedDict()
        self._b1: OrderedDict = OrderedDict()
        self._b2: OrderedDict = OrderedDict()

    def insert(self, key, hints=None):
        if key in self._t1 or key in self._t2:
            self.touch((key,))
            return
        b1, b2 = self._b1, self._b2
        if key in b1:
            self.p = min(float(self.capacity), self.p + max(1.0, len(b2) / len(b1)))
            del b1[key]
            self._t2[key] = None
        elif key in b2:
            self.p = max(0.0, self.p - max(1.0, len(b1) / len(b2)))
            del b2[key]
            self._t2[key] = None
        else:
            self._t1[key] = None
        self._trim_ghosts()

    def touch(self, keys):
        t1, t2 = self._t1, self._t2
        for key in keys:
            if key in t2:
                t2.move_to_end(key)
            elif key in t1:
                del t1[key]
                t2[key] = None

    def remove(self, key):
        for queue in (self._t1, self._t2, self._b1, self._b2):
            queue.pop(key, None)

    def evict(self, n, protected=()):
        if n <= 0:
            return []
        if protected and not isinstance(protected, (set, frozenset, dict)):
            protected = set(protected)
        # Plan without touching state (atomic), then apply.
        old1 = (k for k in self._t1 if k not in protected)
        old2 = (k for k in self._t2 if k not in protected)
        next1, next2 = next(old1, _NONE), next(old2, _NONE)
        size1, plan = len(self._t1), []
        while len(plan) < n:
            if next1 is not _NONE and (size1 > self.p or next2 is _NONE):
                plan.append((next1, True))
                size1 -= 1
                next1 = next(old1, _NONE)
            elif next2 is not _NONE:
                plan.append((next2, False))
                next2 = next(old2, _NONE)
            else:
                return None
        for key, from_t1 in plan:
            if from_t1:
                del self._t1[key]
                self._b1[key] = None
            else:
                del self._t2[key]
                self._b2[key] = None
        self._trim_ghosts()
        return [key for key, _ in plan]

    def _trim_ghosts(self) -> None:
        c, b1, b2 = self.capacity, self._b1, self._b2
        while b1 and len(self._t1) + len(b1) > c:
            b1.popitem(last=False)
        while len(b1) + len(b2) > c:
            (b2 if b2 else b1).popitem(last=False)

    def __len__(self):
        return len(self._t1) + len(self._t2)

    def __contains__(self, key):
        return key in self._t1 or key in self._t2


_NONE = object()
