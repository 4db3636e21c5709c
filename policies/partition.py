"""Partition: one instance of a policy per owner; victims come from the owners most over their share.

A tier shared by owners (the daemon's tenants) under one policy lets whoever stores most evict
everyone else. Here each owner's keys live in an instance of the configured policy of their
own, and evict() decides *whose* keys go by weighted max-min fairness, the allocation of
FairRide (Pu et al., "FairRide: Near-Optimal, Fair Cache Sharing", NSDI'16) without its
blocking, water-filling as in Bertsekas & Gallager (Data Networks, 1992, 6.5.2); *which* of
that owner's keys go is its own policy's choice.

    owner      Hints.owner given at insert (None: unknown); a key has one owner
    weight     weights[owner], else other_weight; an owner's share of the tier is its weight
               over the weights of the owners holding blocks (equal weights: equal shares)
    level      blocks held / weight; weight 0: above every weighted owner (no guarantee)
    evict(n)   lowers the highest levels first: one victim at a time would come from the owner
               whose level is highest (most blocks first among weight 0, then ties in the order
               owners appeared), so an owner at or below another's level gives no block while
               that other has one to give. Computed in one pass (the level the n victims reach),
               then one evict call per owner that gives
    idle share is lent: a lone owner may fill the tier; it gives the room back, first of all,
               once another owner stores (work-conserving)

Atomic: too few unprotected keys in all is None before any owner is asked; each owner's evict
is atomic, and one that cannot give its planned count (its keys protected) is asked for what it
can give while the rest is planned again over the others. Only a policy that keeps unprotected
keys (a third-party one; built-in prefix no longer: 11bea26) can leave the victims short after that; those
taken are then inserted back (their order lost, never a key) and None is returned.

    PartitionPolicy(capacity, policy="lru", options={}, weights={}, other_weight=1.0)

Each owner's policy is built with the tier's capacity (it may hold all of it) and the clock.
"""

from __future__ import annotations

from collections import deque
from functools import partial
from itertools import repeat
from typing import Any, Mapping

from .base import EvictionPolicy

_ABSENT = object()
_drain = partial(deque, maxlen=0)


class PartitionPolicy(EvictionPolicy):
    name = "partition"

    def __init__(self, capacity, *, policy: Any = "lru", options: Mapping | None = None,
                 weights: Mapping | None = None, other_weight: float = 1.0, **kw):
        super().__init__(capacity, **kw)
        if isinstance(policy, str):
            from ..registry import EVICTION

            cls = EVICTION.get(policy)
        else:
            cls = policy
        if cls is PartitionPolicy:
            raise ValueError("partition: policy must be another policy (a partition of partitions is one partition)")
        self._cls, self._options = cls, dict(options or {})
        for owner, w in {**(weights or {}), None: other_weight}.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < float("inf"):
                raise ValueError(f"partition: the weight of owner {owner!r} must be a number >= 0, got {w!r}")
        self.weights = dict(weights or {})
        self.other_weight = float(other_weight)
        self._spare = self._new()  # checks the options now (a TypeError names a bad one)
        self.wants_structure = cls.wants_structure
        self.filters_inserts = cls.filters_inserts
        self.simulation_only = cls.simulation_only
        self._parts: dict[Any, EvictionPolicy] = {}  # owner -> its policy, in the order owners appeared
        self._inv: dict[Any, float] = {}  # owner -> 1 / its weight, -1.0 for weight 0
        self._owner: dict[Any, Any] = {}  # key -> owner

    def _new(self) -> EvictionPolicy:
        return self._cls(self.capacity, clock=self.clock, **self._options)

    def _part(self, owner: Any) -> EvictionPolicy:
        part = self._parts.get(owner)
        if part is None:
            part, self._spare = (self._new() if self._spare is None else self._spare), None
            self._parts[owner] = part
            w = self.weight(owner)
            self._inv[owner] = 1.0 / w if w > 0 else -1.0
        return part

    def weight(self, owner: Any) -> float:
        return self.weights.get(owner, self.other_weight)

    def held(self) -> dict:
        """{owner: keys held} for every owner holding one."""
        return {o: len(p) for o, p in self._parts.items() if len(p)}

    # ---------------------------------------------------------------- tracking

    def insert(self, key, hints=None):
        owner = None if hints is None else hints.owner
        was = self._owner.get(key, _ABSENT)
        if was is not _ABSENT and was != owner:  # a key changes owner: it leaves the old one
            self._parts[was].remove(key)
        self._owner[key] = owner
        part = self._parts.get(owner)
        (self._part(owner) if part is None else part).insert(key, hints)

    def insert_many(self, keys, hints=None):
        if isinstance(hints, (list, tuple)):
            owners = [None if h is None else h.owner for h in hints]
            if owners and owners.count(owners[0]) != len(owners):  # several owners: each its own run
                for owner in dict.fromkeys(owners):
                    idx = [i for i, o in enumerate(owners) if o == owner]
                    self.insert_many([keys[i] for i in idx], [hints[i] for i in idx])
                return
            owner = owners[0] if owners else None
        else:
            owner = None if hints is None else hints.owner
        own = self._owner
        if not own.keys().isdisjoint(keys):  # some tracked already (the contract allows re-inserts)
            for i, key in enumerate(keys):
                self.insert(key, hints[i] if isinstance(hints, (list, tuple)) else hints)
            return
        own.update(dict.fromkeys(keys, owner))
        self._part(owner).insert_many(keys, hints)

    def _by_owner(self, keys) -> dict:
        """{owner: its tracked keys among keys, in order}."""
        if not isinstance(keys, (list, tuple)):
            keys = list(keys)
        if not keys:
            return {}
        owners = list(map(self._owner.get, keys, repeat(_ABSENT)))
        first = owners[0]
        if owners.count(first) == len(owners):  # the usual case: one request, one owner
            return {} if first is _ABSENT else {first: keys}
        groups: dict = {}
        for key, owner in zip(keys, owners):
            if owner is not _ABSENT:
                g = groups.get(owner)
                if g is None:
                    groups[owner] = [key]
                else:
                    g.append(key)
        return groups

    def touch(self, keys):
        parts = self._parts
        if len(parts) == 1:  # one owner: its policy ignores unknown keys itself
            next(iter(parts.values())).touch(keys)
            return
        if isinstance(keys, (list, tuple)) and len(keys) == 1:
            owner = self._owner.get(keys[0], _ABSENT)
            if owner is not _ABSENT:
                parts[owner].touch(keys)
            return
        for owner, ks in self._by_owner(keys).items():
            parts[owner].touch(ks)

    def batch_stored(self, keys):
        for owner, ks in self._by_owner(keys).items():
            self._parts[owner].batch_stored(ks)

    def accepts(self, key, hints=None):
        part = self._parts.get(None if hints is None else hints.owner)
        if part is None:
            part = self._new() if self._spare is None else self._spare
        return part.accepts(key, hints)

    def remove(self, key):
        owner = self._owner.pop(key, _ABSENT)
        if owner is not _ABSENT:
            self._parts[owner].remove(key)

    def __len__(self):
        return len(self._owner)

    def __contains__(self, key):
        return key in self._owner

    # ---------------------------------------------------------------- eviction

    def evict(self, n, protected=()):
        if n <= 0:
            return []
        parts, own = self._parts, self._owner
        if len(own) - len(protected) < n:  # maybe too few unprotected keys: count them (nothing taken yet)
            if not isinstance(protected, (set, frozenset, dict)):
                protected = set(protected)
            if len(own) - sum(1 for key in protected if key in own) < n:
                return None
        if len(parts) == 1:  # one owner: its own policy's atomic evict
            victims = next(iter(parts.values())).evict(n, protected)
            if victims:
                _drain(map(own.__delitem__, victims))
            return victims
        if n == 1:  # the usual single victim (promotions, a policy refusing keys): no plan to build
            got = parts[self._top()].evict(1, protected)
            if got:
                del own[got[0]]
                return got
        held = {o: len(p) for o, p in parts.items() if len(p)}
        taken: list = []  # (owner, victims)
        need = n
        while need:
            plan = self._plan(need, held)
            if not plan:
                break
            for owner, k in plan:
                part = parts[owner]
                got = part.evict(k, protected)
                if got is None:  # some of its keys are protected: all it can give, then plan again
                    got = self._what_it_gives(owner, part, k, protected)
                    held.pop(owner)
                else:
                    held[owner] -= k
                if got:
                    taken.append((owner, got))
                    need -= len(got)
        if need:  # not enough unprotected keys: put back what was taken
            for owner, got in taken:
                part = parts[owner]
                for key in got:
                    part.insert(key, None)
            return None
        victims = taken[0][1] if len(taken) == 1 else [k for _, got in taken for k in got]
        _drain(map(own.__delitem__, victims))
        return victims

    def _what_it_gives(self, owner, part, k, protected) -> list:
        """At most k victims of one owner whose evict(k) refused: its unprotected keys, counted."""
        own = self._owner
        free = len(part) - sum(1 for key in protected if own.get(key, _ABSENT) == owner)
        free = min(k, free)
        got = part.evict(free, protected) if free > 0 else []
        if got is None:  # a policy that keeps some unprotected keys (a third-party one; not prefix since 11bea26)
            got = []
            while len(got) < free:
                one = part.evict(1, protected)
                if not one:
                    break
                got += one
        return got

    def _top(self) -> Any:
        """The owner _plan(1) takes from, in one pass: the highest level (weight 0 above all, by
        count; ties: the owner that appeared first). Some owner holds a key."""
        inv = self._inv
        best = zbest = 0.0
        top = ztop = _ABSENT
        for owner, part in self._parts.items():
            c = len(part)
            if c:
                i = inv[owner]
                if i < 0:
                    if c > zbest:
                        zbest, ztop = c, owner
                elif c * i > best:
                    best, top = c * i, owner
        return ztop if ztop is not _ABSENT else top

    def _plan(self, need: int, held: dict) -> list:
        """[(owner, victims)] taking `need` blocks from the highest levels down (see the module
        docstring); owners of weight 0 first, most blocks first."""
        inv = self._inv
        zero = [(c, -i, o) for i, (o, c) in enumerate(held.items()) if inv[o] < 0]
        plan: list = []
        if zero:  # weight 0: level them by count, above everyone else
            zero.sort(reverse=True)
            take = _water_fill(need, [(o, c, 1.0) for c, _, o in zero])
            plan += take
            need -= sum(k for _, k in take)
            if not need:
                return plan
        rest = [(o, c, 1.0 / inv[o]) for o, c in held.items() if inv[o] > 0]
        rest.sort(key=lambda x: -x[1] / x[2])  # stable: ties keep the order owners appeared
        return plan + _water_fill(need, rest)


def _water_fill(need: int, owners: list) -> list:
    """owners [(owner, held, weight)], highest level (held / weight) first: [(owner, take)]
    with sum(take) = min(need, sum(held)), lowering the highest levels to one level L (take =
    held - L * weight, rounded; the blocks rounding leaves go to the highest levels first)."""
    total = sum(c for _, c, _ in owners)
    if need >= total:
        return [(o, c) for o, c, _ in owners if c]
    csum = wsum = 0.0
    k = 0
    level = 0.0
    for k, (_, c, w) in enumerate(owners):
        csum += c
        wsum += w
        nxt = owners[k + 1][1] / owners[k + 1][2] if k + 1 < len(owners) else 0.0
        if csum - nxt * wsum >= need:  # the first k+1 owners, lowered to nxt, give enough
            if not k:  # the highest alone (a flood's usual case)
                return [(owners[0][0], need)]
            level = (csum - need) / wsum
            break
    active = owners[:k + 1]
    take = [min(c, max(0, int(c - level * w))) for _, c, w in active]  # floor: never over need
    short = need - sum(take)
    # the rounding's remainder: one more each from the owners left highest, in order
    order = sorted(range(len(active)), key=lambda i: -(active[i][1] - take[i]) / active[i][2]) if short else ()
    while short > 0:
        for i in order:
            if short and take[i] < active[i][1]:
                take[i] += 1
                short -= 1
    return [(active[i][0], t) for i, t in enumerate(take) if t]
