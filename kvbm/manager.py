"""BlockManager: the tiered block pool. It owns every invariant; policies and storages stay dumb.

    lookup(keys) -> (n_hit, where)          longest ready prefix, fastest tier per block
    locate(keys) -> [tier index or -1]      per-block presence (block hits beyond the prefix)
    prepare_store / complete_store          two-phase, all-or-nothing reservation, rollback on failure
    prepare_load / complete_load            pins sources until the copy lands; optional promotion
    store(keys) / load(keys)                both phases at once (metadata-only storages)
    serve(keys) -> where                    one request: locate, load the ready prefix, store the rest
    pin / unpin / remove                    explicit pins, invalidation
    take_events() / stats()                 stored / removed / moved events; per-tier counters

Invariants:
- a block is served (lookup, load) only while *ready*: never while pending or after a failure;
- a pending or pinned block is *busy* and is never chosen as a victim;
- each tier holds at most `capacity` blocks (ready + pending), always;
- a victim of tier k is offered to tier k+1 (cascade); that tier's admission policy decides.

Modes: `exclusive` (default) keeps a block in one tier: promotion moves it up and eviction
moves it down. `inclusive` keeps lower copies: promotion copies up, and a block evicted from
tier k is dropped there if tier k+1 already holds it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, NamedTuple, Sequence

from .config import ConfigError, KVBMConfig
from .policies.base import DEFAULT_HINTS, AdmissionPolicy, EvictionPolicy, Hints
from .registry import ADMISSION, EVICTION, STORAGE, UnknownName
from .tiers.base import Storage, namespace_id
from .transfer import BufferSet, PathStats, TransferEngine, transfer


class Event(NamedTuple):
    kind: str  # "stored" | "removed" | "moved"
    key: Any
    tier: str  # where the block is now (moved) or was (removed)
    source: str | None = None  # tier a moved block came from


@dataclass(slots=True)
class TierStats:
    hits: int = 0  # blocks served to a load from this tier
    stores: int = 0  # blocks written into this tier from a source (engine)
    demotions_in: int = 0  # blocks that arrived from the tier above
    promotions_out: int = 0  # blocks moved or copied to the top tier on a hit
    evictions: int = 0  # victims chosen by this tier's policy
    drops: int = 0  # victims that left the hierarchy from this tier
    rejected: int = 0  # offers refused by this tier's admission policy
    failed: int = 0  # writes rolled back (a medium error, or the caller said so)
    load_failures: int = 0  # reads that did not return intact bytes (the block was dropped)
    recovered: int = 0  # blocks found again at start (persistent media)


class Tier:
    """Capacity + eviction policy + admission policy + storage, and the block states."""

    __slots__ = ("name", "index", "capacity", "policy", "admission", "storage",
                 "ready", "pending", "busy", "pins", "stats")

    def __init__(self, name: str, capacity: int, policy: EvictionPolicy,
                 admission: AdmissionPolicy, storage: Storage) -> None:
        self.name = name
        self.index = 0
        self.capacity = capacity
        self.policy = policy
        self.admission = admission
        self.storage = storage
        self.ready: dict[Any, Any] = {}  # key -> slot, servable
        self.pending: dict[Any, Any] = {}  # key -> slot, being written
        self.busy: set = set()  # pending or pinned: protected from eviction
        self.pins: dict[Any, int] = {}  # key -> reader count
        self.stats = TierStats()

    @property
    def used(self) -> int:
        return len(self.ready) + len(self.pending)

    def __repr__(self) -> str:
        return f"Tier({self.name}, {self.used}/{self.capacity}, {self.policy.name})"


@dataclass(eq=False)  # identity: two jobs of equal fields are different work
class StoreJob:
    """Reserved, not-ready blocks awaiting their bytes. `rejected` jobs reserved nothing."""

    runs: list = field(default_factory=list)  # (tier, keys, slots or None, index of keys[0])
    source: Any = None
    rejected: str | None = None
    failed: Sequence[Any] = ()  # keys whose bytes did not land (rolled back)
    position: int = 0  # index of the stored keys' first block in its sequence

    @property
    def keys(self) -> list:
        return [k for _, keys, _, _ in self.runs for k in keys]


@dataclass(eq=False)  # identity: two jobs of equal fields are different work
class Ticket:
    """An asynchronous store or load: `done` once poll()/wait() completed it."""

    kind: str
    job: Any
    future: Any
    done: bool = False
    error: BaseException | None = None


@dataclass(eq=False)  # identity: two jobs of equal fields are different work
class LoadJob:
    """Pinned source blocks; `keys[:n]` are being loaded, `promotions` reserved in the top tier."""

    keys: list = field(default_factory=list)
    tiers: list = field(default_factory=list)
    slots: list = field(default_factory=list)
    promotions: list = field(default_factory=list)  # (key, source tier, top slot, index in keys)
    destination: Any = None
    loaded: int = 0  # keys[:loaded] landed intact: the usable prefix
    failed: Sequence[Any] = ()  # keys that could not be read (miss, checksum)


class BlockManager:
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
        self.paths = PathStats()
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
        a block recovered in a faster tier wins). Their bytes are verified when read."""
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
        """Build tiers from config. `simulation` carries the future for simulation-only policies."""
        nbytes = config.layout.block_nbytes if config.layout else 0
        ns = namespace_id(config.namespace.model, config.layout.fingerprint if config.layout else "-",
                          config.namespace.salt)
        tiers = []
        for tc in config.tiers:
            where = f"tiers.{tc.name}"
            pcls = _resolve(EVICTION, tc.eviction.name, f"{where}.eviction")
            kwargs = dict(tc.eviction.options)
            if pcls.simulation_only:
                if simulation is None:
                    raise ConfigError(
                        f"{where}.eviction: {tc.eviction.name!r} needs the future and runs only "
                        f"inside `kvbm simulate`; choose an online policy ({', '.join(EVICTION.names())})"
                    )
                kwargs.update(simulation)
            policy = _build(pcls, f"{where}.eviction", tc.capacity, clock=clock, **kwargs)
            acls = _resolve(ADMISSION, tc.admission.name, f"{where}.admission")
            admission = _build(acls, f"{where}.admission", clock=clock, **tc.admission.options)
            scls = _resolve(STORAGE, tc.storage.name, f"{where}.storage")
            if not scls.instant and not nbytes:
                raise ConfigError(f"{where}.storage: {tc.storage.name!r} holds real bytes; give a `layout` "
                                  f"so kvbm knows the block size")
            storage = _build(scls, f"{where}.storage", tc.capacity, nbytes, namespace=ns, **tc.storage.options)
            tiers.append(Tier(tc.name, tc.capacity, policy, admission, storage))
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

    def prepare_store(self, keys: Sequence[Any], hints: Hints | Sequence[Hints] | None = None,
                      parent: Any = None, source: Any = None, position: int = 0) -> StoreJob:
        """Reserve room for every key not yet stored; all or nothing.

        Keys already ready are touched (an access) and, below the top tier with promotion on,
        moved up since the source holds fresh bytes. Keys pending elsewhere are skipped.
        `parent` is the key before keys[0] in its sequence and `position` the index of keys[0]
        in it (for structure-aware policies).
        """
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

    def _reserve_run(self, job, t, keys, start, end, hints, per_key, parent) -> None:
        """Make room for keys[start:end], all new to t (one evict call), and insert them pending."""
        if t.policy.filters_inserts:
            self._reserve_each(job, t, keys, start, end, hints, per_key, parent)
            return
        n = end - start
        free = t.capacity - len(t.ready) - len(t.pending)
        if n > free:
            victims = t.policy.evict(n - free, t.busy)
            if victims is None:  # only stale-plan keys can lack room: take what fits
                victims = self._evict_upto(t, n - free)
                end = start + free + len(victims)
            self._evicted_all(t, victims)
        run = keys[start:end]
        if not isinstance(run, list):
            run = list(run)
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
            slots = [t.storage.allocate() for _ in run]
            t.pending.update(zip(run, slots))
        t.busy.update(run)
        job.runs.append((t, run, slots, start))

    def _reserve_each(self, job, t, keys, start, end, hints, per_key, parent) -> None:
        """Key by key, for policies that may refuse a new key (accepts): ask, evict one, insert."""
        policy, structured = t.policy, t.policy.wants_structure
        instant = t.storage.instant
        for i in range(start, end):
            key = keys[i]
            h = hints[i] if per_key else hints
            prev = keys[i - 1] if i else parent
            ph = self._hints_for(t, key, h, prev, job.position + i) if structured else h
            if not policy.accepts(key, ph):
                t.stats.rejected += 1
                continue
            if len(t.ready) + len(t.pending) >= t.capacity:
                victims = policy.evict(1, t.busy)
                if victims is None:
                    continue
                self._evicted_all(t, victims)
            self._remember(key, h, prev, job.position + i)
            slot = None if instant else t.storage.allocate()
            policy.insert(key, ph)
            t.pending[key] = slot
            t.busy.add(key)
            job.runs.append((t, [key], None if instant else [slot], i))

    def _evict_upto(self, t: Tier, n: int) -> list:
        victims: list = []
        while n > 0:
            v = t.policy.evict(1, t.busy)
            if not v:
                break
            victims += v
            n -= 1
        return victims

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

    def complete_store(self, job: StoreJob, failed: Iterable[Any] = ()) -> None:
        """Mark written blocks ready; roll back the `failed` ones (never served)."""
        failed = set(failed) if failed else None
        ev = self._events if self._record_events else None
        job.failed = [k for _, keys, _, _ in job.runs for k in keys if k in failed] if failed else []
        for t, keys, slots, _ in job.runs:
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
                            t.storage.free(slots[keys.index(k)])
                        self._forget_if_gone(k)
                if slots is not None:
                    slots = [s for k, s in zip(keys, slots) if k not in failed]
                keys = ok
            t.ready.update(zip(keys, slots) if slots is not None else dict.fromkeys(keys))
            t.stats.stores += len(keys)
            if ev is not None:
                ev.extend(Event("stored", k, t.name) for k in keys)

    def store(self, keys: Sequence[Any], hints: Hints | Sequence[Hints] | None = None,
              parent: Any = None, source: Any = None, position: int = 0) -> StoreJob:
        top = self.tiers[0]
        if (self._plain_store and hints is None
                and self._all_new(keys) and len(keys) <= top.capacity - len(top.busy)):
            # Metadata only, all new, one run: prepare and complete collapse into one step with
            # the same policy calls, since nothing can observe the pending state in between.
            run = keys if isinstance(keys, list) else list(keys)
            free = top.capacity - len(top.ready) - len(top.pending)
            victims = top.policy.evict(len(run) - free, top.busy) if len(run) > free else []
            if victims is not None:  # else: the general path below handles a refusing policy
                self._evicted_all(top, victims)
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
        try:
            failed = self._write_job(job)
        except BaseException:
            self.complete_store(job, failed=job.keys)
            raise
        self.complete_store(job, failed)
        return job

    # ---------------------------------------------------------------- asynchronous

    def submit_store(self, keys: Sequence[Any], source: Sequence[Any], hints: Any = None,
                     parent: Any = None, position: int = 0) -> "Ticket":
        """prepare_store now, the bytes on a worker thread; poll() completes it."""
        job = self.prepare_store(keys, hints, parent, source, position)
        return self._submit("store", job, self._write_job)

    def submit_load(self, keys: Sequence[Any], destination: Sequence[Any]) -> "Ticket":
        """prepare_load now (pins), the bytes on a worker thread; poll() completes it."""
        job = self.prepare_load(keys, destination)
        return self._submit("load", job, self._read_job)

    def poll(self) -> list["Ticket"]:
        """Complete every finished transfer (on the caller's thread); return those tickets."""
        done = [t for t in self._tickets if t.future is None or t.future.done()]
        if not done:
            return []
        self._tickets = [t for t in self._tickets if not (t.future is None or t.future.done())]
        for ticket in done:
            self._finish(ticket)
        return done

    def wait(self, ticket: "Ticket", timeout: float | None = None) -> Any:
        """Block until ticket's transfer finished and is completed; returns its job."""
        if ticket.future is not None:
            try:
                ticket.future.result(timeout)
            except BaseException:  # reported by _finish
                pass
        if ticket in self._tickets:
            self._tickets.remove(ticket)
            self._finish(ticket)
        if ticket.error is not None:
            raise ticket.error
        return ticket.job

    def _submit(self, kind: str, job: Any, work: Callable[[Any], Any]) -> "Ticket":
        busy = bool(job.runs) if kind == "store" else bool(job.keys)
        future = None
        if busy and not self._instant:
            if self._engine is None:
                self._engine = TransferEngine()
            future = self._engine.submit(work, job)
        ticket = Ticket(kind, job, future)
        self._tickets.append(ticket)
        return ticket

    def _finish(self, ticket: "Ticket") -> None:
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

    # ---------------------------------------------------------------- load

    def prepare_load(self, keys: Sequence[Any], destination: Any = None) -> LoadJob:
        """Pin the ready prefix of `keys` (an access), reserve promotions into the top tier.

        Stops at the first key that is no longer ready (evicted since lookup): only a prefix
        is useful to an engine.
        """
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

    def complete_load(self, job: LoadJob, failed: Iterable[Any] = (),
                      promotion_failed: Iterable[Any] = ()) -> None:
        """Unpin sources; promotions become ready.

        `failed` keys could not be read intact (missing, I/O or checksum error): they are
        dropped from their tier, never served again, and cut the usable prefix (`loaded`).
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
                if key in t.ready and key not in t.busy:
                    self._drop(t, key)
        top = self.tiers[0]
        ev = self._events if self._record_events else None
        undo = failed | set(promotion_failed)
        for key, src, slot, _ in job.promotions:
            del top.pending[key]
            top.busy.discard(key)
            if key in undo:
                top.policy.remove(key)
                top.storage.free(slot)
                top.stats.failed += 1
                continue
            top.ready[key] = slot
            if self.exclusive and key in src.ready and key not in src.busy:
                self._drop(src, key, moved=True)
            if ev is not None:
                ev.append(Event("moved", key, top.name, src.name))

    def load(self, keys: Sequence[Any], destination: Any = None) -> LoadJob:
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
        try:
            failed, promo_failed = self._read_job(job)
        except BaseException:
            self.complete_load(job, failed=job.keys)
            raise
        self.complete_load(job, failed, promo_failed)
        return job

    # ---------------------------------------------------------------- one request

    def serve(self, keys: Sequence[Any]) -> list[int]:
        """What an engine does per request, metadata only: `locate(keys)`, `load` the ready
        prefix, `store` the rest in order (ready blocks are touched, new ones inserted).

        Returns `locate(keys)` as it was before the request. The same policy calls as the three
        verbs one after the other; one tier over `null` storage takes a single pass without jobs.
        """
        if not self._plain_serve:
            where = self.locate(keys)
            n = where.index(-1) if -1 in where else len(where)
            if n:
                self.load(keys[:n])
            if n < len(where):
                self.store(keys[n:], parent=keys[n - 1] if n else None, position=n)
            return where
        top = self.tiers[0]
        hit = list(map(top.ready.__contains__, keys))
        nkeys = len(hit)
        misses = hit.count(False)
        n = hit.index(False) if misses else nkeys
        if n:  # load's metadata-only fast path: the access is the whole load
            prefix = keys[:n]
            top.policy.touch(prefix)
            top.stats.hits += n
            for adm in self._observers:
                adm.observe(prefix)
        if misses != nkeys - n:  # ready blocks after the first miss: the general store touches them
            self.store(keys[n:], parent=keys[n - 1] if n else None, position=n)
            return [h - 1 for h in hit]  # True -> tier 0, False -> -1
        if misses:  # one run of new blocks: store()'s fast path, inlined
            rest, parent = keys[n:], keys[n - 1] if n else None
            if not self._store_new(top, rest, parent, n):
                self.store(rest, parent=parent, position=n)
        return [0] * n + [-1] * misses

    def _store_new(self, top: Tier, run: Sequence[Any], parent: Any, position: int) -> bool:
        """store(run) for keys not ready in the one tier, with store()'s policy calls; False,
        with nothing called or changed, where its fast path does not apply (a key pending or
        repeated, no room)."""
        new = dict.fromkeys(run)
        nrun, pending, capacity = len(run), top.pending, top.capacity
        if (len(new) != nrun or nrun > capacity - len(top.busy)
                or (pending and not pending.keys().isdisjoint(run))):
            return False
        ready = top.ready
        over = nrun - (capacity - len(ready) - len(pending))
        if over > 0:
            victims = top.policy.evict(over, top.busy)
            if victims is None:  # as in store(): the two phases handle a refusing policy
                self.complete_store(self.prepare_store(run, None, parent, None, position))
                return True
            if self._hints or self._parents or self._forgetters:
                self._evicted_all(top, victims)
            else:  # _evicted_all's hot path: the last tier drops its victims, nothing to forget
                for v in victims:
                    del ready[v]
                stats, nv = top.stats, len(victims)
                stats.evictions += nv
                stats.drops += nv
        top.policy.insert_many(run, None)
        ready.update(new)
        top.stats.stores += nrun
        return True

    # ---------------------------------------------------------------- pins, removal, events

    def touch(self, keys: Iterable[Any]) -> int:
        """An access to each ready key where it is, no bytes moved (an engine that reads its
        own copy, e.g. vLLM's primary tier, tells kvbm the block is in use); returns count."""
        by_tier: dict[int, list] = {}
        for key in keys:
            for i, t in enumerate(self.tiers):
                if key in t.ready:
                    by_tier.setdefault(i, []).append(key)
                    break
        for i, run in by_tier.items():
            self.tiers[i].policy.touch(run)
        return sum(map(len, by_tier.values()))

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

    def unpin(self, keys: Iterable[Any]) -> None:
        for key in keys:
            for t in self.tiers:
                if key in t.pins:
                    self._unpin(t, key)
                    break

    def remove(self, keys: Iterable[Any]) -> int:
        """Invalidate keys in every tier; busy (pinned, in-flight) blocks raise."""
        n = 0
        for key in keys:
            for t in self.tiers:
                if key in t.busy:
                    raise RuntimeError(f"cannot remove {key!r} from {t.name}: it is pinned or in flight")
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

    # ---------------------------------------------------------------- internals

    def _pin(self, t: Tier, key: Any) -> None:
        t.pins[key] = t.pins.get(key, 0) + 1
        t.busy.add(key)

    def _unpin(self, t: Tier, key: Any) -> None:
        n = t.pins.get(key, 0) - 1
        if n > 0:
            t.pins[key] = n
            return
        t.pins.pop(key, None)
        if key not in t.pending:
            t.busy.discard(key)

    def _reserve(self, t: Tier, key: Any, hints: Hints | None) -> tuple[bool, Any]:
        """Make room for one block in t (cascading victims down) and insert it as pending.

        (False, None), with nothing changed, when the policy finds no victim: a policy may
        refuse while unpinned blocks remain (prefix keeps every ancestor of a pinned block).
        """
        if len(t.ready) + len(t.pending) >= t.capacity:
            victims = t.policy.evict(len(t.ready) + len(t.pending) - t.capacity + 1, t.busy)
            if victims is None:
                return False, None
            self._evicted_all(t, victims)
        slot = t.storage.allocate()
        t.policy.insert(key, hints)
        t.pending[key] = slot
        t.busy.add(key)
        return True, slot

    def _evicted_all(self, t: Tier, victims: list) -> None:
        """Policy victims leave t. Each is offered to the next tier (one batched copy for all
        that are admitted); the rest leave the hierarchy."""
        if not victims:
            return
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
                    t.storage.free(slot)
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
            extra = nxt.policy.evict(need, nxt.busy)
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
        dst_slots = [nxt.storage.allocate() for _ in movers]
        ok = self._move(t, src_slots, nxt, dst_slots, keys)
        for v, slot, dst, good in zip(keys, src_slots, dst_slots, ok):
            if not good:  # the medium failed (full, I/O error): the block drops
                nxt.storage.free(dst)
                nxt.stats.failed += 1
                self._dropped(t, v, slot)
                continue
            nxt.policy.insert(v, self._hints_for(nxt, v, self._hints.get(v), *self._structure(v)))
            nxt.ready[v] = dst
            nxt.stats.demotions_in += 1
            t.storage.free(slot)
            self._event("moved", v, nxt.name, t.name)

    def _dropped(self, t: Tier, key: Any, slot: Any) -> None:
        t.storage.free(slot)
        t.stats.drops += 1
        self._event("removed", key, t.name)
        self._forget_if_gone(key)

    @property
    def _stateful(self) -> bool:
        """True when dropping a key must clear per-key state (hints, parents, admission)."""
        return bool(self._hints or self._parents or self._forgetters)

    def _drop(self, t: Tier, key: Any, moved: bool = False) -> None:
        slot = t.ready.pop(key)
        t.policy.remove(key)
        t.storage.free(slot)
        if not moved:
            self._event("removed", key, t.name)
            self._forget_if_gone(key)

    def _event(self, kind: str, key: Any, tier: str, source: str | None = None) -> None:
        if self._record_events:
            self._events.append(Event(kind, key, tier, source))

    def _structure(self, key: Any) -> tuple[Any, int]:
        return self._parents.get(key, (None, 0))

    def _remember(self, key: Any, hints: Hints | None, parent: Any, position: int = 0) -> None:
        if hints is not None and hints is not DEFAULT_HINTS:
            self._hints[key] = hints
        if self._structured and parent is not None:
            self._parents[key] = (parent, position)

    def _hints_for(self, t: Tier, key: Any, hints: Hints | None, parent: Any, position: int) -> Hints | None:
        if not t.policy.wants_structure:
            return hints
        base = hints or DEFAULT_HINTS
        return Hints(base.priority, base.duration, parent, position, base.size)

    def _forget_if_gone(self, key: Any) -> None:
        if not (self._hints or self._parents or self._forgetters):
            return
        for t in self.tiers:
            if key in t.ready or key in t.pending:
                return
        self._hints.pop(key, None)
        self._parents.pop(key, None)
        for adm in self._forgetters:
            adm.forget(key)

    # Data movement. Only metadata-only (instant) storages exist so far; real media register
    # transfer handlers per (source medium, destination medium) with the data plane.

    def _move(self, src: Tier, src_slots: list, dst: Tier, dst_slots: list, keys: list) -> list[bool]:
        """Copy blocks down the hierarchy (demotions) in one batch; per block: did it land."""
        if self._instant:
            return [True] * len(keys)
        return transfer(src.storage, src_slots, dst.storage, dst_slots, keys, self.paths)


def _resolve(registry, name: str, where: str):
    try:
        return registry.get(name)
    except UnknownName as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _build(cls, where: str, *args, **kwargs):
    try:
        return cls(*args, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
