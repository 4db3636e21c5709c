"""Cross-node pulls: a NIXL agent over the shared G2 pool, and requests to peer daemons.

    new_agent(name, backends) -> nixl_agent        an agent whose progress thread sleeps when idle
    new_pull_agent(name, backends) -> nixl_agent   an agent without a progress thread (READs it starts)
    Agent.create(pool, name) -> Agent | None      None (with the reason) when nixl is missing
    Agent.metadata                                 bytes a peer adds to read from this pool
    Agent.read(peer, meta, local, remote, timeout) NIXL READ of (address, length) pairs
    Agent.finished(handle)                         a READ that outlived its timeout has ended
    Peers(addresses, token, timeout, secret)       one DEALER per peer, with a short timeout
    Peers.connect(peer) -> bool                    peer_hello: both sides prove the peer secret
    Peers.ask(peer, op, **fields) -> reply | None  None when the peer is down or slow

A pull (peering.py runs it on its puller thread, off the request loop): after a mutual
challenge-response over the cluster's peer secret (peerauth.py), ask a peer
`peer_lookup(namespace, client keys)` -> it derives its own server keys within that namespace,
pins the prefix it holds in its G2 and answers addresses; reserve
local G2 slots; READ; `peer_release` -> the peer's crc32c per block (computed while we READ);
verify; commit. A peer that does not answer within `timeout` is skipped for a back-off period,
so a dead peer costs one short wait, not one per lookup.

The peer's agent metadata is loaded once per agent name (a restarted peer has a new name).
The Python `nixl_agent` starts UCX's progress thread with a poll timeout of 0, so an idle agent
spins a whole core; `new_agent` gives it IDLE_POLL_US instead (it still wakes at once on UCX
events: the thread polls the worker's event fd), which the target side of a READ needs and
which costs nothing while idle. The READs this daemon starts go through a second agent over the
same pool without a progress thread (`new_pull_agent`; the puller progresses them itself): while
a READ ran, the serving agent's progress thread ran beside it and doubled it (a bare two-agent
READ of 256 MiB at load 1, alternating: 117 ms and 61 ms of CPU with the thread, 67 ms and 35 ms
without).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np
import zmq

from .peerauth import nonce as new_nonce
from .peerauth import prove, server_ok
from .protocol import request, unpack

log = logging.getLogger("kvbm.daemon")
BACKOFF_S = 5.0
IDLE_POLL_US = 20_000  # the progress thread's poll timeout (it wakes on UCX events before that)
WAIT_MAX_S = 0.0005    # a READ's completion check backs off to this (the progress thread moves it)
_PATCH_LOCK = threading.Lock()


def new_agent(name: str, backends: list[str]) -> Any:
    """A nixl_agent whose UCX progress thread blocks in poll() when idle instead of spinning.

    nixl_agent hard-codes pthrDelay = 0 (poll timeout 0: a busy loop). A config subclass keeps
    the delay at IDLE_POLL_US. If this nixl build has no such knob, the plain agent is returned.
    """
    import nixl._api as api

    bind = getattr(api, "nixlBind", None)
    base = getattr(bind, "nixlAgentConfig", None)
    if base is None or not isinstance(getattr(base, "pthrDelay", None), property):
        log.warning("nixl: cannot set the progress thread's poll timeout; an idle agent may spin a core")
        return api.nixl_agent(name, api.nixl_agent_config(backends=backends))

    class _Config(base):  # type: ignore[misc, valid-type]
        @property
        def pthrDelay(self) -> int:
            return base.pthrDelay.__get__(self)

        @pthrDelay.setter
        def pthrDelay(self, value: int) -> None:
            base.pthrDelay.__set__(self, max(int(value), IDLE_POLL_US))

    with _PATCH_LOCK:
        bind.nixlAgentConfig = _Config
        try:
            return api.nixl_agent(name, api.nixl_agent_config(backends=backends))
        finally:
            bind.nixlAgentConfig = base


def new_pull_agent(name: str, backends: list[str]) -> Any:
    """A nixl_agent without UCX's progress thread, for the READs it starts: the caller's
    transfer() and check_xfer_state() progress them, and no second thread contends for the
    worker while they run. (A READ's target needs its own progress: new_agent.)"""
    import nixl._api as api

    return api.nixl_agent(name, api.nixl_agent_config(enable_prog_thread=False, backends=backends))


class Agent:
    """A NIXL agent with the daemon's G2 pool registered (UCX backend): the serving one (peers READ
    from it), and beside it one for this daemon's own READs (the puller's alone)."""

    def __init__(self, nixl_agent: Any, reg: Any, name: str, puller: Any = None, puller_reg: Any = None) -> None:
        self._serving = nixl_agent
        self._serving_reg = reg
        self._agent = puller if puller is not None else nixl_agent  # the READs' agent
        self._reg = puller_reg
        self.name = name
        self.metadata: bytes = nixl_agent.get_agent_metadata()
        self._known: dict[str, str] = {}  # peer agent name -> added

    @classmethod
    def create(cls, pool: Any, name: str) -> tuple["Agent | None", str]:
        try:
            import nixl._api  # noqa: F401
        except ImportError as exc:
            return None, f"cross-node pulls are off: nixl is not importable ({exc}); pip install nixl"
        region = [(int(pool.ctypes.data), int(pool.nbytes), 0, "")]
        try:
            agent = new_agent(name, ["UCX"])
            reg = agent.register_memory(region, "DRAM")
        except Exception as exc:  # a plugin or UCX failure: run without peers
            return None, f"cross-node pulls are off: NIXL agent failed to start: {exc}"
        try:
            puller = new_pull_agent(f"{name}-pull", ["UCX"])
            puller_reg = puller.register_memory(region, "DRAM")
        except Exception as exc:  # READs go through the serving agent, as before
            log.warning("nixl: no separate agent for pulls (%s); READs share the serving agent's progress", exc)
            puller = puller_reg = None
        return cls(agent, reg, name, puller, puller_reg), f"NIXL agent {name} (UCX) with the G2 pool registered"

    def read(self, peer_name: str, peer_meta: bytes, local: list, remote: list,
             timeout: float) -> tuple[str, Any]:
        """READ remote (address, length) pairs into local ones -> ("DONE" | "ERR" | "LATE", handle).

        LATE: still running at the timeout. Its handle stays in `late` until it finishes,
        because until then the local slots may still be written and must not be reused.
        """
        a = self._agent
        if peer_name not in self._known:
            a.add_remote_agent(peer_meta)
            self._known[peer_name] = peer_name
        larr, rarr = _descs(local, remote)
        ldescs = a.get_xfer_descs(larr, "DRAM")
        rdescs = a.get_xfer_descs(rarr, "DRAM")
        handle = a.initialize_xfer("READ", ldescs, rdescs, peer_name)
        # Over shared memory (UCX cma) the copy happens inside transfer() (the GIL is released);
        # over a network each check_xfer_state progresses it (the pull agent has no progress
        # thread), backing off to WAIT_MAX_S so this thread neither spins a core nor holds the GIL.
        state = a.transfer(handle)
        deadline = time.monotonic() + timeout
        pause = 0.00002
        while state not in ("DONE", "ERR"):
            if time.monotonic() > deadline:
                log.warning("NIXL READ from %s timed out after %.1fs", peer_name, timeout)
                return "LATE", handle
            time.sleep(pause)
            pause = min(pause * 2, WAIT_MAX_S)
            state = a.check_xfer_state(handle)
        self._release(handle)
        return state, None

    def finished(self, handle: Any) -> bool:
        """A LATE transfer has ended (either way) and its handle is released."""
        if self._agent.check_xfer_state(handle) == "PROC":
            return False
        self._release(handle)
        return True

    def _release(self, handle: Any) -> None:
        try:
            self._agent.release_xfer_handle(handle)
        except Exception as exc:  # nothing more can be done with it; the slots are safe anyway
            log.warning("NIXL: cannot release a transfer handle: %s", exc)

    def forget(self, peer_name: str) -> None:
        if self._known.pop(peer_name, None) is not None:
            try:
                self._agent.remove_remote_agent(peer_name)
            except Exception:
                pass

    def close(self) -> None:
        """Deregister the pool and destroy the agents now (their UCX threads stop here, not at
        interpreter exit, where nixl's teardown can crash the process)."""
        if self._serving is None:
            return
        for name in list(self._known):
            self.forget(name)
        for agent, reg in ((self._agent, self._reg), (self._serving, self._serving_reg)):
            if reg is not None:
                try:
                    agent.deregister_memory(reg)
                except Exception:
                    pass
        self._reg = self._serving_reg = None
        self._agent = self._serving = None
        import gc

        gc.collect()


def _descs(local: list, remote: list) -> tuple[np.ndarray, np.ndarray]:
    """(address, length) pairs -> NIXL's Nx3 (address, length, device) arrays, one row per run of
    blocks that are adjacent on both sides (NIXL pairs row i with row i)."""
    out = np.zeros((2, len(local), 3), dtype=np.uint64)
    n = 0
    for (la, ln), (ra, rn) in zip(local, remote):
        if ln != rn:
            raise ValueError(f"NIXL READ: local length {ln} != remote length {rn}")
        if n and int(out[0, n - 1, 0] + out[0, n - 1, 1]) == la and int(out[1, n - 1, 0] + out[1, n - 1, 1]) == ra:
            out[:, n - 1, 1] += ln
        else:
            out[0, n, :2] = la, ln
            out[1, n, :2] = ra, rn
            n += 1
    return out[0, :n].copy(), out[1, :n].copy()


class Peer:
    __slots__ = ("address", "sock", "down_until", "session", "agent", "meta", "next_id")

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock: zmq.Socket | None = None
        self.down_until = 0.0
        self.session: bytes | None = None
        self.agent = ""
        self.meta = b""
        self.next_id = 1


class Peers:
    def __init__(self, ctx: zmq.Context, addresses: list[str], token: str, timeout: float,
                 secret: bytes) -> None:
        self.ctx = ctx
        self.peers = [Peer(a) for a in addresses]
        self.token = token
        self.timeout = timeout
        self._secret = secret
        self.auth_failures = 0  # peers whose proof did not verify (another cluster, or no daemon)

    def live(self) -> list[Peer]:
        now = time.monotonic()
        return [p for p in self.peers if p.down_until <= now]

    def ask(self, peer: Peer, op: str, **fields: Any) -> dict | None:
        """One request; None (and the peer backs off) when it is down, slow or refuses."""
        if peer.sock is None:
            peer.sock = self.ctx.socket(zmq.DEALER)
            peer.sock.setsockopt(zmq.LINGER, 0)
            peer.sock.connect(peer.address)
        rid = peer.next_id
        peer.next_id += 1
        try:
            peer.sock.send(request(op, rid, self.token, peer.session, **fields), zmq.NOBLOCK)
        except zmq.Again:
            return self._down(peer, "send queue full")
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not peer.sock.poll(int(left * 1000) + 1):
                return self._down(peer, f"no answer in {self.timeout}s")
            try:
                reply = unpack(peer.sock.recv(), 1 << 20)
            except Exception:
                return self._down(peer, "garbled reply")
            if reply.get("id") != rid:
                continue  # a late answer to a request that timed out
            if not reply.get("ok"):
                if reply.get("error") == "no_session":
                    peer.session = None  # idle past the lease, or the peer restarted: hello again
                    return None
                if reply.get("error") in ("unauthorized", "peer_off", "nixl_off"):
                    self.auth_failures += reply.get("error") == "unauthorized"
                    return self._down(peer, f"it refused {op}: {reply.get('message')}")
                log.warning("peer %s refused %s: %s", peer.address, op, reply.get("message"))
                return None
            return reply

    def connect(self, peer: Peer) -> bool:
        """peer_hello once per peer (and after its restart): the peer proves the secret, we prove
        it back, then its agent name and metadata."""
        if peer.session is not None:
            return True
        ours = new_nonce()
        first = self.ask(peer, "peer_hello", nonce=ours)
        if first is None:
            return False
        challenge = first.get("challenge")
        if not server_ok(self._secret, ours, challenge, first.get("proof")):
            self.auth_failures += 1
            self._down(peer, "it could not prove the peer secret (daemon.peer_secret_file)")
            return False
        reply = self.ask(peer, "peer_hello", nonce=ours, challenge=challenge,
                         proof=prove(self._secret, b"puller", ours, challenge))
        if reply is None:
            return False
        session, agent, meta = reply.get("session"), reply.get("agent"), reply.get("metadata")
        if not (isinstance(session, bytes) and isinstance(agent, str) and isinstance(meta, bytes)):
            self._down(peer, "a malformed peer_hello reply")
            return False
        peer.session, peer.agent, peer.meta = session, agent, meta
        return True

    def _down(self, peer: Peer, why: str) -> None:
        log.warning("peer %s is down (%s); local only for %.0fs", peer.address, why, BACKOFF_S)
        peer.down_until = time.monotonic() + BACKOFF_S
        peer.session = None
        if peer.sock is not None:
            peer.sock.close(0)
            peer.sock = None
        return None

    def close(self) -> None:
        for p in self.peers:
            if p.sock is not None:
                p.sock.close(0)
                p.sock = None
