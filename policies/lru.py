"""Least recently used: evict the key whose last access is oldest.

The classic baseline (Mattson et al., 1970). One OrderedDict: the front is the oldest key.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from .base import EvictionPolicy


class LRUPolicy(EvictionPolicy):
    name = "lru"

    def __init__(self, capacity, **kw):
        super().__init__(capacity, **kw)
        self._order: OrderedDict = OrderedDict()

    def insert(self, key, hints=None):
        self._order[key] = None
        self._order.move_to_end(key)

    def insert_many(self, keys, hints=None):
        self._order.update(dict.fromkeys(keys))  # new keys land at the MRU end, in order

    def touch(self, keys):
        if not isinstance(keys, (list, tuple)):
            keys = list(keys)
        try:  # the usual case, every key known: one C-level pass
            deque(map(self._order.move_to_end, keys), maxlen=0)
        except KeyError:  # redo in order, skipping unknown keys: the final order is the same
            order = self._order
            for key in keys:
                if key in order:
                    order.move_to_end(key)

    def remove(self, key):
        self._order.pop(key, None)

    def evict(self, n, protected=()):
        victims = []
        if n <= 0:
            return victims
        order = self._order
        if not protected and n <= len(order):
            return [order.popitem(last=False)[0] for _ in range(n)]
        for key in self._order:
            if key not in protected:
                victims.append(key)
                if len(victims) == n:
                    break
        else:
            return None
        for key in victims:
            del self._order[key]
        return victims

    def __len__(self):
        return len(self._order)

    def __contains__(self, key):
        return key in self._order
