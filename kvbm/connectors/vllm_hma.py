"""Hybrid models through the vLLM connector: vLLM's hybrid memory allocator (HMA), checked on 0.32.

    is_hybrid(kv_cache_config)          more than one KV cache group, or one that is not plain
                                        full attention (KVBMConnector then becomes the class below)
    manifest_from_vllm(kv_cache_config) the PageManifest of the engine's groups (manifest.py)
    HybridPagedKV (paged_hybrid.py)     every group's paged tensors; a page = one block id per group
    HybridSchedulerSide                 hits, loads and stores per page, by each group's rule
    KVBMHybridConnector                 KVBMConnector + SupportsHMA for hybrid KV cache configs

One kvbm block per page, holding every group's piece for that prefix position (full attention,
sliding window, SSM state). Why: a tier then moves, demotes and evicts a page whole, so no tier
ever holds half of one and no piece can be evicted behind the others' backs; lookup stays the
manager's plain prefix lookup. The cost: a sliding-window group's piece is stored for every
page although a hit reads only the last window of them (bench/bench_hybrid.py measures it).
An SSM state exists only where a step ended on a block boundary: that page is stored a second
time under `state_key`, with the state, and a hit must end on such a page.

All or nothing: a hit counts only pages whose required pieces are all in kvbm; a load that
does not bring every page it promised fails the whole request (vLLM's `failed_recving`: with
several groups vLLM cannot take block-level errors) and vLLM recomputes it from scratch; the
pages already scattered are overwritten by that recompute, never used.
"""

from __future__ import annotations

import logging
from itertools import zip_longest
from typing import TYPE_CHECKING, Any, Sequence

from ..config import ConfigError
from .core import LoadPlan, SchedulerSide, StorePlan
from .manifest import Buffer, PageManifest, Piece, state_key
from .paged_hybrid import HybridPagedKV
from .vllm import KVBMConnector
from .vllm_pins import SchedulerPins

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults

if TYPE_CHECKING:
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

NULL_BLOCK = 0  # vLLM's BlockPool hands out block 0 as its null block (a skipped position)


def _spec_kind(spec: Any) -> str:
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MambaSpec, SlidingWindowSpec

    if isinstance(spec, SlidingWindowSpec):
        return "sliding"
    if isinstance(spec, MambaSpec):
        return "mamba"
    if isinstance(spec, FullAttentionSpec):
        return "full"
    raise ConfigError(f"kvbm connector: KV cache group type {type(spec).__name__} is not supported "
                      f"(full attention, sliding window and Mamba are); run without --kv-transfer-config")


def is_hybrid(kv_cache_config: Any) -> bool:
    """Whether vLLM gave this engine more than one KV cache group (or one of another kind)."""
    from vllm.v1.kv_cache_interface import MambaSpec, SlidingWindowSpec

    groups = getattr(kv_cache_config, "kv_cache_groups", None) or []
    if len(groups) > 1:
        return True  # an unsupported kind among them is refused by manifest_from_vllm, at start
    return len(groups) == 1 and isinstance(groups[0].kv_cache_spec, (SlidingWindowSpec, MambaSpec))


def _dtype(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def manifest_from_vllm(kv_cache_config: Any) -> PageManifest:
    """The page manifest of vLLM's KV cache groups (every group that takes part in transfers)."""
    pieces, sizes = [], set()
    for g, group in enumerate(kv_cache_config.kv_cache_groups):
        if not getattr(group, "enable_kv_transfer", True):
            continue
        spec = group.kv_cache_spec
        kind = _spec_kind(spec)
        sizes.add(spec.block_size)
        if kind == "mamba":
            if getattr(spec, "mamba_cache_mode", "align") != "align":
                raise ConfigError("kvbm connector: Mamba layers need vLLM's prefix caching for Mamba "
                                  "(--enable-prefix-caching, mamba_cache_mode 'align'): with "
                                  f"{spec.mamba_cache_mode!r} vLLM keeps no state at block boundaries to store")
            buffers = tuple(Buffer(f"{name}[{i}]", shape, _dtype(dt)) for name in group.layer_names
                            for i, (shape, dt) in enumerate(zip(spec.shapes, spec.dtypes)))
        else:
            item = spec.dtype.itemsize
            shape = (spec.page_size_bytes // item,)
            if spec.page_size_bytes == 2 * spec.block_size * spec.num_kv_heads * spec.head_size * item:
                shape = (2, spec.block_size, spec.num_kv_heads, spec.head_size)  # K and V, dense
            buffers = tuple(Buffer(name, shape, _dtype(spec.dtype)) for name in group.layer_names)
        window = int(spec.sliding_window) if kind == "sliding" else 0
        pieces.append(Piece(kind, buffers, window))
    if len(sizes) != 1:
        raise ConfigError(f"kvbm connector: the KV cache groups use block sizes {sorted(sizes)}; kvbm pages "
                          f"need one block size for every group (set --block-size so they agree)")
    return PageManifest(sizes.pop(), pieces)


def pages_of(groups: Sequence[Sequence[int]]) -> list[tuple[int | None, ...]]:
    """Per-group block id lists -> per-position tuples (vLLM's null block -> None)."""
    return [tuple(None if b is None or b == NULL_BLOCK else b for b in ids)
            for ids in zip_longest(*groups, fillvalue=None)]


class HybridSchedulerSide(SchedulerSide):
    """Scheduler half for a hybrid engine: block_ids are pages (one id per group, None where the
    group holds nothing at that position)."""

    def __init__(self, *args: Any, manifest: PageManifest, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.manifest = manifest
        self.state_pieces = [i for i, p in enumerate(manifest.pieces) if p.kind == "mamba"]

    def match(self, req_id: str, keys: Sequence[Any], num_tokens: int, num_computed: int,
              must_compute_one: bool) -> int:
        # A page holds every group's piece, so the ready prefix of pages is a hit for full and
        # sliding groups alike. An SSM state applies the tokens it has seen: vLLM must compute
        # the last prompt token itself, on a state that has not seen it.
        tokens = super().match(req_id, keys, num_tokens, num_computed,
                               must_compute_one or bool(self.state_pieces))
        if not tokens or not self.state_pieces:
            return tokens
        r = self._reqs[req_id]
        start, end = r.match_start, r.match_start + r.match_blocks
        e = end
        while e > start:  # the hit ends on the last page stored with its state
            sk = state_key(keys[e - 1])
            if self._lookup([sk]) == 1 and (not self.backend.pins or self._pin([sk]) == 1):
                r.state_pin = sk if self.backend.pins else None
                break
            e -= 1
        if r.pinned and len(r.pinned) > e - start:
            self.backend.unpin(r.pinned[e - start:])
            r.pinned = r.pinned[:e - start]
        r.match_blocks = e - start
        return r.match_blocks * self.block_size

    def load_failed(self, req_id: str) -> None:
        """vLLM recomputes the request from scratch: what it computes is stored again (pages
        kvbm still holds are only touched), so a page whose load failed comes back."""
        r = self._reqs.get(req_id)
        if r is not None:
            r.stored, r.match_blocks = 0, 0

    def _release(self, r: Any) -> None:
        super()._release(r)
        sk = getattr(r, "state_pin", None)
        if sk is not None:
            r.state_pin = None
            self.backend.unpin([sk])

    def plan_load(self, req_id: str, block_ids: Sequence[Any], num_external_tokens: int) -> LoadPlan | None:
        r = self._reqs.get(req_id)
        start = r.match_start if r is not None else 0
        state_pin = getattr(r, "state_pin", None)
        if r is not None:
            r.state_pin = None  # handed to the plan below, or released
        plan = super().plan_load(req_id, block_ids, num_external_tokens)
        if plan is None or not plan.keys:
            if state_pin is not None:
                self.backend.unpin([state_pin])
            return plan
        end = start + len(plan.keys)
        needed = [set(rng) for rng in self.manifest.needed(end, start)]
        plan.block_ids = [tuple(b if (start + j) in needed[i] else None for i, b in enumerate(page))
                          for j, page in enumerate(plan.block_ids)]
        if self.state_pieces:
            # the hit's last page comes with its state; one that is absent fails the load (recompute)
            plain = plan.keys[-1]
            plan.keys[-1] = state_key(plain)
            if plan.pinned and plan.keys[-1] == state_pin:
                self.backend.unpin([plain])  # the worker unpins the plan's keys, the state key among them
            else:  # vLLM took another length than matched: release every pin now, load unpinned
                if plan.pinned:
                    self.backend.unpin(plan.keys[:-1] + [plain])
                    plan.pinned = False
                if state_pin is not None:
                    self.backend.unpin([state_pin])
        return plan

    def plan_store(self, req_id: str, block_ids: Sequence[Any], num_computed_tokens: int) -> StorePlan | None:
        plan = super().plan_store(req_id, block_ids, num_computed_tokens)
        if plan is None:
            return None
        # a page is stored only with every attention group's piece present
        good = 0
        for page in plan.block_ids:
            if any(page[i] is None for i, p in enumerate(self.manifest.pieces) if p.kind != "mamba"):
                break
            good += 1
        last = plan.block_ids[good - 1] if good else None
        plan.keys, plan.block_ids = plan.keys[:good], [
            tuple(None if i in self.state_pieces else b for i, b in enumerate(page)) for page in plan.block_ids[:good]]
        if plan.hints:
            plan.hints = plan.hints[:good]
        if getattr(plan, "hashes", None):  # the engine's names of the pages (KV events)
            plan.hashes = plan.hashes[:good]
        if self.state_pieces and last is not None and num_computed_tokens % self.block_size == 0 \
                and plan.position + good == num_computed_tokens // self.block_size \
                and all(last[i] is not None for i in self.state_pieces):
            # the step ended on this page's boundary: the groups' state blocks hold the state there
            self.stores.append(StorePlan(req_id, [state_key(plan.keys[-1])], [tuple(last)],
                                         parent=plan.keys[-2] if good > 1 else plan.parent,
                                         position=plan.position + good - 1))
        if not plan.keys:
            self.stores.remove(plan)
            return None
        return plan


class KVBMHybridConnector(KVBMConnector):
    """KVBMConnector for hybrid KV cache configs (KVBMConnector.__new__ picks it)."""

    def _layout(self, vllm_config: Any, kv_cache_config: Any) -> Any:
        self.manifest = manifest_from_vllm(kv_cache_config)
        return self.manifest.layout(tp_size=vllm_config.parallel_config.tensor_parallel_size)

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        kv_layout = getattr(kv_cache_config, "kv_cache_layout", None) or ""
        self.namespace = self.manifest.namespace(self.namespace).derive("kv_cache_layout", kv_layout)
        self.scheduler = HybridSchedulerSide(self.manager, self.lock, self.namespace, self.block_size,
                                             shards=self.scheduler.shards, manifest=self.manifest)
        self.pins = SchedulerPins(self.scheduler)
        self.async_load = True  # failures are reported per request (failed_recving): loads are async
        self._pages: dict[str, list[list[int]]] = {}
        self._failed: set[str] = set()
        self._recompute: set[str] = set()  # requests whose load failed: never matched again
        log.info("kvbm connector: hybrid KV cache, %r (fingerprint %s)", self.manifest, self.manifest.fingerprint)

    # ------------------------------------------------------------ scheduler half

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int,
                                   *args: Any, **kwargs: Any) -> tuple[int | None, bool]:
        if request.request_id in self._recompute:  # its load failed: vLLM recomputes, no retry
            return 0, False
        return super().get_num_new_matched_tokens(request, num_computed_tokens, *args, **kwargs)

    def update_connector_output(self, connector_output: Any) -> None:
        super().update_connector_output(connector_output)
        for req_id in getattr(connector_output, "failed_recving", None) or ():
            self._recompute.add(req_id)
            self.scheduler.load_failed(req_id)

    def update_state_after_alloc(self, request: "Request", blocks: Any, num_external_tokens: int) -> None:
        self._requests[request.request_id] = request
        if num_external_tokens > 0:
            groups = [[None if getattr(b, "is_null", False) else b.block_id for b in group] for group in blocks.blocks]
            self.pins.hold(self.scheduler.plan_load(request.request_id, pages_of(groups), num_external_tokens))
        else:
            self.pins.unclaimed(request.request_id)

    def build_connector_meta(self, scheduler_output: Any) -> Any:
        from .vllm import KVBMConnectorMetadata

        for new in scheduler_output.scheduled_new_reqs:
            self._pages[new.req_id] = [list(ids) for ids in new.block_ids]
            self._plan_store(new.req_id, new.num_computed_tokens, scheduler_output)
        cached = scheduler_output.scheduled_cached_reqs
        resumed = getattr(cached, "resumed_req_ids", set())
        for i, req_id in enumerate(cached.req_ids):
            new_ids = cached.new_block_ids[i]
            if req_id in resumed:
                self.scheduler.preempted(req_id)
                self._pages[req_id] = [list(ids) for ids in new_ids] if new_ids else []
            elif new_ids:
                have = self._pages.setdefault(req_id, [[] for _ in new_ids])
                for g, ids in enumerate(new_ids):
                    have[g].extend(ids)
            self._plan_store(req_id, cached.num_computed_tokens[i], scheduler_output)
        for req_id in scheduler_output.preempted_req_ids or ():
            self.scheduler.preempted(req_id)
            self.pins.unclaimed(req_id)
        loads, stores = self.scheduler.take_plans()
        return KVBMConnectorMetadata(loads, stores)

    def _plan_store(self, req_id: str, num_computed: int, out: Any) -> None:
        request = self._requests.get(req_id)
        if request is None:
            return
        self._keys(request)
        done = num_computed + out.num_scheduled_tokens.get(req_id, 0)
        self.scheduler.plan_store(req_id, pages_of(self._pages.get(req_id, [])), done)

    def request_finished_all_groups(self, request: "Request", block_ids: tuple[list[int], ...]) -> tuple[bool, dict | None]:
        self._pages.pop(request.request_id, None)
        self._recompute.discard(request.request_id)
        return self.request_finished(request, list(block_ids[0]) if block_ids else [])

    # ------------------------------------------------------------ worker half

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        self.layer_names = list(kv_caches)
        kv = HybridPagedKV(self.manifest, kv_caches,
                           self._kv_transfer_config.kv_connector_extra_config.get("kv_block_dim"))
        if kv.block_nbytes != self.worker.backend.block_nbytes:
            raise ConfigError(f"kvbm connector: a page holds {kv.block_nbytes} bytes but the kvbm backend's "
                              f"blocks hold {self.worker.backend.block_nbytes}")
        self.worker.kv = kv

    def _finish_loads(self, wait: bool = False) -> None:
        loads, _ = self.worker.poll(wait=wait)
        for req_id, failed in loads.items():
            if failed:  # some page did not arrive whole: the request recomputes, all of it
                self._failed.add(req_id)
        self._recved.update(loads)
        self._note_loads(loads)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return set()  # vLLM takes no block-level errors with several groups: see get_transfer_results

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        if self.worker.kv is None:
            return KVConnectorTransferResults()
        self._finish_loads()
        done, self._recved = self._recved, set()
        failed, self._failed = self._failed & done, self._failed - done
        if failed:
            log.warning("kvbm: %d request(s) did not get every page of their hit: vLLM recomputes them", len(failed))
        return KVConnectorTransferResults(finished_recving=done, failed_recving=failed)
