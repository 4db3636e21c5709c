"""An engine's own kvbm daemon, started by its connector when scheduler and workers are apart.

    attach(instance, config)     the daemon of engine `instance`: started by the first process
                                 of the engine to ask, joined by the others; a daemon spec
                                 (address, token, model, salt, layout) for shared_backend
    python -m kvbm.connectors.engine_daemon CONFIG READY
                                 the daemon process: `kvbm serve` on CONFIG, its ready line
                                 written to READY, gone when the process that started it is

vLLM's multiprocessing executor runs the model workers in other processes than the engine core
(where the scheduler half lives); a private BlockManager per process would let the scheduler
look up a cache the workers never fill. With an in-process kvbm config the connector instead
gives the engine one daemon of its own, over a Unix socket in a 0700 directory of this user,
with a random token, holding the config's tiers. Every process of the engine reaches it by the
engine's id (vLLM's kv_transfer_config.engine_id, the same in all of them). The daemon's stdin
is a pipe from the process that started it: when that process ends, the pipe closes and the
daemon shuts down cleanly (G2 shared memory removed, G3 index flushed).
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import re
import secrets
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Mapping

from ..config import ConfigError
from ..daemon.transport import unsafe_path
from .cpus import unbind_cpus

SUN_PATH_MAX = 107  # bytes of a Unix socket path (Linux sun_path, less the terminating NUL)
READY_TIMEOUT_S = 120.0  # a loaded machine: the daemon imports numpy, zmq and the tiers first
_STARTED: dict[str, subprocess.Popen] = {}  # instance -> daemon this process started (keeps its stdin open)
_PIDS: dict[str, int] = {}  # address -> pid of the engine daemons this process attached to
_DUMPED: dict[int, float] = {}  # pid -> when report_stall last asked it for its stacks


def runtime_dir() -> str:
    """This user's private directory for engine daemons' sockets and rendezvous files."""
    base = os.environ.get("KVBM_RUNTIME_DIR") or os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    path = os.path.join(base, f"kvbm-{os.getuid()}")
    # another local user may have made /tmp/kvbm-<our uid> first, or a symbolic link there they can
    # re-point after our check: refuse both (the daemon's socket and rendezvous files live here)
    why = unsafe_path(path)
    if why:
        raise ConfigError(f"kvbm: {path}: {why}; remove it or set KVBM_RUNTIME_DIR")
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError(f"kvbm: {path} is a symbolic link; it must be a directory owned by this user "
                          f"with mode 0700 (it holds engine daemons' sockets); remove it or set KVBM_RUNTIME_DIR")
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ConfigError(f"kvbm: {path} must be a directory owned by this user with mode 0700 "
                          f"(it holds engine daemons' sockets); remove it or set KVBM_RUNTIME_DIR")
    return path


def _name(instance: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", instance)[:48]
    if not name:
        raise ConfigError("kvbm: an engine daemon needs a non-empty engine id")
    return name


def attach(instance: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """The daemon spec of engine `instance`'s own daemon (started now if no process of the
    engine has started it yet), holding `config`'s tiers, layout and namespace."""
    name = _name(instance)
    root = runtime_dir()
    info_path = os.path.join(root, f"{name}.json")
    with open(os.path.join(root, f"{name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one starter per engine; the others wait for it
        info = _read_info(info_path)
        if info is None:
            _sweep(root)
            info = _start(name, root, config)
            _write_private(info_path, json.dumps(info))
    _PIDS[info["address"]] = int(info["pid"])
    ns = config["namespace"]
    return {"address": info["address"], "token": info["token"], "salt": str(ns.get("salt") or ""),
            "model": ns["model"], "layout": dict(config["layout"])}


def report_stall(address: str) -> None:
    """A request to the engine daemon at `address` timed out: have it write every thread's stack
    to its stderr (the engine's log), at most once a minute, so the cause is on record."""
    pid = _PIDS.get(address)
    if pid is None or time.monotonic() - _DUMPED.get(pid, -120.0) < 60.0:
        return
    _DUMPED[pid] = time.monotonic()
    try:
        os.kill(pid, signal.SIGUSR1)
    except OSError:
        pass


def _read_info(path: str) -> dict | None:
    """A running daemon's rendezvous file, or None (absent, or its daemon is gone)."""
    try:
        with open(path) as f:
            info = json.load(f)
        os.kill(int(info["pid"]), 0)
        return info
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_private(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _start(name: str, root: str, config: Mapping[str, Any]) -> dict[str, Any]:
    token = secrets.token_hex(16)
    sock = os.path.join(root, hashlib.blake2b(name.encode(), digest_size=8).hexdigest() + ".sock")
    if len(sock.encode()) > SUN_PATH_MAX:
        raise ConfigError(f"kvbm: the engine daemon's socket path {sock} is longer than a Unix socket "
                          f"allows ({SUN_PATH_MAX} bytes); set KVBM_RUNTIME_DIR to a shorter folder")
    daemon = {"address": f"ipc://{sock}", "events": "", "metrics": "", "token": token,
              "shm_name": f"kvbm-{os.getuid()}-{name}", "nixl": False,
              "lease_s": 30.0}  # its clients are the engine's own processes: a starved heartbeat must not cost a load
    cfg_path = os.path.join(root, f"{name}.config.json")
    ready_path = os.path.join(root, f"{name}.ready")
    _write_private(cfg_path, json.dumps({**dict(config), "daemon": daemon}))
    if os.path.exists(ready_path):
        os.unlink(ready_path)
    # The daemon detaches (a second fork: no process's child) into its own process group (main()), so an
    # engine that kills its own process tree or group at shutdown leaves it to stop cleanly when
    # its stdin closes. It stays in the engine's session, not a new one: with the kernel's
    # autogroup scheduling (sched_autogroup_enabled, the default on desktop and many server
    # kernels) every session is one CPU group, and a session of one mostly-sleeping process was
    # starved for 8-28 s at a time beside the engine's spinning TP workers and a CPU hog (its
    # threads runnable, 0.15 s run against 8.5 s of run-queue wait, /proc/PID/task/*/schedstat):
    # every load of the tensor-parallel ranks timed out. In the engine's session it waited
    # 0.05-0.18 s in all (issue 14; tests/test_vllm_serve_tp.py).
    proc = subprocess.Popen([sys.executable, "-m", "kvbm.connectors.engine_daemon", cfg_path, ready_path],
                            stdin=subprocess.PIPE)  # main() makes its own group
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        ready = _ready_line(ready_path)
        if ready is not None:
            break
        if time.monotonic() > deadline or (proc.poll() not in (None, 0)):
            raise RuntimeError(f"kvbm: the engine's own daemon did not start (exit code {proc.poll()}); "
                               f"config {cfg_path}")
        time.sleep(0.05)
    proc.wait()  # the first fork: gone once the daemon detached
    if "error" in ready:
        raise ConfigError(f"kvbm: the engine's own daemon refused the config: {ready['error']}")
    _STARTED[name] = proc  # keeps the pipe to the daemon's stdin open while this process lives
    return {"address": ready["address"], "token": token, "pid": ready["pid"]}


def _sweep(root: str) -> None:
    """Remove what engine daemons killed outright left behind (files here, theirs in /dev/shm)."""
    for entry in os.listdir(root):
        if not entry.endswith(".json") or entry.endswith(".config.json"):
            continue
        base = os.path.join(root, entry[:-len(".json")])
        if _read_info(base + ".json") is not None:
            continue
        name = os.path.basename(base)
        _remove(base, *glob.glob(f"/dev/shm/kvbm-{os.getuid()}-{glob.escape(name)}*"))


def _remove(base: str, *more: str) -> None:
    name = os.path.basename(base)
    sock = os.path.join(os.path.dirname(base), hashlib.blake2b(name.encode(), digest_size=8).hexdigest() + ".sock")
    for path in [base + s for s in (".ready", ".json", ".config.json")] + [sock, *more]:
        try:
            os.unlink(path)
        except OSError:
            pass


def _ready_line(path: str) -> dict | None:
    try:
        with open(path) as f:
            line = f.readline()
    except OSError:
        return None
    if not line.endswith("\n"):
        return None
    return json.loads(line)


def _watch_parent(stdin: Any) -> None:
    """Stop the daemon (as SIGTERM does) once the process that started it has gone."""
    try:
        while stdin.read(4096):
            pass
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str]) -> int:
    import logging

    import faulthandler

    cfg_path, ready_path = argv
    if os.fork() > 0:  # detach: the daemon is no child of the engine's processes
        os._exit(0)
    os.setpgid(0, 0)  # its own process group, in the engine's session (see _start)
    unbind_cpus()  # not on the core the engine worker that started it is bound to (cpus.py)
    base = ready_path[:-len(".ready")]
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s kvbm-engine-daemon %(levelname)s %(message)s")
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # report_stall: every stack to the engine's log
    try:
        fd = os.open(ready_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as ready:
            try:
                from ..daemon.config import load_daemon_config
                from ..daemon.server import serve

                cfg, dcfg = load_daemon_config(cfg_path, env={})
                threading.Thread(target=_watch_parent, args=(sys.stdin.buffer,), name="kvbm-parent",
                                 daemon=True).start()
                return serve(cfg, dcfg, ready=ready)
            except Exception as exc:  # noqa: BLE001 - the engine that started it reports it
                if ready.tell() == 0:
                    ready.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
                    ready.flush()
                    time.sleep(5)  # the engine reads it before the file goes
                raise
    finally:
        _remove(base)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
