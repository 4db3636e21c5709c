"""Least recently used: evict the key whose last access is oldest.

The classic baseline (Mattson et al., 1970). One OrderedDict: the front is the oldest key.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from itertools import filterfalse, islice

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
        order = self._order
        for key in keys:  # new keys land at the MRU end, in order (a loop beats update())
            order[key] = None

    def touch(self, keys):
        if not isinstance(keys, (list, tuple)):
            keys = list(keys)
        move = self._order.move_to_end
        try:  # the usual case, every key known
            if len(keys) > 16:  # one C-level pass; a plain loop wins on short runs
                deque(map(move, keys), maxlen=0)
            else:
                for key in keys:
                    move(key)
        except KeyError:  # redo in order, skipping unknown keys: the final order is the same
            order = self._order
            for key in keys:
                if key in order:
                    order.move_to_end(key)

    def remove(self, key):
        self._order.pop(key, None)

    def evict(self, n, protected=()):
        if n <= 0:
            return []
        order = self._order
        # The n oldest keys outside `protected`, found at C speed (islice stops at the n-th).
        victims = list(islice(order if not protected else filterfalse(protected.__contains__, order), n))
        if len(victims) < n:
            return None
        for key in victims:
            del order[key]
        return victims

    def __len__(self):
        return len(self._order)

    def __contains__(self, key):
        return key in self._order
