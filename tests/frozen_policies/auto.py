"""FROZEN (tests only): policies/auto.py as session 10 left it (2026-12-05, issue 15: shared minis
at rate 1, S3FIFO_WARM, PERSIST 3), over the frozen hitdensity, prefix and s3fifo beside it and
with its Python mini feed (no compiled core, no compiled sample). Re-frozen because those
changes alter decisions on purpose; tests/test_policy_auto_equal.py and
test_policy_native_equal.py compare the current auto, compiled and in Python, with this copy.
The earlier frozen auto (commit 19070e5's) is in git history. Session 14 (H56): the cold
switch's FRESH scores and RESUME tables added here too, on purpose (they change decisions).

Auto: run the candidate that miniature simulations of this very workload say is best.

No single eviction policy wins everywhere on KV traffic: hitdensity leads on chat traffic, the
leaf-first `prefix` policy on agent sessions whose contexts grow, S3-FIFO on one-off documents
at small tiers. So `auto` does not guess: it keeps one *miniature simulation* per candidate,
fed with a spatially hashed sample of the keys at a proportionally scaled capacity (SHARDS,
Waldspurger et al., FAST'15; "Cache Modeling and Optimization using Miniature Simulations",
Waldspurger et al., ATC'17), counts the prefix hits each would have served, and lets the best
of them order the real tier.

    sample     a key is in the sample iff a multiplicative hash of hash(key) falls below
               rate * 2**32 (the same keys always, whatever the access order); the mini caches
               hold rate * capacity blocks, rate = clamp(sample_slots / capacity, 1/64, 1)
    candidates prefix, s3fifo, hitdensity. lru and arc are left out: on the tune rows of the
               grid `prefix` (LRU among leaves) is never below lru by more than noise, and
               hitdensity or s3fifo lead wherever arc does; each extra mini costs time per
               sampled key and adds a noisy maximum for the switch test to chase
    minis      one instance of each candidate, seeing only sampled keys: hits are touched,
               misses make room and are inserted, as the manager does; a run of new blocks
               stays a run (hitdensity learns from runs)
    prefix     a request starts at a root block (no parent), or at a stored block whose parent
               is neither resident nor one of the request's own keys (a tier below the first
               gets one demoted block at a time, its parent above); a sampled key counts as a
               prefix hit for a candidate while every earlier sampled key of that request hit
               in its mini. The parent a structure-aware mini sees is the previous *sampled* key
    deepest    s3fifo (real and mini) gets each call's keys deepest block first: its FIFO
               queues then drop a request's tail before its head, which is what a prefix
               cache wants (a child is useless without its parent). On the tune rows this
               took auto from -0.006 to +0.005..+0.011 against plain s3fifo where s3fifo leads
    own blocks a request longer than the tier evicts its own blocks to store its tail; the
               victims auto gives back from that request are its deepest ones, never its
               head (leaf first, as `prefix` does), whatever the active candidate chose
    score      prefix hits per candidate over a sliding window (KEEP of it kept per check)
    choose     every max(CHECK_MIN, CHECK_SCALE * mini capacity) sampled accesses, the best
               score replaces the active policy when it leads by Z=2 standard deviations of
               the paired difference and MARGIN=0.2 % of the window, PERSIST=3 checks running
    shared     at rate 1 (capacity <= sample_slots) a mini is a full-scale simulation of its
               candidate, so the real tier stands in for the active candidate's mini (its keys
               are asked, its prefix hits counted, nothing fed twice), and a switch *swaps*:
               the winner's mini, which learned on this very stream (S3-FIFO's queues, ghosts
               and frequencies; hitdensity's tables and ages; prefix's leaf order), becomes the
               real policy after it drops the keys the tier does not hold and takes the tier's
               keys it lacks (in the order auto saw them stored, oldest first); the old real
               policy goes on as its candidate's mini. Nothing starts cold
    switch     (rate < 1) the new policy is built from the old one's resident keys, inserted
               in the old one's eviction order (least valuable first); the real tier keeps its
               blocks. A switched-in S3-FIFO has all but its small queue's share of them marked
               seen once (S3FIFO_WARM): its first evictions move the old policy's valuable keys
               to M and drop its least valuable, instead of a FIFO pass over every old key
    after      (rate < 1; session 14) a cold switch is judged on what came after it: the scores
               and window restart at the switch (FRESH), so the candidates are compared on
               evidence the switch has not acted on yet, and the policy left behind, whose mini
               goes on as if auto had stayed, wins back only on what it earned since. And auto
               does not come back to hitdensity on its mini's tables alone (RESUME): it keeps
               the real hitdensity's reuse and life counts from when it left it, and a return
               adopts what that hitdensity would hold had auto stayed: those counts, halved as
               often as the hitdensity mini's have been since, plus what the mini learned since,
               scaled to the tier (the mini's tables, learned on a sample, are biased: H41 in
               bench/RESULTS.md; on mooncake-1 2 % a return on them gave 0.0779, on these
               0.0782). No new constant; on the tune rows the two change only agent 10 % (-0.0001) and
               docqa 10 % (+0.0006), and took mooncake-1 2 % from 0.0774 to 0.0782 (within
               0.002 of s3fifo's 0.0800: every grid cell within the bar). Restarting the scores
               after a shared swap too (rate 1) cost tune rows (agent 2 % -0.0022), so it is
               only for cold switches (bench/RESULTS.md, "Issue 15, session 14 (H56)")
    start      hitdensity (plain LRU until it has learned), until the minis disagree

Constants were chosen on the grid's `tune` rows only (chat, agent, docqa, fanout of
kvbm/sim/synth.py), never on Mooncake or the held-out rows. Checking faster (every 128
sampled accesses, one check to switch) helped tiny traces but thrashed on the tune rows
(agent at 10 %: -0.018, docqa at 5 %: -0.020 against the best reference): a switch loses the
old policy's learned state, so it must be worth it. Session 10 (2026-12-05, issue 15): the
shared minis, S3FIFO_WARM and PERSIST 3 (was 2), chosen on the tune rows (every tune cell
within 0.002 of the best reference: chat 2 % was -0.0022); PERSIST 2, 1, Z 3, KEEP 0.9,
CHECK_SCALE 2, MARGIN 0 and starting on prefix or s3fifo each left a tune cell missing.

Measured (bench/RESULTS.md, "Robustness grid"): see there for the full grid, the cells where
auto is more than 0.002 below the best of lru/arc/s3fifo/prefix, and the bundled trace.

Memory per resident key (bench/bench_policy_cost.py --memory, after the Mooncake stream, the
compiled cores' arrays counted): 438 B at 10,000 blocks (sample rate 0.1; hitdensity alone
301 B), 1,096 B at 1,000 blocks before session 10 (rate 1: every key in every mini; shared
minis since: one simulation fewer, see bench/RESULTS.md). It is the active policy's state, a
parent entry per key (None for a root: for a switch to a structured policy, and to see a
request begin), the minis' `rate` x their per-key state (ghosts included), and the key lists
of the request being served (made into a map only when the request outgrows the tier).
Cost per operation (CPU time of recorded Mooncake calls, bench/RESULTS.md "Policy cost per
operation"): 3.8-4.3x LRU per block access at 10,000 blocks (three runs), 7.8x at 1,000 before
the shared minis (rate 1: every key through all three minis), ~7x with them (two minis beside
the real tier), with the active policy, the minis (hitdensity, prefix and s3fifo cores) and
`_feed` (MiniFeed: the sample and every mini's step in one call) compiled; 0.11-0.13 of the
time with all of them in Python (KVBM_POLICY_NATIVE=0) on the same calls. The issue's 5x bound
holds per access at 10k, not at 1k; an insert alone costs 5.1-6.1x. Where the time goes at
10k (py-spy over the replay): the active hitdensity ~38 %, MiniFeed ~20 %, the parents map
~14 %, auto's own Python ~5 %, the rest the bench's loop. At 1k each full-scale mini costs about
twice its policy alone (prefix +245 ns per access, hitdensity +200), and the wrapper with the
tier's own s3fifo ~370 ns (LRU ~120).
"""

from __future__ import annotations

import math
from collections import deque
from functools import partial
from itertools import chain, filterfalse, repeat, takewhile
from operator import attrgetter

from itertools import compress
from operator import and_, lt, mul

from kvbm.policies.arc import ARCPolicy
from kvbm.policies.base import EvictionPolicy
from kvbm.policies.lru import LRUPolicy

from .hitdensity import _BUCKETS, _HALF_LIFE_UPDATES, _STARTS, HitDensityPolicy, _bucket
from .prefix import PrefixPolicy
from .s3fifo import S3FIFOPolicy


def _python_sample(keys, mix, mask, threshold):
    return list(compress(keys, map(lt, map(and_, map(mul, map(hash, keys), repeat(mix)), repeat(mask)),
                                   repeat(threshold))))


class _hitdensity_native:  # frozen: the Python sample, never a compiled one
    sampler = staticmethod(lambda: _python_sample)


class _policy_native:  # frozen: the Python mini feed only
    feeder = staticmethod(lambda *a, **k: None)

CANDIDATES = {"lru": LRUPolicy, "arc": ARCPolicy, "s3fifo": S3FIFOPolicy,
              "prefix": PrefixPolicy, "hitdensity": HitDensityPolicy}
_NO_KEY = object()
_parent_of = attrgetter("parent")
_MIX = 2654435761  # Knuth's multiplicative hash constant: spreads sequential ids too
_MASK = 0xFFFFFFFF


_drain = partial(deque, maxlen=0)  # run an iterator of calls at C speed
def _member_test(policy):
    """A callable answering `key in policy`: the key dict's own C-level __contains__ where the
    policy keeps its keys in one (`_keys`: hitdensity, prefix, the compiled cores; a mini is
    asked about every sampled key, two or three times), else the policy's __contains__."""
    keys = policy.__dict__.get("_keys")
    return keys.__contains__ if keys is not None else policy.__contains__


SWAPPABLE = frozenset({"prefix", "s3fifo", "hitdensity"})  # candidates a SHARED auto can swap


def _resident(policy):
    """The keys a candidate holds (any order): its key dict, or S3-FIFO's queues in Python."""
    keys = policy.__dict__.get("_keys")
    if keys is None:  # the frozen minis: hitdensity's _class, prefix's _seq
        keys = policy.__dict__.get("_class", policy.__dict__.get("_seq"))
    if keys is not None:
        return list(keys)
    return [*policy._small, *policy._main, *policy._parked]


class _Link:
    """The one hint a structured mini or a switch needs, without Hints' validation per key."""

    __slots__ = ("parent",)

    def __init__(self, parent):
        self.parent = parent


class _Tables:
    """A hitdensity's reuse and life counts (what HitDensityPolicy.adopt reads), copied."""

    def __init__(self, reuses, ends):
        self._reuses, self._ends = reuses, ends

    @classmethod
    def of(cls, policy):
        return cls([list(r) for r in policy._reuses], [list(e) for e in policy._ends])


def _resumed(left, mini, scale):
    """The tables the real hitdensity would hold now had auto stayed with it: its own counts
    when auto left it, halved as often as the hitdensity mini's have been since, plus what the
    mini learned since (its counts now less its counts then, halved alike), ages and counts
    scaled from the mini's clock to the tier's, as adopt scales them."""
    real, then, updates = left
    now = _Tables.of(mini)
    d = 0.5 ** (mini._updates // _HALF_LIFE_UPDATES - updates // _HALF_LIFE_UPDATES)
    reuses, ends = [], []
    for c in range(len(real._reuses)):
        r = [x * d for x in real._reuses[c]]
        e = [x * d for x in real._ends[c]]
        for b in range(_BUCKETS):
            dr = max(0.0, now._reuses[c][b] - then._reuses[c][b] * d)
            de = max(0.0, now._ends[c][b] - then._ends[c][b] * d)
            if dr or de:
                to = _bucket(int(_STARTS[b] * scale))
                r[to] += dr * scale
                e[to] += de * scale
        reuses.append(r)
        ends.append(e)
    return _Tables(reuses, ends)


class AutoPolicy(EvictionPolicy):
    name = "auto-frozen"
    wants_structure = True
    Z = 2.0  # standard deviations a lead must pass
    MARGIN = 0.002  # and this share of the window's sampled accesses
    PERSIST = 3  # checks in a row
    KEEP = 0.8  # share of the scores kept at each check (the window's memory)
    DEFAULT_CANDIDATES = ("prefix", "s3fifo", "hitdensity")  # lru and arc: see the docstring
    DEFAULT_START = "hitdensity"
    S3FIFO_WARM = True  # a cold switch to s3fifo marks the old order's valuable keys seen
    SHARED = True  # at rate 1 the real tier is the active candidate's mini (see __init__)
    LEAF_FIRST = True  # a request's own victims are its deepest blocks (see _deepest_first)
    FRESH = True  # scores restart after a cold switch (rate < 1; see `after` in the docstring)
    RESUME = True  # back into hitdensity at rate < 1: its own tables, aged (see `after`)
    REVERSED = frozenset({"s3fifo"})  # candidates fed each call deepest block first
    CHECK_MIN = 2048  # sampled accesses between checks, at least
    CHECK_SCALE = 4  # ... and this many mini capacities

    def __init__(self, capacity, *, candidates=None, sample_slots=1024, start=None, **kw):
        super().__init__(capacity, **kw)
        if candidates is None:
            candidates = self.DEFAULT_CANDIDATES
        if start is None:
            start = self.DEFAULT_START
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"auto policy: capacity={capacity!r} must be an int >= 0 (it sizes the samples)")
        unknown = [c for c in candidates if c not in CANDIDATES]
        if unknown or not candidates:
            raise ValueError(f"auto policy: candidates={list(candidates)!r}; choose from {', '.join(CANDIDATES)}")
        if start not in candidates:
            raise ValueError(f"auto policy: start={start!r} must be one of the candidates {list(candidates)}")
        if isinstance(sample_slots, bool) or not isinstance(sample_slots, int) or sample_slots < 1:
            raise ValueError(f"auto policy: sample_slots={sample_slots!r} must be an int >= 1")
        self.names = list(candidates)
        self.rate = min(1.0, max(1 / 64, sample_slots / max(1, capacity)))
        self._threshold = int(self.rate * (1 << 32))
        self._sample = _hitdensity_native.sampler()
        self.mini_capacity = max(1, round(self.rate * capacity))
        self._minis = [CANDIDATES[n](self.mini_capacity) for n in self.names]
        start_index = self.names.index(start)
        # SHARED (rate 1, every candidate keeping its keys in a dict): the minis are full-scale
        # simulations, so the real tier stands in for the active candidate's mini (its prefix
        # hits are counted on the tier itself; no duplicate simulation) and a switch swaps
        # roles: the winner's mini, reconciled with the tier's keys, becomes the real policy
        # with all it learned (queues, ghosts, tables), and the old real policy becomes the
        # loser's mini
        self._shared = self.SHARED and self.rate == 1.0 and capacity >= 1 and all(
            n in SWAPPABLE for n in self.names)
        if self._shared:
            self._minis[start_index] = CANDIDATES[start](capacity)
        self._reversed = [n in self.REVERSED for n in self.names]
        self._alive = [True] * len(self.names)
        self._score = [0.0] * len(self.names)
        self._differ = [0.0] * len(self.names)  # decayed |prefix hits - the active one's|
        # every mini a compiled core: _feed in one compiled call, the same steps; it updates
        # these three lists in place (so they are never replaced, only refilled)
        self._feeder = None
        self._make_feeder(start_index)
        self._window = 0.0  # sampled accesses in the (halving) window
        self._left_hitdensity = None  # (its tables, its mini's, the mini's updates) when auto left it
        self._seen = 0
        self._check = max(self.CHECK_MIN, round(self.CHECK_SCALE * self.mini_capacity))
        self._next_check = self._check
        self._last = None  # previous sampled key of the current request
        self._new_request = True
        self._stored_last = False
        self._structured = False  # hints with parents seen: roots mark requests
        # resident key -> its parent (None: it begins a sequence, a root), for a switch to a
        # structured policy and to see where a request begins
        self._parents: dict = {}
        self._ahead = [0] * len(self.names)  # consecutive checks each candidate led by enough
        self.active = start
        self._active_index = start_index
        self._real = self._minis[start_index] if self._shared else CANDIDATES[start](capacity)
        self.switches: list[tuple[int, str]] = []  # (sampled accesses so far, new policy)
        # the key lists of the calls of the request being served (LEAF_FIRST): kept as given,
        # made into one ordered map only when the request outgrows the tier (rarely)
        self._req: list = []
        self._req_len = 0  # that request's keys seen so far, evicted ones included (an upper
        #                    bound: a key given twice counts twice until the map is made)

    def _make_feeder(self, active):
        kinds = [0 if m.__class__ is HitDensityPolicy else 1 if m.wants_structure else 2 for m in self._minis]
        if self._shared:
            kinds[active] = 3  # the real tier: its keys asked, never fed
        self._feeder = _policy_native.feeder(self._minis, kinds, self._reversed, _MIX, _MASK, self._threshold,
                                             self.mini_capacity, self._alive, self._score, self._differ)

    # ---------------------------------------------------------------- verbs

    def insert(self, key, hints=None):
        self.insert_many((key,), hints)  # one Hints (or None) for the one key: no per-key list

    def insert_many(self, keys, hints=None):
        if not isinstance(keys, (list, tuple)):
            keys = list(keys)
        if not keys:
            return
        per_key = isinstance(hints, (list, tuple))
        first = hints[0] if per_key else hints
        if first is not None:
            self._structured = True
        if first is None:  # no structure given: a store after a store starts a new request
            if self._stored_last:
                self._new_request = True
                self._req, self._req_len = [], 0
        elif first.parent is None:
            self._structured = True
            self._parents[keys[0]] = None
            self._new_request = True
            self._req, self._req_len = [], 0
        elif (self._req and first.parent not in self._parents
              and not any(first.parent in call for call in self._req)):
            # a chain goes on only from a key of the request being served (resident here, or
            # stored by it and evicted since); a parent that is neither means another request.
            # A tier below the first gets one demoted block per insert, whose parent stays
            # above: each is its own request (without this, the whole demotion stream was one
            # ever-growing request: unbounded key lists, O(stream) evicts, and its newest
            # blocks given back first as "the request's deepest")
            self._new_request = True
            self._req, self._req_len = [], 0
        if self.LEAF_FIRST and self._structured:
            self._req.append(keys)
            self._req_len += len(keys)
        if self._shared:  # the tier's hits are read before the keys go in (a switch may come)
            self._feed(keys, True)
        if self._real.wants_structure:
            self._real.insert_many(keys, hints)
        elif self.active in self.REVERSED:
            self._real.insert_many(keys[::-1], None)
        else:
            self._real.insert_many(keys, None)
        if per_key:
            try:  # the usual case, a Hints per key: at C speed (`None in hints` would call
                self._parents.update(zip(keys, map(_parent_of, hints)))  # Hints.__eq__ per key)
            except AttributeError:  # some are None: those keys are left out
                self._parents.update((k, h.parent) for k, h in zip(keys, hints) if h is not None)
        elif hints is not None:
            self._parents[keys[0]] = hints.parent
        self._stored_last = True
        if not self._shared:
            self._feed(keys, True)

    def touch(self, keys):
        if not isinstance(keys, (list, tuple)):
            keys = list(keys)
        if not keys:
            return
        if self._parents.get(keys[0], _NO_KEY) is None or (self._stored_last and not self._structured):
            self._new_request = True
            self._req, self._req_len = [], 0
        if self.LEAF_FIRST and self._structured:
            self._req.append(keys)
            self._req_len += len(keys)
        self._stored_last = False
        self._real.touch(keys[::-1] if self.active in self.REVERSED else keys)
        self._feed(keys, False)

    def batch_stored(self, keys):
        self._real.batch_stored(keys)

    def remove(self, key):
        self._real.remove(key)
        self._parents.pop(key, None)

    def evict(self, n, protected=()):
        victims = self._real.evict(n, protected)
        room = len(self._real) + len(victims) if victims else 0
        if (victims and self._req_len + n > room and not self._real.wants_structure):
            req = dict.fromkeys(chain.from_iterable(self._req))  # in order, each key once
            self._req, self._req_len = [list(req)], len(req)
            if self._req_len + n > room:  # the request does not fit the tier
                victims = self._deepest_first(victims, protected, req)
        if victims:  # forget them here too, at C speed
            _drain(map(self._parents.pop, victims, repeat(None)))
        return victims

    def _deepest_first(self, victims, protected, req):
        """Victims from the request being served are its deepest blocks, never its head.

        A request longer than what the tier can spare evicts its own blocks to store its tail;
        a recency or frequency order picks the head first (touched first, or least often),
        and the next turn of the session then misses from block 0. Leaf first, as the `prefix`
        policy does, keeps the head. Victims outside the request are left as chosen."""
        own = [v for v in victims if v in req]  # req: the request's keys, resident or gone
        if not own:
            return victims
        chosen = set(victims)
        real = self._real
        deepest = []
        for k in reversed(req):  # deepest first: the request's own victims, or resident keys
            if k in chosen or (k in real and k not in protected):
                deepest.append(k)
                if len(deepest) == len(own):
                    break
        keep = [v for v in own if v not in set(deepest)]
        if not keep:
            return victims
        fresh = [k for k in deepest if k not in chosen]
        for k in fresh:
            real.remove(k)
        real.insert_many(keep[::-1], None)  # back in, head last: the most recent
        return [v for v in victims if v not in req] + deepest

    def __len__(self):
        return len(self._real)

    def __contains__(self, key):
        return key in self._real

    # ---------------------------------------------------------------- miniature simulations

    def _feed(self, keys, stored):
        """Give the sampled keys of one call, in order, to every mini; count prefix hits."""
        if self._feeder is not None:  # the same steps compiled: (sampled keys, the last) or None
            got = self._feeder(keys, stored, self._new_request, self._last, self._active_index)
            if got is None:
                return
            self._new_request = False
            n, self._last = got
            self._window += n
            self._seen += n
            if self._seen >= self._next_check:
                self._choose()
            return
        thr = self._threshold
        # [k for k in keys if (hash(k) * _MIX) & _MASK < thr], at C speed
        sample = self._sample(keys, _MIX, _MASK, thr)  # compiled where kvbm._native has it
        if not sample:
            return
        if self._new_request:
            self._new_request = False
            self._alive[:] = [True] * len(self._minis)
            self._last = None
        parent = self._last
        self._last = sample[-1]
        n = len(sample)
        self._window += n
        self._seen += n
        ends_run = stored and sample[-1] is keys[-1]
        self._count(self._feed_python(sample, parent, len(keys), ends_run))
        if self._seen >= self._next_check:
            self._choose()

    def _count(self, counted):
        """The per-mini prefix hits of one call into the paired differences."""
        ja = counted[self._active_index]
        if any(j != ja for j in counted):  # a paired test: where the two outcomes differ
            differ = self._differ
            for i, j in enumerate(counted):
                differ[i] += abs(j - ja)

    def _feed_python(self, sample, parent, run_length, ends_run):
        """_feed's per-mini step: hits touched, prefix hits counted, misses made room for and
        inserted (csrc/auto_core.cpp's MiniFeed is the same, step for step)."""
        n = len(sample)
        counted = []
        before = None
        for i, mini in enumerate(self._minis):
            member = _member_test(mini)  # `k in mini`, at C speed where it can be
            hits = list(filter(member, sample))
            j = 0
            if self._alive[i]:
                if len(hits) == n:
                    j = n
                else:  # the leading sampled keys it holds: its prefix hits in this request
                    j = len(list(takewhile(member, sample)))
                    self._alive[i] = False
                self._score[i] += j
            counted.append(j)
            if self._shared and i == self._active_index:
                continue  # the real tier: asked, not fed
            reverse = self._reversed[i]
            if hits:
                mini.touch(hits[::-1] if reverse else hits)
            if len(hits) == n:
                continue
            new = list(filterfalse(member, sample)) if hits else sample
            room = len(mini) + len(new) - self.mini_capacity
            if room > 0 and len(new) > self.mini_capacity:
                continue  # the manager refuses a store larger than the tier
            if room > 0:
                mini.evict(room, ())
            if mini.__class__ is HitDensityPolicy:
                mini.insert_run(new, run_length, ends_run)
            elif mini.wants_structure:
                if before is None:  # each sampled key's parent: the sampled key before it
                    before = dict(zip(sample, chain((parent,), sample)))
                mini.insert_many(new, [_Link(before[k]) for k in new])
            else:
                mini.insert_many(new[::-1] if reverse else new, None)
        return counted

    def _choose(self):
        self._next_check = self._seen + self._check
        score, names, cur = self._score, self.names, self._active_index
        for i in range(len(names)):  # a lead counts when it is beyond noise and worth a switch
            lead = score[i] - score[cur]
            real = (i != cur and lead > self.Z * math.sqrt(self._differ[i])
                    and lead > self.MARGIN * self._window)
            self._ahead[i] = self._ahead[i] + 1 if real else 0
        best = max(range(len(names)), key=score.__getitem__)
        if self._ahead[best] >= self.PERSIST:  # held for PERSIST checks in a row: switch
            self._switch(best)
        keep = self.KEEP
        score[:] = [x * keep for x in score]  # in place: the compiled feed holds these lists
        self._differ[:] = [d * keep for d in self._differ]
        self._window *= keep

    def _switch(self, index):
        if self._shared:
            self._swap(index)
            return
        self._switch_cold(index)

    def _swap(self, index):
        """SHARED: the winner's full-scale mini becomes the real policy, with what it learned;
        the keys it holds that the tier does not are removed from it, the tier's keys it lacks
        are inserted (in the tier's key order, oldest first), and the old real policy goes on
        as the old candidate's mini."""
        old = self._real
        new = self._minis[index]
        in_tier, held = _member_test(old), _member_test(new)
        extra = [k for k in _resident(new) if not in_tier(k)]  # (removal order changes nothing)
        for k in extra:
            new.remove(k)
        # the tier's keys in the order auto saw them stored (the same whichever implementation
        # runs); keys stored without hints are not in _parents: the tier's own order after them
        parents = self._parents
        missing = [k for k in parents if not held(k) and in_tier(k)]
        if len(parents) < len(old):
            missing += [k for k in _resident(old) if k not in parents and not held(k)]
        if new.wants_structure:
            for k in missing:
                new.insert(k, _Link(parents.get(k)))
        else:
            for k in missing:
                new.insert(k, None)
        self._real = new
        self.active = self.names[index]
        self._active_index = index
        self._make_feeder(index)
        self._ahead = [0] * len(self.names)
        self._differ[:] = [0.0] * len(self.names)
        self.switches.append((self._seen, self.active))

    def _switch_cold(self, index):
        """The real tier's keys, least valuable first, into a fresh instance of the winner,
        warm-started from its miniature simulation where it learns (hitdensity's tables,
        ARC's target size)."""
        old = self._real
        if isinstance(old, HitDensityPolicy):  # leaving it: what it learned at full scale
            mini = self._minis[self._active_index]
            self._left_hitdensity = (_Tables.of(old), _Tables.of(mini), mini._updates)
        order = old.evict(len(old), ()) or []
        name = self.names[index]
        new = CANDIDATES[name](self.capacity)
        mini = self._minis[index]
        if isinstance(new, HitDensityPolicy):
            if self._left_hitdensity is not None and self.RESUME:
                new.adopt(_resumed(self._left_hitdensity, mini, 1 / self.rate), 1.0)
            else:
                new.adopt(mini, 1 / self.rate)
        elif isinstance(new, ARCPolicy):
            new.p = min(float(self.capacity), mini.p / self.rate)
        if new.wants_structure:
            parents = self._parents
            for k in order:
                new.insert(k, _Link(parents.get(k)))
        else:
            for k in order:
                new.insert(k, None)
            if isinstance(new, S3FIFOPolicy) and self.S3FIFO_WARM and len(order) > new.small_target:
                # every key would start in S with no history and leave in the old order, one by
                # one, before any new key could: the old policy's most valuable keys are
                # marked seen once, so S3-FIFO's first evictions move them to M and drop the
                # least valuable (S's share of the tier) as S3-FIFO would
                new.touch(order[new.small_target:])
        self._real = new
        self.active = name
        self._active_index = index
        self._ahead = [0] * len(self.names)
        self._differ[:] = [0.0] * len(self.names)  # measured against the active policy only
        if self.FRESH:  # the switch is judged on what came after it (see the class docstring)
            self._score[:] = [0.0] * len(self.names)  # in place: the compiled feed holds it
            self._window = 0.0
        self.switches.append((self._seen, name))
