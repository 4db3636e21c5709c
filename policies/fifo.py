"""First in, first out: evict the key inserted longest ago; accesses change nothing.

The cheapest policy and a common baseline for flash caches (see S3-FIFO, SOSP'23).
"""

from __future__ import annotations

from collections import OrderedDict

from .base import EvictionPolicy


class FIFOPolicy(EvictionPolicy):
    name = "fifo"

    def __init__(self, capacity, **kw):
        super().__init__(capacity, **kw)
        self._order: OrderedDict = OrderedDict()

    def insert(self, key, hints=None):
        self._order[key] = None

    def insert_many(self, keys, hints=None):
        self._order.update(dict.fromkeys(keys))

    def touch(self, keys):
        pass

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
