"""Engine-independent connector logic, shared by the vLLM and TensorRT-LLM adapters.

    shared_manager(config)        one BlockManager per config in this process (scheduler and
                                  worker halves of one engine share it; manager_backend.py)
    SchedulerSide                 engine block hashes -> keys, prefix match, load/store plans
    LoadPlan, StorePlan           what the scheduler half hands the worker half, per request
    WorkerSide (worker.py)        runs the plans: gather/scatter paged KV, async store/load
    PagedKV (paged.py)            an engine's per-layer paged tensors; one kvbm block = one
                                  engine block id across all layers, staged contiguously
    api_differences(cls, methods) what an engine class changed under an adapter (version checks)

A kvbm block is the bytes of one engine block (all layers), so the block keys are the engine's
own chained block hashes adopted into the kvbm namespace (model + layout + salt + cache salt).
Scheduler and worker meet only through plain plans (lists of keys and block ids), which is
what an engine ships from its scheduler to its workers.

One process, one manager: multi-process deployments (tensor parallel workers in other
processes) need the cache daemon, where every process talks to one manager.

Both halves reach kvbm through a backend with the few operations they need (lookup; store
from and load into staging rows; poll for completion):
    ManagerBackend   the process's BlockManager (the default; manager_backend.py)
    DaemonBackend    a `kvbm serve` daemon through kvbm.client.Client, chosen with
                     extra config {"kvbm_daemon": "tcp://127.0.0.1:5557", "kvbm_token": ...}
                     (daemon_backend.py; its names are re-exported here)
SchedulerSide and WorkerSide take either a backend or (manager, lock) as before.
Every name of worker.py, manager_backend.py and daemon_backend.py that adapters, tests and
benchmarks use is re-exported here.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..blocks import Namespace
from ..config import ConfigError  # noqa: F401 (re-exported: tests use core.ConfigError)
from ..policies.base import Hints
from .daemon_backend import DaemonBackend, daemon_spec, shared_backend  # noqa: F401 (re-exported)
from .manager_backend import (  # noqa: F401 (re-exported)
    _MANAGERS, _OFFLOADERS, ManagerBackend, as_backend, release_managers, resolve_config, shared_manager)
from .worker import WorkerSide, shard_key  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

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
        start = num_computed // self.block_size
        r = self._reqs.setdefault(req_id, _Request())
        if (r.pinned and r.match_blocks == len(r.pinned) and r.match_start == start
                and num_computed % self.block_size == 0 and start + r.match_blocks <= limit):
            # Asked again before the engine could allocate (its pool is full: vLLM retries the
            # waiting request every step): the last promise stands, its blocks still pinned.
            # Through a daemon this spares the engine's scheduler two round trips per step.
            return r.match_blocks * self.block_size
        aligned = num_computed % self.block_size == 0
        one_trip = getattr(self.backend, "lookup_pin", None) if aligned and self.backend.pins else None
        if one_trip is not None:  # the daemon: lookup and pin in one round trip
            n_hit, pinned = self._lookup(keys[:limit], lambda ks: one_trip(ks, start))
        else:
            n_hit, pinned = self._lookup(keys[:limit]), None
        self._release(r)  # a second match (preempted, resumed) replaces the first
        if self.shards == 1:  # blocks the engine holds on device and kvbm holds too: never re-stored
            r.stored = max(r.stored, min(n_hit, start))
        if n_hit > start and aligned and self.backend.pins:
            # Pin what is promised until the worker's load has pinned it itself: eviction or a
            # background demotion in between would turn the promise into a load error. A block
            # gone since the lookup ends the promise there.
            if pinned is None:
                pinned = self._pin(keys[start:n_hit])
            r.pinned = list(keys[start:start + pinned])
            n_hit = start + len(r.pinned)
        if n_hit <= start or not aligned:
            r.match_blocks = 0
            return 0
        r.match_start, r.match_blocks = start, n_hit - start
        return r.match_blocks * self.block_size

    def _lookup(self, keys: Sequence[Any], via: Any = None) -> Any:
        """The ready prefix of keys; 0 while the cache cannot be reached (the engine recomputes:
        a cache that is down costs misses, never a failed request). After a failure, no lookup
        for retry_s, doubling per failure up to 60 s: an unreachable daemon stalls the engine's
        scheduler (the client's timeout) once per try, not once per request.
        via(keys) -> (n, pinned): a lookup that pins too (DaemonBackend.lookup_pin); then
        (n, pinned) is returned, (0, 0) when it failed or was not tried."""
        if not keys or time.monotonic() < self._down_until:
            return 0 if via is None else (0, 0)
        try:
            n = self.backend.lookup(keys)[0] if via is None else via(keys)
        except Exception as exc:  # noqa: BLE001 - daemon gone, timeout, a refused session
            # back off (doubling, at most 60 s): each try may cost the client's timeout
            self._backoff = min(60.0, self._backoff * 2) if self._backoff else self.retry_s
            self._down_until = time.monotonic() + self._backoff
            log.warning("kvbm lookup failed (%s: %s): requests recompute; next try in %.0f s",
                        type(exc).__name__, exc, self._backoff)
            return 0 if via is None else (0, 0)
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
