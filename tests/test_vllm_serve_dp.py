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
from vllm_e2e import CONFIG  # noqa: E402
from vllm_serve_helpers import BLOCK, Server, engine_daemon, group_shm, kv_config, prompt, stored_blocks, wait_stored, write_model  # noqa: E402

from kvbm.config import ConfigError  # noqa: E402
from kvbm.connectors.vllm import engine_cache  # noqa: E402

# external data parallel (ranks launched one by one) is for MoE models only (vLLM refuses others)
MOE = {**CONFIG, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
       "num_local_experts": 4, "num_experts_per_tok": 2}


def vllm_config(model: str, **engine_args):
    """The VllmConfig `vllm serve MODEL --<engine_args>` builds (the API server's, before the
    engine cores get their copies)."""
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=model, load_format="dummy", skip_tokenizer_init=True, block_size=BLOCK,
                      max_model_len=4096, kv_transfer_config=kv_config({"kvbm_config": {}}),
                      **engine_args).create_engine_config()


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
@pytest.mark.parametrize("args, rank, local, what", [
    # two nodes of two ranks: the DP master must be reachable from the other node
    ({"data_parallel_size": 4, "data_parallel_size_local": 2, "data_parallel_address": "10.1.2.3"}, 0, 0,
     ["DP master 10.1.2.3"]),
    # the second node's ranks (2, 3) are its local ranks 0, 1 (a MoE rank still sees DP 4, 2 local)
    ({"data_parallel_size": 4, "data_parallel_size_local": 2, "data_parallel_start_rank": 2}, 2, 0,
     ["as local rank 0", "4 data parallel ranks, 2 on this node"]),
])
def test_ranks_on_other_nodes_are_refused_in_one_line(models, model, args, rank, local, what):
    cfg = vllm_config(models[model], **args)
    with pytest.raises(ConfigError, match="kvbm_daemon") as err:
        engine_cache(*rank_view(cfg, rank, local))
    assert any(w in str(err.value) for w in what) and "\n" not in str(err.value)


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


def test_torchrun_ranks_share_their_master_on_one_node(monkeypatch):
    pc = SimpleNamespace(distributed_executor_backend="external_launcher", nnodes=1, data_parallel_size=2,
                         data_parallel_backend="mp")
    cfg = SimpleNamespace(parallel_config=pc)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29611")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert {engine_cache(cfg, f"{uuid}_dp{k}") for k, uuid in enumerate(["a", "b"])} == {"torchrun-127.0.0.1-29611"}
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # the other rank on another node
    with pytest.raises(ConfigError, match="kvbm_daemon") as err:
        engine_cache(cfg, "a_dp0")
    assert "\n" not in str(err.value)


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
