"""Placement: making room in a tier and the cascade of its victims (a BlockManager mixin).

    _reserve_run(job, tier, keys, ...)   room for a run of new keys (one evict call), inserted pending
    _reserve_each(job, tier, keys, ...)  the same key by key, for policies that may refuse a key
    _reserve(tier, key, hints)           room for one block (promotions)
    _evicted_all(tier, victims)          victims leave a tier: offered to the next one, or dropped
    _drop / _dropped                     a block leaves the hierarchy (events, forgotten state)
    _pin / _unpin                        readers of a block; a pinned block is busy
    _alloc / _free                       storage slots, through the open journal

Every change to a tier's block states goes through here or through the verbs in manager.py,
and each one first tells the open journal (kvbm.journal) what it is about to change, so a
public verb that raises leaves the manager as it found it.
"""

from __future__ import annotations

from typing import Any

from .policies.base import DEFAULT_HINTS, Hints
from .tier import Event, Tier


class Placement:
    # ---------------------------------------------------------------- room in a tier

    def _reserve_run(self, job, t, keys, start, end, hints, per_key, parent) -> None:
        """Make room for keys[start:end], all new to t (one evict call), and insert them pending."""
        if t.policy.filters_inserts:
            self._reserve_each(job, t, keys, start, end, hints, per_key, parent)
            return
        n = end - start
        free = t.capacity - len(t.ready) - len(t.pending)
        if n > free:
            victims = self._evict(t, n - free)
            if victims is None:  # only stale-plan keys can lack room: take what fits
                victims = self._evict_upto(t, n - free)
                end = start + free + len(victims)
            self._evicted_all(t, victims)
        run = keys[start:end]
        if not isinstance(run, list):
            run = list(run)
        j = self._j
        if j is not None:
            j.saw_all(t, run, tracked=False)  # all new to t
        if hints is None and not self._structured:
            t.policy.insert_many(run, None)
        else:
            structured, per_block = t.policy.wants_structure, []
            for i in range(start, end):
                key = keys[i]
                h = hints[i] if per_key else hints
                prev = keys[i - 1] if i else parent
                self._remember(key, h, prev, job.position + i)
                per_block.append(self._hints_for(t, key, h, prev, job.position + i) if structured else h)
            t.policy.insert_many(run, per_block)
        if t.storage.instant:
            slots = None
            t.pending.update(dict.fromkeys(run))
        else:
            slots = [self._alloc(t) for _ in run]
            t.pending.update(zip(run, slots))
        t.busy.update(run)
        job.runs.append((t, run, slots, start))

    def _reserve_each(self, job, t, keys, start, end, hints, per_key, parent) -> None:
        """Key by key, for policies that may refuse a new key (accepts): ask, evict one, insert."""
        policy, structured = t.policy, t.policy.wants_structure
        instant = t.storage.instant
        j = self._j
        for i in range(start, end):
            key = keys[i]
            h = hints[i] if per_key else hints
            prev = keys[i - 1] if i else parent
            ph = self._hints_for(t, key, h, prev, job.position + i) if structured else h
            if not policy.accepts(key, ph):
                t.stats.rejected += 1
                continue
            if len(t.ready) + len(t.pending) >= t.capacity:
                victims = self._evict(t, 1)
                if victims is None:
                    continue
                self._evicted_all(t, victims)
            self._remember(key, h, prev, job.position + i)
            slot = None if instant else self._alloc(t)
            if j is not None:
                j.saw(t, key)
            policy.insert(key, ph)
            t.pending[key] = slot
            t.busy.add(key)
            job.runs.append((t, [key], None if instant else [slot], i))

    def _all_new(self, keys: Sequence[Any]) -> bool:
        """No key is ready or pending anywhere, none repeats, and the top tier admits all."""
        if not self._admit_all:
            return False
        for t in self.tiers:
            if not (t.ready.keys().isdisjoint(keys) and t.pending.keys().isdisjoint(keys)):
                return False
        return len(set(keys)) == len(keys)

    @staticmethod
    def _no_room(t: "Tier", n: int) -> str:
        return (f"{t.name} cannot make room for {n} blocks: capacity {t.capacity}, "
                f"{len(t.busy)} busy (pinned or in flight)")

    def _find_lower(self, key: Any) -> "Tier | int":
        for t in self.tiers[1:]:
            if key in t.ready:
                return t
        return 0

    def _plan_store(self, keys, hints, per_key):
        """Per key: "touch", a lower Tier to promote from, a target tier index, or None."""
        top = self.tiers[0]
        plan: list = []
        need = [0] * len(self.tiers)
        seen = set()
        for i, key in enumerate(keys):
            if key in top.ready or key in seen:
                plan.append("touch" if key in top.ready else None)
                continue
            seen.add(key)
            lower = None
            pending = False
            for t in self.tiers:
                if key in t.pending:
                    pending = True
                    break
                if t is not top and key in t.ready:
                    lower = t
                    break
            if pending:
                plan.append(None)
            elif lower is not None:
                if self.promote_on_hit and not (self.exclusive and key in lower.busy):
                    plan.append(lower)
                    need[0] += 1
                else:
                    lower.policy.touch((key,))
                    plan.append(None)
            else:
                if self._admit_all:
                    plan.append(0)
                    need[0] += 1
                    continue
                h = hints[i] if per_key else hints
                for t in self.tiers:
                    if t.storage.writable and t.admission.admit(key, h):
                        plan.append(t.index)
                        need[t.index] += 1
                        break
                    t.stats.rejected += 1
                else:
                    plan.append(None)
        for t, n in zip(self.tiers, need):
            if n and n > t.capacity - len(t.busy):
                return self._no_room(t, n)
        return plan

    def _evict_upto(self, t: Tier, n: int) -> list:
        victims: list = []
        while n > 0:
            v = self._evict(t, 1)
            if not v:
                break
            victims += v
            n -= 1
        return victims

    def _reserve(self, t: Tier, key: Any, hints: Hints | None) -> tuple[bool, Any]:
        """Make room for one block in t (cascading victims down) and insert it as pending.

        (False, None), with nothing changed, when the policy finds no victim: a policy may
        refuse while unpinned blocks remain (prefix keeps every ancestor of a pinned block).
        """
        if len(t.ready) + len(t.pending) >= t.capacity:
            victims = self._evict(t, len(t.ready) + len(t.pending) - t.capacity + 1)
            if victims is None:
                return False, None
            self._evicted_all(t, victims)
        slot = self._alloc(t)
        if self._j is not None:
            self._j.saw(t, key)
        t.policy.insert(key, hints)
        t.pending[key] = slot
        t.busy.add(key)
        return True, slot

    # ---------------------------------------------------------------- the cascade

    def _evicted_all(self, t: Tier, victims: list) -> None:
        """Policy victims leave t. Each is offered to the next tier (one batched copy for all
        that are admitted); the rest leave the hierarchy."""
        if not victims:
            return
        j = self._j  # (victims come from _evict, which showed them to the journal)
        nxt = self.tiers[t.index + 1] if t.index + 1 < len(self.tiers) else None
        t.stats.evictions += len(victims)
        if nxt is None and t.storage.instant and not self._record_events and not self._stateful:
            ready = t.ready  # last tier, metadata only, nothing to forget: the replay hot path
            for v in victims:
                del ready[v]
            t.stats.drops += len(victims)
            return
        movers: list = []  # (key, slot in t)
        for v in victims:
            slot = t.ready.pop(v)
            if nxt is not None:
                # The lower tier already holds a copy: inclusive mode, or an exclusive promotion
                # that had to leave a pinned source in place. Moving would orphan its slot.
                if v in nxt.ready:
                    self._free(t, slot)
                    self._event("removed", v, t.name)
                    continue
                h = self._hints.get(v)
                if v not in nxt.pending:
                    if nxt.storage.writable and nxt.admission.admit(v, h) and not (
                            nxt.policy.filters_inserts and not nxt.policy.accepts(v, h)):
                        movers.append((v, slot))
                        continue
                    nxt.stats.rejected += 1
            self._dropped(t, v, slot)
        if not movers:
            return
        # Room for all movers in one go; nxt's own victims cascade further down first.
        need = len(movers) - (nxt.capacity - len(nxt.ready) - len(nxt.pending))
        if need > 0:
            extra = self._evict(nxt, need)
            if extra is None:
                extra = self._evict_upto(nxt, need)
            self._evicted_all(nxt, extra)
            short = len(movers) - (nxt.capacity - len(nxt.ready) - len(nxt.pending))
            if short > 0:  # everything else in nxt is busy: the oldest victims drop
                for v, slot in movers[:short]:
                    self._dropped(t, v, slot)
                movers = movers[short:]
        keys = [v for v, _ in movers]
        src_slots = [slot for _, slot in movers]
        alloc = nxt.storage.allocate if j is None or nxt.storage.instant else self._alloc_in(nxt)
        dst_slots = [alloc() for _ in movers]
        ok = self._move(t, src_slots, nxt, dst_slots, keys)
        if j is not None:
            j.saw_all(nxt, keys, tracked=False)  # new to nxt
        free = t.storage.free if j is None or t.storage.instant else self._free_in(t)
        insert, ready, hints, structured = nxt.policy.insert, nxt.ready, self._hints, nxt.policy.wants_structure
        for v, slot, dst, good in zip(keys, src_slots, dst_slots, ok):
            if not good:  # the medium failed (full, I/O error): the block drops
                self._free(nxt, dst)
                nxt.stats.failed += 1
                self._dropped(t, v, slot)
                continue
            h = hints.get(v)
            insert(v, self._hints_for(nxt, v, h, *self._structure(v)) if structured else h)
            ready[v] = dst
            nxt.stats.demotions_in += 1
            free(slot)
            self._event("moved", v, nxt.name, t.name)

    def _dropped(self, t: Tier, key: Any, slot: Any) -> None:
        self._free(t, slot)
        t.stats.drops += 1
        self._event("removed", key, t.name)
        self._forget_if_gone(key)

    @property
    def _stateful(self) -> bool:
        """True when dropping a key must clear per-key state (hints, parents, admission)."""
        return bool(self._hints or self._parents or self._forgetters)

    def _drop(self, t: Tier, key: Any, moved: bool = False) -> None:
        if self._j is not None:
            self._j.saw(t, key)
        slot = t.ready.pop(key)
        t.policy.remove(key)
        self._free(t, slot)
        if not moved:
            self._event("removed", key, t.name)
            self._forget_if_gone(key)

    # ---------------------------------------------------------------- pins, slots, per-key state

    def _pin(self, t: Tier, key: Any) -> None:
        if self._j is not None:
            self._j.saw(t, key)
        t.pins[key] = t.pins.get(key, 0) + 1
        t.busy.add(key)

    def _settle(self, t: Tier, key: Any) -> None:
        """Exclusive mode: a copy in t that a faster tier now holds ready goes, once nothing holds
        it. A promotion that finds its source pinned (a scheduler's pin, another load) leaves the
        source where it is (onboard.complete_load); the last release ends the move here."""
        if (self.exclusive and key in t.ready and key not in t.busy
                and any(key in u.ready for u in self.tiers[:t.index])):
            self._drop(t, key)

    def _unpin(self, t: Tier, key: Any) -> None:
        if self._j is not None:
            self._j.saw(t, key)
        n = t.pins.get(key, 0) - 1
        if n > 0:
            t.pins[key] = n
            return
        t.pins.pop(key, None)
        if key not in t.pending:
            t.busy.discard(key)

    def _evict(self, t: Tier, n: int) -> list | None:
        """t's policy chooses n victims (or None); one that raises forgets nothing."""
        try:
            victims = t.policy.evict(n, t.busy)
        except BaseException:
            self._repair(t)
            raise
        if victims and self._j is not None:
            self._j.saw_all(t, victims, tracked=True)
        return victims

    def _repair(self, t: Tier) -> None:
        """After an evict raised midway: the policy tracks every ready key of t again (a ready
        block is always tracked; pending ones may be demotions, which the source no longer is)."""
        policy = t.policy
        for key in t.ready:
            if key not in policy:
                policy.insert(key, self._hints_for(t, key, self._hints.get(key), *self._structure(key)))

    def _alloc_in(self, t: Tier):
        return lambda: self._j.allocate(t)

    def _free_in(self, t: Tier):
        return lambda slot: self._j.free(t, slot)

    def _alloc(self, t: Tier) -> Any:
        j = self._j
        if j is None or t.storage.instant:
            return t.storage.allocate()
        return j.allocate(t)

    def _free(self, t: Tier, slot: Any) -> None:
        j = self._j
        if j is None or t.storage.instant:
            t.storage.free(slot)
        else:
            j.free(t, slot)

    def _event(self, kind: str, key: Any, tier: str, source: str | None = None) -> None:
        if self._record_events:
            self._events.append(Event(kind, key, tier, source))

    def _structure(self, key: Any) -> tuple[Any, int]:
        return self._parents.get(key, (None, 0))

    def _remember(self, key: Any, hints: Hints | None, parent: Any, position: int = 0) -> None:
        keep_hints = hints is not None and hints is not DEFAULT_HINTS
        keep_parent = self._structured and parent is not None
        if (keep_hints or keep_parent) and self._j is not None:
            self._j.saw_key(key)
        if keep_hints:
            self._hints[key] = hints
        if keep_parent:
            self._parents[key] = (parent, position)

    def _hints_for(self, t: Tier, key: Any, hints: Hints | None, parent: Any, position: int) -> Hints | None:
        if not t.policy.wants_structure:
            return hints
        base = hints or DEFAULT_HINTS
        return Hints(base.priority, base.duration, parent, position, base.size, base.owner)

    def _forget_if_gone(self, key: Any) -> None:
        if not (self._hints or self._parents or self._forgetters):
            return
        for t in self.tiers:
            if key in t.ready or key in t.pending:
                return
        if self._j is not None:
            self._j.saw_key(key)
        self._hints.pop(key, None)
        self._parents.pop(key, None)
        for adm in self._forgetters:
            adm.forget(key)
