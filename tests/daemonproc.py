"""Shared by the daemon tests: whether nixl is here, waiting for `kvbm serve` to be ready, waiting on a condition."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

try:
    import nixl._api  # noqa: F401

    HAVE_NIXL = True
except ImportError:
    if os.environ.get("KVBM_REQUIRE_NIXL") == "1":  # CI installs nixl: a broken install must fail
        raise
    HAVE_NIXL = False

# The cluster's peer secret in the daemon tests (written 0600 as daemon.peer_secret_file)
PEER_SECRET = b"kvbm-test-peer-secret-0123456789"


def write_peer_secret(folder: Path) -> str:
    path = folder / "peer.secret"
    if not path.exists():
        path.write_bytes(PEER_SECRET)
        path.chmod(0o600)
    return str(path)


def wait_ready(proc: subprocess.Popen, stdout: Path, timeout: float = 180.0) -> dict | None:
    """The daemon's `{"ready": ...}` line, or None if it exited or stayed silent past timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in stdout.read_text().splitlines():
            if line.startswith('{"ready"'):
                return json.loads(line)
        if proc.poll() is not None:
            return None
        time.sleep(0.05)
    return None


def wait_until(cond, timeout: float = 60.0) -> bool:
    """Whether cond() came true before the deadline (polled every 50 ms; checked once more at it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def scripted_peer(keys: list, layout: dict, delay: float, later: bool, bad: tuple, conn, gate: str = "") -> None:
    """A stand-in peer daemon, run in its own process (a NIXL agent must not live in the test
    process: nixl's wheel crashes at exit once UCX's IB module is loaded). A real NIXL agent
    over a pool holding `keys`' bytes (shake_128 of the key, as the tests store them), and a
    ROUTER that answers peer_hello / peer_lookup / peer_release after `delay` seconds each.
    `bad` block indices get a wrong crc32c; `later`: crc32c come with peer_release (this
    version's protocol) instead of with the lookup. `gate`: a path; each peer_lookup creates
    `gate`.asked, then is answered only once `gate` exists (the test holds a pull open for as long
    as it needs, no clock involved). Sends its address, then on "stop" the ops it was asked, and
    exits.
    """
    import hashlib
    import os

    import numpy as np
    import zmq

    from kvbm import ops
    from kvbm.blocks import KVLayout
    from kvbm.daemon.leases import namespace_of, server_key
    from kvbm.daemon.peerauth import Challenges
    from kvbm.daemon.peers import new_agent
    from kvbm.daemon.protocol import pack, unpack

    lay = KVLayout(**layout)
    nb = lay.block_nbytes
    ns = namespace_of("tiny", lay.fingerprint, "")
    index = {server_key(ns, k): i for i, k in enumerate(keys)}
    pool = np.concatenate([np.frombuffer(hashlib.shake_128(k).digest(nb), np.uint8) for k in keys])
    crcs = [int(c) ^ (1 if i in bad else 0) for i, c in
            enumerate(ops.crc32c_blocks(pool, np.arange(len(keys), dtype=np.uint64) * np.uint64(nb), nb))]
    agent = new_agent(f"scripted-{os.getpid()}", ["UCX"])
    agent.register_memory([(pool.ctypes.data, pool.nbytes, 0, "")], "DRAM")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    conn.send(f"tcp://127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}")
    asked: list[str] = []
    pending: dict[int, list] = {}
    challenges = Challenges(PEER_SECRET)
    while not conn.poll(0):
        if not sock.poll(20):
            continue
        ident, payload = sock.recv_multipart()
        msg = unpack(payload, 1 << 16)
        op = msg["op"]
        asked.append(op)
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and not conn.poll(0):
            time.sleep(0.01)
        if gate and op == "peer_lookup":
            open(gate + ".asked", "w").close()
            while not os.path.exists(gate) and not conn.poll(0):
                time.sleep(0.01)
        reply: dict = {"id": msg["id"], "ok": True}
        if op == "peer_hello" and "proof" not in msg:  # the handshake's first step (peerauth.py)
            challenge, proof = challenges.issue(msg["nonce"])
            reply.update(challenge=challenge, proof=proof)
        elif op == "peer_hello":
            assert challenges.check(msg["nonce"], msg["challenge"], msg["proof"])
            reply.update(session=b"s" * 16, agent=agent.name, metadata=agent.get_agent_metadata())
        elif op == "peer_lookup":
            idx = []
            for k in msg["keys"]:  # client keys within msg["namespace"]
                sk = server_key(msg["namespace"], k)
                if sk not in index:
                    break
                idx.append(index[sk])
            h = len(pending) + 1
            pending[h] = idx
            reply.update(handle=h if idx else 0, n=len(idx), nbytes=nb, addrs=[pool.ctypes.data + i * nb for i in idx])
            if later and msg.get("crcs_later"):
                reply["crcs_later"] = True
            else:
                reply["crcs"] = [crcs[i] for i in idx]
        elif op == "peer_release":
            idx = pending.pop(msg["handle"], [])
            if msg.get("crcs"):
                reply["crcs"] = [crcs[i] for i in idx]
        sock.send_multipart([ident, pack(reply)])
    conn.recv()
    conn.send(asked)
    os._exit(0)
