"""kvbm's tiers as a secondary tier of vLLM's own tiered offloading (vLLM 0.32 tiering).

vLLM's OffloadingConnector with its tiering spec keeps a CPU primary tier (host memory the GPU
copies to and from), cascades every chunk it stores to each secondary tier, and promotes a
secondary-tier hit into a primary slot before the GPU reads it. `KVBMSecondaryTier` is such a
secondary tier, backed by a kvbm BlockManager: kvbm's G3 (O_DIRECT slot file, crash-safe index,
a checksum per block) and G4 (any fsspec URL), its eviction and admission policies and its
hard capacity bounds, behind vLLM's interface, with vLLM's own engine-native path untouched:

    "kv_connector_extra_config": {
        "cpu_bytes_to_use": 10737418240,
        "secondary_tiers": [{
            "type": "KVBMSecondaryTier", "module_path": "kvbm.connectors.vllm_tier",
            "tiers": [{"name": "g3", "capacity": 100000, "eviction": "hitdensity",
                       "storage": {"name": "disk", "path": "/nvme/kvbm"}}],
            "model": "llama-3.1-8b"}]}

    lookup(key)          HIT when ready in a kvbm tier, RETRY while it is being written, else MISS
    submit_store(job)    BlockManager.submit_store from the job's primary chunks (kvbm's copy
                         threads; chunks the tier already holds are an access, not a copy)
    submit_load(job)     BlockManager.submit_load into the job's primary chunks: the ready prefix;
                         a partial result names the keys that landed, checksum failures excluded
    get_finished_jobs()  BlockManager.poll(): one JobResult per finished job
    touch(keys)          an access for the policies of the tiers holding them
    drain_jobs()         waits for every copy in flight (vLLM then reads the results)

A block is one primary chunk (`primary_kv_view` row, `block_size_bytes` bytes); its key is
vLLM's OffloadKey (bytes). `tiers` is kvbm's tier list (kvbm.yaml syntax, fastest first);
`model` names the namespace, so two models never share G4 objects.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np

from ..blocks import KVLayout
from ..config import ConfigError, KVBMConfig
from ..manager import BlockManager
from ..offload import Offloader, offload_headroom

try:
    from vllm.v1.kv_offload.base import LookupResult, Medium, RequestOffloadingContext
    from vllm.v1.kv_offload.tiering.base import JobResult, SecondaryTierManager, TransferJob
except ImportError as exc:  # pragma: no cover - exercised only without vLLM
    raise ImportError(f"kvbm.connectors.vllm_tier needs vLLM's kv_offload tiering (tested with 0.32): {exc}") from exc


def chunk_layout(nbytes: int) -> KVLayout:
    """A layout whose block is one primary chunk of `nbytes` (kvbm sizes its slots from it)."""
    return KVLayout(num_layers=1, num_kv_heads=1, head_dim=nbytes, block_size=1, dtype="uint8", kv_factor=1)


class KVBMSecondaryTier(SecondaryTierManager):
    """A vLLM secondary tier over a kvbm BlockManager (see the module docstring)."""

    medium: ClassVar[Medium] = Medium.STORAGE

    def __init__(self, offloading_spec: Any, primary_kv_view: memoryview, tier_type: str,
                 backpressure_detector: Any = None, *, tiers: list | None = None,
                 model: str = "vllm", mode: str = "exclusive", promote_on_hit: bool = True,
                 events: bool = False) -> None:
        super().__init__(offloading_spec, primary_kv_view, tier_type, backpressure_detector)
        if not tiers:
            raise ConfigError("KVBMSecondaryTier needs `tiers`: kvbm's tier list, e.g. "
                              "[{name: g3, capacity: 100000, storage: {name: disk, path: /nvme/kvbm}}]")
        cfg = KVBMConfig.from_dict({"tiers": tiers, "mode": mode, "promote_on_hit": promote_on_hit,
                                    "events": events, "namespace": {"model": model}})
        cfg.layout = chunk_layout(self.block_size_bytes)
        self.manager = BlockManager.from_config(cfg)
        # vLLM calls a tier on its scheduler thread and wants it non-blocking: a store into a
        # full G3 would move G3's victims to G4 inline, so an offloader keeps each tier's
        # headroom free in the background (its own thread: every manager call takes the lock)
        self._lock = threading.RLock()
        self._offloader = Offloader(self.manager, self._lock, offload_headroom(cfg, self.manager))
        self._rows = np.asarray(primary_kv_view).view(np.uint8)  # (chunks, row bytes), zero copy
        self._jobs: dict[int, tuple[Any, dict]] = {}  # id(kvbm ticket) -> (ticket, its vLLM job's entry)
        self._finished: list[JobResult] = []  # results not yet handed to vLLM

    # ---------------------------------------------------------------- lookups

    def lookup(self, key: Any, req_context: Any = None) -> LookupResult:
        with self._lock:
            if self.manager.locate([key])[0] >= 0:
                return LookupResult.HIT
            if any(key in t.pending for t in self.manager.tiers):
                return LookupResult.RETRY
        return LookupResult.MISS

    def touch(self, keys: Iterable[Any], req_context: Any = None) -> None:
        with self._lock:
            self.manager.touch(list(keys))

    def on_new_request(self, req_context: Any) -> RequestOffloadingContext:
        return RequestOffloadingContext()

    # ---------------------------------------------------------------- transfers

    def _chunks(self, job: TransferJob) -> list[np.ndarray]:
        return [self._rows[int(c)] for c in np.asarray(job.chunk_ids).reshape(-1)]

    def submit_store(self, job_metadata: TransferJob) -> None:
        # kvbm reserves a store all or nothing in its top tier: a job larger than that tier
        # goes in pieces, one after the other (each piece's victims move down first)
        keys, chunks = list(job_metadata.keys), self._chunks(job_metadata)
        step = max(1, self.manager.tiers[0].capacity)
        pieces = [(keys[i:i + step], chunks[i:i + step]) for i in range(0, len(keys), step)]
        self._next_piece({"job": job_metadata, "bytes": len(keys) * self.block_size_bytes,
                          "pieces": pieces, "done": []})

    def submit_load(self, job_metadata: TransferJob) -> None:
        keys = list(job_metadata.keys)
        entry = {"job": job_metadata, "bytes": len(keys) * self.block_size_bytes, "pieces": [], "done": []}
        with self._lock:
            ticket = self.manager.submit_load(keys, self._chunks(job_metadata))
        self._jobs[id(ticket)] = (ticket, entry)

    def _next_piece(self, entry: dict) -> None:
        if entry["pieces"]:
            keys, chunks = entry["pieces"].pop(0)
            with self._lock:
                ticket = self.manager.submit_store(keys, chunks)
            self._jobs[id(ticket)] = (ticket, entry)
        else:
            self._finished.append(self._result(entry))

    def get_finished_jobs(self) -> list[JobResult]:
        with self._lock:
            done = self.manager.poll()
        if any(t.kind == "store" for t in done):
            self._offloader.kick()  # stores filled the tiers: restore their headroom
        for ticket in done:
            _, entry = self._jobs.pop(id(ticket), (None, None))
            if entry is None:
                continue
            entry["done"].append(ticket)
            if ticket.kind == "store":
                self._next_piece(entry)
            else:
                self._finished.append(self._result(entry))
        results, self._finished = self._finished, []
        return results

    def _result(self, entry: dict) -> JobResult:
        job, tickets = entry["job"], entry["done"]
        elapsed = time.monotonic() - job.submit_time
        if not tickets or tickets[0].kind == "store":
            failed = any(t.error is not None or t.job.rejected or t.job.failed for t in tickets)
            return JobResult(job.job_id, not failed, None, elapsed, entry["bytes"])
        ticket, keys = tickets[0], list(job.keys)
        landed = keys[:ticket.job.loaded] if ticket.error is None else []
        ok = len(landed) == len(keys)
        return JobResult(job.job_id, ok, None if ok else landed, elapsed, len(landed) * self.block_size_bytes)

    def has_pending_work(self) -> bool:
        return bool(self._jobs or self._finished)  # results drain_jobs kept for the next poll

    def drain_jobs(self) -> None:
        while self._jobs:  # a store's later pieces start as earlier ones finish
            for ticket, _ in list(self._jobs.values()):
                if ticket.future is not None:
                    try:
                        ticket.future.result()
                    except BaseException:  # reported by poll() as a failed job
                        pass
            self._finished.extend(self.get_finished_jobs())

    def shutdown(self) -> None:
        self.drain_jobs()
        self.get_finished_jobs()
        self._offloader.close()
        with self._lock:
            self.manager.close()
