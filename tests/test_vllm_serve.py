"""`vllm serve` (CPU build, multiprocessing on) with the kvbm connector as the README sets it up.

One server for the module (start-up takes a minute or more on CPU): the in-process kvbm config
(`kvbm_config`), which under vLLM's multiprocessing executor (engine core and worker in
different processes) is served by the engine's own kvbm daemon. A prompt of 8 full blocks
runs, vLLM's own prefix cache is cleared, and the same prompt runs again: vLLM's metrics count
8 blocks of external (kvbm) hits and the greedy output equals the recompute's. `kvbm replay`
then runs a small trace against the same server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("KVBM_REQUIRE_VLLM") == "1":  # CI installs vLLM: a broken install must fail, not skip
    import vllm  # noqa: F401
else:
    pytest.importorskip("vllm", reason="vLLM is not installed (see README: vLLM connector)")
pytest.importorskip("httpx")
pytest.importorskip("zmq")

sys.path.insert(0, str(Path(__file__).parent))
from vllm_serve_helpers import BLOCK, Server, kv_config, prompt, engine_daemon, stored_blocks, wait_stored, write_model  # noqa: E402
from vllm_serve_helpers import daemon_pins, wait_unpinned  # noqa: E402

PROMPT = 8 * BLOCK + 60  # 8 full blocks and a partial one


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("vllm-serve")
    runtime = work / "run"
    runtime.mkdir(mode=0o700)
    kvbm = {"tiers": [{"name": "g2", "capacity": 64, "storage": {"name": "host", "pin": "never"}},
                      {"name": "g3", "capacity": 128, "storage": {"name": "disk", "path": str(work / "g3")}}]}
    s = Server(work, write_model(work), kv=kv_config({"kvbm_config": kvbm}),
               env={"KVBM_RUNTIME_DIR": str(runtime)}).start()
    try:
        s.wait()
        s.runtime = runtime / f"kvbm-{os.getuid()}"
        yield s
    finally:
        s.stop()


def test_engine_core_and_worker_share_one_cache(server):
    pids = server.pids()
    assert pids["EngineCore"] and pids["Worker"] and not pids["EngineCore"] & pids["Worker"]
    # the engine's own daemon, found by both processes through its rendezvous file
    (info,) = [json.loads(p.read_text()) for p in server.runtime.glob("*.json") if not p.name.endswith("config.json")]
    os.kill(info["pid"], 0)

    tokens = prompt(1, PROMPT)
    before = server.external_hits()
    d = engine_daemon(server.runtime)
    stores = stored_blocks(d["address"], d["token"], d["layout"])
    cold = server.complete(tokens)  # computed by the engine; its 8 full blocks stored in kvbm
    wait_stored(d["address"], d["token"], d["layout"], stores + 8)  # (the worker's store lane ends after the reply)
    server.reset_prefix_cache()  # vLLM forgets its own copy
    pinned = daemon_pins(d["address"], d["token"], d["layout"])[2]
    warm = server.complete(tokens)
    assert server.external_hits() - before == 8 * BLOCK, server.kvbm_lines()
    assert warm == cold and len(cold) == 8
    # the scheduler pinned the 8 blocks it promised (its own daemon session) and released them
    # once the worker's load was reported: nothing stays pinned (vllm_pins.py)
    assert daemon_pins(d["address"], d["token"], d["layout"])[2] - pinned >= 8
    wait_unpinned(d["address"], d["token"], d["layout"])


def test_replay_against_vllm_serve(server, tmp_path):
    # two sessions of three turns: each turn extends the last (128-token blocks), 12 requests
    rows, t = [], 0
    for session in range(2):
        ids = []
        for turn in range(3):
            ids = ids + [1000 * session + 10 * turn + k for k in range(3)]
            rows.append({"timestamp": t, "input_length": len(ids) * BLOCK - 20, "output_length": 4, "hash_ids": ids})
            t += 100
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def replay() -> dict:
        out = subprocess.run([sys.executable, "-m", "kvbm.cli", "replay", str(trace), "--url", server.url,
                              "--block-size", str(BLOCK), "--speed", "2", "--json", "--quiet"],
                             capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    first = replay()
    assert (first["requests"], first["completed"], first["failed"]) == (6, 6, 0)
    assert first["output_tokens"] == 6 * 4
    assert first["ttft_s"]["p50"] > 0 and first["e2e_s"]["p99"] >= first["ttft_s"]["p99"]
    assert first["server_metrics"]["vllm:prefix_cache_queries"] >= sum(r["input_length"] for r in rows)
    # the same trace again: every full block of every prompt (2 + 5 + 8 per session) was computed
    # in the first run, so it is reused now, from vLLM's own prefix cache or from kvbm
    again = replay()
    assert (again["completed"], again["failed"]) == (6, 0)
    m = again["server_metrics"]
    assert m.get("vllm:prefix_cache_hits", 0) + m.get("vllm:external_prefix_cache_hits", 0) >= 2 * 15 * BLOCK


@pytest.mark.parametrize("backend, nnodes, apart", [
    ("uni", 1, False),  # the worker inside the engine core: one in-process manager
    ("external_launcher", 1, False),  # torchrun: one whole engine per process
    ("mp", 1, True),  # workers in child processes on this node: the engine's own daemon
])
def test_executor_layouts(backend, nnodes, apart):
    from types import SimpleNamespace

    from kvbm.connectors.vllm import workers_apart

    cfg = SimpleNamespace(parallel_config=SimpleNamespace(distributed_executor_backend=backend, nnodes=nnodes))
    assert workers_apart(cfg) is apart


@pytest.mark.parametrize("backend, nnodes", [("ray", 1), ("mp", 2)])
def test_executors_that_may_leave_the_node_are_refused_in_one_line(backend, nnodes):
    from types import SimpleNamespace

    from kvbm.config import ConfigError
    from kvbm.connectors.vllm import workers_apart

    cfg = SimpleNamespace(parallel_config=SimpleNamespace(distributed_executor_backend=backend, nnodes=nnodes))
    with pytest.raises(ConfigError, match="kvbm_daemon") as err:
        workers_apart(cfg)
    assert "\n" not in str(err.value)
