"""BlockManager: the tiered block pool. It owns every invariant; policies and storages stay dumb.

    lookup(keys) -> (n_hit, where)          longest ready prefix, fastest tier per block
    locate(keys) -> [tier index or -1]      per-block presence (block hits beyond the prefix)
    prepare_store / complete_store          two-phase, all-or-nothing reservation, rollback on failure
    prepare_load / complete_load            pins sources until the copy lands; optional promotion
    store(keys) / load(keys)                both phases at once (metadata-only storages)
    serve(keys) -> where                    one request: locate, load the ready prefix, store the rest
    pin / unpin / remove                    explicit pins, invalidation
    take_events() / stats()                 stored / removed / moved events; per-tier counters
    keep_meta(fn) / kept_meta()             an opaque blob per key that persistent tiers keep (G3, G4)
    adopt_found()                           blocks a tier found after the start (G4's listing, resumed)

Here: construction, queries, the store verbs, one request (serve), pins, events. Beside it:
onboard.py (the load verbs, promotion), placement.py (where a store's keys go, room-making and
the cascade), jobs.py (the byte copies and asynchronous tickets: submit_*, poll, wait),
journal.py (rollback), build.py (config -> tiers) and tier.py (Tier, jobs, events).

One request's keys name distinct blocks: a block cannot follow itself in a prefix chain (its
key hashes its parent's), so a repeated key is a caller's bug, and the verbs that take a
request's keys (store, load, serve and their phases) raise ValueError naming it, before they
change anything. pin / unpin / touch / remove take any keys (a key given twice counts twice).

Every public verb is atomic: if it raises (a bad argument, or a policy or storage that
raises), the manager is as it was before the call (kvbm.journal says exactly what that covers).

Invariants:
- a block is served (lookup, load) only while *ready*: never while pending or after a failure;
- a pending or pinned block is *busy* and is never chosen as a victim;
- each tier holds at most `capacity` blocks (ready + pending), always;
- a victim of tier k is offered to tier k+1 (cascade); that tier's admission policy decides.

Modes: `exclusive` (default) keeps a block in one tier: promotion moves it up and eviction
moves it down (a promoted block whose source is pinned where it was, by a scheduler's pin or
another load, keeps that source copy until the last release, which drops it). `inclusive` keeps lower copies: promotion copies up, and a block evicted from
tier k is dropped there if tier k+1 already holds it.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Sequence

from .config import ConfigError, KVBMConfig
from .jobs import ByteJobs
from .journal import Journal, atomic
from .onboard import Onboard
from .placement import Placement
from .policies.base import AdmissionPolicy, Hints
from .tier import Event, LoadJob, StoreJob, Ticket, Tier, TierStats, check_unique, repeated_key
from .transfer import PathStats, TransferEngine

__all__ = ["BlockManager", "Event", "LoadJob", "StoreJob", "Ticket", "Tier", "TierStats", "repeated_key"]


class BlockManager(Placement, Onboard, ByteJobs):
    def __init__(self, tiers: Sequence[Tier], *, mode: str = "exclusive",
                 promote_on_hit: bool = True, events: bool = True) -> None:
        if not tiers:
            raise ValueError("BlockManager needs at least one tier")
        if mode not in ("exclusive", "inclusive"):
            raise ValueError(f"mode must be 'exclusive' or 'inclusive', got {mode!r}")
        self.tiers = list(tiers)
        for i, t in enumerate(self.tiers):
            t.index = i
        self.mode = mode
        self.exclusive = mode == "exclusive"
        self.promote_on_hit = promote_on_hit
        self._events: list[Event] = []
        self._hints: dict[Any, Hints] = {}  # only non-default hints
        self._structured = any(t.policy.wants_structure for t in self.tiers)
        self._parents: dict[Any, Any] = {}  # key -> (parent, position), only when a policy wants it
        self._observers = [t.admission for t in self.tiers if t.admission.observes]
        self._readies = [t.ready for t in self.tiers]
        self._admit_all = self.tiers[0].admission.admits_all
        self._instant = all(t.storage.instant for t in self.tiers)
        self._forgetters = [t.admission for t in self.tiers
                            if type(t.admission).forget is not AdmissionPolicy.forget]
        if not self._instant and any(t.storage.instant for t in self.tiers):
            names = ", ".join(f"{t.name}={t.storage.medium}" for t in self.tiers)
            raise ConfigError(f"tiers mix metadata-only and real storages ({names}); give every tier a "
                              f"storage that holds bytes (device, host, disk, object) or none at all")
        self.block_nbytes = self.tiers[0].storage.block_nbytes
        self.record_events = events  # also decides whether store() may fold its two phases
        self._engine: TransferEngine | None = None
        self._tickets: list[Ticket] = []
        self._j: Journal | None = None  # open while a public verb runs (kvbm.journal)
        self.paths = PathStats()
        # tiers whose storage may find blocks after recover() (G4 lists on in the background)
        self._finders = [t for t in self.tiers if getattr(t.storage, "finds_late", False)]
        self._recover()

    @property
    def record_events(self) -> bool:
        return self._record_events

    @record_events.setter
    def record_events(self, on: bool) -> None:
        self._record_events = on
        self._plain_store = (self._instant and not self._structured and not on
                             and not self.tiers[0].policy.filters_inserts)
        # serve() in one pass: one metadata-only tier whose store is plain and admits every key.
        self._plain_serve = self._plain_store and len(self.tiers) == 1 and self._admit_all

    def _recover(self) -> None:
        """Blocks that persistent media kept across a restart become ready again (exclusive:
        a block recovered in a faster tier wins), each a "stored" event of its tier, as a store
        into that tier would give. Their bytes are verified when read."""
        for t in self.tiers:
            if not t.storage.persistent:
                continue
            for key, slot in t.storage.recover():
                dup = key in t.ready or (self.exclusive and any(key in u.ready for u in self.tiers[:t.index]))
                if dup or len(t.ready) >= t.capacity:
                    t.storage.free(slot)
                    continue
                t.ready[key] = slot
                t.policy.insert(key, None)
                t.stats.recovered += 1
                self._event("stored", key, t.name)  # the first events: what came back, per tier

    def adopt_found(self, most: int = 256) -> int:
        """Blocks a persistent tier found after the start (G4 lists its prefix again in the
        background when the listing at start was cut short: object_resume.py) become ready as
        recovered ones do, each a "stored" event, at most `most` per call; poll() calls this, and
        the daemon each tick. Capacity stays a hard bound: when the tier is full its policy
        chooses victims first (they cascade or drop as a store's would). Returns how many."""
        if not any(t.storage.found_waiting for t in self._finders):
            return 0
        return self._adopt_found(most)

    @atomic
    def _adopt_found(self, most: int) -> int:
        n = 0
        for t in self._finders:
            waiting = min(t.storage.found_waiting, most)
            if not waiting:
                continue
            over = t.used + waiting - t.capacity
            if over > 0:
                victims = self._evict(t, over)
                self._evicted_all(t, self._evict_upto(t, over) if victims is None else victims)
            room = t.capacity - t.used
            if room <= 0:
                continue
            held = lambda k, t=t: k in t.ready or k in t.pending  # noqa: E731 (its object is the holder's)
            for key, slot in t.storage.take_found(min(room, waiting), held):
                self._j.took(t, slot)
                if self.exclusive and any(key in u.ready or key in u.pending for u in self.tiers[:t.index]):
                    self._free(t, slot)  # a faster tier holds it: this copy goes, as at recover
                    continue
                self._j.saw(t, key)
                t.ready[key] = slot
                t.policy.insert(key, None)
                t.stats.recovered += 1
                self._event("stored", key, t.name)
                n += 1
        return n

    def keep_meta(self, fn: Callable[[Any], bytes | None]) -> None:
        """fn(key) -> an opaque blob (or None) that tiers keeping metadata (G3, G4) store beside a block
        as they write it (fn may run on transfer threads) and give back after a restart."""
        for t in self.tiers:
            if t.storage.keeps_meta:
                t.storage.meta_of = fn

    def kept_meta(self) -> dict[Any, bytes]:
        """{key: blob} that tiers keeping metadata hold for their ready blocks, oldest write first:
        at start, the blobs of the blocks they recovered (G4 reads its trailers here, once: ask once)."""
        out: dict[Any, bytes] = {}
        for t in self.tiers:
            if t.storage.keeps_meta:
                out.update((k, m) for k, m in t.storage.kept_meta().items() if k in t.ready)
        return out

    def close(self) -> None:
        """Finish in-flight transfers, then flush and release every storage."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        self.poll()
        for t in self.tiers:
            t.storage.close()

    def __enter__(self) -> "BlockManager":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_config(cls, config: KVBMConfig, *, clock: Callable[[], float] = time.monotonic,
                    simulation: dict[str, Any] | None = None) -> "BlockManager":
        """Build tiers from config (kvbm.build: the same checks as `kvbm config check`).
        `simulation` carries the future for simulation-only policies."""
        from .build import build_tiers

        tiers = build_tiers(config, clock=clock, simulation=simulation)
        return cls(tiers, mode=config.mode, promote_on_hit=config.promote_on_hit, events=config.events)

    # ---------------------------------------------------------------- queries

    def locate(self, keys: Iterable[Any]) -> list[int]:
        """Index of the fastest tier where each key is ready, or -1."""
        readies = self._readies
        if len(readies) == 1:
            r = readies[0]
            return [0 if k in r else -1 for k in keys]
        out = []
        for k in keys:
            for i, r in enumerate(readies):
                if k in r:
                    out.append(i)
                    break
            else:
                out.append(-1)
        return out

    def lookup(self, keys: Iterable[Any]) -> tuple[int, list[str]]:
        """Longest prefix of keys ready in some tier, and the fastest tier name per block."""
        where = []
        for k in keys:
            for t in self.tiers:
                if k in t.ready:
                    where.append(t.name)
                    break
            else:
                break
        return len(where), where

    def __contains__(self, key: Any) -> bool:
        return any(key in r for r in self._readies)

    # ---------------------------------------------------------------- store

    @atomic
    def prepare_store(self, keys: Sequence[Any], hints: Hints | Sequence[Hints] | None = None,
                      parent: Any = None, source: Any = None, position: int = 0) -> StoreJob:
        """Reserve room for every key not yet stored; all or nothing.

        Keys already ready are touched (an access) and, below the top tier with promotion on,
        moved up since the source holds fresh bytes. Keys pending elsewhere are skipped.
        Raises ValueError, changing nothing, when a key repeats.
        `parent` is the key before keys[0] in its sequence and `position` the index of keys[0]
        in it (for structure-aware policies).
        """
        check_unique(keys)
        per_key = hints is not None and not isinstance(hints, Hints)
        if per_key and len(hints) != len(keys):
            raise ValueError(f"hints has {len(hints)} entries for {len(keys)} keys")
        job = StoreJob(source=source, position=position)
        if self._all_new(keys):  # the common case: one run of new blocks for the top tier
            top = self.tiers[0]
            if len(keys) > top.capacity - len(top.busy):
                job.rejected = self._no_room(top, len(keys))
            else:
                self._reserve_run(job, top, keys, 0, len(keys), hints, per_key, parent)
            return job
        plan = self._plan_store(keys, hints, per_key)
        if isinstance(plan, str):
            job.rejected = plan
            return job
        top = self.tiers[0]
        touches: list = []  # consecutive accesses to top-tier blocks
        start = end = 0  # keys[start:end] is a run of new blocks for run_tier
        run_tier = top
        for i, key in enumerate(keys):
            action = plan[i]
            # The plan may be stale: a victim of this very job can be a later key of it,
            # which then is new again (as when an engine re-inserts a block it just lost).
            if action == "touch":
                if end > start:  # make the run's room first: it may evict this very key
                    self._reserve_run(job, run_tier, keys, start, end, hints, per_key, parent)
                    start = end
                if key in top.ready:
                    touches.append(key)
                    continue
                action = self._find_lower(key)  # demoted by this job's own evictions
            elif action is None:
                continue
            elif action.__class__ is Tier:
                if end > start:
                    self._reserve_run(job, run_tier, keys, start, end, hints, per_key, parent)
                    start = end
                if key not in action.ready:
                    action = self._find_lower(key)
            if action.__class__ is Tier:
                if self.exclusive and key in action.busy:
                    action.policy.touch((key,))  # a reader holds it there; keep that copy
                    continue
                if self.exclusive:
                    self._drop(action, key, moved=True)
                else:
                    action.policy.touch((key,))
                action.stats.promotions_out += 1
                action = 0
            if touches:
                top.policy.touch(touches)
                touches = []
            target = self.tiers[action]
            if end > start and (target is not run_tier or end != i):
                self._reserve_run(job, run_tier, keys, start, end, hints, per_key, parent)
                start = end
            if end == start:
                start = i
            run_tier = target
            end = i + 1
        if end > start:
            self._reserve_run(job, run_tier, keys, start, end, hints, per_key, parent)
        if touches:
            top.policy.touch(touches)
        return job

    @atomic
    def complete_store(self, job: StoreJob, failed: Iterable[Any] = ()) -> None:
        """Mark written blocks ready; roll back the `failed` ones (never served)."""
        failed = set(failed) if failed else None
        ev = self._events if self._record_events else None
        j = self._j
        for t, keys, slots, _ in job.runs:
            j.saw_all(t, keys, tracked=True)  # pending: inserted when reserved
            pending = t.pending
            for k in keys:
                del pending[k]
            t.busy.difference_update(keys)
            if failed is not None and not failed.isdisjoint(keys):
                ok = [k for k in keys if k not in failed]
                for k in keys:
                    if k in failed:
                        t.policy.remove(k)
                        t.stats.failed += 1
                        if slots is not None:
                            self._free(t, slots[keys.index(k)])
                        self._forget_if_gone(k)
                if slots is not None:
                    slots = [s for k, s in zip(keys, slots) if k not in failed]
                keys = ok
            t.ready.update(zip(keys, slots) if slots is not None else dict.fromkeys(keys))
            t.stats.stores += len(keys)
            if ev is not None:
                ev.extend(Event("stored", k, t.name) for k in keys)
        job.failed = [k for _, keys, _, _ in job.runs for k in keys if k in failed] if failed else []

    @atomic
    def store(self, keys: Sequence[Any], hints: Hints | Sequence[Hints] | None = None,
              parent: Any = None, source: Any = None, position: int = 0) -> StoreJob:
        """prepare_store, the copy from `source` (one buffer per key), complete_store."""
        top = self.tiers[0]
        if (self._plain_store and hints is None
                and self._all_new(keys) and len(keys) <= top.capacity - len(top.busy)):
            # Metadata only, all new, one run: prepare and complete collapse into one step with
            # the same policy calls, since nothing can observe the pending state in between.
            run = keys if isinstance(keys, list) else list(keys)
            free = top.capacity - len(top.ready) - len(top.pending)
            victims = self._evict(top, len(run) - free) if len(run) > free else []
            if victims is not None:  # else: the general path below handles a refusing policy
                self._evicted_all(top, victims)
                self._j.saw_all(top, run, tracked=False)
                top.policy.insert_many(run, None)
                top.ready.update(dict.fromkeys(run))
                top.stats.stores += len(run)
                return StoreJob(runs=[(top, run, None, 0)], source=source)
        if not self._instant and source is None:
            raise ValueError(f"store into {top.name} ({top.storage.medium}) needs `source`: "
                             f"one buffer of {self.block_nbytes} bytes per key")
        job = self.prepare_store(keys, hints, parent, source, position)
        if self._instant:
            self.complete_store(job)
            return job
        self.complete_store(job, self._write_job(job))  # a copy that raises rolls back the store
        return job

    # ---------------------------------------------------------------- one request

    def serve(self, keys: Sequence[Any]) -> list[int]:
        """What an engine does per request, metadata only: `locate(keys)`, `load` the ready
        prefix, `store` the rest in order (ready blocks are touched, new ones inserted).

        Returns `locate(keys)` as it was before the request. The same policy calls as the three
        verbs one after the other; one tier over `null` storage takes a single pass without jobs.
        Raises ValueError, changing nothing, when a key repeats.
        """
        if len(set(keys)) != len(keys):
            raise ValueError(repeated_key(keys))
        if not self._plain_serve:
            return self._serve(keys)
        top = self.tiers[0]
        hit = list(map(top.ready.__contains__, keys))
        nkeys = len(hit)
        misses = hit.count(False)
        n = hit.index(False) if misses else nkeys
        if n:  # load's metadata-only fast path: the access is the whole load
            prefix = keys[:n]
            top.policy.touch(prefix)
            for adm in self._observers:
                adm.observe(prefix)
            top.stats.hits += n
        try:
            if misses != nkeys - n:  # ready blocks after the first miss: the general store touches them
                self.store(keys[n:], parent=keys[n - 1] if n else None, position=n)
                return [h - 1 for h in hit]  # True -> tier 0, False -> -1
            if misses:  # one run of new blocks: store()'s fast path, inlined
                rest, parent = keys[n:], keys[n - 1] if n else None
                if not self._store_new(top, rest, parent, n):
                    self.store(rest, parent=parent, position=n)
        except BaseException:
            top.stats.hits -= n  # the store rolled itself back
            raise
        return [0] * n + [-1] * misses

    @atomic
    def _serve(self, keys: Sequence[Any]) -> list[int]:
        where = self.locate(keys)
        n = where.index(-1) if -1 in where else len(where)
        if n:
            self.load(keys[:n])
        if n < len(where):
            self.store(keys[n:], parent=keys[n - 1] if n else None, position=n)
        return where

    @atomic
    def _store_phases(self, run: Sequence[Any], parent: Any, position: int) -> None:
        self.complete_store(self.prepare_store(run, None, parent, None, position))

    def _store_new(self, top: Tier, run: Sequence[Any], parent: Any, position: int) -> bool:
        """store(run) for new keys of the one tier, with store()'s policy calls; False, with
        nothing called or changed, where its fast path does not apply (a key pending, no room,
        per-key state to forget: the journaled store() handles those). Atomic on its own."""
        nrun, pending, capacity = len(run), top.pending, top.capacity
        if (nrun > capacity - len(top.busy) or (pending and not pending.keys().isdisjoint(run))
                or self._hints or self._parents or self._forgetters):
            return False
        ready, policy, stats = top.ready, top.policy, top.stats
        over = nrun - (capacity - len(ready) - len(pending))
        victims = ()
        if over > 0:
            victims = self._evict(top, over)
            if victims is None:  # as in store(): the two phases handle a refusing policy
                self._store_phases(run, parent, position)
                return True
            for v in victims:  # _evicted_all's hot path: the last tier drops its victims
                del ready[v]
        try:
            policy.insert_many(run, None)
        except BaseException:
            for k in run:
                if k in policy:
                    policy.remove(k)
            ready.update(dict.fromkeys(victims))
            self._repair(top)  # the victims, tracked again
            raise
        nv = len(victims)
        stats.evictions += nv
        stats.drops += nv
        ready.update(dict.fromkeys(run))
        stats.stores += nrun
        return True

    # ---------------------------------------------------------------- pins, removal, events

    def touch(self, keys: Iterable[Any]) -> int:
        """An access to each ready key where it is, no bytes moved (an engine that reads its
        own copy, e.g. vLLM's primary tier, tells kvbm the block is in use); returns count.
        Only policies' order changes, so a touch that raises needs no rollback."""
        by_tier: dict[int, list] = {}
        for key in keys:
            for i, t in enumerate(self.tiers):
                if key in t.ready:
                    by_tier.setdefault(i, []).append(key)
                    break
        for i, run in by_tier.items():
            self.tiers[i].policy.touch(run)
        return sum(map(len, by_tier.values()))

    @atomic
    def pin(self, keys: Iterable[Any]) -> int:
        """Pin the ready prefix of keys where it is (protects it from eviction); returns count."""
        n = 0
        for key in keys:
            for t in self.tiers:
                if key in t.ready:
                    self._pin(t, key)
                    n += 1
                    break
            else:
                break
        return n

    @atomic
    def unpin(self, keys: Iterable[Any]) -> None:
        for key in keys:
            for t in self.tiers:
                if key in t.pins:
                    self._unpin(t, key)
                    self._settle(t, key)
                    break

    @atomic
    def remove(self, keys: Iterable[Any]) -> int:
        """Invalidate keys in every tier; a busy (pinned, in-flight) block raises RuntimeError
        and nothing is removed."""
        keys = list(keys)
        for key in keys:  # all checked first: a busy key anywhere in the list removes nothing
            for t in self.tiers:
                if key in t.busy:
                    raise RuntimeError(f"cannot remove {key!r} from {t.name}: it is pinned or in flight")
        n = 0
        for key in keys:
            for t in self.tiers:
                if key in t.ready:
                    self._drop(t, key)
                    n += 1
        return n

    def take_events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def stats(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "transfers": self.paths.report(),
            "tiers": {
                t.name: {"capacity": t.capacity, "used": t.used, "policy": t.policy.name,
                         "medium": t.storage.medium,
                         **{k: getattr(t.stats, k) for k in TierStats.__slots__},
                         "io_errors": t.storage.errors.io_errors,
                         "checksum_errors": t.storage.errors.checksum_errors,
                         "foreign_objects": t.storage.errors.foreign_objects,
                         "writes_refused": t.storage.errors.writes_refused}
                for t in self.tiers
            },
        }

