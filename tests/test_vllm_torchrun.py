"""vLLM under torchrun (distributed_executor_backend="external_launcher"): two processes, one cache.

Every torchrun process is a whole offline engine with a scheduler of its own (tests/vllm_torchrun.py
is one rank). With data parallel 2 each serves its own prompts: rank 1 serving what rank 0
served gets its 8 full blocks from kvbm. With tensor parallel 2 both schedule the same request
in lockstep, each holding one shard: a private manager per process let rank 1's scheduler see
none of rank 0's keys, so the two disagreed on every hit; now both reach the engine's own
daemon, named by torchrun's master (kvbm/connectors/vllm.py _torchrun_cache). vLLM's CPU build
overwrites LOCAL_WORLD_SIZE with the TP size (1 for DP 2), which had the DP layout refused as
multi-node: torchrun's GROUP_WORLD_SIZE (its agents, one per node) decides now.

One real run per layout (about a minute each on a quiet 2-core box): one daemon for both ranks
(same address and pid), gone after the run (after the last rank that held it), and nothing left in /dev/shm that a rank held
(vLLM's TP buffers and queues, kvbm's windows) or the daemon made.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

if os.environ.get("KVBM_REQUIRE_VLLM") == "1":
    import vllm  # noqa: F401
else:
    pytest.importorskip("vllm", reason="vLLM is not installed (see README: vLLM connector)")

sys.path.insert(0, str(Path(__file__).parent))
from vllm_serve_helpers import BLOCK, free_port, write_model  # noqa: E402

RUN_TIMEOUT_S = 900  # two engines starting on a loaded 2-core box


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.mark.parametrize("mode", ["dp", "tp"])
def test_torchrun_ranks_hit_each_others_blocks(tmp_path, mode):
    write_model(tmp_path)
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    port = free_port()
    env = {**os.environ, "KVBM_RUNTIME_DIR": str(runtime), "OMP_NUM_THREADS": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), str(Path(__file__).parent / "vllm_torchrun.py"), str(tmp_path), mode]
    log = tmp_path / "torchrun.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=RUN_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
    text = log.read_text(errors="replace")
    assert rc == 0, "\n".join(line for line in text.splitlines() if "Error" in line or "kvbm" in line)[-4000:]
    ranks = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in range(2)]
    assert ranks[0]["daemon"] == ranks[1]["daemon"] and ranks[0]["pid"] == ranks[1]["pid"]  # one daemon
    for r in ranks:
        assert r["first"]["cached"] == 0  # computed here (a fresh prompt, or the other rank's)
        assert r["then"]["cached"] == 8 * BLOCK, r  # only kvbm had these blocks on this rank
        assert r["then"]["ids"] and len(r["then"]["ids"]) == 8
    if mode == "dp":  # each rank's output for the prompt it got from kvbm equals the other's recompute
        assert ranks[1]["then"]["ids"] == ranks[0]["first"]["ids"]
        assert ranks[0]["then"]["ids"] == ranks[1]["first"]["ids"]
    else:
        assert ranks[0]["then"]["ids"] == ranks[0]["first"]["ids"] == ranks[1]["then"]["ids"]
    # the daemon stops once no rank holds it (engine_daemon.py); it leaves nothing behind
    deadline = time.monotonic() + 60
    while _alive(ranks[0]["pid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(ranks[0]["pid"])
    held = {p for r in ranks for p in r["shm"]}
    assert any(p.startswith(f"/dev/shm/kvbm-{os.getuid()}-torchrun-") for p in held)  # the windows were seen
    assert not [p for p in held if os.path.exists(p)]
    assert not glob.glob(f"/dev/shm/kvbm-{os.getuid()}-torchrun-127.0.0.1-{port}*")
    assert not [p for p in (runtime / f"kvbm-{os.getuid()}").iterdir() if not p.name.endswith(".lock")]
