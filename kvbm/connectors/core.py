"""Engine-independent connector logic, shared by the vLLM and TensorRT-LLM adapters.

    shared_manager(config)        one BlockManager per config in this process (scheduler and
                                  worker halves of one engine share it)
    SchedulerSide                 engine block hashes -> keys, prefix match, load/store plans
    WorkerSide                    runs the plans: gather/scatter paged KV, async store/load
    PagedKV (paged.py)            an engine's per-layer paged tensors; one kvbm block = one
                                  engine block id across all layers, staged contiguously

A kvbm block is the bytes of one engine block (all layers), so the block keys are the engine's
own chained block hashes adopted into the kvbm namespace (model + layout + salt + cache salt).
Scheduler and worker meet only through plain plans (lists of keys and block ids), which is
what an engine ships from its scheduler to its workers.

One process, one manager: multi-process deployments (tensor parallel workers in other
processes) need the cache daemon, where every process talks to one manager.

Both halves reach kvbm through a backend with the few operations they need (lookup; store
from and load into staging rows; poll for completion):
    ManagerBackend   the process's BlockManager (the default)
    DaemonBackend    a `kvbm serve` daemon through kvbm.client.Client, chosen with
                     extra config {"kvbm_daemon": "tcp://127.0.0.1:5557", "kvbm_token": ...}
                     (daemon_backend.py; its names are re-exported here)
SchedulerSide and WorkerSide take either a backend or (manager, lock) as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..blocks import KVLayout, Namespace
from ..config import ConfigError, KVBMConfig, load_config
from ..manager import BlockManager
from ..offload import Offloader, offload_headroom
from ..policies.base import Hints
from .daemon_backend import DaemonBackend, daemon_spec, release_backends, shared_backend
from .paged import PagedKV

log = logging.getLogger(__name__)

_MANAGERS: dict[str, tuple[BlockManager, threading.RLock]] = {}
_OFFLOADERS: dict[int, Offloader] = {}  # id(manager) -> its background offloader
_MANAGERS_LOCK = threading.Lock()


def resolve_config(spec: str | Mapping[str, Any] | None, layout: KVLayout, model: str) -> dict[str, Any]:
    """The kvbm config as a plain dict, from a file path or an inline dict, with the engine's layout.

    A config without `layout` takes the engine's; a config with one must match it exactly
    (a block of another shape would be served as garbage). A default namespace takes the model.
    """
    if spec is None:
        raise ConfigError("kv_connector_extra_config.kvbm_config is missing: give a path to kvbm.yaml "
                          "or an inline config dict")
    if isinstance(spec, str):
        data = _as_dict(load_config(spec))
    elif isinstance(spec, Mapping):
        data = json.loads(json.dumps(dict(spec)))  # a private deep copy
    else:
        raise ConfigError(f"kvbm_config must be a path or a mapping, got {type(spec).__name__}")
    engine = {f: getattr(layout, f) for f in layout.__dataclass_fields__}
    if data.get("layout") is None:
        data["layout"] = engine
    else:
        given = KVBMConfig.from_dict({"tiers": [{"name": "g2", "capacity": 1}], "layout": data["layout"]}).layout
        if given != layout:
            raise ConfigError(f"layout in the kvbm config {given} does not match the engine's KV cache {layout}; "
                              f"remove `layout` from the config (the connector fills it) or fix it")
    ns = dict(data.get("namespace") or {})
    if ns.get("model", "default") == "default":
        ns["model"] = model
    data["namespace"] = ns
    KVBMConfig.from_dict(data)  # validate now: errors name the key
    return data


def _as_dict(config: KVBMConfig) -> dict[str, Any]:
    return {
        "layout": None if config.layout is None else
        {f: getattr(config.layout, f) for f in config.layout.__dataclass_fields__},
        "namespace": {"model": config.namespace.model, "salt": config.namespace.salt},
        "mode": config.mode, "promote_on_hit": config.promote_on_hit, "events": config.events,
        "tiers": [{"name": t.name, "capacity": t.capacity,
                   "eviction": {"name": t.eviction.name, **t.eviction.options},
                   "admission": {"name": t.admission.name, **t.admission.options},
                   "storage": {"name": t.storage.name, **t.storage.options},
                   **({} if t.headroom is None else {"headroom": t.headroom})} for t in config.tiers],
    }


def shared_manager(config: Mapping[str, Any]) -> tuple[BlockManager, threading.RLock]:
    """The process's BlockManager for this config (built on first use) and its lock."""
    key = json.dumps(config, sort_keys=True)
    with _MANAGERS_LOCK:
        entry = _MANAGERS.get(key)
        if entry is None:
            cfg = KVBMConfig.from_dict(config)
            manager, lock = BlockManager.from_config(cfg), threading.RLock()
            entry = (manager, lock)
            _MANAGERS[key] = entry
            _OFFLOADERS[id(manager)] = Offloader(manager, lock, offload_headroom(cfg, manager))
        return entry


def release_managers() -> None:
    """Close every shared manager and daemon backend (tests, engine shutdown)."""
    with _MANAGERS_LOCK:
        entries = list(_MANAGERS.values())
        _MANAGERS.clear()
        offloaders = list(_OFFLOADERS.values())
        _OFFLOADERS.clear()
    for offloader in offloaders:
        offloader.close()
    for manager, lock in entries:
        with lock:
            manager.close()
    release_backends()


# ---------------------------------------------------------------- backends


class ManagerBackend:
    """The in-process path: a BlockManager behind its lock; tickets are the manager's."""

    def __init__(self, manager: BlockManager, lock: threading.RLock) -> None:
        self.manager = manager
        self.lock = lock
        # keeps room free in G2 (and below) so a store never demotes on the engine's thread
        self.offloader = _OFFLOADERS.get(id(manager))

    @property
    def block_nbytes(self) -> int:
        return self.manager.block_nbytes

    def lookup(self, keys: Sequence[Any]) -> tuple[int, list[str]]:
        with self.lock:
            self.manager.poll()  # stores that landed since the last step are servable now
            return self.manager.lookup(keys)

    pins = True  # match() pins what it promises until the worker's load holds it

    def pin(self, keys: Sequence[Any]) -> int:
        """Pin the ready prefix of keys where it is (no eviction, no demotion); returns count."""
        with self.lock:
            return self.manager.pin(keys)

    def unpin(self, keys: Sequence[Any]) -> None:
        with self.lock:
            self.manager.unpin(keys)

    def start_store(self, keys: Sequence[Any], staging: Any, hints: Any = None, parent: Any = None,
                    position: int = 0) -> Any:
        """A ticket, or None when the store was rejected (no room: a future miss, not an error)."""
        with self.lock:
            ticket = self.manager.submit_store(keys, list(staging), hints=hints, parent=parent,
                                               position=position)
        if self.offloader is not None:
            self.offloader.kick()
        return None if ticket.job.rejected else ticket

    def start_load(self, keys: Sequence[Any], staging: Any) -> Any:
        with self.lock:
            ticket = self.manager.submit_load(keys, list(staging))
        if self.offloader is not None:
            self.offloader.kick()  # promotions fill the top tier too
        return ticket

    def poll(self, tickets: Sequence[Any], wait: bool = False) -> None:
        with self.lock:
            if wait:
                for t in tickets:
                    if t is not None and not t.done:
                        try:
                            self.manager.wait(t)
                        except Exception:  # reported through the job's failed keys
                            pass
            self.manager.poll()

    def done(self, ticket: Any) -> bool:
        return ticket.done

    def loaded(self, ticket: Any) -> int:
        """Blocks of a finished load that arrived intact (a prefix of its keys)."""
        return ticket.job.loaded if ticket.error is None else 0

    held = None  # HeldMedia (kvbm/held.py), from the first take_events: the engine asks for KV events

    def name(self, keys: Sequence[Any], hashes: Sequence[Any], parent_hash: Any = None) -> None:
        """The engine's block hashes of keys, for the KV events of take_events."""
        if self.held is not None:
            with self.lock:
                self.held.name(None, list(keys), list(hashes), parent_hash)

    def take_events(self, block_size: int) -> list[dict]:
        """vLLM-shaped KV events (kvbm/held.py) of what the tiers hold, by engine block hashes,
        since the last call; drains the manager's own events (else they pile up)."""
        with self.lock:
            events = self.manager.take_events()
            if self.held is None:
                from ..held import HeldMedia

                self.held = HeldMedia(self.manager, block_size)
                return []
            return self.held.diff(ev.key for ev in events).get(None, [])

    def close(self) -> None:
        if self.offloader is not None:
            self.offloader.close()
        with self.lock:
            self.manager.close()


def as_backend(manager: Any, lock: threading.RLock | None = None) -> Any:
    """A backend as given, or a BlockManager (with its lock) wrapped as one."""
    if isinstance(manager, (ManagerBackend, DaemonBackend)):
        return manager
    return ManagerBackend(manager, lock if lock is not None else threading.RLock())


__all__ = ["DaemonBackend", "daemon_spec", "shared_backend"]  # re-exported (daemon_backend.py)


# ---------------------------------------------------------------- plans


@dataclass
class LoadPlan:
    """Copy keys (from kvbm) into the engine's block ids, for one request."""

    req_id: str
    keys: list
    block_ids: list[int]
    pinned: bool = False  # the scheduler pinned keys at match time: the worker releases them


@dataclass
class StorePlan:
    """Copy the engine's block ids into kvbm under keys, for one request."""

    req_id: str
    keys: list
    block_ids: list[int]
    parent: Any = None  # key of the block before keys[0]
    position: int = 0  # index of keys[0] in its sequence
    hints: list | None = None  # per-key Hints (TensorRT-LLM priorities), or None
    hashes: list | None = None  # the engine's block hashes of keys (routers' names for them), or None
    parent_hash: Any = None  # the engine's hash of the block before keys[0]


@dataclass
class _Request:
    salt: str = ""
    keys: list = field(default_factory=list)
    hashes: list = field(default_factory=list)  # the engine's own block hashes, one per key
    hashes_seen: int = 0
    match_start: int = 0  # first block of the planned load
    match_blocks: int = 0  # blocks matched by the last get-matched call
    stored: int = 0  # blocks already planned for store
    priorities: list | None = None  # per-block Hints
    pinned: list = field(default_factory=list)  # keys pinned by match(), not yet handed to a load


class SchedulerSide:
    """Scheduler-half logic: which blocks to load, which to store; never touches bytes."""

    def __init__(self, manager: Any, lock: threading.RLock | None, namespace: Namespace,
                 block_size: int, shards: int = 1) -> None:
        self.manager = manager  # a BlockManager or a backend
        self.lock = lock
        self.backend = as_backend(manager, lock)
        self.namespace = namespace
        self.block_size = block_size
        # workers per block (tensor x pipeline parallel): the lookups see rank 0's shards only
        self.shards = shards
        self._spaces: dict[str, Namespace] = {"": namespace}
        self._generation = 0  # reset_cache() count: each generation keys apart from the last
        self.retry_s = 2.0  # after a failed lookup, seconds of misses before the next try
        self._down_until = 0.0
        self._backoff = 0.0
        self._reqs: dict[str, _Request] = {}
        self.loads: list[LoadPlan] = []
        self.stores: list[StorePlan] = []

    def keys(self, req_id: str, engine_hashes: Sequence[Any], salt: str | None = None) -> list:
        """kvbm keys of the request's full blocks; adopted incrementally as hashes appear."""
        r = self._reqs.get(req_id)
        if r is None:
            r = self._reqs[req_id] = _Request(salt=salt or "")
        if len(engine_hashes) > r.hashes_seen:
            new = list(engine_hashes[r.hashes_seen:])
            r.keys += self._space(r.salt).adopt(new)
            r.hashes += new
            r.hashes_seen = len(engine_hashes)
        return r.keys

    def new_generation(self) -> None:
        """Key everything from now on apart from all blocks stored before (a reset: new weights)."""
        base = self.namespace
        self._generation += 1
        self.namespace = base.derive("generation", str(self._generation))
        self._spaces = {"": self.namespace}  # requests in flight keep the keys they have

    def _space(self, salt: str) -> Namespace:
        ns = self._spaces.get(salt)
        if ns is None:  # a tenant's cache salt: its blocks never meet another tenant's
            base = self.namespace
            ns = self._spaces[salt] = base.derive("cache_salt", salt)
        return ns

    def set_priorities(self, req_id: str, hints: list[Hints] | None) -> None:
        self._reqs.setdefault(req_id, _Request()).priorities = hints

    def match(self, req_id: str, keys: Sequence[Any], num_tokens: int, num_computed: int,
              must_compute_one: bool) -> int:
        """Tokens beyond `num_computed` that kvbm can supply: whole blocks of the ready prefix.

        must_compute_one: the engine must compute at least one prompt token itself (a sync
        load), so the block holding the last token is never counted.
        """
        limit = (num_tokens - 1 if must_compute_one else num_tokens) // self.block_size
        n_hit = self._lookup(keys[:limit])
        start = num_computed // self.block_size
        r = self._reqs.setdefault(req_id, _Request())
        self._release(r)  # a second match (preempted, resumed) replaces the first
        if self.shards == 1:  # blocks the engine holds on device and kvbm holds too: never re-stored
            r.stored = max(r.stored, min(n_hit, start))
        aligned = num_computed % self.block_size == 0
        if n_hit > start and aligned and self.backend.pins:
            # Pin what is promised until the worker's load has pinned it itself: eviction or a
            # background demotion in between would turn the promise into a load error. A block
            # gone since the lookup ends the promise there.
            r.pinned = list(keys[start:start + self._pin(keys[start:n_hit])])
            n_hit = start + len(r.pinned)
        if n_hit <= start or not aligned:
            r.match_blocks = 0
            return 0
        r.match_start, r.match_blocks = start, n_hit - start
        return r.match_blocks * self.block_size

    def _lookup(self, keys: Sequence[Any]) -> int:
        """The ready prefix of keys; 0 while the cache cannot be reached (the engine recomputes:
        a cache that is down costs misses, never a failed request). After a failure, no lookup
        for retry_s, doubling per failure up to 60 s: an unreachable daemon stalls the engine's
        scheduler (the client's timeout) once per try, not once per request."""
        if not keys or time.monotonic() < self._down_until:
            return 0
        try:
            n = self.backend.lookup(keys)[0]
        except Exception as exc:  # noqa: BLE001 - daemon gone, timeout, a refused session
            # back off (doubling, at most 60 s): each try may cost the client's timeout
            self._backoff = min(60.0, self._backoff * 2) if self._backoff else self.retry_s
            self._down_until = time.monotonic() + self._backoff
            log.warning("kvbm lookup failed (%s: %s): requests recompute; next try in %.0f s",
                        type(exc).__name__, exc, self._backoff)
            return 0
        if self._down_until:
            log.warning("kvbm lookups answer again")
            self._down_until, self._backoff = 0.0, 0.0
        return n

    def _pin(self, keys: Sequence[Any]) -> int:
        try:
            return self.backend.pin(keys)
        except Exception as exc:  # noqa: BLE001 - promise nothing that is not pinned
            log.warning("kvbm pin failed (%s: %s): no blocks promised", type(exc).__name__, exc)
            return 0

    def _release(self, r: _Request) -> None:
        if r.pinned:
            try:
                self.backend.unpin(r.pinned)
            except Exception as exc:  # noqa: BLE001 - the daemon's lease releases them
                log.warning("kvbm unpin failed (%s: %s)", type(exc).__name__, exc)
            r.pinned = []

    def plan_load(self, req_id: str, block_ids: Sequence[int], num_external_tokens: int) -> LoadPlan | None:
        """After the engine allocated blocks: load the matched keys into block_ids[start:end]."""
        r = self._reqs.get(req_id)
        if r is None or num_external_tokens <= 0 or not r.match_blocks:
            return None
        n = num_external_tokens // self.block_size
        start = r.match_start
        plan = LoadPlan(req_id, list(r.keys[start:start + n]), list(block_ids[start:start + n]))
        if r.pinned:  # the worker releases the plan's keys once its load holds them; the rest now
            extra = r.pinned[n:]
            r.pinned = []
            if extra:
                self.backend.unpin(extra)
            plan.pinned = n > 0
        r.match_blocks = 0
        r.stored = max(r.stored, start + n)  # loaded blocks are in kvbm already
        if len(r.hashes) >= start + n:
            self._name(plan.keys, r.hashes[start:start + n], r.hashes[start - 1] if start else None)
        self.loads.append(plan)
        return plan

    def plan_store(self, req_id: str, block_ids: Sequence[int], num_computed_tokens: int) -> StorePlan | None:
        """Blocks that are full once `num_computed_tokens` are computed and not yet stored."""
        r = self._reqs.get(req_id)
        if r is None:
            return None
        full = min(num_computed_tokens // self.block_size, len(r.keys), len(block_ids))
        if full <= r.stored:
            return None
        start = r.stored
        hints = r.priorities[start:full] if r.priorities else None
        if hints is not None and len(hints) < full - start:
            hints = None
        plan = StorePlan(req_id, list(r.keys[start:full]), list(block_ids[start:full]),
                         parent=r.keys[start - 1] if start else None, position=start, hints=hints)
        if len(r.hashes) >= full:  # published by the daemon under the engine's names (kv_events.py)
            plan.hashes, plan.parent_hash = r.hashes[start:full], r.hashes[start - 1] if start else None
            self._name(plan.keys, plan.hashes, plan.parent_hash)
        r.stored = full
        self.stores.append(plan)
        return plan

    def _name(self, keys: list, hashes: list, parent_hash: Any) -> None:
        name = getattr(self.backend, "name", None)  # the in-process manager's KV events
        if name is not None:
            name(keys, hashes, parent_hash)

    def take_events(self) -> list[dict]:
        """KV events in vLLM's shape (kvbm/held.py) of the in-process manager's tiers, by engine
        block hashes; [] through a daemon (it publishes its own stream: daemon.kv_events)."""
        take = getattr(self.backend, "take_events", None)
        return take(self.block_size) if take is not None else []

    def preempted(self, req_id: str) -> None:
        """The engine freed the request's blocks: its planned stores already ran (they gather
        in the same step), so only the match state resets; stored blocks stay stored."""
        r = self._reqs.get(req_id)
        if r is not None:
            r.match_blocks = 0

    def finished(self, req_id: str) -> int:
        """Forget the request; returns how many of its blocks were planned for store."""
        r = self._reqs.pop(req_id, None)
        if r is None:
            return 0
        self._release(r)
        return r.stored

    def take_plans(self) -> tuple[list[LoadPlan], list[StorePlan]]:
        loads, stores = self.loads, self.stores
        self.loads, self.stores = [], []
        return loads, stores


# ---------------------------------------------------------------- worker


@dataclass
class _Transfer:
    req_id: str
    ticket: Any
    block_ids: list[int]
    staging: Any
    event: Any = None  # a GPU copy in flight: the gather before a store, the scatter after a load
    failed: list = field(default_factory=list)


def shard_key(key: Any, rank: int) -> bytes:
    """The key of tensor/pipeline-parallel rank `rank`'s shard of block `key` (rank 0: the key)."""
    if not rank:
        return key
    raw = key if isinstance(key, bytes) else repr(key).encode()
    return hashlib.blake2b(raw + b"\0rank" + rank.to_bytes(4, "little"), digest_size=16).digest()


class WorkerSide:
    """Worker-half logic: run load and store plans against the registered paged KV.

    Stores gather the blocks' pages into staging rows, then write them to kvbm on a transfer
    thread. Synchronously by default (the engine may reuse the blocks right after the step);
    with `async_save` on a GPU the gather is a copy kernel on kvbm's own stream, ordered after
    the step that wrote the pages, and `fence()` (called before the next step's work) orders
    the engine's next kernels after it, so a block freed and reused next step is read first.
    Loads read on a transfer thread into staging and are scattered when `poll` sees them
    complete (on a GPU: a kernel, and the load is reported once it has run); a block that did
    not arrive intact is reported as failed, never scattered.
    """

    def __init__(self, manager: Any, lock: threading.RLock | None = None, async_save: bool = False,
                 rank: int = 0) -> None:
        self.manager = manager  # a BlockManager or a backend
        self.lock = lock
        # This worker's shard of every block (its tensor/pipeline-parallel rank): rank 0 keeps the
        # scheduler's keys, which its lookups see; another rank keys its shard apart, so workers
        # sharing one cache (the daemon, a G4 bucket) never read each other's shard.
        self.rank = rank
        self.backend = as_backend(manager, lock)
        self.async_save = async_save
        self.kv: PagedKV | None = None
        self._gathers: list[tuple[StorePlan, Any, Any]] = []  # (plan, staging, event) on the GPU
        self._loads: list[_Transfer] = []
        self._scatters: list[_Transfer] = []
        self._stores: list[_Transfer] = []
        self.corrupt_hook = None  # tests only: called with (staging, block_ids) before scatter

    def register(self, tensors: Sequence[Any], block_dim: int | None = None) -> PagedKV:
        kv = PagedKV(tensors, block_dim)
        if kv.block_nbytes != self.backend.block_nbytes:
            raise ConfigError(
                f"the engine's KV cache holds {kv.block_nbytes} bytes per block (all layers) but the "
                f"kvbm layout says {self.backend.block_nbytes}; check layout (dtype, heads, head_dim, block_size)"
            )
        self.kv = kv
        return kv

    def _shard(self, keys: Sequence[Any]) -> list:
        return list(keys) if not self.rank else [shard_key(k, self.rank) for k in keys]

    def start_load(self, plan: LoadPlan) -> None:
        staging = self.kv.staging(len(plan.keys))
        ticket = self.backend.start_load(self._shard(plan.keys), staging)
        if plan.pinned:  # the load pins its sources now: the scheduler's pins can go
            self.backend.unpin(plan.keys)
        self._loads.append(_Transfer(plan.req_id, ticket, plan.block_ids, staging))

    def start_store(self, plan: StorePlan, after: Any = None) -> None:
        """Gather the plan's blocks and write them to kvbm; when async, the gather runs after
        the work on CUDA stream `after` (default: the current one)."""
        if self.async_save:
            staging, event = self.kv.gather_async(plan.block_ids, after)
            if event is not None:
                self._gathers.append((plan, staging, event))
                return
        else:
            staging = self.kv.gather(plan.block_ids)
        self._submit_store(plan, staging)

    def _submit_store(self, plan: StorePlan, staging: Any) -> None:
        # None: rejected, no room (everything busy): a future miss, not an error
        parent = None if plan.parent is None else shard_key(plan.parent, self.rank)
        # rank 0's shard stands for the block on the KV-event stream: the others' carry no hashes
        named = {"hashes": plan.hashes, "parent_hash": plan.parent_hash} if (
            plan.hashes is not None and not self.rank and getattr(self.backend, "takes_hashes", False)) else {}
        ticket = self.backend.start_store(self._shard(plan.keys), staging, hints=plan.hints, parent=parent,
                                          position=plan.position, **named)
        self._stores.append(_Transfer(plan.req_id, ticket, plan.block_ids, staging))

    def fence(self, stream: Any = None) -> None:
        """Order the engine's next GPU work (on `stream`, default the current one) after the
        gathers still in flight, without a host wait."""
        if self._gathers:
            if stream is None:
                stream = self.kv.torch.cuda.current_stream(self.kv.device)
            for _, _, event in self._gathers:
                stream.wait_event(event)

    def poll(self, wait: bool = False) -> tuple[dict[str, list[int]], set[str]]:
        """Complete transfers: ({req_id: failed block ids} of finished loads, finished store req ids)."""
        pending = []
        for plan, staging, event in self._gathers:  # gathered rows go on to kvbm
            if wait:
                event.synchronize()
            if event.query():
                self._submit_store(plan, staging)
            else:
                pending.append((plan, staging, event))
        self._gathers = pending
        self.backend.poll([t.ticket for t in self._loads + self._stores], wait=wait)
        pending = []
        for t in self._loads:
            if not self.backend.done(t.ticket):
                pending.append(t)
                continue
            n = self.backend.loaded(t.ticket)
            if self.corrupt_hook is not None:
                self.corrupt_hook(t.staging, t.block_ids[:n])
            t.event = self.kv.scatter_async(t.staging, t.block_ids[:n]) if n else None
            t.failed = t.block_ids[n:]
            self._scatters.append(t)
        self._loads = pending
        loads: dict[str, list[int]] = {}
        pending = []
        for t in self._scatters:  # a load counts once its bytes are in the engine's pages
            if t.event is not None and wait:
                t.event.synchronize()
            if t.event is None or t.event.query():
                loads.setdefault(t.req_id, []).extend(t.failed)
            else:
                pending.append(t)
        self._scatters = pending
        stores: set[str] = set()
        pending = []
        for t in self._stores:
            if t.ticket is not None and not self.backend.done(t.ticket):
                pending.append(t)
            else:
                stores.add(t.req_id)
        self._stores = pending
        return loads, stores - self.saving()

    @property
    def busy(self) -> bool:
        return bool(self._loads or self._stores or self._gathers or self._scatters)

    def saving(self) -> set:
        """Requests whose blocks are still being gathered or written."""
        return {t.req_id for t in self._stores} | {plan.req_id for plan, _, _ in self._gathers}


def api_differences(cls: Any, methods: dict, prefix: str = "") -> list[str]:
    """What differs between an engine class and the methods (and leading parameters) an
    adapter calls: one line per missing method or changed signature."""
    import inspect

    problems = []
    for name, params in methods.items():
        fn = getattr(cls, name, None)
        if fn is None:
            problems.append(f"{prefix}{name} is missing")
            continue
        have = list(inspect.signature(fn).parameters)[1:]
        if list(params) != have[:len(params)]:
            problems.append(f"{prefix}{name}{tuple(have)} (expected {params})")
    return problems
