"""The connector's daemon backend: a `kvbm serve` daemon reached through kvbm.client.Client.

    DaemonBackend.connect(address, layout, model, salt, token)   two lanes (loads, stores)
    daemon_spec(extra, layout, model)    the daemon named in the connector's extra config, or None
    shared_backend(spec)                 one backend per spec in this process (both engine halves)
    release_backends()                   close them all (tests, engine shutdown)

kvbm.connectors.core re-exports DaemonBackend, daemon_spec and shared_backend.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as _wait_futures
from typing import Any, Mapping, Sequence

from ..blocks import KVLayout
from ..config import ConfigError
from .cpus import unbind_cpus

log = logging.getLogger("kvbm.connectors.core")  # the name its warnings always had

_BACKENDS: dict[str, "DaemonBackend"] = {}
_BACKENDS_LOCK = threading.Lock()
_CLAIMS_LOCK = threading.Lock()  # DaemonBackend._claims (the scheduler's and a worker's thread)


class DaemonBackend:
    """The daemon path: kvbm.client.Client sessions; transfers run on two lanes, tickets are futures.

    Loads and stores go on lanes of their own, each a thread with its own client (session,
    socket, window): a load the engine waits on (time to first token) never queues behind the
    stores submitted before it, on this side or in the client's lock. Lookups use the load
    lane's client (short round trips, also on the critical path). The store lane's client is
    opened on its thread at the first store, so a scheduler-only process (vLLM's
    multiprocessing executor) holds one session.

    The daemon owns the tiers and their policies. A store that fails (daemon gone, timeout) is
    a future miss; a load that fails reports its blocks as not arrived, never scattered.
    """

    def __init__(self, client: Any = None, store_client: Any = None, connect_store: Any = None,
                 connect_load: Any = None) -> None:
        self._store_client = store_client
        self._connect_store = connect_store  # () -> a Client, on the store lane at first use
        # (cpus.py: lanes run on any core, not on the engine worker's bound one; lane_omp_team:
        # the engine's OpenMP threads wait as they do beside the in-process backend)
        self._loads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvbm-daemon-load",
                                         initializer=_start_lane)
        self._stores = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvbm-daemon-store",
                                          initializer=unbind_cpus)
        if client is None:  # connect_load: () -> a Client, opened now on the load lane's thread
            try:
                client = self._loads.submit(connect_load).result()
            except BaseException:  # refused, no daemon: no lane thread stays behind
                self._loads.shutdown(wait=True)
                self._stores.shutdown(wait=True)
                raise
        self.client = client  # lookups and loads
        self.block_nbytes = client.block_nbytes

    @classmethod
    def connect(cls, address: str, layout: KVLayout, model: str, salt: str = "",
                token: str | None = None, timeout: float = 10.0) -> DaemonBackend:
        from ..client import Client

        def opener() -> Client:
            return Client(address, model=model, layout=layout, salt=salt, token=token, timeout=timeout)

        # Each client is opened on its lane's thread, so that its zmq I/O thread and heartbeat
        # start unbound too (cpus.py): the load lane's now, the store lane's at its first store.
        return cls(connect_load=opener, connect_store=opener)

    # The scheduler's lookup pins what it promises, through the scheduler's own session (its
    # client). A worker in another process has another session and cannot release those pins
    # (the daemon unpins only what the asking session pinned), so the scheduler releases them
    # itself once vLLM reports the load done, or the request gone (vllm_pins.py). The daemon
    # bounds them per session, namespace and uid, and drops them at bye, lease expiry, the
    # client's death or daemon.pin_s (kvbm/daemon/sessions.py, SECURITY.md).
    pins = True
    scheduler_releases = True

    @property
    def rehellos(self) -> int:
        """Sessions reopened (daemon restarted) on either lane."""
        store = self._store_client if self._store_client not in (None, self.client) else None
        return self.client.rehellos + (store.rehellos if store is not None else 0)

    def pin(self, keys: Sequence[Any]) -> int:
        """Pin the ready prefix of keys (just looked up) in this session; returns how many are held.

        A refusal for the daemon's quota (this tenant keeps its share of G2 busy) holds the rest
        unpinned, as before pins: a hit is never lost to the quota, only its protection. Those
        claims are counted here and their unpins never sent: a key's pins are interchangeable
        counts, and a release spends a claim first, so a real pin (another request's) outlives it.
        Another refusal (daemon gone, timeout) after some were pinned returns those: each pin has
        an owner that knows it, else it would only go at daemon.pin_s."""
        keys = list(keys)
        n, step = 0, max(1, self.client.max_keys)
        while n < len(keys):  # the daemon caps keys per request
            part = keys[n:n + step]
            try:
                got = self.client.pin(part)
            except Exception as exc:  # noqa: BLE001 - the first part refused: the caller promises nothing
                if getattr(exc, "code", None) == "quota":  # a RemoteError
                    return n + self._promise_unpinned(keys[n:], exc)
                if not n:
                    raise
                log.warning("kvbm daemon pin stopped at %d blocks: %s", n, exc)
                return n
            n += got
            if got < len(part):
                break
        return n

    def _promise_unpinned(self, keys: list, exc: Exception) -> int:
        """The quota refused pins of keys: promise them unpinned (claims, see pin()); len(keys)."""
        self._claim(keys)
        if not self.quota_claims:
            log.warning("kvbm daemon refused pins (%s): hits past the quota are promised unpinned", exc)
        self.quota_claims += len(keys)
        return len(keys)

    _one_trip = True  # the daemon answers lookup_pin (False after unknown_op: an older daemon)

    def lookup_pin(self, keys: Sequence[Any], start: int) -> tuple[int, int | None]:
        """lookup(keys), and pin(keys[start:n]) of its ready prefix, in one round trip on the
        scheduler's thread where the daemon can (it was two: ~0.7 ms per hit request at p50,
        bench/RESULTS.md issue 14, session 10): (n, pinned). pinned None: nothing was pinned
        (an older daemon, more keys than one request takes, a lookup that waited on the peers):
        the caller pins with pin(). The pins are pin()'s: the same session, quota, release paths
        and claims when the quota refuses. A failure of the lookup itself raises, as lookup()."""
        keys = list(keys)
        one = getattr(self.client, "lookup_pin", None) if self._one_trip else None
        if one is None or len(keys) > max(1, self.client.max_keys):
            return self.lookup(keys)[0], None
        try:
            n, _, pinned = one(keys, start)
        except Exception as exc:  # noqa: BLE001 - sorted below; anything else is lookup()'s failure
            code = getattr(exc, "code", None)
            if code == "quota" and isinstance(getattr(exc, "n", None), int):  # client.QuotaRefused
                n = exc.n
                return n, (self._promise_unpinned(keys[start:n], exc) if n > start else 0)
            if code == "unknown_op":
                self._one_trip = False
                return self.lookup(keys)[0], None
            raise
        return n, pinned

    quota_claims = 0  # blocks promised unpinned because the daemon's quota refused their pins
    _claims: dict | None = None  # key -> blocks promised unpinned, not yet released

    def _claim(self, keys: list) -> None:
        with _CLAIMS_LOCK:
            if self._claims is None:
                self._claims = {}
            for k in keys:
                self._claims[k] = self._claims.get(k, 0) + 1

    def _pinned_of(self, keys: list) -> list:
        """keys less one claim each where there is one (those were never pinned)."""
        if not self._claims:
            return keys
        out = []
        with _CLAIMS_LOCK:
            claims = self._claims
            for k in keys:
                c = claims.get(k, 0)
                if c > 1:
                    claims[k] = c - 1
                elif c == 1:
                    del claims[k]
                else:
                    out.append(k)
        return out

    def unpin(self, keys: Sequence[Any]) -> None:
        """Release pins taken by pin(), on the load lane: after every load submitted before it,
        so a caller that unpins right after start_load never lets a block go before its load
        holds it; and off the engine's scheduler thread (no round trip there)."""
        keys = self._pinned_of(list(keys))
        if not keys or self._closing:
            return
        try:
            self._loads.submit(self._unpin, keys).add_done_callback(_log_unpin_error)
        except RuntimeError:  # closing: the session's bye releases every pin it holds
            pass

    def _unpin(self, keys: list) -> int:
        if self._closing:  # the session's bye releases them, without a round trip per request
            return 0
        n, step = 0, max(1, self.client.max_keys)
        for i in range(0, len(keys), step):
            n += self.client.unpin(keys[i:i + step])
        return n

    def lookup(self, keys: Sequence[Any]) -> tuple[int, list[str]]:
        keys = list(keys)
        n, where, step = 0, [], max(1, self.client.max_keys)
        while n < len(keys):  # the daemon caps keys per request
            part = keys[n:n + step]
            hit, w = self.client.lookup(part)
            n += hit
            where += list(w)[:hit]
            if hit < len(part):
                break
        return n, where

    takes_hashes = True  # the daemon publishes them (vLLM-format KV events, daemon/kv_events.py)

    def start_store(self, keys: Sequence[Any], staging: Any, hints: Any = None, parent: Any = None,
                    position: int = 0, hashes: Sequence[Any] | None = None, parent_hash: Any = None) -> Future:
        per_key = None if hints is None else list(hints)  # retention priorities cross to the daemon
        ticket = self._stores.submit(self._store, list(keys), _rows_of(staging), parent, position, per_key,
                                     None if hashes is None else list(hashes), parent_hash)
        ticket.add_done_callback(_log_store_error)
        return ticket

    def _store(self, keys: list, staging: Any, parent: Any, position: int, hints: Any,
               hashes: list | None = None, parent_hash: Any = None) -> int:
        """On the store lane: its own client, opened here at the first store (or reopened after
        a failed open: the daemon may be back)."""
        if self._store_client is None:
            if self._connect_store is None:
                self._store_client = self.client  # built around one client: one session for both
            else:
                self._store_client = self._connect_store()
        if hashes is None:
            return self._store_client.store(keys, staging, parent, position, hints)
        return self._store_client.store(keys, staging, parent, position, hints, hashes=hashes,
                                        parent_hash=parent_hash)

    def start_load(self, keys: Sequence[Any], staging: Any) -> Future:
        return self._loads.submit(self.client.load, list(keys), _rows_of(staging))

    def poll(self, tickets: Sequence[Any], wait: bool = False) -> None:
        if wait:
            _wait_futures([t for t in tickets if t is not None])

    def done(self, ticket: Future) -> bool:
        return ticket.done()

    def loaded(self, ticket: Future) -> int:
        if ticket.cancelled():  # abandoned with its daemon (close(abandon=True))
            return 0
        exc = ticket.exception()
        if exc is not None:
            log.warning("kvbm daemon load failed: %s", exc)
            if isinstance(exc, TimeoutError):  # an engine's own daemon writes its stacks to the log
                from .engine_daemon import report_stall
                report_stall(self.client.address)
            return 0
        return ticket.result()

    _closing = False

    def close(self, abandon: bool = False) -> None:
        """Close both lanes and clients; abandon: the daemon is gone, so the transfers still
        queued are cancelled (each would wait out the client's timeout), not run."""
        self._closing = True
        self._loads.shutdown(wait=True, cancel_futures=abandon)
        self._stores.shutdown(wait=True, cancel_futures=abandon)
        if self._store_client is not None and self._store_client is not self.client:
            self._store_client.close()
        self.client.close()


def _start_lane() -> None:
    lane_omp_team()
    # After the team, not before: with GOMP_CPU_AFFINITY set (vLLM's CPU worker under its
    # multiprocessing executor sets it to its compute cores), libgomp binds the thread that
    # starts a team to the first of them, the worker's own main core; the lane, and the client's
    # zmq and heartbeat threads it starts next, would then queue behind the worker's spinning
    # main thread on that one core (bench/RESULTS.md, issue 14, session 9).
    unbind_cpus()


def lane_omp_team() -> bool:
    """Give the calling thread an OpenMP team of its own, when the engine already loaded torch:
    returns whether it ran.

    Why: libgomp (vLLM's CPU build preloads it) lets a waiting OpenMP thread spin 300,000 times
    before it sleeps, unless the process manages more OpenMP threads than it has CPUs; then it
    spins 1,000 times. The in-process backend's transfer threads copy staging rows with torch,
    so each gets a team and the engine's OpenMP threads sleep soon when they wait; the daemon
    backend's threads never touched torch, so beside it the engine's main and OpenMP threads
    spun at every wait (between ops, at barriers while a core was taken by another process):
    on a 2-core box, ~1.8x the engine's CPU seconds for the same steps (bench/RESULTS.md,
    session 8). One small parallel copy here puts the daemon backend in the same state.
    KVBM_LANE_OMP_TEAM=0 leaves it out (A/B runs); OMP_WAIT_POLICY / GOMP_SPINCOUNT in the
    engine's environment set the policy for both backends."""
    torch = sys.modules.get("torch")  # never imported here: kvbm does not need torch
    if torch is None or os.environ.get("KVBM_LANE_OMP_TEAM", "1") == "0":
        return False
    try:
        src = torch.zeros(1 << 17, dtype=torch.uint8)  # over at::parallel_for's grain: a team
        torch.empty_like(src).copy_(src)
    except Exception:  # noqa: BLE001 - a policy nicety, never a reason for a lane to fail
        return False
    return True


def _rows_of(staging: Any) -> Any:
    """Staging as the client takes it: a 2-D buffer of rows as is (the client copies it in one
    native call, kvbm.client._rows), anything else as a list of rows."""
    return staging if getattr(staging, "ndim", 0) == 2 else list(staging)


def _log_unpin_error(ticket: Future) -> None:
    exc = None if ticket.cancelled() else ticket.exception()
    if exc is not None:  # the daemon's lease, bye or pin_s releases them
        log.warning("kvbm daemon unpin failed: %s", exc)


def _log_store_error(ticket: Future) -> None:
    exc = None if ticket.cancelled() else ticket.exception()
    if exc is not None:  # a future miss, not an error for the engine
        log.warning("kvbm daemon store failed: %s", exc)


def daemon_spec(extra: Mapping[str, Any], layout: KVLayout, model: str) -> dict[str, Any] | None:
    """The daemon to use from the connector's extra config, or None for the in-process manager.

    extra: kvbm_daemon (address), kvbm_token (else $KVBM_DAEMON__TOKEN), kvbm_salt (namespace salt).
    """
    address = extra.get("kvbm_daemon")
    if not address:
        return None
    if not isinstance(address, str) or not address.startswith(("tcp://", "ipc://")):
        raise ConfigError(f"kvbm_daemon must be tcp://HOST:PORT or ipc://PATH, got {address!r}")
    return {"address": address, "token": extra.get("kvbm_token"), "salt": str(extra.get("kvbm_salt") or ""),
            "model": model, "layout": {f: getattr(layout, f) for f in layout.__dataclass_fields__}}


def shared_backend(spec: Mapping[str, Any]) -> DaemonBackend:
    """The process's daemon backend for this spec (one client, shared by both halves)."""
    key = json.dumps(spec, sort_keys=True)
    with _BACKENDS_LOCK:
        backend = _BACKENDS.get(key)
        if backend is None:
            backend = _BACKENDS[key] = DaemonBackend.connect(
                spec["address"], KVLayout(**spec["layout"]), spec["model"], spec.get("salt", ""),
                spec.get("token"))
        return backend


def release_backends() -> None:
    """Close every shared daemon backend."""
    with _BACKENDS_LOCK:
        backends = list(_BACKENDS.values())
        _BACKENDS.clear()
    for backend in backends:
        backend.close()
    engine = sys.modules.get("kvbm.connectors.engine_daemon")
    if engine is not None:  # backends to engines' own daemons (engine_daemon.engine_backend)
        engine.release_engine_backends()
