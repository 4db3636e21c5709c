"""An engine's own kvbm daemon (kvbm.connectors.engine_daemon), without vLLM.

The scheduler half and the workers of one engine live in different processes under vLLM's
multiprocessing executor; each asks engine_daemon.attach(engine_id, config) for the cache.
Here three processes play those parts: the first starts the daemon, the others join it, a
block stored by one is looked up and loaded, byte for byte, by another, and when the starter
exits the daemon stops and leaves nothing behind (socket, rendezvous files, G2 in /dev/shm).
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import textwrap
import uuid

import pytest

pytest.importorskip("zmq")
pytest.importorskip("msgpack")

from kvbm.blocks import KVLayout
from kvbm.config import ConfigError
from kvbm.connectors import engine_daemon
from daemonproc import wait_until

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, block_size=16, dtype="float16")
CONFIG = {"namespace": {"model": "tiny", "salt": ""},
          "layout": {f: getattr(LAYOUT, f) for f in LAYOUT.__dataclass_fields__},
          "tiers": [{"name": "g2", "capacity": 32, "storage": {"name": "host", "pin": "never"}}]}

# One process of the engine: attach, then act ("store" or "load"), print a JSON line, and wait
# for a line on stdin before exiting (so the test decides when the starter goes).
PART = textwrap.dedent("""
    import json, sys
    import numpy as np
    from kvbm.connectors import core, engine_daemon
    instance, act, cfg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    if act == "bound-store":  # as vLLM's CPU worker: its main thread bound to one core first
        import os
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    spec = engine_daemon.attach(instance, cfg)
    backend = core.shared_backend(spec)
    keys = [bytes([i]) * 16 for i in range(4)]
    rows = [np.full(backend.block_nbytes, i + 7, np.uint8) for i in range(4)]
    out = {"address": spec["address"], "pid": __import__("os").getpid()}
    if act.endswith("store"):
        t = backend.start_store(keys, rows)
        backend.poll([t], wait=True)
        out["stored"] = t.result()
        t = backend.start_load(keys, [np.zeros(backend.block_nbytes, np.uint8) for _ in range(4)])
        backend.poll([t], wait=True)
        out["loaded"] = backend.loaded(t)
        import os
        import threading
        tasks = {int(t): open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")}
        tasks = {tid: n for tid, n in tasks.items() if n.startswith("ZMQbg") or tid == os.getpid()}
        tasks.update({t.native_id: t.name for t in threading.enumerate() if t.name.startswith("kvbm-")})
        out["cpus"] = {f"{name}/{tid}": sorted(os.sched_getaffinity(tid)) for tid, name in tasks.items()}
    else:
        out["hit"] = backend.lookup(keys)[0]
        dst = [np.zeros(backend.block_nbytes, np.uint8) for _ in range(4)]
        t = backend.start_load(keys, dst)
        backend.poll([t], wait=True)
        out["loaded"] = backend.loaded(t)
        out["equal"] = all(bool((d == r).all()) for d, r in zip(dst, rows))
    print(json.dumps(out), flush=True)
    sys.stdin.readline()
    core.release_managers()
""")


def _part(instance: str, act: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PART, instance, act, json.dumps(CONFIG)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


def _line(proc: subprocess.Popen) -> dict:
    line = proc.stdout.readline()
    assert line, f"part exited with {proc.wait()}"
    return json.loads(line)


def test_processes_of_one_engine_share_its_daemon(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBM_RUNTIME_DIR", str(tmp_path))
    env = {**os.environ}
    instance = f"engine-{uuid.uuid4().hex[:8]}"
    starter = _part(instance, "store", env)
    joiners = []
    try:
        first = _line(starter)
        assert first["stored"] == 4
        joiners = [_part(instance, "load", env) for _ in range(2)]  # the scheduler, a second rank
        for j in joiners:
            got = _line(j)
            assert got["address"] == first["address"]  # one daemon for the engine
            assert (got["hit"], got["loaded"], got["equal"]) == (4, 4, True)
        root = engine_daemon.runtime_dir()
        assert root.startswith(str(tmp_path)) and os.stat(root).st_mode & 0o777 == 0o700
        info = json.loads(open(os.path.join(root, f"{instance}.json")).read())
        # In the engine's session (one autogroup with the engine: a session of its own was starved
        # beside spinning TP workers, engine_daemon._start), in a process group of its own (an
        # engine's kill of its group leaves it to stop cleanly)
        assert os.getsid(info["pid"]) == os.getsid(starter.pid)
        assert os.getpgid(info["pid"]) == info["pid"] != os.getpgid(starter.pid)
        shm = f"/dev/shm/kvbm-{os.getuid()}-{instance}"  # the prefix of the daemon's shared-memory files
    finally:
        for p in [starter, *joiners]:
            p.stdin.write("\n")
            p.stdin.flush()
            p.wait(timeout=60)
    # The starter is gone: its daemon stops by itself and cleans up.
    assert wait_until(lambda: not _alive(info["pid"]))
    assert wait_until(lambda: not glob.glob(shm + "*"))
    left = [f for f in os.listdir(root) if not f.endswith(".lock")]
    assert left == []  # socket, rendezvous, config and ready files all gone


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to bind one")
def test_daemon_and_lanes_leave_the_engine_workers_bound_core(tmp_path, monkeypatch):
    # vLLM's CPU worker binds its main thread to its core(s) and spins on sched_yield while a
    # load goes; kvbm's daemon (started by the worker) and its lanes inherited that binding and
    # starved there (every load timed out beside a busy node). They run on every core now.
    monkeypatch.setenv("KVBM_RUNTIME_DIR", str(tmp_path))
    every = sorted(os.sched_getaffinity(0))
    part = _part(f"engine-{uuid.uuid4().hex[:8]}", "bound-store", {**os.environ})
    try:
        got = _line(part)
        assert got["stored"] == got["loaded"] == 4
        cpus = got["cpus"]
        assert cpus[f"python/{got['pid']}"] == every[:1]  # the engine's own binding is untouched
        lanes = {k: v for k, v in cpus.items() if not k.startswith("python/")}
        for name in ("kvbm-daemon-load", "kvbm-daemon-store", "kvbm-heartbeat"):
            assert any(k.startswith(name) for k in lanes), lanes
        assert sum(k.startswith("ZMQbg") for k in lanes) >= 2  # each lane's client has its own zmq I/O
        assert all(v == every for v in lanes.values()), lanes
        info = json.loads(open(os.path.join(engine_daemon.runtime_dir(), _info_name(engine_daemon.runtime_dir()))).read())
        assert sorted(os.sched_getaffinity(info["pid"])) == every
        for tid in os.listdir(f"/proc/{info['pid']}/task"):  # every thread of the daemon
            assert sorted(os.sched_getaffinity(int(tid))) == every
    finally:
        part.stdin.write("\n")
        part.stdin.flush()
        part.wait(timeout=60)


def _info_name(root: str) -> str:
    (name,) = [f for f in os.listdir(root) if f.endswith(".json") and not f.endswith(".config.json")]
    return name


def test_a_second_engine_gets_its_own_daemon(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBM_RUNTIME_DIR", str(tmp_path))
    env = {**os.environ}
    a, b = _part("engine-a", "store", env), _part("engine-b", "load", env)
    try:
        got_a, got_b = _line(a), _line(b)
        assert got_a["address"] != got_b["address"]
        assert got_b["hit"] == 0 and got_b["loaded"] == 0  # engine b never sees engine a's blocks
    finally:
        for p in (a, b):
            p.stdin.write("\n")
            p.stdin.flush()
            p.wait(timeout=60)


def test_a_bad_config_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBM_RUNTIME_DIR", str(tmp_path))
    bad = {**CONFIG, "tiers": [{"name": "g3", "capacity": 8, "storage": {"name": "disk", "path": str(tmp_path / "d")}}]}
    with pytest.raises(ConfigError, match="first tier must be g2") as err:
        engine_daemon.attach("engine-bad", bad)
    assert "\n" not in str(err.value)


def test_runtime_dir_of_another_mode_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBM_RUNTIME_DIR", str(tmp_path))
    (tmp_path / f"kvbm-{os.getuid()}").mkdir(mode=0o755)
    os.chmod(tmp_path / f"kvbm-{os.getuid()}", 0o755)
    with pytest.raises(ConfigError, match="mode 0700"):
        engine_daemon.runtime_dir()


def test_runtime_dir_behind_a_symbolic_link_is_refused(tmp_path, monkeypatch):
    """/tmp/kvbm-<uid> as a symbolic link (whoever made it can re-point it after the check, and
    the engine daemon's socket and rendezvous files would then be theirs) is refused, even when
    it points at a private folder of ours; so is a parent folder others may write (not sticky)."""
    monkeypatch.setenv("KVBM_RUNTIME_DIR", str(tmp_path))
    mine = tmp_path / "private"
    mine.mkdir(mode=0o700)
    (tmp_path / f"kvbm-{os.getuid()}").symlink_to(mine)
    with pytest.raises(ConfigError, match="symbolic link"):
        engine_daemon.runtime_dir()
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)  # world-writable, no sticky bit: anyone could rename our folder in it
    monkeypatch.setenv("KVBM_RUNTIME_DIR", str(open_dir))
    with pytest.raises(ConfigError, match="others may write"):
        engine_daemon.runtime_dir()
    assert not (open_dir / f"kvbm-{os.getuid()}").exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie of ours would still answer
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_a_cache_that_stops_answering_is_a_miss_never_an_error(monkeypatch):
    # vLLM calls the scheduler half on its scheduler thread: an exception there kills the
    # engine. A lookup that fails (daemon killed, timeout) is a miss; the next try waits out a
    # back-off that doubles per failure, so a dead daemon costs one timeout per try, not per request.
    from kvbm.blocks import Namespace
    from kvbm.connectors import core

    class Flaky(core.DaemonBackend):
        def __init__(self):
            self.calls, self.up = 0, False

        def lookup(self, keys):
            self.calls += 1
            if not self.up:
                raise TimeoutError("kvbm daemon at ipc://x did not answer lookup in 10s")
            return len(keys), ["g2"] * len(keys)

        def pin(self, keys):  # (pins through a real daemon: test_daemon_pins.py)
            return len(keys)

        def lookup_pin(self, keys, start):  # the one-trip op: fails as lookup does while down
            n = self.lookup(keys)[0]
            return n, (self.pin(keys[start:n]) if n > start else 0)

        def unpin(self, keys):
            return None

    clock = [100.0]
    monkeypatch.setattr(core.time, "monotonic", lambda: clock[0])
    backend = Flaky()
    sched = core.SchedulerSide(backend, None, Namespace("tiny", LAYOUT), LAYOUT.block_size)
    keys = sched.keys("r", [b"h1", b"h2", b"h3"])
    assert sched.match("r", keys, 3 * 16 + 1, 0, must_compute_one=False) == 0  # fails: a miss
    assert backend.calls == 1
    clock[0] += 1.0  # within the 2 s back-off: no call, a miss
    assert sched.match("r", keys, 3 * 16 + 1, 0, must_compute_one=False) == 0 and backend.calls == 1
    clock[0] += 1.5  # tried again, fails again: the back-off doubles to 4 s
    assert sched.match("r", keys, 3 * 16 + 1, 0, must_compute_one=False) == 0 and backend.calls == 2
    clock[0] += 3.0
    assert sched.match("r", keys, 3 * 16 + 1, 0, must_compute_one=False) == 0 and backend.calls == 2
    backend.up = True  # the daemon is back
    clock[0] += 1.5
    assert sched.match("r", keys, 3 * 16 + 1, 0, must_compute_one=False) == 3 * 16 and backend.calls == 3
    keys = sched.keys("r2", [b"h1", b"h2", b"h3"])  # (a repeat ask of "r" keeps its pins: test_connector_rematch.py)
    assert sched.match("r2", keys, 3 * 16 + 1, 0, must_compute_one=False) == 3 * 16 and backend.calls == 4


def test_a_runtime_dir_too_long_for_a_socket_whose_short_folder_is_unsafe_is_one_line_error(tmp_path, monkeypatch):
    # too deep for sun_path: the socket would go to the short private folder (a deep runtime
    # folder works: test_engine_daemon_launches.py); that folder a symbolic link another user
    # could re-point: refused in one line, nothing started
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    monkeypatch.setenv("KVBM_RUNTIME_DIR", str(deep))
    short = tmp_path / "s"
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    short.symlink_to(tmp_path / "elsewhere")
    monkeypatch.setattr(engine_daemon, "SHORT_SOCKET_DIR", str(short))
    with pytest.raises(ConfigError, match="symbolic link|KVBM_RUNTIME_DIR") as err:
        engine_daemon.attach("engine-long", CONFIG)
    assert "\n" not in str(err.value) and str(short) in str(err.value)
    assert not list((tmp_path / "elsewhere").iterdir())


def test_a_timed_out_request_has_the_daemon_log_its_stacks(tmp_path, monkeypatch, capfd):
    """report_stall (called when a load times out) makes the engine's own daemon write every
    thread's stack to its stderr, i.e. the engine's log: a stall is diagnosed where it happened."""
    monkeypatch.setenv("KVBM_RUNTIME_DIR", str(tmp_path))
    instance = f"engine-{uuid.uuid4().hex[:8]}"
    spec = engine_daemon.attach(instance, CONFIG)
    err = ""
    try:
        engine_daemon.report_stall(spec["address"])
        engine_daemon.report_stall(spec["address"])  # at most once a minute: one dump

        def dumped() -> bool:
            nonlocal err
            err += capfd.readouterr().err
            return "kvbm/daemon/server.py" in err and "in run" in err

        assert wait_until(dumped), err[-2000:]
        assert err.count("Current thread") + err.count("Thread 0x") >= 1
    finally:
        engine_daemon.release(instance)  # no process holds it: the daemon stops
