"""Hit density: evict the block whose class expects the fewest future hits per slot and unit of time.

A KV block earns its slot only if its sequence comes back while it is cached. Whether and when
that happens is not a property of one block but of its kind. Most blocks are one-hit wonders
(S3-FIFO, Yang et al., SOSP'23): 76 % of the distinct blocks of the Mooncake conversation trace
(FAST'25) are used once, while a block used before returns far more often (24 % of first uses
are followed by another, 42 % of second uses, 50 % of third). The partial last block of a
prompt is rehashed by the next turn, so it almost never returns (1 % of them, against 38 % of
other blocks). How many blocks a request *stores* tells its kind too: a follow-up turn of a
cached conversation stores its new message and the previous answer (a few blocks), a one-off
document stores all of it, and on that trace a block stored in a run of 2-3 blocks returns
twice as often as one stored in a run of 128 or more (50 % against 21 %). Reuse times are
ephemeral but, within a request category, regular ("KVCache Cache in the Wild", Wang et al.,
ATC'25). So the policy sorts blocks into classes and *learns online*, per class, how the chance
of a reuse varies with age; it then evicts where the expected hits per slot-time are lowest.
This is LHD's hit density (Beckmann, Chen and Cidon, "LHD: Improving Cache Hit Rate by
Maximizing Hit Density", NSDI'18) with four changes for KV caches: KV classes, ghost lifetimes,
censored lives, and the best horizon instead of the whole remaining life.

    classes   tail: last block of a stored batch (the partial block the next turn replaces);
              new[g]: a body block not reused yet, stored in a run of 2**g .. 2**(g+1)-1 blocks
              (one class per octave of run length, the last one open-ended; a key inserted
              alone, a demotion or a hinted store, is a run of one); once: reused once;
              many: reused twice or more. One LRU queue per class, keyed by last access.
    time      counted in inserts (misses), the unit of eviction pressure: deterministic, no clock.
    ghosts    an evicted block leaves a ghost (class, last access) for `capacity` evictions, as
              ARC and S3-FIFO keep history beyond residency. A ghost that is inserted again is a
              reuse its class would have earned had it kept the block longer; it re-enters as
              once/many (its reuse count survives eviction, as in TinyLFU).
    learning  per class and age bucket (2 per octave): reuses, and lives that ended (reuse,
              ghost expiry, removal). The exposure (slot-time) spent at each age comes from
              survival analysis over ended lives *and* the lives still going on (resident blocks
              and ghosts, censored at their current age, as Kaplan and Meier count them): without
              them a large tier, whose first ghosts expire only after two turnovers, would learn
              from nothing but the lives that ended in a reuse. Counts halve every 8 turnovers
              so the tables follow the workload.
    index     for class c at age a: max over horizons h of reuses(a..h) / exposure(a..h), the
              Gittins index of keeping the block (Gittins, J. R. Stat. Soc. B 41, 1979) with the
              slot-time as cost. Unlike LHD's whole-life average it does not undervalue a young
              block whose reuse is still to come (a user reads before replying), nor overvalue
              an old one. Linear between bucket starts; recomputed 4 times a turnover.
    evict     compare the oldest unprotected block of each class; take the lowest index (the
              older one on ties). Before any statistics exist every index is 0: plain LRU.
    once      where no block reused once has been seen to return at an age or later (its
              index 0 there), once takes the new classes' mean index at that age, weighted by
              their reuses (_floor_reused): a 0 puts the class first in line, so its blocks
              never live long enough to show a later return. Session 12 (issue 15): the first
              Mooncake half at 2 % (2,003 blocks) 0.0715 -> 0.0807 (S3-FIFO 0.0800); the
              bundled trace at 1k/10k/30k 0.0559/0.2357/0.3326 (recorded before:
              0.0531/0.2364/0.3325).
    order     a batch is inserted deepest block first and touched in reverse, so among the
              blocks of one request the deepest is the oldest and goes first (a child is
              useless without its parent).

Why these defaults (fixed, not fitted to a trace):
    classes        reuse count and partial tail (the two signals KV traces show everywhere) and
                   run length in octaves, the resolution the ages use; no threshold in blocks,
                   so it holds for 16-token and 512-token blocks alike (runs up to 4096 blocks
                   get their own octave). Every class is learned: one that does not differ on a
                   workload (tails in a trace where the tail keeps its id) gets the same index.
    ghosts = capacity  ARC's bound: it observes each class up to about twice its resident life,
                   enough to see the reuses a longer retention would win.
    2 buckets per octave  ages span 5 decades; half-octave steps give ~20 % age resolution with
                   enough samples per bucket (LHD coarsens ages the same way).
    half-life 8 turnovers  a life lasts up to ~2 turnovers (resident + ghost); the statistics
                   must hold several lives per bucket yet follow load changes within minutes.
    update every capacity/4 inserts (at least 256)  fresh tables within a fraction of a lifetime,
                   while the recomputation (a pass over the resident blocks and ghosts, and
                   O(classes x buckets^2)) stays a few operations per insert.

Measured (prefix hit ratio, `python bench/eval_policies.py`; Mooncake at 1k/10k/30k/50k/100k
blocks): 0.0559/0.2357/0.3326/0.3548/0.3642 with the once floor (session 12; before it
0.0531/0.2364/0.3325/0.3551/0.3643) (LRU 0.0445/0.2112/0.3257/0.3546/0.3637, ARC
0.2227 at 10k, Belady 0.191 then 0.366). The previous version (one class for every new block,
no censored lives, a batch inserted in request order) gave 0.0466/0.2339/0.3312/0.3557/0.3639.
The run-length split was found by analysing that trace; it raised the synthetic agent trace
too (0.2019 against 0.1913 at 2 % of its blocks; LRU 0.1432) and narrowed the synthetic chat
trace's shortfall against LRU (0.6073 against 0.6110 at 2 %; was 0.6049). Sensitivity:
perturbing the update period by a few inserts moves the 10k figure within 0.2356-0.2364.
Coarser run classes are not equivalent: one class for every run of 64 blocks or more gives
0.2346 at 10k (below the issue's 0.235), because the longest prompts return half as often as
those of 64-127 blocks; the octave classes are what separates them. Censored lives matter most
where a tier is large against the trace (50k: 0.3551 with them, 0.3547 without). Each half of
the trace replayed on its own (`--traces mooncake-1,mooncake-2`) keeps the lead over LRU and
ARC at 5k/10k/20k blocks (10k: 0.2240 and 0.2271 against LRU 0.2083 and 0.2083); at 50k the
first half ends 0.001 below LRU (0.3408 against 0.3418; one class for all new blocks: 0.3421):
there the tier fills after 60 % of the requests, and the run classes, each learned from its
own share of the few lives seen so far, lose ~130 hits in the first 500 requests after
evictions begin. Pooling sparse classes toward their parent or a pessimistic prior did not
recover it.

Tried without a gain that held across capacities and the synthetic traces: depth-in-batch and
absolute-position classes, a class for the deep blocks of follow-on requests, the parent's
class as a per-conversation feature, splitting reused blocks by their previous reuse gap,
ghosts at 0.5x/2x/4x capacity, LHD's whole-life density instead of the Gittins index,
shrinking sparse classes toward their pool (16 to 1024 pseudo-lives: no steady gain),
wall-clock ages, a class for orphans (blocks whose parent was evicted; they are rare), evicting
from the young end of a queue, a class for the answer's length, reuse counts beyond two (a
third class: -0.0035 at 10k), and each run class split by whether the run extends a cached
prefix of 2+ blocks (+0.0009 at 10k, +0.002 at 30k, -0.002 on a half trace at 5k; it would need
Hints.position, the manager's slower structured path, and a threshold in blocks). "Passed" branches (when a
request branches off a prefix of one conversation, the other continuation is almost never
reused) helped Mooncake at 30k but misfires where sessions share a system prompt, so it is
not in. Where the rest of the gap to Belady lies: given a perfect per-block "will it ever
return" bit, the previous version of this policy reached 0.328 at 10k; nothing known at
insert time comes close.

Costs: insert, touch and remove O(1); evict O(classes) per victim (the oldest unprotected
block of each class scored, protected keys skipped); a table update every capacity/4 inserts
passes over the resident blocks and ghost epochs once and is O(classes x buckets^2): amortised
O(1) per insert. Where kvbm._native is built, the per-key state and every verb run compiled
(policies/_hitdensity_native.py, csrc/hitdensity_core.cpp: keys -> slots through two dicts,
queues and ghosts as linked arrays, the same float operations in the same order); native=False
or KVBM_POLICY_NATIVE=0 runs this Python version (its table update a numba kernel where numba is
installed, policies/_gittins.py). Both decide alike, victim for victim and table for table
(tests/test_policy_auto_equal.py). `python bench/bench_policy_cost.py` (Mooncake stream, CPU
time per block access, bench/RESULTS.md "Policy cost per operation"): compiled 1.4-1.6x LRU at
10k blocks, 1.4x at 1k; the Python version takes 8-16x longer on the same calls (3.5 us per
access, ~17x LRU). Memory per resident key, ghosts and the core's arrays included: 297 B at
10k blocks (the Python version's: 455 B).
"""

from __future__ import annotations

from bisect import bisect_right
from collections import OrderedDict, deque
from functools import partial
from heapq import heapify, heappop, heapreplace
from operator import itemgetter

from . import _gittins, _hitdensity_native
from .base import EvictionPolicy

_RUN_OCTAVES = 13  # runs of 1, 2-3, ..., 2048-4095, and 4096 or more blocks
# Class ids rise with reuse, so a tie between two heads (equal index, equal age) evicts the
# less reused block. NEW + g: a new body block stored in a run of 2**g .. 2**(g+1)-1 blocks.
TAIL, NEW = 0, 1
ONCE, MANY = NEW + _RUN_OCTAVES, NEW + _RUN_OCTAVES + 1
CLASSES = ("tail", "new[1]") + tuple(
    f"new[{1 << g}-{(2 << g) - 1}]" for g in range(1, _RUN_OCTAVES - 1)) + (
    f"new[{1 << (_RUN_OCTAVES - 1)}+]", "once", "many")
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
# _bucket(age) for age < _TABLE by one list index (the hot paths' ages: residents and ghosts
# of tiers up to ~20k blocks; older ages take the arithmetic). 512 KiB, shared by all instances
_TABLE = 1 << 16
_BUCKET_OF = [_bucket(age) for age in range(_TABLE)]
# C-level helpers over evict's heap entries (score, last access, class, key)
_key_of, _class_of, _ghost_of = itemgetter(3), itemgetter(2), itemgetter(2, 1)
_odict_del = OrderedDict.__delitem__
_drain = partial(deque, maxlen=0)  # run an iterator of calls at C speed


def _run_class(n: int) -> int:
    return NEW + min(n.bit_length() - 1, _RUN_OCTAVES - 1)


class HitDensityPolicy(EvictionPolicy):
    name = "hitdensity"

    def __init__(self, capacity, *, native=None, **kw):
        super().__init__(capacity, **kw)
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"hitdensity policy: capacity={capacity!r} must be an int >= 0 (it sizes the ghosts)")
        # native: the compiled core (policies/_hitdensity_native.py), the same decisions
        core = _hitdensity_native.core(capacity, native)
        if core is not None:
            _hitdensity_native.bind(self, core)
            return
        self._core = None
        n = len(CLASSES)
        self._queues = [OrderedDict() for _ in range(n)]  # key -> insert count at last access
        self._class: dict = {}
        self._keys = self._class  # the resident keys (auto asks them `in` at C speed)
        self._ghosts: OrderedDict = OrderedDict()  # key -> (class, last access)
        # ghosts per class by last access >> shift (~1/4 of an update period): their ages,
        # at the resolution the old age buckets have, without a pass over the ghosts
        self._ghost_epochs = [{} for _ in range(n)]
        self._max_ghosts = max(1, capacity)
        self._now = 0  # inserts so far: the policy's clock
        self._reuses = [[0.0] * _BUCKETS for _ in range(n)]
        self._ends = [[0.0] * _BUCKETS for _ in range(n)]
        self._index = [[0.0] * _BUCKETS for _ in range(n)]
        self._rise = [[0.0] * _BUCKETS for _ in range(n)]  # index[b + 1] - index[b], for evict
        self._period = max(_MIN_PERIOD, capacity // 4)
        self._shift = (self._period // 4).bit_length() - 1
        self._next_update = self._period
        self._updates = 0

    # ---------------------------------------------------------------- verbs

    def insert(self, key, hints=None):
        self._insert(key, NEW)

    def insert_many(self, keys, hints=None):
        if not isinstance(keys, (list, tuple)):
            keys = list(keys)
        self.insert_run(keys, len(keys), True)

    def insert_run(self, keys, run_length, ends_run):
        """insert_many for a sample of a run (auto's miniature simulations): `keys`, in order,
        are some of the `run_length` new keys of one stored run; `ends_run`: the last of them
        is the run's last block."""
        last = len(keys) - 1
        if last < 0:
            return
        body = _run_class(max(1, run_length))
        now, klass, ghosts = self._now, self._class, self._ghosts
        # each key's insert time: the tail first, then deepest to head (the head the newest)
        stamps = dict(zip(keys[::-1], range(now + 1, now + last + 2)))
        if (len(stamps) == last + 1 and now + last + 1 < self._next_update
                and klass.keys().isdisjoint(stamps)):  # the usual case: in bulk, at C speed
            self._now = now + last + 1
            back = ghosts.keys() & stamps.keys()
            if back:  # reuses the tier missed: one by one, in time order
                for key in [k for k in stamps if k in back]:
                    self._reinsert(key, ghosts.pop(key), stamps.pop(key))
            if ends_run and keys[last] in stamps:  # the partial block the next turn replaces
                self._queues[TAIL][keys[last]] = stamps.pop(keys[last])
                klass[keys[last]] = TAIL
            self._queues[body].update(stamps)
            klass.update(dict.fromkeys(stamps, body))
            return
        insert = self._insert
        # the batch's last block: the partial one the next turn replaces
        insert(keys[last], TAIL if ends_run else body)
        for i in range(last - 1, -1, -1):  # deepest first: the oldest of its batch
            insert(keys[i], body)

    def batch_stored(self, keys):
        """Keys inserted one by one (class new[1]) were one stored run, head first: class them
        as insert_many would have (tail, run length, deepest oldest). Their age restarts here;
        keys touched or gone since are left as they are."""
        queue, klass = self._queues[NEW], self._class
        keys = [k for k in keys if klass.get(k) == NEW]
        if not keys:
            return
        now, last = self._now, len(keys) - 1
        body = _run_class(last + 1)
        for i in range(last, -1, -1):
            key = keys[i]
            del queue[key]
            c = TAIL if i == last else body
            klass[key] = c
            self._queues[c][key] = now

    def touch(self, keys):
        now, klass, queues = self._now, self._class, self._queues
        reuses, ends, bucket_of, table = self._reuses, self._ends, _BUCKET_OF, _TABLE
        for key in reversed(keys if isinstance(keys, (list, tuple)) else list(keys)):
            c = klass.get(key)
            if c is None:
                continue
            age = now - queues[c].pop(key)
            if age < table:
                b = bucket_of[age]
            else:  # _bucket, inlined on the hottest path
                b = age.bit_length()
                b = min(_BUCKETS - 1, 2 * b - 2 + ((age >> (b - 2)) & 1))
            reuses[c][b] += 1
            ends[c][b] += 1
            c = MANY if c >= ONCE else ONCE
            klass[key] = c
            queues[c][key] = now

    def remove(self, key):
        c = self._class.pop(key, None)
        if c is not None:  # observation stops here: a censored life, not a miss
            self._ends[c][_bucket(self._now - self._queues[c].pop(key))] += 1

    def evict(self, n, protected=()):
        if n <= 0:
            return []
        # _score inlined twice below for the usual ages (each class's first head, then a refill
        # per victim): the hottest loop of the policy. The same float operations as _score:
        # rise[b] is index[b + 1] - index[b], taken at the table update
        now, indices, rises, bucket_of = self._now, self._index, self._rise, _BUCKET_OF
        starts, widths, table, replace = _STARTS, _WIDTH, _TABLE, heapreplace
        iters, heads = [None] * len(indices), []
        for c, q in enumerate(self._queues):
            if not q:
                continue
            iters[c] = items = iter(q.items())
            for key, last in items:
                if key in protected:
                    continue
                age = now - last
                if 4 <= age < table:
                    b = bucket_of[age]
                    heads.append((indices[c][b] + rises[c][b] * (age - starts[b]) / widths[b], last, c, key))
                else:
                    heads.append((self._score(c, age), last, c, key))
                break
        heapify(heads)  # one head per class: (score, last access, class, key); the older wins a tie
        victims = []
        while len(victims) < n:
            if not heads:
                return None  # atomic: nothing has changed yet
            best = heads[0]
            victims.append(best)
            c = best[2]
            for key, last in iters[c]:  # the class's next unprotected entry
                if key in protected:
                    continue
                age = now - last
                if 4 <= age < table:
                    b = bucket_of[age]
                    replace(heads, (indices[c][b] + rises[c][b] * (age - starts[b]) / widths[b], last, c, key))
                else:
                    replace(heads, (self._score(c, age), last, c, key))
                break
            else:
                heappop(heads)
        return self._forget(victims, now)

    def __len__(self):
        return len(self._keys)

    def __contains__(self, key):
        return key in self._keys

    def __getattr__(self, name):  # only names not set: the compiled core's state, on demand
        core = self.__dict__.get("_core")
        if core is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return _hitdensity_native.read(core, name)

    def class_of(self, key, detail=False):
        """"tail", "new", "once" or "many" for a tracked key, else None (for notebooks, tests).

        detail=True names the run-length class of a new block too ("new[4-7]")."""
        c = self._core.class_of(key) if self._core else self._class.get(key, -1)
        if c < 0:
            return None
        return CLASSES[c] if detail or not NEW <= c < ONCE else "new"

    def learned(self):
        """What the policy has learned, for notebooks: {class: {"blocks": resident count,
        "ages": [age at each bucket start], "index": [expected hits per slot-insert there]}}
        for every class that holds blocks or has an index (a plot of index against age shows
        where each class stops earning its slot)."""
        out, core = {}, self._core
        indices = core.table(2) if core else self._index
        for c, name in enumerate(CLASSES):
            index, blocks = indices[c], core.queue_len(c) if core else len(self._queues[c])
            top = max((b for b in range(_BUCKETS) if index[b] > 0), default=-1)
            if top < 0 and not blocks:
                continue
            out[name] = {"blocks": blocks, "ages": _STARTS[:top + 1], "index": index[:top + 1]}
        return out

    def adopt(self, other, scale):
        """Warm start from `other`, a hitdensity whose clock runs `scale` times slower (auto's
        miniature simulation of this tier): its reuse and life counts, ages and counts scaled,
        then the indices recomputed with this tier's own lives."""
        new_reuses, new_ends, old_reuses, old_ends = [], [], other._reuses, other._ends
        for c in range(len(CLASSES)):
            reuses, ends = [0.0] * _BUCKETS, [0.0] * _BUCKETS
            for b, (r, e) in enumerate(zip(old_reuses[c], old_ends[c])):
                if r or e:
                    to = _bucket(int(_STARTS[b] * scale))
                    reuses[to] += r * scale
                    ends[to] += e * scale
            new_reuses.append(reuses)
            new_ends.append(ends)
        if self._core:
            self._core.set_counts(new_reuses, new_ends)
        else:
            self._reuses, self._ends = new_reuses, new_ends
        self._update()

    # ---------------------------------------------------------------- internals

    def _insert(self, key, fresh):
        """Add key as class `fresh` (or once/many if its ghost is here); re-access it if tracked."""
        self._now = now = self._now + 1
        if now >= self._next_update:
            self._update()
        c = self._class.get(key)
        if c is not None:  # already tracked: an access
            self.touch((key,))
            return
        ghost = self._ghosts.pop(key, None)
        if ghost is None:
            self._class[key] = fresh
            self._queues[fresh][key] = now
        else:
            self._reinsert(key, ghost, now)

    def _reinsert(self, key, ghost, now):
        """key was a ghost (class, last access): a reuse the tier missed, counted for the class
        the block had; it comes back as once/many."""
        gc, last = ghost
        self._unghost(gc, last)
        b = _bucket(now - last)
        self._reuses[gc][b] += 1
        self._ends[gc][b] += 1
        c = MANY if gc >= ONCE else ONCE
        self._class[key] = c
        self._queues[c][key] = now

    def _forget(self, victims, now):
        queues, klass, ghosts, epochs, shift = self._queues, self._class, self._ghosts, self._ghost_epochs, self._shift
        if len(victims) > 6:  # out of their queues and classes, into the ghosts: C-level maps
            out = list(map(_key_of, victims))
            ghost = list(map(_ghost_of, victims))  # (class, last access) per victim
            _drain(map(_odict_del, map(queues.__getitem__, map(_class_of, victims)), out))
            _drain(map(klass.__delitem__, out))
            ghosts.update(zip(out, ghost))
            for c, last in ghost:
                epoch = epochs[c]
                e = last >> shift
                epoch[e] = epoch.get(e, 0) + 1
        else:  # the same, one by one: cheaper for a few (most calls of auto's minis)
            out = []
            for _, last, c, key in victims:
                del queues[c][key]
                del klass[key]
                ghosts[key] = (c, last)
                epoch = epochs[c]
                e = last >> shift
                epoch[e] = epoch.get(e, 0) + 1
                out.append(key)
        extra = len(ghosts) - self._max_ghosts
        if extra > 0:  # never came back within the ghost horizon
            ends, bucket_of, pop = self._ends, _BUCKET_OF, ghosts.popitem
            for _ in range(extra):
                gc, last = pop(False)[1]
                age = now - last
                if age < _TABLE:
                    ends[gc][bucket_of[age] if age > 0 else 0] += 1
                else:  # _bucket, inlined: a ghost's age at expiry is about two turnovers
                    b = age.bit_length()
                    ends[gc][min(_BUCKETS - 1, 2 * b - 2 + ((age >> (b - 2)) & 1))] += 1
                epoch, e = epochs[gc], last >> shift
                if epoch[e] == 1:
                    del epoch[e]
                else:
                    epoch[e] -= 1
        return out

    def _unghost(self, c, last):
        epoch, e = self._ghost_epochs[c], last >> self._shift
        if epoch[e] == 1:
            del epoch[e]
        else:
            epoch[e] -= 1

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

    def _ongoing(self):
        """Lives not ended yet, per class and age bucket: resident blocks and ghosts."""
        now, shift = self._now, self._shift
        live = [[0] * _BUCKETS for _ in self._queues]
        for c, queue in enumerate(self._queues):
            if not queue:
                continue
            # ascending: a queue is in access order. The plain dict's own order is the same (keys
            # only ever join a queue at its end, never move_to_end) and reads 10x faster
            lasts, counts = list(dict.values(queue)), live[c]
            newer = len(lasts)  # entries younger than the bucket being counted
            for b in range(_bucket(now - lasts[0]) + 1):
                older = bisect_right(lasts, now - _STARTS[b + 1])  # at least as old as the next bucket
                counts[b] = newer - older
                newer = older
        now -= (1 << shift) >> 1  # an epoch's ghosts count at its middle
        for c, epoch in enumerate(self._ghost_epochs):
            counts = live[c]
            for e, n in epoch.items():
                age = now - (e << shift)
                if age < 4:
                    counts[age if age > 0 else 0] += n
                else:  # _bucket, inlined: this loop runs over every epoch of every class
                    b = age.bit_length()
                    counts[min(_BUCKETS - 1, 2 * b - 2 + ((age >> (b - 2)) & 1))] += n
        return live

    def _update(self):
        """Recompute every class's index from its reuses and lives (ended or going on), then
        age the counts."""
        self._next_update = self._now + self._period
        self._updates += 1
        decay = self._updates % _HALF_LIFE_UPDATES == 0
        _gittins.update(self._reuses, self._ends, self._ongoing(), self._index, self._rise, _WIDTH, decay)
        _floor_reused(self._reuses, self._index, self._rise)


def _floor_reused(reuses, index, rise):
    """Where no block reused once has been seen to return at an age or later (once's index is
    0 there), once is worth what a new block of that age is worth on average: the new classes'
    index there, each weighted by its reuses. rise follows. csrc/hitdensity_table.hpp's
    floor_reused does the same operations in the same order (loops, not sum()).

    Why: an index of 0 puts a class first in line for eviction, so its blocks never live long
    enough to show a later return, and 0 is all it ever learns. On the first half of the
    Mooncake trace at 2 % of its blocks (2,003) the tier held 2,001 new blocks and no `once`
    block a third of the way in; S3-FIFO keeps exactly those (a hit moves a block to its main
    queue) and served 0.0800 of the prefix hits against 0.0715 (0.0807 with this floor).
    It is S3-FIFO's frequency prior, used only where the class has no evidence of its own."""
    weights, total = [], 0.0
    for c in range(NEW, ONCE):
        w = 0.0
        for r in reuses[c]:
            w += r
        weights.append(w)
        total += w
    if not total > 0.0:
        return
    once = index[ONCE]
    for b in range(_BUCKETS):
        if once[b] != 0.0:
            continue
        f = 0.0
        for w, c in zip(weights, range(NEW, ONCE)):
            f += w * index[c][b]
        once[b] = f / total
    up = rise[ONCE]
    for b in range(_BUCKETS - 1):
        up[b] = once[b + 1] - once[b]
    up[_BUCKETS - 1] = 0.0
