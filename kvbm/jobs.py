"""Byte jobs: the copies behind the two-phase verbs, and asynchronous tickets (a BlockManager mixin).

    submit_store(keys, source) -> Ticket     prepare_store now, the copy on a worker thread
    submit_load(keys, destination) -> Ticket prepare_load now (pins), the copy on a worker thread
    poll() -> [Ticket]                       complete every finished copy, on the caller's thread
    wait(ticket) -> job                      block until one ticket is complete
    _write_job / _read_job / _move           the copies themselves (no manager state touched)

The metadata of every job (reservations, pins, rollback) is the manager's; this file only
moves bytes between the caller's buffers and the tiers' storages.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from .journal import atomic
from .tier import LoadJob, StoreJob, Ticket, Tier
from .transfer import BufferSet, TransferEngine, transfer


class ByteJobs:
    @atomic
    def submit_store(self, keys: Sequence[Any], source: Sequence[Any], hints: Any = None,
                     parent: Any = None, position: int = 0) -> Ticket:
        """prepare_store now, the bytes on a worker thread; poll() completes it."""
        job = self.prepare_store(keys, hints, parent, source, position)
        return self._submit("store", job, self._write_job)

    @atomic
    def submit_load(self, keys: Sequence[Any], destination: Sequence[Any]) -> Ticket:
        """prepare_load now (pins), the bytes on a worker thread; poll() completes it."""
        job = self.prepare_load(keys, destination)
        return self._submit("load", job, self._read_job)

    @atomic
    def poll(self) -> list[Ticket]:
        """Complete every finished transfer (on the caller's thread); return those tickets.
        Blocks a tier found after the start are adopted here too (adopt_found)."""
        if self._finders:
            self.adopt_found()
        done = [t for t in self._tickets if t.future is None or t.future.done()]
        if not done:
            return []
        self._tickets[:] = [t for t in self._tickets if not (t.future is None or t.future.done())]
        try:
            for ticket in done:
                self._finish(ticket)
        except BaseException:
            for ticket in done:  # the journal puts them back in the list, not yet complete
                ticket.done, ticket.error = False, None
            raise
        return done

    def wait(self, ticket: Ticket, timeout: float | None = None) -> Any:
        """Block until ticket's transfer finished and is completed; returns its job.

        A transfer that raised is completed first (its blocks rolled back, never served),
        then its error is raised here: that is the job's outcome, not a failed call.
        """
        if ticket.future is not None:
            try:
                ticket.future.result(timeout)
            except BaseException:  # reported by _finish
                pass
        if ticket in self._tickets:
            self._finish_one(ticket)
        if ticket.error is not None:
            raise ticket.error
        return ticket.job

    @atomic
    def _finish_one(self, ticket: Ticket) -> None:
        self._tickets.remove(ticket)
        try:
            self._finish(ticket)
        except BaseException:
            ticket.done, ticket.error = False, None
            raise

    def _submit(self, kind: str, job: Any, work: Callable[[Any], Any]) -> Ticket:
        busy = bool(job.runs) if kind == "store" else bool(job.keys)
        future = None
        if busy and not self._instant:
            if self._engine is None:
                self._engine = TransferEngine()
            future = self._engine.submit(work, job)
        ticket = Ticket(kind, job, future)
        self._tickets.append(ticket)
        return ticket

    def _finish(self, ticket: Ticket) -> None:
        job, fut = ticket.job, ticket.future
        result: Any = ([], []) if ticket.kind == "load" else []
        if fut is not None:
            try:
                result = fut.result()
            except BaseException as exc:  # a bad buffer, a bug: nothing is served from it
                ticket.error = exc
                result = (list(job.keys), []) if ticket.kind == "load" else list(job.keys)
        if ticket.kind == "store":
            self.complete_store(job, result)
        else:
            self.complete_load(job, *result)
        ticket.done = True

    # ---------------------------------------------------------------- bytes

    def _write_job(self, job: StoreJob) -> list:
        """Copy each reserved block from the caller's buffers; returns keys that did not land."""
        if not job.runs:
            return []
        if job.source is None:
            raise ValueError("this store reserved blocks but has no `source` buffers to copy from")
        src = BufferSet(job.source, self.block_nbytes)
        failed: list = []
        for t, run, slots, start in job.runs:
            ok = transfer(src, range(start, start + len(run)), t.storage, slots, run, self.paths)
            failed += [k for k, good in zip(run, ok) if not good]
        return failed

    def _read_job(self, job: LoadJob) -> tuple[list, list]:
        """Copy each pinned block to the caller's buffers, then promotions into the top tier."""
        dst = BufferSet(job.destination, self.block_nbytes) if job.destination is not None else None
        failed: list = []
        if dst is not None:
            by_tier: dict[int, list[int]] = {}
            for i, t in enumerate(job.tiers):
                if t is not None:
                    by_tier.setdefault(t.index, []).append(i)
            for ti, idx in by_tier.items():
                t = self.tiers[ti]
                keys = [job.keys[i] for i in idx]
                ok = transfer(t.storage, [job.slots[i] for i in idx], dst, idx, keys, self.paths)
                failed += [k for k, good in zip(keys, ok) if not good]
        bad = set(failed)
        promo_failed: list = []
        top = self.tiers[0].storage
        for key, src, slot, i in job.promotions:
            if key in bad:
                continue
            if dst is not None:
                ok = transfer(dst, [i], top, [slot], [key], self.paths)
            else:
                ok = transfer(src.storage, [job.slots[i]], top, [slot], [key], self.paths)
                if not ok[0]:
                    failed.append(key)  # the source itself is unreadable
                    continue
            if not ok[0]:
                promo_failed.append(key)
        return failed, promo_failed

    def _move(self, src: Tier, src_slots: list, dst: Tier, dst_slots: list, keys: list) -> list[bool]:
        """Copy blocks down the hierarchy (demotions) in one batch; per block: did it land."""
        if self._instant:
            return [True] * len(keys)
        return transfer(src.storage, src_slots, dst.storage, dst_slots, keys, self.paths)
