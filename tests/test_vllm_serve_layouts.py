"""More process layouts of one vLLM engine, each reaching one kvbm cache, or why not here.

- `--nnodes 2 --node-rank K` (K = 1 with `--headless`): vLLM's multi-node tensor parallelism, both
  "nodes" on this machine (a loopback --master-addr). Node 0 runs the API server, the engine core
  (the connector's scheduler half) and TP rank 0; node 1 runs TP rank 1 alone, in another launch
  with another engine_id. Both reach the engine's own daemon, named by the master address and
  port (kvbm/connectors/vllm.py engine_cache); a repeated prompt is 8 blocks of kvbm hits, both
  ranks' shards loaded.
- `--pipeline-parallel-size 2`: blocked on vLLM's CPU build (see the test).

Each launch binds one core (VLLM_CPU_OMP_THREADS_BIND); one daemon; nothing left in /dev/shm.
Launches apart that stop one by one (the other keeps the daemon): tests/test_vllm_serve_apart.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

if os.environ.get("KVBM_REQUIRE_VLLM") == "1":
    import vllm  # noqa: F401
else:
    pytest.importorskip("vllm", reason="vLLM is not installed (see README: vLLM connector)")
pytest.importorskip("httpx")
pytest.importorskip("zmq")

sys.path.insert(0, str(Path(__file__).parent))
from daemonproc import wait_until  # noqa: E402
from vllm_serve_helpers import (BLOCK, Server, engine_daemon, free_port, group_shm, kv_config, prompt,  # noqa: E402
                                stored_blocks, wait_stored, write_model)

KVBM = {"tiers": [{"name": "g2", "capacity": 64, "storage": {"name": "host", "pin": "never"}}]}


@pytest.mark.parametrize("node_rank", [0, 1])
def test_nodes_of_one_engine_on_this_machine_share_a_name(tmp_path, node_rank):
    from vllm.engine.arg_utils import EngineArgs

    from kvbm.config import ConfigError
    from kvbm.connectors.vllm import engine_cache

    def config(addr: str):
        return EngineArgs(model=write_model(tmp_path), load_format="dummy", skip_tokenizer_init=True,
                          block_size=BLOCK, max_model_len=4096, kv_transfer_config=kv_config({"kvbm_config": {}}),
                          tensor_parallel_size=2, nnodes=2, node_rank=node_rank, master_addr=addr,
                          master_port=29779).create_engine_config(headless=node_rank > 0)

    cfg = config("127.0.0.1")  # every launch its own engine_id; the master is what they share
    assert engine_cache(cfg, cfg.kv_transfer_config.engine_id) == "nodes-127.0.0.1-29779"
    cfg = config("10.1.2.3")  # node 1 may be another machine
    with pytest.raises(ConfigError, match="kvbm_daemon") as err:
        engine_cache(cfg, cfg.kv_transfer_config.engine_id)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("setting", ["decode_context_parallel_size", "prefill_context_parallel_size"])
def test_context_parallel_is_refused_in_one_line(setting):
    from types import SimpleNamespace

    from kvbm.connectors.vllm import refuse_context_parallel

    refuse_context_parallel(SimpleNamespace(decode_context_parallel_size=1, prefill_context_parallel_size=1))
    with pytest.raises(ValueError, match="--" + setting.replace("_", "-")) as err:
        refuse_context_parallel(SimpleNamespace(**{setting: 2}))
    assert "\n" not in str(err.value)


def _repeat_hits(s: Server, d: dict, shards: int, seed: int) -> None:
    """A prompt, vLLM's own copy forgotten, the prompt again: 8 blocks from kvbm, same output."""
    tokens = prompt(seed, 8 * BLOCK + 60)
    stores = stored_blocks(d["address"], d["token"], d["layout"])
    before = s.external_hits()
    cold = s.complete(tokens)
    wait_stored(d["address"], d["token"], d["layout"], stores + 8 * shards)  # every rank's shards
    s.reset_prefix_cache()
    warm = s.complete(tokens)
    assert s.external_hits() - before == 8 * BLOCK, s.kvbm_lines()
    assert warm == cold and len(cold) == 8


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two tensor-parallel ranks need two cores to bind")
def test_tensor_parallel_over_two_nodes_of_this_machine(tmp_path):
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    model = write_model(tmp_path)
    port = free_port()
    cores = sorted(os.sched_getaffinity(0))[:2]
    common = ("--tensor-parallel-size", "2", "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(port))
    node0, node1 = [Server(tmp_path, model, kv=kv_config({"kvbm_config": KVBM}), cli=True, name=f"node{k}",
                           args=(*common, "--node-rank", str(k), *(("--headless",) if k else ())),
                           env={"KVBM_RUNTIME_DIR": str(runtime), "VLLM_CPU_OMP_THREADS_BIND": str(cores[k])})
                    for k in range(2)]
    folder = runtime / f"kvbm-{os.getuid()}"
    shm: set[str] = set()
    try:
        node1.start()
        node0.start()
        node0.wait()
        assert "Worker" in "".join(node1.pids()) and "EngineCore" not in node1.pids()  # TP rank 1 alone
        infos = [p.name for p in folder.glob("*.json") if not p.name.endswith("config.json")]
        assert infos == [f"nodes-127.0.0.1-{port}.json"]  # one daemon for both launches
        d = engine_daemon(folder)
        _repeat_hits(node0, d, shards=2, seed=51)
        shm = group_shm(node0.proc.pid) | group_shm(node1.proc.pid)
    finally:
        node0.stop()
        node1.stop()
    assert not [p for p in shm if os.path.exists(p)]
    # the daemon stops once no process of either launch holds it (engine_daemon.py): soon after
    assert wait_until(lambda: not list(folder.glob("*.json")), timeout=120)


def _cpu_build() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


# Blocked on this machine, tried: `vllm serve --pipeline-parallel-size 2` with VLLM_CPU_OMP_THREADS_BIND
# "0|1" starts (engine core, Worker_PP0, Worker_PP1), then its first request kills the engine:
# Worker_PP1 fails `assert self.intermediate_tensors is not None` (gpu_model_runner.py
# sync_and_gather_intermediate_tensors: the CPU model runner never allocates them), the engine core
# then KeyErrors on the request id. The same without kvbm (no --kv-transfer-config), and with
# --enforce-eager dropped (compiled, VLLM_CPU_CI_ENV=1). Where PP runs (a GPU build) this test does.
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two pipeline stages need two cores to bind")
@pytest.mark.skipif(_cpu_build(), reason="vLLM 0.32's CPU build fails every pipeline-parallel request on stage "
                    "1 (intermediate_tensors never allocated), with or without kvbm")
def test_pipeline_parallel_stages_share_the_engine_daemon(tmp_path):
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    cores = sorted(os.sched_getaffinity(0))[:2]
    s = Server(tmp_path, write_model(tmp_path), kv=kv_config({"kvbm_config": KVBM}), cli=True, name="pp2",
               args=("--pipeline-parallel-size", "2"),
               env={"KVBM_RUNTIME_DIR": str(runtime), "VLLM_CPU_OMP_THREADS_BIND": f"{cores[0]}|{cores[1]}"})
    folder = runtime / f"kvbm-{os.getuid()}"
    shm: set[str] = set()
    try:
        s.start().wait()
        assert {"Worker_PP0", "Worker_PP1"} <= set(s.pids()), s.pids()
        _repeat_hits(s, engine_daemon(folder), shards=2, seed=52)  # each stage stores its layers' shard
        shm = group_shm(s.proc.pid)
    finally:
        s.stop()
    assert not [p for p in shm if os.path.exists(p)]
