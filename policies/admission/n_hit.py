"""N-hit admission: admit a key only once it has been accessed at least n times.

A one-hit wonder offered to a flash tier costs a write and wears the device for nothing.
Counting accesses first is the classic filter: Maggs and Sitaraman, "Algorithmic Nuggets in
Content Delivery", SIGCOMM CCR 45(3), 2015 (Akamai's cache-on-second-hit rule); the same
idea as the admission step of TinyLFU (Einziger et al., ACM ToS 2017), kept exact here.

    observe(keys)   count one access per key (the manager calls it on every lookup)
    admit(key)      count >= n
    forget(key)     drop the key's count (it left the whole hierarchy)
    memory          at most max_tracked counters; the least recently observed key is
                    forgotten first, so a burst of cold keys cannot grow the table
"""

from __future__ import annotations

from collections import OrderedDict

from ..base import AdmissionPolicy


class NHitAdmission(AdmissionPolicy):
    name = "n_hit"
    observes = True

    def __init__(self, *, n=2, max_tracked=1 << 18, **kw):
        super().__init__(**kw)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n_hit admission: n={n!r} must be an int >= 1")
        if isinstance(max_tracked, bool) or not isinstance(max_tracked, int) or max_tracked < 1:
            raise ValueError(f"n_hit admission: max_tracked={max_tracked!r} must be an int >= 1")
        self.n = n
        self.max_tracked = max_tracked
        self._counts: OrderedDict = OrderedDict()  # key -> accesses, least recently observed first

    def count(self, key) -> int:
        return self._counts.get(key, 0)

    def observe(self, keys):
        counts = self._counts
        for key in keys:
            counts[key] = counts.get(key, 0) + 1
            counts.move_to_end(key)
        while len(counts) > self.max_tracked:
            counts.popitem(last=False)

    def admit(self, key, hints=None):
        return self._counts.get(key, 0) >= self.n

    def forget(self, key):
        self._counts.pop(key, None)
