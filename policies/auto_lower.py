"""Auto below the first tier: LRU, the one candidate never far below the best on a demotion-fed tier.

A tier below the first (G3, G4) is fed by the cascade: one demoted block per insert, its parent
usually above, and (exclusive mode, the default) a hit there is a promotion that *removes* the
block; the tier never sees a touch, and it never sees a miss (a block it dropped is fetched
anew into the first tier). What `auto` does on the first tier cannot work there:

    minis      they count a hit only when a block they still hold is demoted again, and read each
               demotion as a request: the first tier's auto on G3 chose s3fifo or hitdensity,
               which are far below lru there (bench/eval_lower_tier.py, tune rows, G2 auto at
               1/2/5 % of the distinct blocks over G3 at 4x and 10x G2: auto up to 0.053 below
               the best of lru/arc/s3fifo/prefix, 15 of 24 cells more than 0.002 below; s3fifo up
               to 0.20, hitdensity 0.052)
    shadows    a full-scale shadow of the other candidate, scored by the promotions it would have
               served, does not work either (session 11, tried and dropped): the shadow's hits on
               blocks the real tier had dropped are seen only when those blocks come down again,
               late or never, so the active policy always looks better than it is. On agent
               traffic (G2 1 %, G3 10x) the real tiers differ by 0.043 (lru 0.3633, prefix
               0.3203: G3 prefix hits 35,520 vs 30,720), yet a prefix tier's lru shadow scored
               fewer hits than the tier itself; with a ghost of the shadow's evictions dated by
               how long served blocks stay above, it swapped back and forth six times (0.3197)

Only lru (nothing is touched: the oldest demotion goes first) and `prefix` (leaf first) lead on
that grid, and neither everywhere: prefix is at or above lru in 22 of 24 tune cells (by up to
0.0125) but 0.043 below lru on agent traffic with a small G2 and a large G3 (and 0.020 on fan-out agents); lru is
more than 0.002 below the best in 6 of 24, by at most 0.0124. With no measurement to choose by,
auto below the first tier is lru: never worse than lru, at lru's memory (179 B per resident key
on a G3 of 100,000 blocks; the first tier's auto there 389 B). Left open: the held-out rows favour
prefix (3 of 48 cells more than 0.002 below the best, worst 0.0157; lru 17, worst 0.0215), so a
leaf-first policy without prefix's loss on agent traffic behind a small G2 would do better. It takes the first
tier's options (candidates, sample_slots, start) and ignores them.

Built by AutoPolicy(capacity, below=True); KVBMConfig gives `below` to every `auto` below the
first tier (the default eviction of every tier is `auto`).
"""

from __future__ import annotations

from .lru import LRUPolicy


class LowerTierAuto(LRUPolicy):
    name = "auto"
    below = True
    active = "lru"

    def __init__(self, capacity, *, candidates=None, start=None, sample_slots=None, **kw):
        super().__init__(capacity, **kw)  # the first tier's options: no choice to make here
