"""Background offload: keep free room in a tier by demoting its victims off the engine's path.

    prepare_demote(manager, tier, n) -> DemoteJob   choose victims, reserve their room below
    run_demote(manager, job) -> [bool]              move the bytes (no manager state touched)
    complete_demote(manager, job, ok)               victims ready below, their slots freed
    offload_pass(manager, headroom) -> int          one bottom-up round toward `headroom` free blocks
    Offloader(manager, lock)                        a thread that keeps `headroom` free per tier

Without it, a store into a full tier demotes that tier's victims inside `prepare_store`,
synchronously on the caller's thread: an engine step waits for the G2 -> G3 disk write of
blocks that have nothing to do with it (measured: 32 blocks of 2 MiB took 57 ms instead of
25 ms once G2 was full). The offloader keeps `headroom` blocks free in every tier that has
a tier below, so stores find room at once; a store that still finds none falls back to the
synchronous cascade, so nothing changes for correctness.

The three phases follow the manager's two-phase verbs. Under the caller's lock, `prepare`
takes victims from the tier's policy (busy blocks are never chosen) and leaves them *pending
in both tiers*: their slots above stay allocated (nobody can reuse them while the bytes are
read), room below is reserved, and they are served by neither (a brief miss, never stale
bytes). `run` copies without the lock. `complete`, under the lock again, makes them ready
below (or drops them if the copy failed) and frees their slots above.
Room below is never made by cascading I/O under the lock: the offloader cleans bottom-up, and
`prepare` moves only as many victims as the tier below has free slots (the last tier drops
its own victims, a metadata step, to make room).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from .transfer import transfer

log = logging.getLogger(__name__)


@dataclass
class DemoteJob:
    """Victims of `src` on their way to `dst` (pending in both until complete_demote)."""

    src: Any = None  # Tier
    dst: Any = None  # Tier
    keys: list = field(default_factory=list)
    src_slots: list = field(default_factory=list)
    dst_slots: list = field(default_factory=list)


def free_room(t: Any) -> int:
    return t.capacity - len(t.ready) - len(t.pending)


def prepare_demote(m: Any, tier: int, n: int) -> DemoteJob:
    """Reserve the demotion of up to n victims of tiers[tier]; nothing moves yet."""
    tiers = m.tiers
    if not 0 <= tier < len(tiers) - 1:
        raise ValueError(f"tier {tier}: only a tier with a tier below it can demote")
    t, nxt = tiers[tier], tiers[tier + 1]
    job = DemoteJob(t, nxt)
    last = tier + 1 == len(tiers) - 1
    n = min(n, len(t.ready) - len(t.pins), free_room(nxt) if not last else nxt.capacity - len(nxt.busy))
    if n <= 0:
        return job
    victims = t.policy.evict(n, t.busy)
    if victims is None:
        victims = m._evict_upto(t, n)
    t.stats.evictions += len(victims)
    movers = []
    for v in victims:
        slot = t.ready.pop(v)
        if v in nxt.ready:  # the lower tier already holds a copy (see manager._evicted_all)
            t.storage.free(slot)
            m._event("removed", v, t.name)
            continue
        h = m._hints.get(v)
        if v not in nxt.pending and nxt.storage.writable and nxt.admission.admit(v, h) and not (
                nxt.policy.filters_inserts and not nxt.policy.accepts(v, h)):
            movers.append((v, slot))
            continue
        if v not in nxt.pending:
            nxt.stats.rejected += 1
        m._dropped(t, v, slot)
    short = len(movers) - free_room(nxt)
    if short > 0:  # the last tier: its own victims leave the hierarchy (no bytes move)
        extra = nxt.policy.evict(short, nxt.busy)
        if extra is None:
            extra = m._evict_upto(nxt, short)
        m._evicted_all(nxt, extra)
        short = len(movers) - free_room(nxt)
        for v, slot in movers[:max(0, short)]:
            m._dropped(t, v, slot)
        movers = movers[max(0, short):]
    for v, slot in movers:
        dst = nxt.storage.allocate()
        t.pending[v] = slot  # slot kept, counted, not served, not a victim
        t.busy.add(v)
        nxt.pending[v] = dst
        nxt.busy.add(v)
        nxt.policy.insert(v, m._hints_for(nxt, v, m._hints.get(v), *m._structure(v)))
        job.keys.append(v)
        job.src_slots.append(slot)
        job.dst_slots.append(dst)
    return job


def run_demote(m: Any, job: DemoteJob) -> list[bool]:
    """Copy the victims' bytes down; call without the manager's lock. Per block: landed."""
    if not job.keys:
        return []
    if m._instant:
        return [True] * len(job.keys)
    return transfer(job.src.storage, job.src_slots, job.dst.storage, job.dst_slots, job.keys, m.paths)


def complete_demote(m: Any, job: DemoteJob, ok: list[bool]) -> None:
    """The victims become ready below (or drop if their copy failed); their slots above are freed."""
    t, nxt = job.src, job.dst
    for v, slot, dst, good in zip(job.keys, job.src_slots, job.dst_slots, ok):
        del t.pending[v]
        t.busy.discard(v)
        t.storage.free(slot)
        del nxt.pending[v]
        nxt.busy.discard(v)
        if good:
            nxt.ready[v] = dst
            nxt.stats.demotions_in += 1
            m._event("moved", v, nxt.name, t.name)
            continue
        nxt.policy.remove(v)  # the medium failed (full, I/O error): the block drops
        nxt.storage.free(dst)
        nxt.stats.failed += 1
        t.stats.drops += 1
        m._event("removed", v, t.name)
        m._forget_if_gone(v)


def demote(m: Any, tier: int, n: int, lock: Any = None, call: Any = None) -> int:
    """All three phases, the copy outside `lock` (a context manager, or None); blocks moved.
    `call(fn, *args)` instead runs the metadata phases where the manager's owner wants them
    (the daemon: on its request loop)."""
    call = call if call is not None else _under(lock)
    job = call(prepare_demote, m, tier, n)
    ok = []
    try:
        ok = run_demote(m, job)
    finally:
        ok = ok if len(ok) == len(job.keys) else [False] * len(job.keys)
        call(complete_demote, m, job, ok)
    return sum(ok)


def offload_headroom(cfg: Any, manager: Any = None) -> dict[int, int]:
    """Blocks to keep free per tier with a tier below (KVBMConfig tiers' headroom); with
    `manager`, only for tiers holding real bytes (the simulator models them all)."""
    return {i: t.offload_headroom for i, t in enumerate(cfg.tiers[:-1])
            if t.offload_headroom > 0 and (manager is None or not manager.tiers[i].storage.instant)}


class Offloader:
    """Keeps `headroom(tier)` blocks free in every tier with a tier below, on its own thread.

    `kick()` after a store wakes it; it cleans bottom-up (so each tier has room to demote into),
    holding `lock` only for the metadata phases.
    """

    def __init__(self, manager: Any, lock: Any, headroom: dict[int, int], call: Any = None) -> None:
        self.manager = manager
        self._call = call if call is not None else _under(lock)
        self.headroom = {i: n for i, n in headroom.items() if n > 0 and i < len(manager.tiers) - 1}
        self.moved = 0
        self._wake = threading.Event()
        self._stop = False
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._loop, name="kvbm-offload", daemon=True)
        if self.headroom:
            self._thread.start()

    def kick(self) -> None:
        if self.headroom:
            self._idle.clear()
            self._wake.set()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """True once a pass found every tier at its headroom (tests, shutdown)."""
        return self._idle.wait(timeout)

    def stop(self) -> None:
        """Ask the thread to end after the demotion in hand (see `alive`, `join`)."""
        self._stop = True
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def close(self) -> None:
        self.stop()
        self.join()

    def _loop(self) -> None:
        while not self._stop:
            self._wake.wait()
            self._wake.clear()
            try:
                while not self._stop and self._pass():
                    pass
            except Exception:  # the owner is shutting down, or a storage broke: stores still work
                if not self._stop:
                    log.exception("kvbm offload: background demotion stopped")
                self._stop = True
            self._idle.set()

    def _pass(self) -> bool:
        """One bottom-up round; True if anything moved (another round may help)."""
        moved = offload_pass(self.manager, self.headroom, call=self._call)
        self.moved += moved
        return moved > 0


def offload_pass(m: Any, headroom: dict[int, int], lock: Any = None, call: Any = None) -> int:
    """One bottom-up round of demotions toward `headroom` free blocks per tier; blocks moved.

    The Offloader's round, also run inline by the simulator after every request (metadata-only
    tiers copy nothing, so it models a background offloader that keeps up)."""
    call = call if call is not None else _under(lock)
    moved = 0
    for i in sorted(headroom, reverse=True):
        want = headroom[i] - call(free_room, m.tiers[i])
        if want > 0:
            moved += demote(m, i, want, call=call)
    return moved


def _under(lock: Any):
    """call(fn, *args) holding `lock` (None: no lock, the caller owns the manager alone)."""
    def call(fn, *args):
        if lock is None:
            return fn(*args)
        with lock:
            return fn(*args)
    return call
