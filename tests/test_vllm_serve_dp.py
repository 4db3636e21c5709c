"""Data parallel vLLM (several engine cores, each with its own workers) reaching one kvbm cache.

`vllm serve --data-parallel-size 2` runs two engine cores, each a scheduler with its own worker
process, behind API servers that route each request to one rank. With a private cache per
rank, a prompt served by rank 0 is a miss on rank 1; with the in-process kvbm config every rank
reaches the engine's own daemon (kvbm/connectors/vllm.py engine_cache), named by what all ranks
share. What each rank sees is not the server's config: vLLM gives a dense model's ranks a
config of DP 1 each (independent engines) and every rank an engine_id ending in "_dp<rank>".
The first tests build vLLM's own configs for each launch layout (single node, DP + TP, uni,
multi-node, ranks launched apart, ray, torchrun), turn them into each rank's view as vLLM's
run_engine_core does, and check which cache each rank reaches or that it is refused in one
line. Then real servers: `vllm serve --data-parallel-size 2 --api-server-count 2` (and DP 2 x
TP 2: four workers), where a prompt served by one rank is 8 blocks of external hits on the
other (vLLM's X-data-parallel-rank header picks the rank), both ways, and nothing is left in
/dev/shm after the stop; and `--api-server-count 2` in front of one engine core.
"""

from __future__ import annotations

import copy
import glob
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

if os.environ.get("KVBM_REQUIRE_VLLM") == "1":
    import vllm  # noqa: F401
else:
    pytest.importorskip("vllm", reason="vLLM is not installed (see README: vLLM connector)")
pytest.importorskip("httpx")
pytest.importorskip("zmq")

sys.path.insert(0, str(Path(__file__).parent))
from daemonproc import wait_until  # noqa: E402
from vllm_e2e import CONFIG  # noqa: E402
from vllm_serve_helpers import (BLOCK, Server, engine_daemon, free_port, group_shm, kv_config, prompt,  # noqa: E402
                                stored_blocks, wait_stored, write_model)

from kvbm.config import ConfigError  # noqa: E402
from kvbm.connectors.vllm import engine_cache  # noqa: E402

# external data parallel (ranks launched one by one) is for MoE models only (vLLM refuses others)
MOE = {**CONFIG, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
       "num_local_experts": 4, "num_experts_per_tok": 2}


def vllm_config(model: str, headless: bool = False, **engine_args):
    """The VllmConfig `vllm serve MODEL --<engine_args>` builds (the API server's, before the
    engine cores get their copies)."""
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=model, load_format="dummy", skip_tokenizer_init=True, block_size=BLOCK,
                      max_model_len=4096, kv_transfer_config=kv_config({"kvbm_config": {}}),
                      **engine_args).create_engine_config(headless=headless)


def rank_view(cfg, rank: int, local: int | None = None) -> tuple:
    """(config, engine_id) as engine core `rank` (local rank `local` on its node) and its
    workers see them, made as vLLM's run_engine_core makes them: "_dp<rank>" appended to the
    engine_id, and a dense model's rank reconfigured as an independent engine of DP 1."""
    cfg = copy.deepcopy(cfg)
    pc = cfg.parallel_config
    pc.data_parallel_rank_local = rank if local is None else local
    cfg.kv_transfer_config.engine_id = f"{cfg.kv_transfer_config.engine_id}_dp{rank}"
    pc.data_parallel_index = rank
    if cfg.model_config.is_moe:
        pc.data_parallel_rank = rank
    else:
        pc.reconfigure_for_independent_dp_rank()
    return cfg, cfg.kv_transfer_config.engine_id


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    work = tmp_path_factory.mktemp("dp-models")
    return {"dense": write_model(work / "dense"), "moe": write_model(work / "moe", MOE)}


@pytest.mark.parametrize("model", ["dense", "moe"])  # a dense model's ranks see DP 1 each (vLLM)
@pytest.mark.parametrize("args", [
    {"data_parallel_size": 2},  # vllm serve --data-parallel-size 2 (mp executor per rank)
    {"data_parallel_size": 2, "data_parallel_size_local": 2},
    {"data_parallel_size": 2, "tensor_parallel_size": 2},  # DP + TP: 2 engine cores x 2 workers
    {"data_parallel_size": 2, "distributed_executor_backend": "uni"},  # worker inside each engine core
])
def test_every_rank_of_one_server_reaches_one_daemon(models, model, args):
    cfg = vllm_config(models[model], **args)
    names = {engine_cache(*rank_view(cfg, rank)) for rank in range(2)}
    assert names == {cfg.kv_transfer_config.engine_id}  # not a rank's, not a pid's
    other = vllm_config(models[model], **args)  # another server on the node: a daemon of its own
    assert engine_cache(*rank_view(other, 0)) not in names


def test_one_engine_without_data_parallel_keeps_its_layout(models):
    one = vllm_config(models["dense"])  # one worker: vLLM's config says "uni" (one process)
    assert one.parallel_config.distributed_executor_backend == "uni"
    assert engine_cache(one, one.kv_transfer_config.engine_id) is None  # an in-process manager
    pc = SimpleNamespace(distributed_executor_backend="mp", nnodes=1, data_parallel_size=1)
    assert engine_cache(SimpleNamespace(parallel_config=pc), "e_dp0") == "e_dp0"  # its engine_id, as is


def test_ranks_launched_apart_on_this_node_share_the_dp_master(models):
    # vllm serve --data-parallel-size 2 --data-parallel-rank K: each rank its own launch, its own
    # engine_id; what they share is the DP master (rank 0 binds its RPC port)
    ranks = [vllm_config(models["moe"], data_parallel_size=2, data_parallel_rank=k,
                         data_parallel_rpc_port=29777) for k in range(2)]
    assert ranks[0].kv_transfer_config.engine_id != ranks[1].kv_transfer_config.engine_id
    names = {engine_cache(*rank_view(cfg, k, 0)) for k, cfg in enumerate(ranks)}  # each its node's local 0
    assert names == {"dp-127.0.0.1-29777"}


@pytest.mark.parametrize("model", ["dense", "moe"])
def test_ranks_on_other_nodes_are_refused_in_one_line(models, model):
    # two nodes of two ranks: the DP master must be reachable from the other node
    cfg = vllm_config(models[model], data_parallel_size=4, data_parallel_size_local=2, data_parallel_address="10.1.2.3")
    with pytest.raises(ConfigError, match="kvbm_daemon") as err:
        engine_cache(*rank_view(cfg, 0, 0))
    assert "DP master 10.1.2.3" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("headless", [False, True])
def test_ranks_launched_apart_on_a_loopback_master_share_it(models, headless):
    # `vllm serve --data-parallel-size 2 --data-parallel-size-local 1` (rank 0 and the front end)
    # beside `vllm serve --data-parallel-size 2 --data-parallel-size-local 1 --data-parallel-start-rank 1
    # [--headless]`: a loopback DP master keeps every rank on this node; a MoE rank keeps the DP size
    extra = {"headless": True} if headless else {}
    front = vllm_config(models["moe"], data_parallel_size=2, data_parallel_size_local=1, data_parallel_rpc_port=29778)
    other = vllm_config(models["moe"], data_parallel_size=2, data_parallel_size_local=1, data_parallel_start_rank=1,
                        data_parallel_rpc_port=29778, **extra)
    assert {engine_cache(*rank_view(front, 0, 0)), engine_cache(*rank_view(other, 1, 0))} == {"dp-127.0.0.1-29778"}


def test_a_dense_rank_launched_apart_is_refused_in_one_line(models):
    # vLLM makes every dense rank an engine of DP 1: rank 0's core, beside its front end, looks like
    # a one-launch server's and names its cache by its engine_id, which rank 1 cannot know
    other = vllm_config(models["dense"], data_parallel_size=2, data_parallel_size_local=1, data_parallel_start_rank=1)
    with pytest.raises(ConfigError, match="kvbm_daemon") as err:
        engine_cache(*rank_view(other, 1, 0))
    assert "rank 1 of a dense model launched apart" in str(err.value) and "\n" not in str(err.value)


def test_ranks_launched_apart_with_a_routable_master_are_refused(models):
    cfg = vllm_config(models["moe"], data_parallel_size=2, data_parallel_rank=1, data_parallel_address="10.1.2.3")
    with pytest.raises(ConfigError, match="DP master 10.1.2.3"):
        engine_cache(*rank_view(cfg, 1, 0))


def test_ray_data_parallel_is_refused_in_one_line():
    pc = SimpleNamespace(distributed_executor_backend="mp", nnodes=1, data_parallel_size=2,
                         data_parallel_backend="ray")
    with pytest.raises(ConfigError, match="kvbm_daemon") as err:
        engine_cache(SimpleNamespace(parallel_config=pc), "e_dp0")
    assert "'ray'" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("dp, tp", [(2, 1), (1, 2)])
def test_torchrun_ranks_share_their_master_on_one_node(monkeypatch, dp, tp):
    # every torchrun process is a whole engine, scheduler included (TP ranks too): one cache for all
    pc = SimpleNamespace(distributed_executor_backend="external_launcher", nnodes=1, data_parallel_size=dp,
                         data_parallel_backend="mp", world_size=dp * tp)
    cfg = SimpleNamespace(parallel_config=pc)
    monkeypatch.setenv("MASTER_ADDR", "10.1.2.3")
    monkeypatch.setenv("MASTER_PORT", "29611")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "1")  # torchrun's agents: one node
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(tp))  # what vLLM's CPU build leaves there (its TP size)
    assert {engine_cache(cfg, uuid) for uuid in ["a", "b_dp1"]} == {"torchrun-10.1.2.3-29611"}
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")  # the other rank on another node
    with pytest.raises(ConfigError, match="kvbm_daemon") as err:
        engine_cache(cfg, "a")
    assert "GROUP_WORLD_SIZE 2" in str(err.value) and "\n" not in str(err.value)
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: its own in-process manager
    pc.world_size = 1
    assert engine_cache(cfg, "a") is None


# ------------------------------------------------------------------ a real server


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two data parallel ranks need two cores to bind")
@pytest.mark.parametrize("tp", [1, 2], ids=["tp1", "tp2"])  # tp 2: each rank's two workers store their shards side by side
def test_a_prompt_served_by_one_rank_hits_on_the_other(tmp_path, tp):
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    kvbm = {"tiers": [{"name": "g2", "capacity": 64, "storage": {"name": "host", "pin": "never"}}]}
    a, b = sorted(os.sched_getaffinity(0))[:2]
    bind = "|".join([f"{a}|{b}"] * tp)  # one core per (DP, TP) rank, in that order
    apis = 2 if tp == 1 else 1  # (one API server fewer on a 2-core box with four workers)
    s = Server(tmp_path, write_model(tmp_path), kv=kv_config({"kvbm_config": kvbm}), cli=True,
               args=("--data-parallel-size", "2", "--tensor-parallel-size", str(tp), "--api-server-count", str(apis)),
               env={"KVBM_RUNTIME_DIR": str(runtime), "VLLM_CPU_OMP_THREADS_BIND": bind}, name=f"dp2-tp{tp}").start()
    shm: set[str] = set()
    try:
        s.wait()
        roles = s.pids()
        assert {"EngineCore_DP0", "EngineCore_DP1"} <= set(roles), roles
        assert len(roles.get("Worker", ())) == 2 * tp, roles
        assert len([r for r in roles if r.lower().startswith("apiserver")]) == apis, roles
        folder = runtime / f"kvbm-{os.getuid()}"
        infos = [json.loads(p.read_text()) for p in folder.glob("*.json") if not p.name.endswith("config.json")]
        assert len(infos) == 1  # one daemon for both engine cores and all their workers
        d = engine_daemon(folder)
        for first, then, seed in [(0, 1, 11), (1, 0, 12)]:
            tokens = prompt(seed, 8 * BLOCK + 60)
            stores = stored_blocks(d["address"], d["token"], d["layout"])
            before = s.external_hits(engine=then)
            cold = s.complete(tokens, dp_rank=first)  # rank `first` computes it; its 8 blocks go to kvbm
            wait_stored(d["address"], d["token"], d["layout"], stores + 8 * tp)  # every worker's shards
            warm = s.complete(tokens, dp_rank=then)  # rank `then` never saw it: only kvbm can supply it
            assert s.external_hits(engine=then) - before == 8 * BLOCK, s.kvbm_lines()
            assert warm == cold and len(cold) == 8
        shm = group_shm(s.proc.pid)
    finally:
        s.stop()
    assert not [p for p in shm if os.path.exists(p)]  # vLLM's queues and TP buffers are gone


def test_two_api_servers_in_front_of_one_engine_get_hits(tmp_path):
    # --api-server-count 2 without data parallelism: two API server processes, one engine core
    # (where the connector's scheduler half runs) and its worker; vLLM sums both servers' metrics
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    kvbm = {"tiers": [{"name": "g2", "capacity": 64, "storage": {"name": "host", "pin": "never"}}]}
    s = Server(tmp_path, write_model(tmp_path), kv=kv_config({"kvbm_config": kvbm}), cli=True,
               args=("--api-server-count", "2"), env={"KVBM_RUNTIME_DIR": str(runtime)}, name="api2").start()
    try:
        s.wait()
        roles = s.pids()
        assert len([r for r in roles if r.lower().startswith("apiserver")]) == 2, roles
        d = engine_daemon(runtime / f"kvbm-{os.getuid()}")
        for seed in (21, 22):  # each request lands on either API server: both go to the one engine core
            tokens = prompt(seed, 8 * BLOCK + 60)
            stores = stored_blocks(d["address"], d["token"], d["layout"])
            before = s.external_hits()
            cold = s.complete(tokens)
            wait_stored(d["address"], d["token"], d["layout"], stores + 8)
            s.reset_prefix_cache()  # vLLM forgets its own copy
            warm = s.complete(tokens)
            assert s.external_hits() - before == 8 * BLOCK, s.kvbm_lines()
            assert warm == cold and len(cold) == 8
    finally:
        s.stop()


# ------------------------------------------------ ranks launched one by one (a MoE model)
#
# vLLM launches ranks apart for MoE models only (external DP: "Non-MoE models do not support
# external data parallel mode"; a dense rank launched apart is refused by kvbm, above). Its CPU
# build cannot run a MoE layer with DP > 1 (CpuCommunicator has no all_gatherv/reduce_scatterv:
# NotImplementedError at the first request), so these servers load tests/vllm_moe_dp_plugin.py,
# which supplies the two collectives over gloo and changes nothing else. Each launch binds one
# core; the daemon is the one whichever rank's process asked first started.


def _serve_apart(tmp_path, launches: list[tuple[str, tuple]]) -> tuple[Path, list[Server]]:
    """`vllm serve` once per (name, args), all on one kvbm runtime folder, the MoE model and the
    collectives plugin; each launch bound to its own core."""
    from vllm_moe_dp_plugin import install

    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    plugin = install(tmp_path / "plugin")
    path = os.pathsep.join(p for p in (str(plugin), os.environ.get("PYTHONPATH", "")) if p)
    kvbm = {"tiers": [{"name": "g2", "capacity": 64, "storage": {"name": "host", "pin": "never"}}]}
    model = write_model(tmp_path, MOE)
    cores = sorted(os.sched_getaffinity(0))
    servers = [Server(tmp_path, model, kv=kv_config({"kvbm_config": kvbm}), cli=True, args=args, name=name,
                      env={"KVBM_RUNTIME_DIR": str(runtime), "VLLM_CPU_OMP_THREADS_BIND": str(cores[i % len(cores)]),
                           "PYTHONPATH": path}) for i, (name, args) in enumerate(launches)]
    return runtime / f"kvbm-{os.getuid()}", servers


def _one_daemon(folder: Path) -> dict:
    infos = [p for p in folder.glob("*.json") if not p.name.endswith("config.json")]
    assert len(infos) == 1, infos  # one daemon for every launch
    d = engine_daemon(folder)
    assert d["pid"] and os.path.basename(str(infos[0])).startswith("dp-127.0.0.1-")  # named by the DP master
    return d


def _stop_all(servers: list[Server]) -> set[str]:
    shm = set().union(*(group_shm(s.proc.pid) for s in servers if s.proc is not None))
    for s in reversed(servers):
        s.stop()
    return shm


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two data parallel ranks need two cores to bind")
def test_external_dp_ranks_launched_one_by_one_hit_each_other(tmp_path):
    # vllm serve --data-parallel-size 2 --data-parallel-rank K --data-parallel-rpc-port P, K = 0, 1:
    # two API servers, two engine cores, two workers, three launches' worth of processes
    rpc = free_port()
    folder, servers = _serve_apart(tmp_path, [
        (f"ext-dp{k}", ("--data-parallel-size", "2", "--data-parallel-rank", str(k), "--data-parallel-address",
                        "127.0.0.1", "--data-parallel-rpc-port", str(rpc))) for k in range(2)])
    shm: set[str] = set()
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait()
        assert [set(s.pids()) >= {f"EngineCore_DP{k}", "APIServer"} for k, s in enumerate(servers)] == [True, True]
        d = _one_daemon(folder)
        assert json.loads((folder / f"dp-127.0.0.1-{rpc}.json").read_text())["pid"] == d["pid"]
        for first, then, seed in [(0, 1, 41), (1, 0, 42)]:
            tokens = prompt(seed, 8 * BLOCK + 60)
            stores = stored_blocks(d["address"], d["token"], d["layout"])
            before = servers[then].external_hits()
            cold = servers[first].complete(tokens)  # rank `first`'s own server computes it
            wait_stored(d["address"], d["token"], d["layout"], stores + 8)
            warm = servers[then].complete(tokens)  # the other launch never saw it
            assert servers[then].external_hits() - before == 8 * BLOCK, servers[then].kvbm_lines()
            assert warm == cold and len(cold) == 8
    finally:
        shm = _stop_all(servers)
    # the daemon stops after its last holder (a flock each launch held) and leaves nothing
    assert wait_until(lambda: not [p for p in shm if os.path.exists(p)], 60)
    assert wait_until(lambda: not list(folder.glob("*.json")), 60)
    assert wait_until(lambda: not glob.glob(f"/dev/shm/kvbm-{os.getuid()}-dp-127.0.0.1-{rpc}*"), 60)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two data parallel ranks need two cores to bind")
def test_a_headless_rank_behind_another_launchs_front_end_hits(tmp_path):
    # vllm serve --data-parallel-size 2 --data-parallel-size-local 1 (the API server and rank 0)
    # beside vllm serve --headless --data-parallel-size 2 --data-parallel-size-local 1
    # --data-parallel-start-rank 1 (rank 1's engine core alone, reached over the DP RPC port)
    rpc = free_port()
    common = ("--data-parallel-size", "2", "--data-parallel-size-local", "1", "--data-parallel-rpc-port", str(rpc))
    folder, servers = _serve_apart(tmp_path, [("front", common),
                                              ("headless", (*common, "--headless", "--data-parallel-start-rank", "1"))])
    front, headless = servers
    shm: set[str] = set()
    try:
        headless.start()
        front.start()
        front.wait()  # ready once both ranks' engine cores shook hands with it
        assert "EngineCore_DP1" in headless.pids() and "APIServer" not in headless.pids()
        d = _one_daemon(folder)
        for first, then, seed in [(0, 1, 43), (1, 0, 44)]:
            tokens = prompt(seed, 8 * BLOCK + 60)
            stores = stored_blocks(d["address"], d["token"], d["layout"])
            before = front.external_hits(engine=then)
            cold = front.complete(tokens, dp_rank=first)
            wait_stored(d["address"], d["token"], d["layout"], stores + 8)
            warm = front.complete(tokens, dp_rank=then)
            assert front.external_hits(engine=then) - before == 8 * BLOCK, front.kvbm_lines() + headless.kvbm_lines()
            assert warm == cold and len(cold) == 8
    finally:
        shm = _stop_all(servers)
    assert wait_until(lambda: not [p for p in shm if os.path.exists(p)], 60)
    assert wait_until(lambda: not list(folder.glob("*.json")), 60)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two data parallel ranks need two cores to bind")
def test_multi_port_supervised_ranks_hit_each_other(tmp_path):
    # vllm serve --data-parallel-size 2 --data-parallel-size-local 2 --data-parallel-multi-port-external-lb:
    # one launch whose supervisor starts one `vllm serve --data-parallel-rank K` per rank, rank K on
    # port + K (external DP under one parent)
    rpc = free_port()
    cores = sorted(os.sched_getaffinity(0))[:2]
    folder, (s0,) = _serve_apart(tmp_path, [("multiport", (
        "--data-parallel-size", "2", "--data-parallel-size-local", "2", "--data-parallel-multi-port-external-lb",
        "--data-parallel-supervisor-port", str(free_port()), "--data-parallel-rpc-port", str(rpc)))])
    s0.env["VLLM_CPU_OMP_THREADS_BIND"] = f"{cores[0]}|{cores[1]}"
    s1 = copy.copy(s0)  # the same process group; rank 1's API server on the next port
    s1.url = f"http://127.0.0.1:{s0.port + 1}"
    shm: set[str] = set()
    try:
        s0.start()
        s1.proc = s0.proc
        s0.wait()
        s1.wait()
        assert {"EngineCore_DP0", "EngineCore_DP1"} <= set(s0.pids()), s0.pids()
        d = _one_daemon(folder)
        servers = [s0, s1]
        for first, then, seed in [(0, 1, 45), (1, 0, 46)]:
            tokens = prompt(seed, 8 * BLOCK + 60)
            stores = stored_blocks(d["address"], d["token"], d["layout"])
            before = servers[then].external_hits()
            cold = servers[first].complete(tokens)
            wait_stored(d["address"], d["token"], d["layout"], stores + 8)
            warm = servers[then].complete(tokens)
            assert servers[then].external_hits() - before == 8 * BLOCK, s0.kvbm_lines()
            assert warm == cold and len(cold) == 8
    finally:
        shm = _stop_all([s0])
    assert wait_until(lambda: not [p for p in shm if os.path.exists(p)], 60)
    assert wait_until(lambda: not list(folder.glob("*.json")), 60)
