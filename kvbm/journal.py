"""Journal: what one public BlockManager call changed, so a call that raises changes nothing.

    @atomic                     a public verb: the outermost call opens a Journal, nested verbs share it
    saw(tier, key)              before a key's state in a tier changes: keep its old state once
    saw_all(tier, keys)         the same for many keys
    saw_key(key)                before a key's hints or parent change
    allocate / took / free      storage slots handed out (by the journal, or by the storage) and given back
    rollback()                  put everything back; the caller re-raises

Why a journal and not a snapshot: a tier can hold 10^5 blocks and a call touches a handful.

What rollback restores exactly: every tier's ready / pending / busy / pins entries, hints and
parents, per-tier counters, the event list, the pending tickets, and which keys each eviction
policy tracks (a key a failed call evicted is re-inserted; a key it inserted is removed). What
it cannot restore: a policy's internal order or counts (a re-inserted victim counts as new)
and an admission policy's sightings; both only change future choices, never correctness.

Bytes cannot be un-copied nor un-deleted: a block whose slot the call gave back (an object
deleted, a slot perhaps rewritten with another block's bytes) is not restored into it; it
leaves the tier, with a "removed" event. So a failed call may lose blocks of byte-holding
tiers, but never serves a block with bytes that are not its own. Metadata-only tiers (the
simulator's) roll back exactly.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # pragma: no cover
    from .manager import BlockManager
    from .tier import Tier

_MISSING = object()


def atomic(verb: Callable) -> Callable:
    """A public verb: the outermost call opens the journal and rolls it back if anything raises."""

    @functools.wraps(verb)
    def call(self, *args: Any, **kwargs: Any) -> Any:
        if self._j is not None:  # inside another verb: its journal covers this call
            return verb(self, *args, **kwargs)
        self._j = j = Journal(self)
        try:
            return verb(self, *args, **kwargs)
        except BaseException:
            self._j = None
            j.rollback()
            raise
        finally:
            self._j = None

    return call


def _put(d: dict, key: Any, value: Any) -> None:
    if value is _MISSING:
        d.pop(key, None)
    else:
        d[key] = value


class Journal:
    __slots__ = ("mgr", "seen", "keys", "stats", "nevents", "tickets", "allocated", "freed")

    def __init__(self, mgr: "BlockManager") -> None:
        self.mgr = mgr
        n = len(mgr.tiers)
        self.seen: list[dict] = [{} for _ in range(n)]  # key -> (ready, pending, pins, busy, tracked)
        self.keys: dict = {}  # key -> (hints, parent) before the call
        self.stats = [t.stats.copy() for t in mgr.tiers]
        self.nevents = len(mgr._events)
        self.tickets = list(mgr._tickets)
        self.allocated: list[set] = [set() for _ in range(n)]  # new slots, still held
        self.freed: list[dict] = [{} for _ in range(n)]  # slot held before -> allocated again since

    def saw(self, t: "Tier", key: Any) -> None:
        seen = self.seen[t.index]
        if key not in seen:
            seen[key] = (t.ready.get(key, _MISSING), t.pending.get(key, _MISSING),
                         t.pins.get(key, 0), key in t.busy, key in t.policy)

    def saw_all(self, t: "Tier", keys, tracked: bool | None = None) -> None:
        """`tracked`: whether the policy tracked them before (victims it just forgot: True)."""
        seen, ready, pending, pins, busy = self.seen[t.index], t.ready, t.pending, t.pins, t.busy
        policy = t.policy
        for key in keys:
            if key not in seen:
                seen[key] = (ready.get(key, _MISSING), pending.get(key, _MISSING),
                             pins.get(key, 0), key in busy, key in policy if tracked is None else tracked)

    def saw_key(self, key: Any) -> None:
        if key not in self.keys:
            m = self.mgr
            self.keys[key] = (m._hints.get(key, _MISSING), m._parents.get(key, _MISSING))

    def allocate(self, t: "Tier") -> Any:
        slot = t.storage.allocate()
        if slot in self.freed[t.index]:  # freed earlier in this call: its old owner's bytes are gone
            self.freed[t.index][slot] = True
        else:
            self.allocated[t.index].add(slot)
        return slot

    def took(self, t: "Tier", slot: Any) -> None:
        """A slot the storage handed out on its own (a block it found: adopt_found)."""
        self.allocated[t.index].add(slot)

    def free(self, t: "Tier", slot: Any) -> None:
        t.storage.free(slot)  # at once: a storage's free has effects (an object's delete)
        if slot in self.allocated[t.index]:
            self.allocated[t.index].discard(slot)
        else:
            self.freed[t.index][slot] = False

    def rollback(self) -> None:
        m = self.mgr
        for t, seen in zip(m.tiers, self.seen):
            for key, (ready, pending, pins, busy, _) in seen.items():
                _put(t.ready, key, ready)
                _put(t.pending, key, pending)
                if pins:
                    t.pins[key] = pins
                else:
                    t.pins.pop(key, None)
                if busy:
                    t.busy.add(key)
                else:
                    t.busy.discard(key)
        for key, (hints, parent) in self.keys.items():
            _put(m._hints, key, hints)
            _put(m._parents, key, parent)
        for t, stats in zip(m.tiers, self.stats):
            t.stats = stats
        del m._events[self.nevents:]
        m._tickets[:] = self.tickets
        for t in m.tiers:
            self._slots(t)
        for t in m.tiers:
            self._policy(t)

    def _slots(self, t: "Tier") -> None:
        """New slots go back to the storage; a block whose slot was freed leaves the tier."""
        for slot in self.allocated[t.index]:
            t.storage.free(slot)
        freed = self.freed[t.index]
        if not freed:
            return
        for d in (t.ready, t.pending):
            for key in [k for k, s in d.items() if s in freed]:
                d.pop(key)
                t.busy.discard(key)
                t.pins.pop(key, None)
                self.mgr._event("removed", key, t.name)
        for slot, again in freed.items():
            if again:  # allocated again for a block this rollback removed
                t.storage.free(slot)

    def _policy(self, t: "Tier") -> None:
        """The policy tracks the keys it tracked before the call again (an evict that raised
        midway was repaired where it raised: Placement._evict)."""
        m, policy, ready, pending = self.mgr, t.policy, t.ready, t.pending
        for key, state in self.seen[t.index].items():
            tracked = key in policy
            # a block _slots dropped (its slot was given back) is not tracked again: a policy
            # must never name a victim the tier no longer holds
            want = state[4] and (key in ready or key in pending)
            if want and not tracked:
                policy.insert(key, m._hints_for(t, key, m._hints.get(key), *m._structure(key)))
            elif tracked and not want:
                policy.remove(key)
