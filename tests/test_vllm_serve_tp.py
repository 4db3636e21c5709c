"""`vllm serve --tensor-parallel-size 2` (CPU build) with the in-process kvbm config.

Two worker processes (tensor-parallel ranks 0 and 1) and the engine core: three processes of
one engine, all reaching the engine's own kvbm daemon. Each rank stores its shard of every
block under its own key; the scheduler's lookup sees rank 0's keys; a repeated prompt after
/reset_prefix_cache is 8 blocks of external hits, both shards loaded, and the greedy output
equals the recompute's (a rank reading the other's shard would change it). vLLM's CPU build
binds each rank's threads to a NUMA node and refuses 2 ranks on one node unless told which
cores to use: VLLM_CPU_OMP_THREADS_BIND="A|B" (rank 0 on core A, rank 1 on core B).

Beside a CPU hog this test lost the ranks' loads in about 1 run of 3 until the engine daemon
stayed in the engine's session (engine_daemon._start): in a session of its own the kernel's
autogroup scheduling left it runnable but unscheduled for 8-28 s while both ranks spun.
"""

from __future__ import annotations

import json
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
from vllm_serve_helpers import BLOCK, Server, kv_config, prompt, engine_daemon, group_shm, stored_blocks, wait_stored, write_model  # noqa: E402


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two tensor-parallel ranks need two cores to bind")
def test_tensor_parallel_ranks_share_the_engine_daemon(tmp_path):
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    kvbm = {"tiers": [{"name": "g2", "capacity": 64, "storage": {"name": "host", "pin": "never"}}]}
    s = Server(tmp_path, write_model(tmp_path), kv=kv_config({"kvbm_config": kvbm}),
               args=("--tensor-parallel-size", "2"), env={"KVBM_RUNTIME_DIR": str(runtime), "VLLM_CPU_OMP_THREADS_BIND": _two_cores()},
               name="tp2").start()
    try:
        s.wait()
        workers = {pid for role, pids in s.pids().items() if role.startswith("Worker") for pid in pids}
        assert len(workers) == 2 and not workers & s.pids()["EngineCore"]
        infos = [json.loads(p.read_text()) for p in (runtime / f"kvbm-{os.getuid()}").glob("*.json")
                 if not p.name.endswith("config.json")]
        assert len(infos) == 1  # one daemon for the engine's three processes
        tokens = prompt(3, 8 * BLOCK + 60)
        before = s.external_hits()
        d = engine_daemon(runtime / f"kvbm-{os.getuid()}")
        stores = stored_blocks(d["address"], d["token"], d["layout"])
        cold = s.complete(tokens)
        wait_stored(d["address"], d["token"], d["layout"], stores + 2 * 8)  # both ranks' shards
        s.reset_prefix_cache()
        warm = s.complete(tokens)
        assert s.external_hits() - before == 8 * BLOCK, s.kvbm_lines()
        assert warm == cold and len(cold) == 8
        shm = group_shm(s.proc.pid)
    finally:
        s.stop()
    # the CPU build's TP buffers (vllm_dist_*) outlive a clean stop unless stop_group unlinks them
    assert any("/vllm_dist_" in p for p in shm) and not [p for p in shm if os.path.exists(p)]


def _two_cores() -> str:
    a, b = sorted(os.sched_getaffinity(0))[:2]
    return f"{a}|{b}"
