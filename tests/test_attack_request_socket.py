"""Attacks on the daemon's request socket over tcp:// (conn_gate.py, config.py).

- Who may connect: a tcp port takes every local user (loopback too) and the daemon cannot tell
  their uids apart there, so a tcp:// request socket without `daemon.token` trusted every uid
  on the box with the daemon owner's quotas. Now it is refused at start (one line, exit 2).
- A connection flood: with a token, a stranger still gets a connection (a file descriptor of
  the daemon) before any request proves anything. Before, nothing bounded them: a local user
  opening RLIMIT_NOFILE connections left the daemon no descriptor for windows, G3, G4 or new
  clients. Now at most a few connections wait for their first authenticated request (the
  oldest is shut down when another comes), and a client that showed the token is never cut.
"""

from __future__ import annotations

import os
import resource
import socket
import struct
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import yaml

zmq = pytest.importorskip("zmq")

from daemonproc import wait_ready, wait_until  # noqa: E402
from kvbm.client import Client  # noqa: E402
from kvbm.daemon.protocol import request  # noqa: E402
from servedaemon import LAYOUT, LAYOUT_DICT, NB, block, make_keys  # noqa: E402

TOKEN = "flood-test-token-0123456789"
DEADLINE_S = 120.0


def _config(tmp_path, **daemon) -> str:
    cfg = {"namespace": {"model": "tiny"}, "layout": LAYOUT_DICT,
           "tiers": [{"name": "g2", "capacity": 64, "eviction": "lru", "storage": "host"}],
           "daemon": {"events": "", "metrics": "", "kv_events": "", "shm_name": f"kvbm-test-{uuid.uuid4().hex[:12]}",
                      "nixl": False, "lease_s": 30.0, **daemon}}
    path = tmp_path / "kvbm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("KVBM_")}


def test_tcp_without_a_token_is_refused_in_one_line(tmp_path):
    """Loopback included: any local user reaches a tcp port, so a tokenless tcp daemon trusted them all."""
    cfg = _config(tmp_path, address="tcp://127.0.0.1:0")
    r = subprocess.run([sys.executable, "-m", "kvbm.cli", "serve", "--config", cfg], capture_output=True,
                       text=True, env=_env(), timeout=300)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "daemon.address" in lines[0] and "every local user" in lines[0] and "daemon.token_file" in lines[0]
    # the same config with a token (here from the environment) starts
    r = subprocess.run([sys.executable, "-m", "kvbm.cli", "config", "check", cfg], capture_output=True, text=True,
                       env={**_env(), "KVBM_DAEMON__TOKEN": TOKEN}, timeout=300)
    assert r.returncode == 0, r.stderr


def _raw_flood(port: int, n: int) -> list[socket.socket]:
    """n TCP connections that never say a word of ZMTP (connect() in flight, not waited for)."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        socks.append(s)
    return socks


def test_a_connection_flood_neither_kills_the_daemon_nor_cuts_its_clients(tmp_path):
    """A stranger (no token) opens more connections than the daemon may open files, first raw
    TCP ones, then zmq DEALERs that finish the handshake, reconnect whenever they are cut and
    send requests with a wrong token. The daemon lives through both, keeps descriptors free,
    a client that connected before the flood is served right through it, and after it a new
    client stores and loads a block byte for byte."""
    limit = 256
    cfg = _config(tmp_path, address="tcp://127.0.0.1:0", token=TOKEN)
    out = tmp_path / "out.txt"
    out.write_text("")
    proc = subprocess.Popen([sys.executable, "-m", "kvbm.cli", "serve", "--config", cfg], stdout=out.open("w"),
                            stderr=(tmp_path / "err.txt").open("w"), env=_env(),
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)))
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, 4096)
    raw: list[socket.socket] = []
    dealers: list = []
    clients: list[Client] = []
    keys = make_keys("before-the-flood", 4)

    def fds() -> int:
        return len(os.listdir(f"/proc/{proc.pid}/fd"))

    def alive() -> None:
        assert proc.poll() is None, f"the daemon died: {(tmp_path / 'err.txt').read_text()[-2000:]}"

    def client() -> Client:
        clients.append(Client(address, model="tiny", layout=LAYOUT, token=TOKEN, timeout=DEADLINE_S))
        return clients[-1]

    def served(c: Client) -> bool:
        dest = [np.zeros(NB, np.uint8) for _ in keys]
        return c.load(keys, dest) == 4 and all(np.array_equal(d, block(k)) for d, k in zip(dest, keys))

    def cut() -> int:
        return -1 if proc.poll() is not None else c0.stats()["daemon"]["connections"]["cut"]

    try:
        info = wait_ready(proc, out, 180)
        assert info is not None, (tmp_path / "err.txt").read_text()[-2000:]
        address = info["address"]
        port = int(address.rsplit(":", 1)[1])
        c0 = client()
        assert c0.store(keys, [block(k) for k in keys]) == 4
        base = fds()
        try:
            # 1. raw connections, more than the daemon may open files
            raw = _raw_flood(port, limit + 64)
            assert wait_until(lambda: cut() < 0 or cut() >= 64, DEADLINE_S)
            alive()
            assert served(c0)  # through the flood, on its own connection
            assert wait_until(lambda: fds() < limit - 64, DEADLINE_S), fds()  # room for windows, G3, G4
            alive()

            # 2. zmq strangers that finish the handshake (and reconnect when cut), half of them
            #    asking with a wrong token
            for i in range(limit + 64):
                d = ctx.socket(zmq.DEALER)
                d.setsockopt(zmq.LINGER, 0)
                d.connect(address)
                if i % 2:
                    d.send(request("hello", 1, "wrong-token", None, model="tiny", layout=LAYOUT_DICT), zmq.NOBLOCK)
                dealers.append(d)
            before = cut()
            assert wait_until(lambda: cut() < 0 or cut() >= before + limit, DEADLINE_S)
            alive()
            for d in dealers[1::2][:16]:  # a wrong token is refused, never served
                if d.poll(0):
                    assert b"unauthorized" in d.recv()
            assert served(c0)
            assert c0.stats()["daemon"]["connections"]["waiting"] <= max(8, limit // 8)
            alive()
        finally:
            for s in raw:
                s.close()
            for d in dealers:
                d.close(0)
            ctx.term()
        # 3. the flood is gone: a new client stores and loads, byte for byte; descriptors return
        c1 = client()
        k = make_keys("after-the-flood", 2)
        assert c1.store(k, [block(x) for x in k]) == 2
        dest = [np.zeros(NB, np.uint8) for _ in k]
        assert c1.load(k, dest) == 2 and all(np.array_equal(d, block(x)) for d, x in zip(dest, k))
        assert served(c1)
        assert wait_until(lambda: fds() <= base + 8, DEADLINE_S), (fds(), base)
        st = c1.stats()["daemon"]["connections"]
        assert st["open"] <= 4 and st["waiting"] <= 2, st
        alive()
    finally:
        for c in clients:
            c.close()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# ---------------------------------------------------------------- a message that never ends


def _zmtp(port: int) -> socket.socket:
    """A raw ZMTP 3.0 peer (NULL mechanism, as a DEALER): what libzmq's own sender never does,
    an attacker's does."""
    s = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S)
    s.sendall(b"\xff" + b"\0" * 8 + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\0") + b"\0" * 32)
    body = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
    s.sendall(bytes([0x04, len(body)]) + body)
    got = b""
    while len(got) < 64:  # the daemon's greeting (then its READY, left unread)
        chunk = s.recv(64 - len(got))
        assert chunk, "the daemon closed the handshake"
        got += chunk
    return s


def _frame(payload: bytes, more: bool) -> bytes:
    if len(payload) < 256:
        return bytes([0x01 if more else 0x00, len(payload)]) + payload
    return bytes([0x03 if more else 0x02]) + struct.pack(">Q", len(payload)) + payload


def _endless(s: socket.socket, limit: int) -> int:
    """Frames of one message with MORE set, 64 KiB each, until the daemon hangs up or `limit`."""
    chunk = _frame(b"x" * (64 << 10), more=True)
    sent = 0
    try:
        while sent < limit:
            s.sendall(chunk)
            sent += len(chunk)
    except OSError:  # reset or broken pipe: the daemon cut this connection
        return sent
    return -1


@pytest.mark.parametrize("authenticated", [False, True], ids=["stranger", "token-holder"])
def test_a_message_that_never_ends_is_cut_not_buffered(tmp_path, authenticated):
    """A peer sends one message whose frames all carry MORE, forever. libzmq bounds a
    connection's queue in whole messages and MAXMSGSIZE per frame, so it buffered this one
    without end: 776 MiB in 4 s from one Python sender, from a stranger with no token (the
    token is checked on messages, and this one never completes). Now the gate compares what
    the kernel received on each connection with what the daemon read from it and shuts down
    a connection more than its backlog ahead (one request before the token was shown, the
    queued requests after). The daemon's memory stays bounded and its clients are served."""
    cfg = _config(tmp_path, address="tcp://127.0.0.1:0", token=TOKEN)
    out = tmp_path / "out.txt"
    out.write_text("")
    proc = subprocess.Popen([sys.executable, "-m", "kvbm.cli", "serve", "--config", cfg], stdout=out.open("w"),
                            stderr=(tmp_path / "err.txt").open("w"), env=_env())
    clients: list[Client] = []

    def rss_mib() -> int:
        for line in open(f"/proc/{proc.pid}/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) >> 10
        return 0

    try:
        info = wait_ready(proc, out, 180)
        assert info is not None, (tmp_path / "err.txt").read_text()[-2000:]
        address = info["address"]
        port = int(address.rsplit(":", 1)[1])
        c0 = Client(address, model="tiny", layout=LAYOUT, token=TOKEN, timeout=DEADLINE_S)
        clients.append(c0)
        keys = make_keys("beside-the-endless", 2)
        assert c0.store(keys, [block(k) for k in keys]) == 2
        base = rss_mib()
        s = _zmtp(port)
        try:
            if authenticated:  # a whole request with the token first: this connection is a client's
                s.sendall(_frame(request("stats", 1, TOKEN), more=False))
                got = b""
                while b"\xa2ok\xc3" not in got:  # its reply (ok: true): the daemon read it, token and all
                    chunk = s.recv(1 << 16)
                    assert chunk, "the daemon hung up on a whole request with the token"
                    got += chunk
            limit = 2 << 30
            sent = _endless(s, limit)
        finally:
            s.close()
        assert proc.poll() is None, (tmp_path / "err.txt").read_text()[-2000:]
        assert 0 < sent < limit, "the daemon kept reading a message that never ends"
        st = c0.stats()["daemon"]["connections"]
        assert st["overfed"] == 1, st
        print(f"cut after {sent >> 20} MiB; daemon RSS {base} -> {rss_mib()} MiB")
        assert rss_mib() < base + 512
        dest = [np.zeros(NB, np.uint8) for _ in keys]
        assert c0.load(keys, dest) == 2 and all(np.array_equal(d, block(k)) for d, k in zip(dest, keys))
    finally:
        for c in clients:
            c.close()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# ---------------------------------------------------------------- pins at the quota edge over tcp


def test_a_tcp_tenant_with_many_salts_cannot_hold_all_of_g2(tmp_path):
    """G2 blocks a client keeps busy are bounded per namespace and, for other users, per uid
    (namespace_share of G2). On tcp:// the daemon knows no uid, and tcp clients were exempt
    from the uid quota like the daemon's own user: a tenant with the token and two salts (two
    namespaces; vLLM's per-request cache salts make many) pinned all of G2, and every other
    tenant's store failed. Now tcp clients, together, hold at most namespace_share of G2."""
    from kvbm.daemon.protocol import RemoteError

    cfg = _config(tmp_path, address="tcp://127.0.0.1:0", token=TOKEN, room_wait_s=0.2, room_stall_s=0.1)
    out = tmp_path / "out.txt"
    out.write_text("")
    proc = subprocess.Popen([sys.executable, "-m", "kvbm.cli", "serve", "--config", cfg], stdout=out.open("w"),
                            stderr=(tmp_path / "err.txt").open("w"), env=_env())
    clients: list[Client] = []
    try:
        info = wait_ready(proc, out, 180)
        assert info is not None, (tmp_path / "err.txt").read_text()[-2000:]

        def client(salt: str) -> Client:
            clients.append(Client(info["address"], model="tiny", layout=LAYOUT, salt=salt, token=TOKEN,
                                  timeout=DEADLINE_S))
            return clients[-1]

        share = 32  # namespace_share 0.5 of 64 blocks
        held = 0
        for salt in ("hog-1", "hog-2"):  # one tenant, two namespaces
            hog = client(salt)
            keys = make_keys(salt, share)
            for i in range(0, share, 4):  # one-shot stores (a two-phase one would hold a reservation)
                assert hog.store(keys[i:i + 4], [block(k) for k in keys[i:i + 4]]) == 4
            try:
                held += hog.pin(keys)
            except RemoteError as exc:  # now: the second salt's pins are refused
                assert exc.code == "quota", exc
        assert held == share  # before: 64, all of G2
        victim = client("victim")
        keys = make_keys("victim", 4)
        assert victim.store(keys, [block(k) for k in keys]) == 4  # before: 0 (G2 all pinned)
        dest = [np.zeros(NB, np.uint8) for _ in keys]
        assert victim.load(keys, dest) == 4 and all(np.array_equal(d, block(k)) for d, k in zip(dest, keys))
    finally:
        for c in clients:
            c.close()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# ---------------------------------------------------------------- a client that never reads


def test_replies_a_client_never_reads_are_bounded(tmp_path):
    """A client opens a session and sends requests without ever reading a reply. The daemon
    queued up to 10,000 replies per connection (SNDHWM), ~120 MiB of lookup replies each, and
    every connection a token holder opens had its own. Now a connection holds at most
    REPLY_HWM (4,096) replies (plus what the kernel buffers); the rest are dropped (this client
    is not listening), and the daemon serves others meanwhile."""
    from kvbm.daemon.server import REPLY_HWM
    from servedaemon import Served

    d = Served(tmp_path, "d").start()
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVHWM, 1)
    s.setsockopt(zmq.RCVBUF, 4096)
    other = None
    try:
        s.connect(d.address)
        s.send(request("hello", 1, "", None, model="tiny", layout=LAYOUT_DICT))
        assert s.poll(DEADLINE_S * 1000)
        from kvbm.daemon.protocol import unpack

        sid = unpack(s.recv(), 1 << 20)["session"]
        other = d.client()
        before = other.stats()["daemon"]["requests"]
        n = 20_000
        for i in range(n):
            s.send(request("stats", 10 + i, "", sid))  # ~1 KiB each, never read (until the end)
        assert wait_until(lambda: other.stats()["daemon"]["requests"] >= before + n, DEADLINE_S)
        keys = make_keys("while-one-never-reads", 2)  # the daemon serves others meanwhile
        assert other.store(keys, [block(k) for k in keys]) == 2
        got = 0
        while s.poll(5000):  # what was queued for it (a wait for absence: the queue is full already)
            s.recv()
            got += 1
        print(f"{got} of {n} replies were queued for a client that never read")
        assert REPLY_HWM <= 4096 and 0 < got <= 5000  # before: 9,999
        assert d.proc.poll() is None
    finally:
        if other is not None:
            other.close()
        s.close(0)
        ctx.term()
        d.stop()
