"""Second chance: admit a block that was reused, or that is offered a second time; remember the rest.

Every block written to an NVMe tier costs endurance whether or not it is read again, and on KV
traffic most blocks are never read again (76 % of the Mooncake trace's distinct blocks are used
once). A block evicted from the tier above for the first time without ever having been hit is
refused, and its key kept as a *ghost*; if the block is evicted again while its ghost is
remembered (it was recomputed, so it did come back), it is admitted. A block that was hit
(loaded) anywhere is admitted at once. This is cache-on-second-hit (Maggs and Sitaraman,
"Algorithmic Nuggets in Content Delivery", SIGCOMM CCR 2015) with the ghost history of ARC
(Megiddo and Modha, FAST'03) standing in for the second request, as flash caches do to spare
writes (CacheLib's admission policies; Berg et al., "The CacheLib Caching Engine", OSDI'20).

    observe(keys)   keys that were hit: remembered as reused (bounded, least recent out first)
    admit(key)      reused, or a ghost (second offer): True; else remember it as a ghost
    forget(key)     nothing: a ghost must outlive the block to be useful
    memory          at most `max_tracked` reused keys and `max_tracked` ghosts

Trade-off (bench/RESULTS.md, "Admission that spares the SSD"): it writes far fewer blocks but
loses the first reuse of every block that comes back only after leaving the tier above, which
on chat traffic is most of what a large G3 serves. It is therefore not the default; `always`
is, and the simulator reports what each choice writes (`kvbm simulate --json`).
"""

from __future__ import annotations

from collections import OrderedDict

from ..base import AdmissionPolicy


class SecondChanceAdmission(AdmissionPolicy):
    name = "second_chance"
    observes = True
    remembers_offers = True  # admit() records a first offer as a ghost: not pure, by design

    def __init__(self, *, max_tracked=1 << 18, **kw):
        super().__init__(**kw)
        if isinstance(max_tracked, bool) or not isinstance(max_tracked, int) or max_tracked < 1:
            raise ValueError(f"second_chance admission: max_tracked={max_tracked!r} must be an int >= 1")
        self.max_tracked = max_tracked
        self._reused: OrderedDict = OrderedDict()
        self._ghosts: OrderedDict = OrderedDict()

    def observe(self, keys):
        reused = self._reused
        for key in keys:
            reused[key] = None
            reused.move_to_end(key)
        while len(reused) > self.max_tracked:
            reused.popitem(last=False)

    def admit(self, key, hints=None):
        if key in self._reused:
            return True
        if self._ghosts.pop(key, 0) is None:
            return True
        self._ghosts[key] = None
        if len(self._ghosts) > self.max_tracked:
            self._ghosts.popitem(last=False)
        return False
