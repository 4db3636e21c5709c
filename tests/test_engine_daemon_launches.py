"""Launches apart on one node sharing an engine's own kvbm daemon (kvbm.connectors.engine_daemon).

Two launches (here: processes, each what one `vllm serve` would be) name one engine daemon. The
daemon lives while any of them holds it (a shared flock each), so stopping or killing the one
that started it leaves the other its cache; after the last one it stops and leaves nothing
(runtime files, /dev/shm). A daemon killed outright is replaced at the next request: misses
meanwhile, transfers in flight given up (never waited out), never wrong bytes. Launches of
another model share the daemon but no block; launches of another config get a daemon of their own.
The same with real vLLM servers: tests/test_vllm_serve_apart.py.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

pytest.importorskip("zmq")
pytest.importorskip("msgpack")

from pathlib import Path

from daemonproc import wait_until  # noqa: E402

from kvbm.blocks import KVLayout  # noqa: E402
from kvbm.connectors import engine_daemon  # noqa: E402

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, block_size=16, dtype="float16")


def _config(model: str = "tiny", capacity: int = 32) -> dict:
    return {"namespace": {"model": model, "salt": ""},
            "layout": {f: getattr(LAYOUT, f) for f in LAYOUT.__dataclass_fields__},
            "tiers": [{"name": "g2", "capacity": capacity, "storage": {"name": "host", "pin": "never"}}]}


# One launch: attach through engine_backend, then one JSON line per command read from stdin
# ("store", "load": 4 blocks of known bytes; "quit").
LAUNCH = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    from kvbm.connectors import core, engine_daemon
    instance, cfg = sys.argv[1], json.loads(sys.argv[2])
    backend = engine_daemon.engine_backend(instance, cfg)
    keys = [bytes([i]) * 16 for i in range(4)]
    rows = [np.full(backend.block_nbytes, i + 7, np.uint8) for i in range(4)]
    print(json.dumps({"address": backend.spec["address"], "daemon": backend.spec["pid"]}), flush=True)
    for line in sys.stdin:
        act = line.strip()
        if act == "quit":
            break
        out = {"daemon": backend.spec["pid"]}
        if act == "store":
            t = backend.start_store(keys, rows)
            backend.poll([t], wait=True)
            out["stored"] = t.result()
        else:
            out["hit"] = backend.lookup(keys)[0]
            dst = [np.zeros(backend.block_nbytes, np.uint8) for _ in range(4)]
            t = backend.start_load(keys, dst)
            backend.poll([t], wait=True)
            out["loaded"] = backend.loaded(t)
            out["equal"] = all(bool((d == r).all()) for d, r in zip(dst, rows))
        print(json.dumps(out), flush=True)
    core.release_managers()
""")


class Launch:
    def __init__(self, instance: str, config: dict, log: Path) -> None:
        # its log in a file: the daemon it may start writes there too (a pipe would stay open with it)
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-c", LAUNCH, instance, json.dumps(config)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("w"),
                                     text=True)
        self.hello = self._line()

    def _line(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, f"launch exited with {self.proc.wait()}: {self.log.read_text()[-3000:]}"
        return json.loads(line)

    def ask(self, act: str) -> dict:
        self.proc.stdin.write(act + "\n")
        self.proc.stdin.flush()
        return self._line()

    def quit(self) -> str:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
            except OSError:
                pass
        self.proc.wait(timeout=120)
        return self.log.read_text()


def _leftovers(root: str, instance: str) -> tuple[list[str], list[str]]:
    files = [f for f in os.listdir(root) if not f.endswith(".lock")]
    return files, glob.glob(f"/dev/shm/kvbm-{os.getuid()}-{instance}*")


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_the_daemon_outlives_the_launch_that_started_it(tmp_path, monkeypatch, how):
    monkeypatch.setenv("KVBM_RUNTIME_DIR", str(tmp_path))
    instance = f"apart-{uuid.uuid4().hex[:8]}"
    a = Launch(instance, _config(), tmp_path / "launch1.log")
    b = None
    try:
        assert a.ask("store")["stored"] == 4
        b = Launch(instance, _config(), tmp_path / "launch2.log")  # started apart, later: joins a's daemon
        assert b.hello == a.hello
        a.proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        a.proc.wait(timeout=60)
        got = b.ask("load")  # a is gone: b still has the cache, and a's blocks in it
        assert got == {"daemon": a.hello["daemon"], "hit": 4, "loaded": 4, "equal": True}
        assert engine_daemon.alive(a.hello["daemon"])
    finally:
        a.quit()
        if b is not None:
            b.quit()
    # the last launch is gone: the daemon stops and leaves nothing behind
    root = engine_daemon.runtime_dir()
    assert wait_until(lambda: not engine_daemon.alive(a.hello["daemon"]), timeout=60)
    assert wait_until(lambda: _leftovers(root, instance) == ([], []), timeout=60), _leftovers(root, instance)


def test_a_grace_period_keeps_the_cache_for_a_launch_that_comes_back(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBM_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setenv("KVBM_ENGINE_DAEMON_GRACE_S", "600")
    instance = f"grace-{uuid.uuid4().hex[:8]}"
    a = Launch(instance, _config(), tmp_path / "launch3.log")
    assert a.ask("store")["stored"] == 4
    a.quit()
    b = Launch(instance, _config(), tmp_path / "launch4.log")  # no launch held it meanwhile: the grace period kept it
    try:
        assert b.hello == a.hello
        assert b.ask("load")["hit"] == 4
    finally:
        b.quit()
    info = json.loads(open(os.path.join(engine_daemon.runtime_dir(), f"{instance}.json")).read())
    os.kill(info["pid"], signal.SIGTERM)  # (600 s is long for a test: stop it as an operator would)
    assert wait_until(lambda: not engine_daemon.alive(info["pid"]), timeout=60)
    assert wait_until(lambda: _leftovers(engine_daemon.runtime_dir(), instance) == ([], []), timeout=60)


def test_a_killed_daemon_is_replaced_at_the_next_request(tmp_path, monkeypatch):
    import numpy as np

    monkeypatch.setenv("KVBM_RUNTIME_DIR", str(tmp_path))
    instance = f"renew-{uuid.uuid4().hex[:8]}"
    backend = engine_daemon.engine_backend(instance, _config())
    first = backend.spec["pid"]
    keys = [bytes([i]) * 16 for i in range(4)]
    rows = [np.full(backend.block_nbytes, i + 3, np.uint8) for i in range(4)]
    try:
        t = backend.start_store(keys, rows)
        backend.poll([t], wait=True)
        assert t.result() == 4
        # a load in flight when the daemon dies: frozen first, so that the load waits on it
        os.kill(first, signal.SIGSTOP)
        dst = [np.zeros(backend.block_nbytes, np.uint8) for _ in range(4)]
        t = backend.start_load(keys, dst)
        stores = [backend.start_store(keys, rows) for _ in range(3)]  # one in flight, two queued behind it
        os.kill(first, signal.SIGKILL)
        assert wait_until(lambda: not engine_daemon.alive(first), timeout=60)
        t0 = time.monotonic()
        backend.poll([t, *stores], wait=True)  # given up with their daemon, not waited out (client timeout 10 s)
        assert backend.done(t) and backend.loaded(t) == 0
        assert all(backend.done(s) for s in stores)
        assert backend.lookup(keys) == (0, [])  # a miss at once while a new daemon starts
        assert time.monotonic() - t0 < 8.0
        assert not any(bool(d.any()) for d in dst)  # nothing of the dead daemon's reached the rows

        def renewed() -> bool:
            backend.lookup(keys)
            return backend.renewals == 1

        assert wait_until(renewed, timeout=120)
        assert backend.spec["pid"] != first and engine_daemon.alive(backend.spec["pid"])
        assert backend.lookup(keys)[0] == 0  # the new daemon's cache starts empty
        t = backend.start_store(keys, rows)
        backend.poll([t], wait=True)
        assert t.result() == 4
        t = backend.start_load(keys, dst)
        backend.poll([t], wait=True)
        assert backend.loaded(t) == 4 and all(bool((d == r).all()) for d, r in zip(dst, rows))
    finally:
        second = backend.spec["pid"]
        backend.close()
        engine_daemon.release(instance)
    assert wait_until(lambda: not engine_daemon.alive(second), timeout=60)
    assert wait_until(lambda: _leftovers(engine_daemon.runtime_dir(), instance) == ([], []), timeout=60), \
        _leftovers(engine_daemon.runtime_dir(), instance)


def test_other_models_share_no_block_and_other_configs_get_their_own_daemon(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBM_RUNTIME_DIR", str(tmp_path))
    instance = f"mixed-{uuid.uuid4().hex[:8]}"
    a = Launch(instance, _config("model-a"), tmp_path / "launch5.log")
    launches = [a]
    try:
        assert a.ask("store")["stored"] == 4
        b = Launch(instance, _config("model-b"), tmp_path / "launch6.log")  # same tiers, another model: one daemon, two namespaces
        launches.append(b)
        assert b.hello == a.hello
        assert b.ask("load") == {"daemon": a.hello["daemon"], "hit": 0, "loaded": 0, "equal": False}
        c = Launch(instance, _config("model-a", capacity=48), tmp_path / "launch7.log")  # another G2 size: its own daemon
        launches.append(c)
        assert c.hello["daemon"] != a.hello["daemon"] and c.hello["address"] != a.hello["address"]
        assert c.ask("load")["hit"] == 0  # shares no block with a's daemon
        assert a.ask("load")["hit"] == 4  # and did not disturb it
    finally:
        errs = [launch.quit() for launch in launches]
    warning = [line for line in errs[2].splitlines() if "runs another kvbm config" in line]
    assert len(warning) == 1 and "shares no blocks" in warning[0], errs[2][-2000:]
    root = engine_daemon.runtime_dir()
    for launch in launches:
        assert wait_until(lambda: not engine_daemon.alive(launch.hello["daemon"]), timeout=60)
    assert wait_until(lambda: _leftovers(root, instance) == ([], []), timeout=60), _leftovers(root, instance)


def test_another_config_on_the_same_g3_folder_is_refused_in_one_line(tmp_path, monkeypatch):
    from kvbm.config import ConfigError

    monkeypatch.setenv("KVBM_RUNTIME_DIR", str(tmp_path))
    instance = f"g3-{uuid.uuid4().hex[:8]}"
    g3 = {"name": "g3", "capacity": 16, "storage": {"name": "disk", "path": str(tmp_path / "g3")}}
    first = _config()
    first["tiers"].append(g3)
    a = Launch(instance, first, tmp_path / "launch-g3.log")
    try:
        other = _config(capacity=48)  # another G2 size, the same G3 folder: two daemons would fight over it
        other["tiers"].append(g3)
        with pytest.raises(ConfigError, match="give every launch naming it the same kvbm_config") as err:
            engine_daemon.attach(instance, other)
        assert "\n" not in str(err.value) and str(tmp_path / "g3") in str(err.value)
        assert engine_daemon.alive(a.hello["daemon"])  # the running daemon is left alone
    finally:
        a.quit()
    assert wait_until(lambda: not engine_daemon.alive(a.hello["daemon"]), timeout=60)
    assert wait_until(lambda: _leftovers(engine_daemon.runtime_dir(), instance) == ([], []), timeout=60)


def test_a_runtime_folder_too_deep_for_a_unix_socket_puts_only_the_socket_in_a_short_one(tmp_path, monkeypatch):
    # KVBM_RUNTIME_DIR 120 bytes deep: the socket path would pass sun_path's 107 bytes; the
    # rendezvous files stay there and the socket goes to /tmp/kvbm-<uid>-sock (private, 0700)
    deep = tmp_path / ("d" * (130 - len(str(tmp_path))))
    deep.mkdir()
    monkeypatch.setenv("KVBM_RUNTIME_DIR", str(deep))
    instance = f"deep-{uuid.uuid4().hex[:8]}"
    a = Launch(instance, _config(), tmp_path / "launch-deep.log")
    try:
        sock = a.hello["address"].removeprefix("ipc://")
        assert sock.startswith(f"/tmp/kvbm-{os.getuid()}-sock/") and len(sock.encode()) <= engine_daemon.SUN_PATH_MAX
        assert os.stat(os.path.dirname(sock)).st_mode & 0o777 == 0o700
        assert a.ask("store")["stored"] == 4
        assert a.ask("load") == {"daemon": a.hello["daemon"], "hit": 4, "loaded": 4, "equal": True}
    finally:
        a.quit()
    root = engine_daemon.runtime_dir()
    assert root.startswith(str(deep))
    assert wait_until(lambda: not engine_daemon.alive(a.hello["daemon"]), timeout=60)
    assert wait_until(lambda: _leftovers(root, instance) == ([], []) and not os.path.exists(sock), timeout=60), \
        (_leftovers(root, instance), os.path.exists(sock))
