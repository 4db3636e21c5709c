"""Auto: run the candidate that miniature simulations of this very workload say is best.

No single eviction policy wins everywhere on KV traffic: hitdensity leads on chat traffic, the
leaf-first `prefix` policy on agent sessions whose contexts grow, ARC and S3-FIFO on one-off
documents at small tiers, LRU where recency is all there is. So `auto` does not guess: it keeps
one *miniature simulation* per candidate policy, fed with a spatially hashed sample of the keys
at a proportionally scaled capacity (SHARDS, Waldspurger et al., FAST'15; "Cache Modeling and
Optimization using Miniature Simulations", Waldspurger et al., ATC'17), counts the prefix hits
each would have served, and lets the best of them order the real tier.

    sample     a key is in the sample iff a multiplicative hash of hash(key) falls below
               rate * 2**32 (the same keys always, whatever the access order); the mini caches
               hold rate * capacity blocks, rate = clamp(sample_slots / capacity, 1/64, 1/4)
    minis      one instance of each candidate (lru, arc, s3fifo, prefix, hitdensity), seeing
               only sampled keys: hits are touched, misses make room and are inserted, as the
               manager does; a run of new blocks stays a run (hitdensity learns from runs)
    prefix     a request starts at a root block (no parent); within a request the minis see its
               sampled keys in order, and a sampled key counts as a prefix hit for a candidate
               while every earlier sampled key of that request hit in its mini cache. The
               parent a structure-aware mini sees is the previous *sampled* key of the request
    score      prefix hits per candidate over a sliding window (halved every check)
    choose     every `check` sampled accesses, the best score replaces the active policy when
               it leads by more than noise: 3 standard deviations of the difference and 0.1 %
               of the window's accesses; at most one switch per two checks
    switch     the new policy is built from the old one's resident keys, inserted in the old
               one's eviction order (least valuable first); the real tier keeps its blocks
    start      hitdensity (plain LRU until it has learned), until the minis disagree

Why these choices (fixed, not fitted to a trace; chosen on the grid's `tune` rows only, chat,
agent, docqa and fanout of kvbm/sim/synth.py, never on Mooncake): the candidates are the
policies the issue names plus the project's best learned one, hitdensity, which is also where
auto starts (before it has learned, hitdensity is plain LRU). sample_slots=1024: below 1024
blocks the minis run at full rate (exact), above it at 1024/capacity (at least 1/64), the
sizes at which SHARDS' error stays well under the gaps that matter. A switch needs a lead of
Z=2 standard deviations of the paired difference (the variance of a difference of prefix-hit
counts is at most the number of accesses where the two disagree) and MARGIN=0.2 % of the
window, held PERSIST=2 checks in a row; the window keeps KEEP=0.8 of its counts per check (a
memory of ~5 checks). With Z=3 and KEEP=0.5 auto switched later and thrashed more (agent at
10 %: 0.4992 against 0.5042).

Measured (bench/RESULTS.md, "Robustness grid"): on Mooncake it runs hitdensity throughout
(0.2362 at 10k blocks on the policy-level stream); it follows s3fifo at small tiers of chat and
document traffic and prefix on agent sessions where the minis see them lead. Where it falls
short of the best of lru/arc/s3fifo/prefix by more than 0.002: small tiers of the Mooncake
halves (s3fifo leads there by up to 0.009: the minis see it late), document QA at 5 % (s3fifo
+0.006), and tiers smaller than one request (agent sessions of 206-block requests in a 127-block
tier: auto 0.171, prefix 0.261), where a mini cache cannot model the manager's refusal of a
store larger than the tier and the run protections of a long store. Switching keeps only keys,
not the old policy's learned state (hitdensity's tables are warm-started from its mini).

Memory per resident key: the active policy's own (LRU ~100 B ... hitdensity ~200 B), a parent
entry (~100 B, for a switch to a structured policy) and, for root blocks only, a set entry; the
minis hold `rate` x their per-key state per resident key, ghosts included: about 1.2 KB x rate
(all of it at rate 1, i.e. tiers under 1024 blocks; under 20 B at 1/64).
Cost per operation: the active policy's, one hash per key, and the minis' on sampled keys. On
the Mooncake stream at 10k blocks (rate 0.1) auto costs about 1.15x hitdensity, which is itself
well above 5x LRU per operation (bench/bench_policy_cost.py): the 5x bound is not met while
hitdensity is the active policy.
"""

from __future__ import annotations

import math

from .arc import ARCPolicy
from .base import EvictionPolicy, Hints
from .hitdensity import HitDensityPolicy
from .lru import LRUPolicy
from .prefix import PrefixPolicy
from .s3fifo import S3FIFOPolicy

CANDIDATES = {"lru": LRUPolicy, "arc": ARCPolicy, "s3fifo": S3FIFOPolicy,
              "prefix": PrefixPolicy, "hitdensity": HitDensityPolicy}
_MIX = 2654435761  # Knuth's multiplicative hash constant: spreads sequential ids too
_MASK = 0xFFFFFFFF


class AutoPolicy(EvictionPolicy):
    name = "auto"
    wants_structure = True
    Z = 2.0  # standard deviations a lead must pass
    MARGIN = 0.002  # and this share of the window's sampled accesses
    PERSIST = 2  # checks in a row
    KEEP = 0.8  # share of the scores kept at each check (the window's memory)

    def __init__(self, capacity, *, candidates=tuple(CANDIDATES), sample_slots=1024, start="hitdensity", **kw):
        super().__init__(capacity, **kw)
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
        self.mini_capacity = max(1, round(self.rate * capacity))
        self._minis = [CANDIDATES[n](self.mini_capacity) for n in self.names]
        self._alive = [True] * len(self.names)
        self._score = [0.0] * len(self.names)
        self._window = 0.0  # sampled accesses in the (halving) window
        self._seen = 0
        self._check = max(2048, 4 * self.mini_capacity)
        self._next_check = self._check
        self._last = None  # previous sampled key of the current request
        self._new_request = True
        self._stored_last = False
        self._structured = False  # hints with parents seen: roots mark requests
        self._roots: set = set()  # resident keys that begin a sequence (no parent)
        self._parents: dict = {}  # resident key -> parent, for a switch to a structured policy
        self._ahead = [0] * len(self.names)  # consecutive checks each candidate led by enough
        self.active = start
        self._active_index = self.names.index(start)
        self._differ = [0.0] * len(self.names)  # decayed |prefix hits - the active one's|
        self._real = CANDIDATES[start](capacity)
        self.switches: list[tuple[int, str]] = []  # (sampled accesses so far, new policy)

    # ---------------------------------------------------------------- verbs

    def insert(self, key, hints=None):
        self.insert_many((key,), (hints,))

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
        elif first.parent is None:
            self._structured = True
            self._roots.add(keys[0])
            self._new_request = True
        self._real.insert_many(keys, hints if self._real.wants_structure else None)
        if per_key:
            roots, parents = self._roots, self._parents
            for k, h in zip(keys, hints):
                if h is not None:
                    if h.parent is None:
                        roots.add(k)
                    else:
                        parents[k] = h.parent
        elif hints is not None and hints.parent is not None:
            self._parents[keys[0]] = hints.parent
        self._stored_last = True
        self._feed(keys, True)

    def touch(self, keys):
        if not isinstance(keys, (list, tuple)):
            keys = list(keys)
        if not keys:
            return
        if keys[0] in self._roots or (self._stored_last and not self._structured):
            self._new_request = True
        self._stored_last = False
        self._real.touch(keys)
        self._feed(keys, False)

    def batch_stored(self, keys):
        self._real.batch_stored(keys)

    def remove(self, key):
        self._real.remove(key)
        self._roots.discard(key)
        self._parents.pop(key, None)

    def evict(self, n, protected=()):
        victims = self._real.evict(n, protected)
        if victims:
            discard, pop = self._roots.discard, self._parents.pop
            for v in victims:
                discard(v)
                pop(v, None)
        return victims

    def __len__(self):
        return len(self._real)

    def __contains__(self, key):
        return key in self._real

    # ---------------------------------------------------------------- miniature simulations

    def _feed(self, keys, stored):
        """Give the sampled keys of one call, in order, to every mini; count prefix hits."""
        thr = self._threshold
        sample = [k for k in keys if (hash(k) * _MIX) & _MASK < thr]
        if not sample:
            return
        if self._new_request:
            self._new_request = False
            self._alive = [True] * len(self._minis)
            self._last = None
        parent = self._last
        self._last = sample[-1]
        n = len(sample)
        self._window += n
        self._seen += n
        ends_run = stored and sample[-1] is keys[-1]
        counted = []
        before = None
        for i, mini in enumerate(self._minis):
            hits = [k for k in sample if k in mini]
            j = 0
            if self._alive[i]:
                if len(hits) == n:
                    j = n
                else:
                    while sample[j] in mini:
                        j += 1
                    self._alive[i] = False
                self._score[i] += j
            counted.append(j)
            if hits:
                mini.touch(hits)
            if len(hits) == n:
                continue
            new = [k for k in sample if k not in mini] if hits else sample
            room = len(mini) + len(new) - self.mini_capacity
            if room > 0 and len(new) > self.mini_capacity:
                continue  # the manager refuses a store larger than the tier
            if room > 0:
                mini.evict(room, ())
            if mini.__class__ is HitDensityPolicy:
                mini.insert_run(new, len(keys), ends_run)
            elif mini.wants_structure:
                if before is None:  # each sampled key's parent: the sampled key before it
                    before, prev = {}, parent
                    for k in sample:
                        before[k] = prev
                        prev = k
                hs = [Hints(parent=before[k], position=0 if before[k] is None else 1) for k in new]
                mini.insert_many(new, hs)
            else:
                mini.insert_many(new, None)
        ja = counted[self._active_index]
        if any(j != ja for j in counted):  # a paired test: where the two outcomes differ
            differ = self._differ
            for i, j in enumerate(counted):
                differ[i] += abs(j - ja)
        if self._seen >= self._next_check:
            self._choose()

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
        self._score = [x * keep for x in score]
        self._differ = [d * keep for d in self._differ]
        self._window *= keep

    def _switch(self, index):
        """The real tier's keys, least valuable first, into a fresh instance of the winner,
        warm-started from its miniature simulation where it learns (hitdensity's tables,
        ARC's target size)."""
        old = self._real
        order = old.evict(len(old), ()) or []
        name = self.names[index]
        new = CANDIDATES[name](self.capacity)
        mini = self._minis[index]
        if isinstance(new, HitDensityPolicy):
            new.adopt(mini, 1 / self.rate)
        elif isinstance(new, ARCPolicy):
            new.p = min(float(self.capacity), mini.p / self.rate)
        if new.wants_structure:
            parents = self._parents
            for k in order:
                new.insert(k, Hints(parent=parents.get(k)))
        else:
            for k in order:
                new.insert(k, None)
        self._real = new
        self.active = name
        self._active_index = index
        self._ahead = [0] * len(self.names)
        self._differ = [0.0] * len(self.names)  # measured against the active policy only
        self.switches.append((self._seen, name))
