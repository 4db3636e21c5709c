"""The daemon backend's load lane holds an OpenMP team of its own once the engine loaded torch
(daemon_backend.lane_omp_team), as the in-process backend's transfer threads do by copying with
torch: libgomp then lets the engine's OpenMP threads sleep soon when they wait, instead of
spinning 300,000 times (bench/RESULTS.md, session 8). Checked by what the process holds: the
team's worker threads, the lane it ran on, and nothing without torch or with the switch off."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import pytest

from servedaemon import LAYOUT, Served, make_keys

torch = pytest.importorskip("torch")


def _tasks() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_lane_omp_team_starts_the_teams_workers_and_keeps_them():
    from kvbm.connectors.daemon_backend import lane_omp_team

    workers = torch.get_num_threads() - 1  # a team of get_num_threads(): the caller + the rest
    ran, started, hold = [], threading.Event(), threading.Event()
    before = []

    def lane():
        before.append(_tasks())
        ran.append(lane_omp_team())
        started.set()
        hold.wait(60)  # the lane lives on: so does its team

    t = threading.Thread(target=lane)
    t.start()
    try:
        assert started.wait(60)
        assert ran == [True]
        assert _tasks() - before[0] == workers  # libgomp's workers of this thread's team
    finally:
        hold.set()
        t.join(60)


def test_lane_omp_team_switch_and_no_torch():
    code = textwrap.dedent("""
        import os, sys
        from kvbm.connectors.daemon_backend import lane_omp_team
        print(lane_omp_team(), "torch" in sys.modules)  # never imports torch itself
        import torch
        os.environ["KVBM_LANE_OMP_TEAM"] = "0"
        print(lane_omp_team())
        os.environ["KVBM_LANE_OMP_TEAM"] = "1"
        print(lane_omp_team())
    """)
    env = {k: v for k, v in os.environ.items() if k != "KVBM_LANE_OMP_TEAM"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == ["False False", "False", "True"]


@pytest.fixture
def daemon(tmp_path):
    d = Served(tmp_path, "lane-omp", tiers=[{"name": "g2", "capacity": 64, "eviction": "lru", "storage": "host"}]).start()
    yield d
    d.stop()


def test_daemon_backend_load_lane_runs_it(daemon, monkeypatch):
    from kvbm.connectors import daemon_backend

    seen = []
    monkeypatch.setattr(daemon_backend, "lane_omp_team", lambda: seen.append(threading.current_thread().name) or True)
    backend = daemon_backend.DaemonBackend.connect(daemon.address, LAYOUT, "tiny")
    try:
        assert len(seen) == 1 and seen[0].startswith("kvbm-daemon-load")  # once, on the load lane
        assert backend.lookup(make_keys("lane", 2))[0] == 0  # the lane still serves
    finally:
        backend.close()
