"""kvbm as a TensorRT-LLM KV cache connector (KvCacheConnectorScheduler / KvCacheConnectorWorker).

    from tensorrt_llm.llmapi.llm_args import KvCacheConnectorConfig
    LLM(model, backend="pytorch", kv_connector_config=KvCacheConnectorConfig(
        connector_module="kvbm.connectors.trtllm",
        connector_scheduler_class="KVBMConnectorScheduler",
        connector_worker_class="KVBMConnectorWorker"))
    # the kvbm config: $KVBM_CONFIG (a kvbm.yaml path); KVBM_... overrides apply
    # or a `kvbm serve` daemon: $KVBM_DAEMON__ADDRESS (and $KVBM_DAEMON__TOKEN)

Engine-independent parts (plain Python, tested without tensorrt_llm; trtllm_core.py, re-exported here):
    token_hashes         chained hashes of a request's full token blocks (TRT-LLM's connector
                         API hands tokens, not block hashes, to get_num_new_matched_tokens)
    retention_hints      KvCacheRetentionConfig -> per-block kvbm Hints (priority 0-100 and
                         duration), so a tier with the `priority` policy evicts low first
    layout_from_hf       KVLayout of one TRT-LLM block from the model's HF config.json
    hybrid_reason        (hybrid_layouts.py) why a model or KV cache config is hybrid
                         (variable attention windows, sliding-window or SSM layers), or None:
                         such engines are refused at start (their pool is not one row per
                         block of every layer; the vLLM connector handles hybrid models)
    TrtllmPlanner        the scheduler half: match, load plans, store plans with Hints
    TrtllmTransfers      the worker half: runs the plans against the registered KV pool
Adapters (need tensorrt_llm, built on first attribute access, API-checked):
    KVBMConnectorScheduler, KVBMConnectorWorker

TensorRT-LLM's pool is one tensor, block-major (`kv_cache_tensor[block_id]` is one block of
every layer), so a kvbm block is exactly one row of it. Loads are synchronous (TRT-LLM has
no per-block load-error path: a block that does not arrive intact raises in start_load_kv,
which TensorRT-LLM runs outside its step's error handling, so the executor stops rather than
computing on garbage). A new request's blocks may be stored a step late (TensorRT-LLM versions
differ in whether computed_position counts the connector's tokens; late is safe, early is not).
Stores gather in wait_for_save (on a GPU: kvbm's copy kernel queued behind the forward's
stream, which then waits on the copy; no host synchronize) and write on a transfer thread; a
finished request holds its blocks until its writes are done.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any

from ..blocks import Namespace
from ..manager import BlockManager
from .core import api_differences, daemon_spec, resolve_config, shared_backend, shared_manager
from .hybrid_layouts import hybrid_reason  # noqa: F401 - part of this module's API
from .trtllm_core import (  # noqa: F401 - part of this module's API (engine-independent halves)
    TrtllmMetadata,
    TrtllmPlanner,
    TrtllmTransfers,
    _field,
    layout_from_hf,
    request_identity,
    retention_hints,
    token_hashes,
)

log = logging.getLogger(__name__)

TESTED_TRTLLM = "1.1"


# ---------------------------------------------------------------- adapters (need tensorrt_llm)

_API = {  # class -> method -> the parameter names this adapter relies on
    "KvCacheConnectorScheduler": {
        "build_connector_meta": ("scheduler_output",),
        "get_num_new_matched_tokens": ("request", "num_computed_tokens"),
        "request_finished": ("request", "cache_block_ids"),
        "update_state_after_alloc": ("request", "block_ids"),
    },
    "KvCacheConnectorWorker": {
        "register_kv_caches": ("kv_cache_tensor",),
        "start_load_kv": ("stream",),
        "wait_for_layer_load": ("layer_idx", "stream"),
        "save_kv_layer": ("layer_idx", "stream"),
        "wait_for_save": ("stream",),
        "get_finished": ("finished_gen_req_ids", "started_loading_req_ids"),
    },
}


def check_trtllm_api(module: Any) -> None:
    """Raise ImportError naming what differs when TRT-LLM's connector API is not the one we use."""
    problems = []
    for cls_name, methods in _API.items():
        cls = getattr(module, cls_name, None)
        if cls is None:
            problems.append(f"{cls_name} is missing")
            continue
        problems += api_differences(cls, methods, f"{cls_name}.")
    if problems:
        raise ImportError(f"kvbm.connectors.trtllm supports TensorRT-LLM's KV cache connector API as of "
                          f"{TESTED_TRTLLM}; this one differs: {'; '.join(problems)}")


def _import_trtllm() -> Any:
    try:
        import tensorrt_llm
        from tensorrt_llm._torch.pyexecutor import kv_cache_connector
    except ImportError as exc:
        raise ImportError(
            f"kvbm.connectors.trtllm needs TensorRT-LLM with the PyTorch backend's KV cache connector "
            f"(tested with {TESTED_TRTLLM}.x): pip install tensorrt_llm; import failed with: {exc}"
        ) from exc
    check_trtllm_api(kv_cache_connector)
    version = getattr(tensorrt_llm, "__version__", "")
    if not version.startswith(TESTED_TRTLLM):
        log.warning("kvbm connector tested with TensorRT-LLM %s.x, running on %s (API check passed)",
                    TESTED_TRTLLM, version)
    return kv_cache_connector


def _setup(llm_args: Any) -> tuple[BlockManager, threading.RLock, Namespace, int]:
    """The shared manager for this engine: kvbm config from $KVBM_CONFIG, layout from the model.

    With $KVBM_DAEMON__ADDRESS (and $KVBM_DAEMON__TOKEN) set, a `kvbm serve` daemon's backend instead.
    """
    path = os.environ.get("KVBM_CONFIG")
    daemon = os.environ.get("KVBM_DAEMON__ADDRESS")
    if not path and not daemon:
        raise ImportError("kvbm.connectors.trtllm: set KVBM_CONFIG to a kvbm.yaml path (the tiers to use)")
    kv = _field(llm_args, "kv_cache_config")
    if (_field(kv, "host_cache_size", default=0) or 0) > 0:
        raise ImportError("kvbm.connectors.trtllm: set kv_cache_config.host_cache_size to 0 (kvbm is the "
                          "host tier; TensorRT-LLM's own host offload moves blocks between pool rows, so a "
                          "block id would no longer name the row kvbm copies)")
    block_size = _field(kv, "tokens_per_block", default=None) or 32
    tp = _field(llm_args, "tensor_parallel_size", default=1) or 1
    model = str(_field(llm_args, "model"))
    model_dir = str(_field(llm_args, "checkpoint_dir", "model"))
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            hf = json.load(f)
    except (OSError, ValueError):
        hf = {}
    why = hybrid_reason(hf, _field(kv, "max_attention_window", default=None))
    if why:
        raise ImportError(f"kvbm.connectors.trtllm: hybrid KV caches are not supported ({why}); serve this "
                          f"model without kv_connector_config, or with vLLM and kvbm.connectors.vllm")
    layout = layout_from_hf(model_dir, block_size, _field(kv, "dtype", default=None), tp)
    if daemon:
        spec = daemon_spec({"kvbm_daemon": daemon, "kvbm_token": os.environ.get("KVBM_DAEMON__TOKEN")},
                           layout, model)
        return shared_backend(spec), None, Namespace(model, layout, spec["salt"]), block_size
    config = resolve_config(path, layout, model)
    manager, lock = shared_manager(config)
    ns = config["namespace"]
    return manager, lock, Namespace(ns["model"], layout, ns.get("salt", "")), block_size


def _shards(llm_args: Any) -> int:
    """Workers holding a shard of each block: tensor x pipeline parallel."""
    return (_field(llm_args, "tensor_parallel_size", default=1) or 1) * (
        _field(llm_args, "pipeline_parallel_size", default=1) or 1)


def _shard_rank(llm_args: Any) -> int:
    """This worker's shard of each block (MPI rank over tensor x pipeline parallel), 0 when alone."""
    if _shards(llm_args) == 1:
        return 0
    from tensorrt_llm._utils import mpi_rank

    return int(mpi_rank())


def _build_adapters() -> dict[str, type]:
    kvc = _import_trtllm()

    class KVBMConnectorScheduler(kvc.KvCacheConnectorScheduler):
        """kvbm tiers behind TensorRT-LLM's connector scheduler (rank 0)."""

        def __init__(self, llm_args: Any) -> None:
            super().__init__(llm_args)
            manager, lock, ns, block_size = _setup(llm_args)
            self.planner = TrtllmPlanner(manager, lock, ns, block_size, shards=_shards(llm_args))

        def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
            salt, keyable = request_identity(request)
            n = self.planner.match(request.request_id, request.get_tokens(0), num_computed_tokens,
                                   salt=salt, keyable=keyable,
                                   retention=_field(request, "kv_cache_retention_config"))
            return n, False  # synchronous load in start_load_kv

        def update_state_after_alloc(self, request: Any, block_ids: list[int]) -> None:
            return  # loads are planned from the step's RequestData (all block ids of a new request)

        def build_connector_meta(self, scheduler_output: Any) -> TrtllmMetadata:
            return self.planner.step(scheduler_output.new_requests, scheduler_output.cached_requests)

        def request_finished(self, request: Any, cache_block_ids: list[int]) -> bool:
            # True holds the blocks until get_finished reports the writes landed; a request
            # with nothing stored frees them at once
            return self.planner.finished(request.request_id)

    class KVBMConnectorWorker(kvc.KvCacheConnectorWorker):
        """kvbm tiers behind TensorRT-LLM's connector worker."""

        def __init__(self, llm_args: Any) -> None:
            super().__init__(llm_args)
            manager, lock, _, _ = _setup(llm_args)
            self.transfers = TrtllmTransfers(manager, lock, rank=_shard_rank(llm_args))

        def register_kv_caches(self, kv_cache_tensor: Any) -> None:
            self.transfers.register(kv_cache_tensor)

        def start_load_kv(self, stream: Any) -> None:
            if self.transfers.worker.kv is not None:
                self.transfers.worker.fence(stream)  # after last step's gathers read the pages
            meta = self.get_connector_meta()
            if isinstance(meta, TrtllmMetadata) and meta.loads:
                failed = self.transfers.load(meta)
                if failed:
                    raise RuntimeError(f"kvbm: blocks did not arrive intact (request: block ids) {failed}; "
                                       f"TensorRT-LLM's connector API cannot recompute them")

        def wait_for_layer_load(self, layer_idx: int, stream: Any) -> None:
            return  # loads land whole before the forward pass

        def save_kv_layer(self, layer_idx: int, stream: Any) -> None:
            return  # a kvbm block spans all layers: saved once per step in wait_for_save

        def wait_for_save(self, stream: Any) -> None:
            meta = self.get_connector_meta()
            if isinstance(meta, TrtllmMetadata) and meta.stores:
                if not self.transfers.direct:
                    stream.synchronize()  # the forward pass wrote the blocks we gather
                self.transfers.save(meta, stream)  # direct: the copy kernel waits on `stream`
                # and `stream` waits on the copy: nothing the engine queues next (a freed block
                # reused or zeroed) touches a page before it is read (a stream wait, no host block)
                self.transfers.worker.fence(stream)

        def get_finished(self, finished_gen_req_ids: list[int],
                         started_loading_req_ids: list[int]) -> tuple[list[int], list[int]]:
            return self.transfers.finished(finished_gen_req_ids), []

    return {"KVBMConnectorScheduler": KVBMConnectorScheduler, "KVBMConnectorWorker": KVBMConnectorWorker}


_ADAPTERS: dict[str, type] = {}


def __getattr__(attr: str) -> type:
    if attr not in ("KVBMConnectorScheduler", "KVBMConnectorWorker"):
        raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
    if not _ADAPTERS:
        _ADAPTERS.update(_build_adapters())
    return _ADAPTERS[attr]
