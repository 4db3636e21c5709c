"""An engine's own kvbm daemon, started by its connector when scheduler and workers are apart.

    attach(instance, config)     the daemon of engine `instance`: started by the first process
                                 of the engine (or of any launch naming it) to ask, joined by the
                                 others; a daemon spec (address, token, pid, model, salt, layout)
    engine_backend(instance, config)   the process's backend to it (EngineBackend): reconnects to a
                                 new daemon when this one died (SIGKILL, OOM)
    release(instance)            this process stops holding the daemon (tests; exit does it too)
    python -m kvbm.connectors.engine_daemon CONFIG READY [GRACE_S]
                                 the daemon process: `kvbm serve` on CONFIG, its ready line
                                 written to READY, gone GRACE_S after the last process holding it

vLLM's multiprocessing executor runs the model workers in other processes than the engine core
(where the scheduler half lives); a private BlockManager per process would let the scheduler
look up a cache the workers never fill. With an in-process kvbm config the connector instead
gives the engine one daemon of its own, over a Unix socket in a 0700 directory of this user,
with a random token, holding the config's tiers. Every process of the engine reaches it by the
engine's id (vLLM's kv_transfer_config.engine_id, the same in all of them), and launches started
apart by what they share (vllm.py engine_cache: the DP master, torchrun's master, or a name the
operator gives, kvbm_cache_name).

Lifetime: every process that attaches holds a shared flock on NAME.held.lock in the runtime
folder for as long as it lives (the kernel drops it at exit, SIGKILL included). The daemon
probes that file (an exclusive non-blocking flock) every POLL_S; once nobody holds it for
GRACE_S (default 0, KVBM_ENGINE_DAEMON_GRACE_S), it removes its rendezvous file under NAME.lock,
the lock every attacher takes first (so no launch can join a daemon that is leaving), and shuts
down cleanly (G3 index flushed, window files gone). So the daemon outlives the launch that
started it while another launch still uses it, and never outlives them all.

One name, one config: the rendezvous file records the daemon's config fingerprint (tiers,
policies, block size in bytes; not the model or salt: namespaces keep models apart in one
daemon). A launch with another config does not join it, nor stop it: it gets a daemon of its own,
NAME~FINGERPRINT, with a one-line warning that the two share no blocks.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import logging
import os
import re
import secrets
import select
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
from .daemon_backend import DaemonBackend

log = logging.getLogger(__name__)

SUN_PATH_MAX = 107  # bytes of a Unix socket path (Linux sun_path, less the terminating NUL)
READY_TIMEOUT_S = 120.0  # a loaded machine: the daemon imports numpy, zmq and the tiers first
POLL_S = 0.2  # how often the daemon looks for holders
LEAVING_S = 30.0  # at most this long a leaving daemon keeps successors waiting (its shutdown)
SHORT_SOCKET_DIR = "/tmp/kvbm-{uid}-sock"  # a socket's folder when the runtime folder is too deep for one
_HELD: dict[str, Any] = {}  # name -> the open NAME.held.lock this process holds shared (its reference)
_STARTED: dict[str, int] = {}  # name -> pid of the daemon this process started
_PIDS: dict[str, int] = {}  # address -> pid of the engine daemons this process attached to
_DUMPED: dict[int, float] = {}  # pid -> when report_stall last asked it for its stacks


def runtime_dir() -> str:
    """This user's private directory for engine daemons' sockets and rendezvous files."""
    base = os.environ.get("KVBM_RUNTIME_DIR") or os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return _private_dir(os.path.join(base, f"kvbm-{os.getuid()}"))


def _private_dir(path: str) -> str:
    """path, made if missing: a directory of this user's with mode 0700 (else ConfigError)."""
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
    """The daemon spec of engine `instance`'s own daemon (started now if no live process holds
    one of that name and config), holding `config`'s tiers, layout and namespace. This process
    holds it (a shared flock) until it exits or release()s it."""
    name = _name(instance)
    root = runtime_dir()
    fp = fingerprint(config)
    info = _attach(root, name, config, fp)
    if info is None:  # a live daemon of this name runs another config: one of our own beside it
        shared = _disk_paths(_config_file(os.path.join(root, f"{name}.config.json"))) & _disk_paths(config)
        if shared:  # two daemons on one G3 folder would overwrite each other's index
            raise ConfigError(f"kvbm: the engine daemon {name!r} runs another kvbm config with G3 at "
                              f"{sorted(shared)[0]}; give every launch naming it the same kvbm_config (or "
                              f"another G3 path, or another kvbm_cache_name)")
        alt = f"{name[:39]}~{fp[:8]}"
        log.warning("kvbm: the engine daemon %r runs another kvbm config (tiers or block size) for another "
                    "launch; this launch uses its own daemon %r and shares no blocks with it (give every "
                    "launch the same kvbm_config to share one cache)", name, alt)
        info = _attach(root, alt, config, fp)
        if info is None:  # pragma: no cover - the fingerprint names it
            raise ConfigError(f"kvbm: the engine daemon {alt!r} runs another config")
    _PIDS[info["address"]] = int(info["pid"])
    ns = config["namespace"]
    return {"address": info["address"], "token": info["token"], "pid": int(info["pid"]),
            "salt": str(ns.get("salt") or ""), "model": ns["model"], "layout": dict(config["layout"])}


def _attach(root: str, name: str, config: Mapping[str, Any], fp: str) -> dict | None:
    """Under NAME.lock: hold NAME's daemon and return its info (started now if none is alive), or
    None (held nothing) when the live one runs another config."""
    info_path = os.path.join(root, f"{name}.json")
    with open(os.path.join(root, f"{name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one starter per name; the others wait for it; a leaving daemon too
        info = _read_info(info_path)
        if info is not None and info.get("config", fp) != fp:
            return None
        _hold(root, name)  # before a daemon starts: it never sees a moment without holders
        if info is None:
            _sweep(root)
            info = _start(name, root, config, fp)
            _write_private(info_path, json.dumps(info))
    return info


def _hold(root: str, name: str) -> None:
    """This process holds NAME's daemon (once): a shared flock on NAME.held.lock, dropped by the
    kernel when the process ends however it ends. Not inherited across exec (O_CLOEXEC); a
    process forked from a holder shares the hold until both are gone."""
    if name in _HELD:
        return
    f = open(os.path.join(root, f"{name}.held.lock"), "a")
    fcntl.flock(f, fcntl.LOCK_SH)
    _HELD[name] = f


def release(instance: str) -> None:
    """Stop holding `instance`'s daemon (every name this process holds for it): it stops once no
    other process holds it (tests; a process's exit does the same)."""
    name = _name(instance)
    for held in [k for k in _HELD if k == name or k.startswith(name[:39] + "~")]:
        f = _HELD.pop(held)
        f.close()


def _config_file(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _disk_paths(config: Mapping[str, Any]) -> set[str]:
    """The G3 (disk) folders of a config's tiers."""
    out = set()
    for tier in config.get("tiers") or ():
        storage = tier.get("storage") if isinstance(tier, dict) else None
        if isinstance(storage, dict) and storage.get("name") == "disk" and storage.get("path"):
            out.add(os.path.realpath(str(storage["path"])))
    return out


def fingerprint(config: Mapping[str, Any]) -> str:
    """What a daemon's clients must agree on: its config less namespace and layout (model and
    layout are per session: namespaces), with the block size in bytes (the daemon's slot size)."""
    from ..blocks import KVLayout

    rest = {k: v for k, v in config.items() if k not in ("namespace", "layout", "daemon")}
    rest["block_nbytes"] = KVLayout(**config["layout"]).block_nbytes
    return hashlib.blake2b(json.dumps(rest, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()


_BACKENDS: dict[str, "EngineBackend"] = {}
_BACKENDS_LOCK = threading.Lock()


def engine_backend(instance: str, config: Mapping[str, Any]) -> "EngineBackend":
    """The process's backend to engine `instance`'s daemon (one per instance and config: both
    halves of an engine in one process share it)."""
    key = json.dumps([instance, config], sort_keys=True, default=str)
    with _BACKENDS_LOCK:
        backend = _BACKENDS.get(key)
        if backend is None or backend.closed:
            backend = _BACKENDS[key] = EngineBackend(instance, config)
        return backend


class _Daemon:
    """One daemon a process reached: its backend and whether its process still runs (a pidfd
    polled without waiting, ~1 us; kill(pid, 0) where pidfds are missing)."""

    def __init__(self, backend: DaemonBackend, spec: dict) -> None:
        self.backend, self.spec, self.pid = backend, spec, int(spec["pid"])
        self._dead = False
        self._fd = -1
        try:
            self._fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            self._dead = True
        except (OSError, AttributeError):
            pass

    def alive(self) -> bool:
        if self._dead:
            return False
        if self._fd >= 0:
            p = select.poll()
            p.register(self._fd, select.POLLIN)
            self._dead = bool(p.poll(0))  # a pidfd reads ready once its process has ended
        else:
            self._dead = not alive(self.pid)
        return not self._dead

    def close(self) -> None:
        try:
            self.backend.close(abandon=not self.alive())
        finally:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _done(value: int) -> Any:
    from concurrent.futures import Future

    f: Future = Future()
    f.set_result(value)
    return f


class EngineBackend(DaemonBackend):
    """A DaemonBackend to an engine's own daemon that outlives that daemon.

    While the daemon runs, every call goes to it as DaemonBackend's do. Once its process is gone
    (SIGKILL, OOM; a pidfd says so without a round trip), calls answer at once as a cache that
    is empty (lookups miss, stores and loads count 0: vLLM recomputes, never reads wrong bytes),
    transfers in flight to the dead daemon count as done with nothing loaded (the engine's step
    never waits out their timeout), and a thread attaches again: a new daemon started by the
    first process of any launch to ask, found by the others. Its failures retry after a back-off
    (2 s doubling, at most 60 s)."""

    pins = True
    scheduler_releases = True
    takes_hashes = True

    def __init__(self, instance: str, config: Mapping[str, Any]) -> None:  # noqa: D107 - no DaemonBackend.__init__
        self.instance, self.config = instance, dict(config)
        self._lock = threading.Lock()
        self._renewing = False
        self._retry_at, self._backoff = 0.0, 0.0
        self.renewals = 0  # new daemons reached after one died
        self.closed = False
        self._daemon = self._open()  # the first attach raises as before (one-line config errors)
        self.block_nbytes = self._daemon.backend.block_nbytes

    def _open(self) -> _Daemon:
        from ..blocks import KVLayout

        spec = attach(self.instance, self.config)
        backend = DaemonBackend.connect(spec["address"], KVLayout(**spec["layout"]), spec["model"],
                                        spec.get("salt", ""), spec.get("token"))
        return _Daemon(backend, spec)

    @property
    def spec(self) -> dict:
        return self._daemon.spec

    @property
    def client(self) -> Any:  # report_stall and tests
        return self._daemon.backend.client

    @property
    def rehellos(self) -> int:
        return self._daemon.backend.rehellos

    @property
    def quota_claims(self) -> int:  # type: ignore[override]
        return self._daemon.backend.quota_claims

    def _live(self) -> _Daemon | None:
        d = self._daemon
        if d.alive():
            return d
        self._renew()
        return None

    def _renew(self) -> None:
        with self._lock:
            if self._renewing or self.closed or time.monotonic() < self._retry_at:
                return
            self._renewing = True
        threading.Thread(target=self._renew_now, name="kvbm-engine-daemon-renew", daemon=True).start()

    def _renew_now(self) -> None:
        old = self._daemon
        try:
            unbind_cpus()
            new = self._open()
        except Exception as exc:  # noqa: BLE001 - misses meanwhile; try again after the back-off
            with self._lock:
                self._backoff = min(60.0, self._backoff * 2) if self._backoff else 2.0
                self._retry_at = time.monotonic() + self._backoff
                self._renewing = False
            log.warning("kvbm: the engine daemon %s (pid %d) is gone and a new one could not be reached "
                        "(%s: %s); requests recompute, next try in %.0f s", self.instance, old.pid,
                        type(exc).__name__, exc, self._backoff)
            return
        with self._lock:
            self._daemon = new
            self.renewals += 1
            self._backoff, self._renewing = 0.0, False
            if self.closed:  # closed meanwhile: this one is not kept either
                new.close()
        log.warning("kvbm: the engine daemon %s (pid %d) was gone; now reaching pid %d at %s (its cache "
                    "starts empty)", self.instance, old.pid, new.pid, new.spec["address"])
        old.close()  # its lanes end once the requests in flight give up

    def _failed(self, d: _Daemon) -> bool:
        """After a call to d raised: whether d is gone (the call then counts as a miss)."""
        if d.alive():
            return False
        self._renew()
        return True

    def lookup(self, keys: Any) -> tuple[int, list[str]]:
        d = self._live()
        if d is None:
            return 0, []
        try:
            return d.backend.lookup(keys)
        except Exception:
            if self._failed(d):
                return 0, []
            raise

    def lookup_pin(self, keys: Any, start: int) -> tuple[int, int | None]:
        d = self._live()
        if d is None:
            return 0, 0
        try:
            return d.backend.lookup_pin(keys, start)
        except Exception:
            if self._failed(d):
                return 0, 0
            raise

    def pin(self, keys: Any) -> int:
        d = self._live()
        if d is None:
            return 0
        try:
            return d.backend.pin(keys)
        except Exception:
            if self._failed(d):
                return 0
            raise

    def unpin(self, keys: Any) -> None:
        d = self._live()
        if d is not None:  # a dead daemon's pins went with it
            d.backend.unpin(keys)

    def start_store(self, keys: Any, staging: Any, hints: Any = None, parent: Any = None,
                    position: int = 0, hashes: Any = None, parent_hash: Any = None) -> Any:
        d = self._live()
        if d is None:
            return _done(0)  # a future miss
        ticket = d.backend.start_store(keys, staging, hints, parent, position, hashes, parent_hash)
        ticket.kvbm_daemon = d
        return ticket

    def start_load(self, keys: Any, staging: Any) -> Any:
        d = self._live()
        if d is None:
            return _done(0)  # nothing arrives: vLLM recomputes the blocks
        ticket = d.backend.start_load(keys, staging)
        ticket.kvbm_daemon = d
        return ticket

    def done(self, ticket: Any) -> bool:
        if ticket.done():
            return True
        d = getattr(ticket, "kvbm_daemon", None)
        return d is not None and not d.alive()  # its daemon is gone: it will never deliver

    def poll(self, tickets: Any, wait: bool = False) -> None:
        from concurrent.futures import wait as wait_futures

        while wait:
            pending = [t for t in tickets if t is not None and not self.done(t)]
            if not pending:
                return
            wait_futures(pending, timeout=POLL_S)

    def loaded(self, ticket: Any) -> int:
        if not ticket.done() or ticket.cancelled():  # given up with its daemon (done() said so): nothing arrived
            return 0
        d = getattr(ticket, "kvbm_daemon", None)
        return d.backend.loaded(ticket) if d is not None else ticket.result()

    def close(self) -> None:
        with self._lock:
            self.closed = True
            d = self._daemon
        d.close()


def release_engine_backends() -> None:
    """Close every engine backend of this process (tests, shutdown)."""
    with _BACKENDS_LOCK:
        backends = list(_BACKENDS.values())
        _BACKENDS.clear()
    for b in backends:
        b.close()


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
    info = _info_file(path)
    if info is None or not alive(int(info.get("pid", 0) or 0)):
        return None
    return info


def _info_file(path: str) -> dict | None:
    try:
        with open(path) as f:
            info = json.load(f)
        int(info["pid"])
        return info
    except (OSError, ValueError, KeyError, TypeError):
        return None


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie does not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's: it runs
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def _write_private(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _start(name: str, root: str, config: Mapping[str, Any], fp: str) -> dict[str, Any]:
    token = secrets.token_hex(16)
    # a socket of its own per daemon: one that is leaving removes its own, never its successor's
    leaf = hashlib.blake2b(name.encode(), digest_size=8).hexdigest() + f".{secrets.token_hex(3)}.sock"
    sock = os.path.join(root, leaf)
    if len(sock.encode()) > SUN_PATH_MAX:  # a deep runtime folder: the socket alone in a short private one
        sock = os.path.join(_private_dir(SHORT_SOCKET_DIR.format(uid=os.getuid())), leaf)
    if len(sock.encode()) > SUN_PATH_MAX:  # pragma: no cover - /tmp/kvbm-<uid>-sock/<28 bytes>
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
    grace = os.environ.get("KVBM_ENGINE_DAEMON_GRACE_S", "0")
    try:
        if float(grace) < 0:
            raise ValueError
    except ValueError:
        raise ConfigError(f"kvbm: KVBM_ENGINE_DAEMON_GRACE_S must be seconds >= 0, got {grace!r}") from None
    # The daemon detaches (a second fork: no process's child) into its own process group (main()), so an
    # engine that kills its own process tree or group at shutdown leaves it to stop cleanly once
    # no process holds it. It stays in the engine's session, not a new one: with the kernel's
    # autogroup scheduling (sched_autogroup_enabled, the default on desktop and many server
    # kernels) every session is one CPU group, and a session of one mostly-sleeping process was
    # starved for 8-28 s at a time beside the engine's spinning TP workers and a CPU hog (its
    # threads runnable, 0.15 s run against 8.5 s of run-queue wait, /proc/PID/task/*/schedstat):
    # every load of the tensor-parallel ranks timed out. In the engine's session it waited
    # 0.05-0.18 s in all (issue 14; tests/test_vllm_serve_tp.py).
    proc = subprocess.Popen([sys.executable, "-m", "kvbm.connectors.engine_daemon", cfg_path, ready_path, grace],
                            stdin=subprocess.DEVNULL)  # main() makes its own group
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
    _STARTED[name] = int(ready["pid"])
    return {"address": ready["address"], "token": token, "pid": ready["pid"], "config": fp}


def _sweep(root: str) -> None:
    """Remove what engine daemons killed outright left behind (files here, theirs in /dev/shm)."""
    for entry in os.listdir(root):
        if not entry.endswith(".json") or entry.endswith(".config.json"):
            continue
        base = os.path.join(root, entry[:-len(".json")])
        info = _info_file(base + ".json")
        if info is not None and alive(int(info["pid"])):
            continue
        name = os.path.basename(base)
        sock = str((info or {}).get("address", "")).removeprefix("ipc://")
        _remove(base, *([sock] if sock else []),
                *glob.glob(f"/dev/shm/kvbm-{os.getuid()}-{glob.escape(name)}.w*"))


def _remove(base: str, *more: str) -> None:
    for path in [base + s for s in (".ready", ".json", ".config.json")] + list(more):
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


def _nobody_holds(held: Any) -> bool:
    """Whether no process holds the daemon (its exclusive flock succeeds; released at once)."""
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    fcntl.flock(held, fcntl.LOCK_UN)
    return True


def _watch_holders(base: str, grace_s: float, address: str, stop: threading.Event, leaving: list) -> None:
    """Stop the daemon (as SIGTERM does) once no process has held it for grace_s: its rendezvous
    file goes first, under the lock every attacher takes, so none joins a daemon that is leaving;
    the lock is kept (in `leaving`) until the daemon has shut down, so no successor opens the same
    G3 folder while this one still flushes it."""
    held = open(base + ".held.lock", "a")
    idle_since = None
    while not stop.wait(POLL_S):
        if not _nobody_holds(held):
            idle_since = None
            continue
        now = time.monotonic()
        idle_since = idle_since or now
        if now - idle_since < grace_s:
            continue
        lock = open(base + ".lock", "a")
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _nobody_holds(held):  # one joined meanwhile
            lock.close()
            idle_since = None
            continue
        _remove_own(base, address)
        leaving.append(lock)  # released by main() once shut down
        os.kill(os.getpid(), signal.SIGTERM)
        if not stop.wait(LEAVING_S):  # a shutdown that hangs must not hold up every later launch
            _let_go(leaving)
        return


def _let_go(leaving: list) -> None:
    try:
        leaving.pop().close()
    except IndexError:  # the other thread did
        pass


def _remove_own(base: str, address: str) -> None:
    """This daemon's files: its socket, and the name's rendezvous files while they are its own
    (a successor of the same name may have written them since)."""
    info = _info_file(base + ".json")
    if info is None or int(info["pid"]) == os.getpid():  # (info None: no successor got as far as it)
        _remove(base)
    if address.startswith("ipc://"):
        try:
            os.unlink(address[len("ipc://"):])
        except OSError:
            pass


def _cleanup(base: str, address: str) -> None:
    """At exit: _remove_own under the name's lock (waited for at most 10 s: an attacher starting a
    successor holds it that long; then only the socket, which is this daemon's alone)."""
    try:
        lock = open(base + ".lock", "a")
    except OSError:
        return
    with lock:
        deadline = time.monotonic() + 10.0
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:
                    try:
                        os.unlink(address.removeprefix("ipc://"))
                    except OSError:
                        pass
                    return
                time.sleep(0.05)
        _remove_own(base, address)


def main(argv: list[str]) -> int:
    import logging

    import faulthandler

    cfg_path, ready_path = argv[:2]
    grace_s = float(argv[2]) if len(argv) > 2 else 0.0
    if os.fork() > 0:  # detach: the daemon is no child of the engine's processes
        os._exit(0)
    os.setpgid(0, 0)  # its own process group, in the engine's session (see _start)
    unbind_cpus()  # not on the core the engine worker that started it is bound to (cpus.py)
    base = ready_path[:-len(".ready")]
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s kvbm-engine-daemon %(levelname)s %(message)s")
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # report_stall: every stack to the engine's log
    address, stop, leaving = "", threading.Event(), []
    try:
        fd = os.open(ready_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as ready:
            try:
                from ..daemon.config import load_daemon_config
                from ..daemon.server import serve

                cfg, dcfg = load_daemon_config(cfg_path, env={})
                address = dcfg.address
                threading.Thread(target=_watch_holders, args=(base, grace_s, address, stop, leaving), name="kvbm-holders",
                                 daemon=True).start()
                return serve(cfg, dcfg, ready=ready)
            except Exception as exc:  # noqa: BLE001 - the engine that started it reports it
                if ready.tell() == 0:
                    ready.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
                    ready.flush()
                    time.sleep(5)  # the engine reads it before the file goes
                raise
    finally:
        stop.set()
        if leaving:  # left for want of holders: its files are gone; now successors may start
            _let_go(leaving)
        else:
            _cleanup(base, address)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
