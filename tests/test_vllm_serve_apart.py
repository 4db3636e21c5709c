"""Two `vllm serve` launches started apart on one node share one kvbm engine daemon, whichever stops.

Both launches name one node cache (kv_connector_extra_config.kvbm_cache_name, the same
kvbm_config) and no `kvbm serve` daemon: the first engine process to ask starts the engine daemon,
every process of both launches holds it (a flock each, kvbm/connectors/engine_daemon.py). Until
session 13 the daemon stopped with the launch that started it and the other launch got misses.

One run, three server starts (each ~30-60 s on 2 cores), both ways of stopping:
  A and B start together; A serves a prompt; the launch that started the daemon (its session
  is that launch's) is stopped with SIGTERM; the other gets the prompt's 8 blocks from kvbm.
  C starts; the remaining launch is SIGKILLed (process group); C gets 8 blocks of kvbm hits for
  a prompt only the killed launch served. After C stops: no daemon, nothing in /dev/shm.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
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
from vllm_serve_helpers import (BLOCK, Server, engine_daemon, group_shm, kv_config, prompt,  # noqa: E402
                                stored_blocks, wait_stored, write_model)

KVBM = {"tiers": [{"name": "g2", "capacity": 64, "storage": {"name": "host", "pin": "never"}}]}


def _alive(pid: int) -> bool:
    from kvbm.connectors.engine_daemon import alive

    return alive(pid)


def _signal_group(s: Server, sig: int, grace_s: float = 120.0) -> set[str]:
    """Send sig to the launch's process group and wait for it; what it held in /dev/shm is
    unlinked after (a killed group cannot; vllm_serve_helpers.stop_group does the same)."""
    shm = group_shm(s.proc.pid)
    os.killpg(s.proc.pid, sig)
    try:
        s.proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    shm |= group_shm(s.proc.pid)
    s.stop()  # SIGINT, then SIGKILL to whatever is left
    for path in shm:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    return shm


def _hits(s: Server, tokens: list[int], cold: list[int]) -> None:
    """s never saw tokens: all 8 full blocks come from kvbm, and the output is the same."""
    before = s.external_hits()
    warm = s.complete(tokens)
    assert s.external_hits() - before == 8 * BLOCK, s.kvbm_lines()
    assert warm == cold and len(cold) == 8


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two launches at once need two cores to bind")
def test_launches_apart_keep_the_node_cache_when_one_stops(tmp_path):
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    model = write_model(tmp_path)
    cores = sorted(os.sched_getaffinity(0))[:2]
    kv = kv_config({"kvbm_config": KVBM, "kvbm_cache_name": "node-llama"})

    def launch(name: str, core: int) -> Server:
        return Server(tmp_path, model, kv=kv, cli=True, name=name,
                      env={"KVBM_RUNTIME_DIR": str(runtime), "VLLM_CPU_OMP_THREADS_BIND": str(core)})

    folder = runtime / f"kvbm-{os.getuid()}"
    servers = [launch("a", cores[0]), launch("b", cores[1])]
    shm: set[str] = set()
    d: dict = {}
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait()
        d = engine_daemon(folder)  # one daemon for both launches
        assert (folder / "name-node-llama.json").exists()
        # the launch that started it: the daemon stays in its session (engine_daemon._start)
        (starter,) = [s for s in servers if s.proc.pid == os.getsid(d["pid"])]
        other = servers[1 - servers.index(starter)]

        first = prompt(61, 8 * BLOCK + 60)
        stores = stored_blocks(d["address"], d["token"], d["layout"])
        cold_first = starter.complete(first)
        wait_stored(d["address"], d["token"], d["layout"], stores + 8)
        shm |= _signal_group(starter, signal.SIGTERM)  # the launch that started the daemon stops
        assert _alive(d["pid"])
        _hits(other, first, cold_first)

        second = prompt(62, 8 * BLOCK + 60)
        stores = stored_blocks(d["address"], d["token"], d["layout"])
        cold_second = other.complete(second)
        wait_stored(d["address"], d["token"], d["layout"], stores + 8)
        third = launch("c", cores[0])
        servers.append(third)
        third.start().wait()
        shm |= _signal_group(other, signal.SIGKILL)  # killed outright: no connector shutdown at all
        assert _alive(d["pid"]) and engine_daemon(folder)["pid"] == d["pid"]
        _hits(third, second, cold_second)
        shm |= group_shm(third.proc.pid)
    finally:
        for s in servers:
            if s.proc is not None:
                shm |= group_shm(s.proc.pid) if s.proc.poll() is None else set()
                s.stop()
    # the last launch is gone: so is the daemon, and nothing of it or of vLLM stays behind
    if d:
        assert wait_until(lambda: not _alive(d["pid"]), timeout=120)
    assert wait_until(lambda: not list(folder.glob("*.json")) and not list(folder.glob("*.sock")), timeout=120)
    assert not glob.glob(f"/dev/shm/kvbm-{os.getuid()}-name-node-llama*")
    assert not [p for p in shm if os.path.exists(p)]
