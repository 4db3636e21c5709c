"""The worker half of a connector: runs the scheduler's plans against the engine's paged KV.

    WorkerSide(manager_or_backend, lock, async_save=, rank=)
        register(tensors)          the engine's per-layer paged KV (PagedKV, paged.py)
        start_load(plan)           kvbm -> staging on a transfer lane; scattered when poll sees it
        start_store(plan)          gather pages into staging (async on a GPU), then kvbm <- staging
        fence(stream)              order the engine's next GPU work after gathers in flight
        poll(wait) -> (loads, stores)   finished loads (with failed block ids) and stores
    shard_key(key, rank)           rank `rank`'s shard of a block under tensor/pipeline parallelism

kvbm.connectors.core re-exports these names; the plans come from its SchedulerSide.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from ..config import ConfigError
from .manager_backend import as_backend
from .paged import PagedKV

if TYPE_CHECKING:
    from .core import LoadPlan, StorePlan


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
