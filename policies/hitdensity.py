"""Hit density: evict the block whose class expects the fewest future hits per slot and unit of time.

A KV block earns its slot only if its sequence comes back while it is cached. Whether and when
that happens is not a property of one block but of its kind. Most blocks are one-hit wonders
(S3-FIFO, Yang et al., SOSP'23): 76 % of the distinct blocks of the Mooncake conversation trace
(FAST'25) are used once, while a block used before returns far more often (24 % of first uses
are followed by another, 42 % of second uses, 50 % of third). The partial last block of a
prompt is rehashed by the next turn, so it almost never returns (1 % of them, against 38 % of
other blocks). Reuse times are ephemeral but, within a request category, regular ("KVCache
Cache in the Wild", Wang et al., ATC'25). So the policy sorts blocks into four classes and *learns online*, per class, how the
chance of a reuse varies with age; it then evicts where the expected hits per slot-time are
lowest. This is LHD's hit density (Beckmann, Chen and Cidon, "LHD: Improving Cache Hit Rate by
Maximizing Hit Density", NSDI'18) with three changes for KV caches: KV classes, ghost lifetimes,
and the best horizon instead of the whole remaining life.

    classes   tail: last block of a stored batch (the partial block the next turn replaces);
              new: a body block not reused yet; once: reused once; many: reused twice or more.
              One LRU queue per class, keyed by the time of last access.
    time      counted in inserts (misses), the unit of eviction pressure: deterministic, no clock.
    ghosts    an evicted block leaves a ghost (class, last access) for `capacity` evictions, as
              ARC and S3-FIFO keep history beyond residency. A ghost that is inserted again is a
              reuse its class would have earned had it kept the block longer; it re-enters as
              once/many (its reuse count survives eviction, as in TinyLFU).
    learning  per class and age bucket (2 per octave): reuses, and lives that ended (reuse,
              ghost expiry, removal). Survival analysis gives the exposure (slot-time) spent at
              each age; counts halve every 8 cache turnovers so the tables follow the workload.
    index     for class c at age a: max over horizons h of reuses(a..h) / exposure(a..h), the
              Gittins index of keeping the block (Gittins, J. R. Stat. Soc. B 41, 1979) with the
              slot-time as cost. Unlike LHD's whole-life average it does not undervalue a young
              block whose reuse is still to come (a user reads before replying), nor overvalue
              an old one. Linear between bucket starts; recomputed 4 times a turnover.
    evict     compare the oldest unprotected block of each class; take the lowest index (the
              older one on ties). Before any statistics exist every index is 0: plain LRU.
    touch     in reverse order, so a sequence's first block is the most recent one: among blocks
              of one request the deepest goes first (a child is useless without its parent).

Why these defaults (fixed, not fitted to a trace):
    4 classes      the two reuse signals KV traces show everywhere (reuse count, partial tail);
                   more classes split the statistics without a gain (tried: request size,
                   continuation turn). Since every class is learned, a class that does not
                   differ on a workload (tails in a trace where the tail block keeps its id)
                   simply gets the same index as the others.
    ghosts = capacity  ARC's bound: it observes each class up to about twice its resident life,
                   enough to see the reuses a longer retention would win.
    2 buckets per octave  ages span 5 decades; half-octave steps give ~20 % age resolution with
                   enough samples per bucket (LHD coarsens ages the same way).
    half-life 8 turnovers  a life lasts up to ~2 turnovers (resident + ghost); the statistics
                   must hold several lives per bucket yet follow load changes within minutes.
    update every capacity/4 inserts (at least 256)  fresh tables within a fraction of a lifetime,
                   while the O(classes x buckets^2) recomputation stays cheap per insert.

Tried without a gain that held across capacities and the synthetic traces (Mooncake prefix hit
ratio at 10,000 blocks stays in 0.233-0.2345 against 0.2339 here): depth-in-batch and
absolute-position classes, a class for the deep blocks of follow-on requests, the parent's
class as a per-conversation feature, splitting reused blocks by their previous reuse gap,
ghosts at 0.5x/2x/4x capacity, LHD's whole-life density instead of the Gittins index,
shrinking sparse indices, wall-clock ages, reversed insert order, a class for orphans (blocks
whose parent was evicted), evicting from the young end of a queue. One real signal: when a
new request branches off a prefix used by one conversation, that conversation's other
continuation is almost never reused (0.3 %); marking it "passed" helped Mooncake at 30k
(+0.002-0.0045) but cost the synthetic agent trace 8 % at 2 % capacity, so it is not in.
At 10k most of the gap to Belady is blocks evicted before their *first* return 4k-32k inserts
later, which nothing known at insert time separates from one-hit wonders.

Costs: insert, touch and remove O(1); evict O(1) per victim (4 queue heads, plus protected keys
skipped); a table update O(classes x 64^2) at most every 256 inserts. `insert_many` marks the last key of the batch as the tail; a
key inserted alone (a demotion, a hinted store) is a body block.
"""

from __future__ import annotations

from collections import OrderedDict

from .base import EvictionPolicy

TAIL, NEW, ONCE, MANY = range(4)
CLASSES = ("tail", "new", "once", "many")
_BUCKETS = 64  # ages up to 2**32 inserts
_HALF_LIFE_UPDATES = 32  # 32 updates of capacity/4 inserts = 8 turnovers
_MIN_PERIOD = 256


def _bucket(age: int) -> int:
    """Age bucket: 0..3 exactly, then two buckets per octave ([4,6) [6,8) [8,12) [12,16) ...)."""
    if age < 4:
        return age if age > 0 else 0
    b = age.bit_length()
    return min(_BUCKETS - 1, 2 * b - 2 + ((age >> (b - 2)) & 1))


def _start(b: int) -> int:
    if b < 4:
        return b
    octave, half = divmod(b + 2, 2)
    return (1 << (octave - 1)) + half * (1 << (octave - 2))


_STARTS = [_start(b) for b in range(_BUCKETS + 1)]
_WIDTH = [max(1, _STARTS[b + 1] - _STARTS[b]) for b in range(_BUCKETS)]


class HitDensityPolicy(EvictionPolicy):
    name = "hitdensity"

    def __init__(self, capacity, **kw):
        super().__init__(capacity, **kw)
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"hitdensity policy: capacity={capacity!r} must be an int >= 0 (it sizes the ghosts)")
        self._queues = [OrderedDict() for _ in CLASSES]  # key -> insert count at last access
        self._class: dict = {}
        self._ghosts: OrderedDict = OrderedDict()  # key -> (class, last access)
        self._max_ghosts = max(1, capacity)
        self._now = 0  # inserts so far: the policy's clock
        self._reuses = [[0.0] * _BUCKETS for _ in CLASSES]
        self._ends = [[0.0] * _BUCKETS for _ in CLASSES]
        self._index = [[0.0] * _BUCKETS for _ in CLASSES]
        self._period = max(_MIN_PERIOD, capacity // 4)
        self._next_update = self._period
        self._updates = 0

    # ---------------------------------------------------------------- verbs

    def insert(self, key, hints=None):
        self._insert(key)

    def insert_many(self, keys, hints=None):
        cls = key = None
        for key in keys:
            cls = self._insert(key)
        if cls == NEW:  # the batch's last block: the partial one the next turn replaces
            self._queues[TAIL][key] = self._queues[NEW].pop(key)
            self._class[key] = TAIL

    def touch(self, keys):
        now, klass, queues = self._now, self._class, self._queues
        reuses, ends = self._reuses, self._ends
        for key in reversed(keys if isinstance(keys, (list, tuple)) else list(keys)):
            c = klass.get(key)
            if c is None:
                continue
            age = now - queues[c].pop(key)
            if age < 4:
                b = age
            else:  # _bucket, inlined on the hottest path
                b = age.bit_length()
                b = min(_BUCKETS - 1, 2 * b - 2 + ((age >> (b - 2)) & 1))
            reuses[c][b] += 1
            ends[c][b] += 1
            c = ONCE if c < ONCE else MANY
            klass[key] = c
            queues[c][key] = now

    def remove(self, key):
        c = self._class.pop(key, None)
        if c is not None:  # observation stops here: a censored life, not a miss
            self._ends[c][_bucket(self._now - self._queues[c].pop(key))] += 1

    def evict(self, n, protected=()):
        if n <= 0:
            return []
        now = self._now
        iters = [iter(q.items()) for q in self._queues]
        heads = [self._head(c, it, protected, now) for c, it in enumerate(iters)]
        victims = []
        while len(victims) < n:
            best = None
            for head in heads:  # (score, last access, class, key); the older wins a tie
                if head is not None and (best is None or head < best):
                    best = head
            if best is None:
                return None  # atomic: nothing has changed yet
            victims.append(best)
            c = best[2]
            heads[c] = self._head(c, iters[c], protected, now)
        return self._forget(victims, now)

    def __len__(self):
        return len(self._class)

    def __contains__(self, key):
        return key in self._class

    def class_of(self, key):
        """"tail", "new", "once" or "many" for a tracked key, else None (for notebooks, tests)."""
        c = self._class.get(key)
        return None if c is None else CLASSES[c]

    # ---------------------------------------------------------------- internals

    def _insert(self, key):
        """Add or re-access key; return its class if it is new to the tier."""
        self._now = now = self._now + 1
        if now >= self._next_update:
            self._update()
        c = self._class.get(key)
        if c is not None:  # already tracked: an access
            self.touch((key,))
            return None
        ghost = self._ghosts.pop(key, None)
        if ghost is None:
            c = NEW
        else:  # a reuse the tier missed: it counts for the class the block had
            gc, last = ghost
            b = _bucket(now - last)
            self._reuses[gc][b] += 1
            self._ends[gc][b] += 1
            c = ONCE if gc < ONCE else MANY
        self._class[key] = c
        self._queues[c][key] = now
        return c

    def _head(self, c, items, protected, now):
        """The oldest unprotected entry left in `items` of class c, with its score."""
        for key, last in items:
            if key not in protected:
                return self._score(c, now - last), last, c, key
        return None

    def _forget(self, victims, now):
        queues, klass, ghosts = self._queues, self._class, self._ghosts
        out = []
        for _, last, c, key in victims:
            del queues[c][key]
            del klass[key]
            ghosts[key] = (c, last)
            out.append(key)
        ends = self._ends
        while len(ghosts) > self._max_ghosts:
            _, (gc, last) = ghosts.popitem(last=False)
            ends[gc][_bucket(now - last)] += 1  # never came back within the ghost horizon
        return out

    def _score(self, c, age):
        """The class index at this age, linear between bucket starts."""
        index = self._index[c]
        if age < 4:
            return index[age if age > 0 else 0]
        b = _bucket(age)
        if b >= _BUCKETS - 1:
            return index[b]
        lo = _STARTS[b]
        return index[b] + (index[b + 1] - index[b]) * (age - lo) / _WIDTH[b]

    def _update(self):
        """Recompute every class's index from its reuse and life-end counts, then age them."""
        self._next_update = self._now + self._period
        self._updates += 1
        decay = self._updates % _HALF_LIFE_UPDATES == 0
        for reuses, ends, index in zip(self._reuses, self._ends, self._index):
            top = max((b for b in range(_BUCKETS) if ends[b]), default=-1)
            exposure = [0.0] * (top + 1)
            alive = 0.0
            for b in range(top, -1, -1):  # lives reaching bucket b spend its width there
                alive += ends[b]
                exposure[b] = (alive - ends[b] / 2) * _WIDTH[b]
            for b in range(top + 1):
                best = hits = cost = 0.0
                for h in range(b, top + 1):
                    hits += reuses[h]
                    cost += exposure[h]
                    if cost > 0 and hits > best * cost:
                        best = hits / cost
                index[b] = best
            for b in range(top + 1, _BUCKETS):
                index[b] = 0.0  # older than any life observed: nothing says it will return
            if decay:
                for b in range(top + 1):
                    reuses[b] *= 0.5
                    ends[b] *= 0.5
