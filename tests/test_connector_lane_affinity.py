"""The daemon backend's load lane runs on every CPU even where the engine binds OpenMP threads.

vLLM's CPU worker under its multiprocessing executor sets GOMP_CPU_AFFINITY to its compute
cores; libgomp then binds any thread that starts an OpenMP team to the first of them. The lane
starts one (lane_omp_team), so it must drop that binding afterwards, or it and the client's
threads it starts share the worker's main core. Checked in a child process with libgomp
preloaded (as vLLM's CPU build runs) and the affinity the engine would set."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
LIBGOMP = Path(torch.__file__).parent / "lib" / "libgomp.so.1"

CODE = textwrap.dedent("""
    import os, threading, torch
    from kvbm.connectors import daemon_backend
    os.sched_setaffinity(0, {0})  # the engine's main thread: bound to its first core
    torch.ones(1 << 20).sum()
    seen = {}
    def lane():
        daemon_backend._start_lane()
        seen["lane"] = sorted(os.sched_getaffinity(0))
        child = threading.Thread(target=lambda: seen.setdefault("child", sorted(os.sched_getaffinity(0))))
        child.start(); child.join()  # a thread the lane starts (the client's zmq I/O, heartbeat)
    t = threading.Thread(target=lane); t.start(); t.join()
    # the team binding happens at all here (else this test shows nothing): a bare team start binds
    def bare():
        os.sched_setaffinity(0, range(os.cpu_count()))
        daemon_backend.lane_omp_team()
        seen["bare"] = sorted(os.sched_getaffinity(0))
    t = threading.Thread(target=bare); t.start(); t.join()
    print(seen["lane"], seen["child"], seen["bare"])
""")


@pytest.mark.skipif(not LIBGOMP.exists() or not hasattr(os, "sched_setaffinity"), reason="needs torch's libgomp, Linux")
@pytest.mark.skipif((os.cpu_count() or 1) < 2 or len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_load_lane_is_unbound_after_its_openmp_team():
    cpus = sorted(os.sched_getaffinity(0))[:2]
    env = {k: v for k, v in os.environ.items() if k != "KVBM_LANE_OMP_TEAM"}
    env.update(LD_PRELOAD=str(LIBGOMP), GOMP_CPU_AFFINITY=f"{cpus[0]} {cpus[1]}", OMP_NUM_THREADS="2")
    code = CODE.replace("{0}", f"{{{cpus[0]}}}")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    every = sorted(os.sched_getaffinity(0))
    lane, child, bare = out.stdout.strip().split("] [")
    assert lane.strip("[]") == child.strip("[]") == ", ".join(map(str, every))
    assert bare.strip("[]") == str(cpus[0])  # what the lane would be without unbinding after
