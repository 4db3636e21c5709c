"""First in, first out: evict the key inserted longest ago; accesses change nothing.

The cheapest policy and a common baseline for flash caches (see S3-FIFO, SOSP'23).
"""

from __future__ import annotations

from collections import OrderedDict
from itertools import filterfalse, islice

from .base import EvictionPolicy


class FIFOPolicy(EvictionPolicy):
    name = "fifo"

    def __init__(self, capacity, **kw):
        super().__init__(capacity, **kw)
        self._order: OrderedDict = OrderedDict()

    def insert(self, key, hints=None):
        self._order[key] = None

    def insert_many(self, keys, hints=None):
        order = self._order
        for key in keys:  # a loop beats OrderedDict.update()
            order[key] = None

    def touch(self, keys):
        pass

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
