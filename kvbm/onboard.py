"""Onboard: loads toward G1, with promotion into the top tier (a BlockManager mixin).

    prepare_load(keys, destination) -> LoadJob   pin the ready prefix, reserve promotions
    complete_load(job, failed, promotion_failed) unpin; promotions become ready
    load(keys, destination) -> LoadJob           both phases and the copy (kvbm.jobs) at once

A hit below the top tier is promoted when `promote_on_hit` is on: exclusive mode moves the
block up, inclusive mode copies it. A block that fails its checksum (or is missing) is dropped
and ends the usable prefix (`job.loaded`); one whose store did not answer (object storage: a
timeout, a refused connection; `storage.unavailable(key)`) ends the prefix but is kept.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from .journal import atomic
from .tier import Event, LoadJob, Tier, check_unique


class Onboard:
    @atomic
    def prepare_load(self, keys: Sequence[Any], destination: Any = None) -> LoadJob:
        """Pin the ready prefix of `keys` (an access), reserve promotions into the top tier.

        Stops at the first key that is no longer ready (evicted since lookup): only a prefix
        is useful to an engine. Raises ValueError, changing nothing, when a key repeats.
        """
        check_unique(keys)
        job = LoadJob(destination=destination)
        sources = []
        for key in keys:
            for t in self.tiers:
                if key in t.ready:
                    break
            else:
                break
            sources.append(t)
            self._pin(t, key)
        top = self.tiers[0]
        run: list = []
        run_tier = None
        for key, t in zip(keys, sources):
            t.stats.hits += 1
            job.keys.append(key)
            job.tiers.append(t)
            job.slots.append(t.ready[key])
            if t is top or not self.promote_on_hit:
                if t is not run_tier and run:
                    run_tier.policy.touch(run)
                    run = []
                run_tier = t
                run.append(key)
                continue
            if run:
                run_tier.policy.touch(run)
                run = []
            self._promote(job, key, t)
        if run:
            run_tier.policy.touch(run)
        if self._observers:
            for adm in self._observers:
                adm.observe(job.keys)
        return job

    def _promote(self, job: LoadJob, key: Any, src: Tier) -> None:
        top = self.tiers[0]
        # Already on its way up (another load's promotion, or a store): a second reservation
        # would take a second slot under the same key and orphan the first.
        if (key in top.pending or top.capacity - len(top.busy) < 1
                or not top.admission.admit(key, self._hints.get(key))):
            src.policy.touch((key,))
            return
        hints = self._hints_for(top, key, self._hints.get(key), *self._structure(key))
        if self.exclusive and src.storage.instant and src.pins.get(key) == 1:
            # Metadata only: the move is instantaneous, so the source slot is free before the
            # top tier makes room (and its victim may land in exactly that slot).
            slot = src.ready[key]
            self._unpin(src, key)
            self._drop(src, key, moved=True)
            ok, top_slot = self._reserve(top, key, hints)
            if not ok:  # the top tier's policy refused: the block stays where it was
                src.ready[key] = slot
                src.policy.insert(key, self._hints_for(src, key, self._hints.get(key), *self._structure(key)))
                self._pin(src, key)
                return
            job.tiers[-1] = None
        else:
            src.policy.touch((key,))
            ok, top_slot = self._reserve(top, key, hints)
            if not ok:
                return
        src.stats.promotions_out += 1
        job.promotions.append((key, src, top_slot, len(job.keys) - 1))

    @atomic
    def complete_load(self, job: LoadJob, failed: Iterable[Any] = (),
                      promotion_failed: Iterable[Any] = ()) -> None:
        """Unpin sources; promotions become ready.

        `failed` keys could not be read intact (missing, I/O or checksum error): they are
        dropped from their tier, never served again, and cut the usable prefix (`loaded`);
        those whose storage says the store did not answer are kept (a miss for this load).
        `promotion_failed` keys loaded fine but their copy into the top tier did not land.
        """
        failed = set(failed)
        job.failed = [k for k in job.keys if k in failed]
        job.loaded = len(job.keys)
        for i, (key, t) in enumerate(zip(job.keys, job.tiers)):
            if t is None:  # an instant move already released it
                continue
            self._unpin(t, key)
            if key in failed:
                job.loaded = min(job.loaded, i)
                t.stats.load_failures += 1
                if key in t.ready and key not in t.busy and not _unavailable(t, key):
                    self._drop(t, key)
            else:
                self._settle(t, key)  # another job's promotion moved it up while this load held it
        top = self.tiers[0]
        ev = self._events if self._record_events else None
        undo = failed | set(promotion_failed)
        j = self._j
        for key, src, slot, _ in job.promotions:
            j.saw(top, key)
            del top.pending[key]
            top.busy.discard(key)
            if key in undo:
                top.policy.remove(key)
                self._free(top, slot)
                top.stats.failed += 1
                continue
            top.ready[key] = slot
            if self.exclusive and key in src.ready and key not in src.busy:
                self._drop(src, key, moved=True)
            if ev is not None:
                ev.append(Event("moved", key, top.name, src.name))

    @atomic
    def load(self, keys: Sequence[Any], destination: Any = None) -> LoadJob:
        """prepare_load, the copy into `destination` (one buffer per key), complete_load."""
        check_unique(keys)
        top = self.tiers[0]
        if self._instant and all(map(top.ready.__contains__, keys)):
            # Metadata only and all in the top tier: the access is the whole load, no pins needed.
            keys = list(keys)
            top.policy.touch(keys)
            top.stats.hits += len(keys)
            for adm in self._observers:
                adm.observe(keys)
            return LoadJob(keys, [top] * len(keys), None, (), destination, len(keys))
        job = self.prepare_load(keys, destination)
        if self._instant:
            self.complete_load(job)
            return job
        self.complete_load(job, *self._read_job(job))  # a copy that raises rolls back the load
        return job


def _unavailable(t: Tier, key: Any) -> bool:
    """The tier's storage says key's read failed only because the store did not answer (object
    storage: a timeout, a refused connection): keep the block, it is a miss for this load only."""
    ask = getattr(t.storage, "unavailable", None)
    return bool(ask(key)) if ask is not None else False
