"""Peers are daemons that prove they hold the cluster's peer secret; a pull is bound to a namespace.

Issue 12 (2): knowing only the client token (or nothing, on the default loopback bind), a process
read the KV-event stream, took each topic for a namespace id, derived that namespace's server keys,
opened a peer session with peer_hello and READ the blocks over NIXL: 8 of 8, byte for byte.
`test_attack_reads_no_byte_of_another_namespace` runs exactly that attack (tests/peerattack.py).
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import time
from dataclasses import fields

import numpy as np
import pytest
import zmq

from daemonproc import HAVE_NIXL
from kvbm.daemon.config import DaemonConfig
from kvbm.daemon.protocol import request, unpack
from servedaemon import NB, TCP_TOKEN, Served, block, make_keys, peer_secret

pytestmark = pytest.mark.skipif(not HAVE_NIXL, reason="nixl is not installed")
HAS_PEER_SECRET = "peer_secret_file" in {f.name for f in fields(DaemonConfig)}


def _served(tmp, name, **daemon) -> Served:
    daemon.setdefault("nixl", True)
    if HAS_PEER_SECRET and "peer_secret_file" not in daemon:
        daemon["peer_secret_file"] = peer_secret(tmp)
    if not HAS_PEER_SECRET:
        daemon.pop("peer_secret_file", None)
    return Served(tmp, name, daemon=daemon).start()


@pytest.fixture
def started(tmp_path):
    ds: list[Served] = []

    def start(name, **daemon):
        d = _served(tmp_path, name, **daemon)
        ds.append(d)
        return d

    yield start
    for d in ds:
        d.stop()


@pytest.mark.parametrize("token", ["", "client-token"], ids=["no-token", "client-token"])
def test_attack_reads_no_byte_of_another_namespace(started, token):
    from peerattack import attack

    # (tcp:// needs a token since session 11: without one the request socket is the default ipc://)
    where = {"address": "tcp://127.0.0.1:*"} if token else {}
    d = started("victim", events="tcp://127.0.0.1:*", token=token, **where)
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=attack, args=(d.address, d.info["events"], token, child), daemon=True)
    proc.start()
    victim_keys = make_keys("victim", 8)
    try:
        with d.client(salt="victim-tenant", token=token) as victim, d.client(salt="probe", token=token) as probe:
            deadline = time.monotonic() + 180
            i = 0
            while not conn.poll(0.05):  # PUB/SUB: store until the attacker sees events
                assert time.monotonic() < deadline and proc.is_alive(), "the attacker never joined"
                k = make_keys(f"probe{i}", 1)
                probe.store(k, [block(k[0])])
                i += 1
            conn.recv()
            assert victim.store(victim_keys, [block(k) for k in victim_keys]) == 8
            conn.send("stored")
            assert conn.poll(600), "the attacker did not finish"
            result = conn.recv()
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    assert result["topics"] >= 2  # it saw the events of both namespaces
    want = {k.hex(): hashlib.sha256(block(k).tobytes()).hexdigest() for k in victim_keys}
    matched = sum(1 for k, h in result["read"].items() if want.get(k) == h)
    assert matched == 0, f"the attacker read {matched} of 8 blocks of another namespace: {result['stages']}"
    # and it never got a peer session: every hello form was refused
    assert not any(s[0].startswith("peer_lookup") for s in result["stages"]), result["stages"]


# ---------------------------------------------------------------- the handshake, from the outside

class _Peer:
    """A hand-driven peer: the handshake with a given secret, then raw peer ops."""

    def __init__(self, address: str, secret: bytes) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.secret = secret
        self.rid = 0
        self.session = None

    def ask(self, op: str, **fields) -> dict:
        self.rid += 1
        # (the test daemons' token: tcp:// needs one; a daemon without one ignores it)
        self.sock.send(request(op, self.rid, TCP_TOKEN, self.session, **fields))
        assert self.sock.poll(180_000), f"no answer to {op}"
        return unpack(self.sock.recv(), 1 << 20)

    def hello(self) -> dict:
        from kvbm.daemon.peerauth import prove, server_ok

        nonce = os.urandom(32)
        first = self.ask("peer_hello", nonce=nonce)
        assert first["ok"], first
        assert server_ok(self.secret, nonce, first["challenge"], first["proof"]) or self.secret == b"wrong"
        self.answer = dict(nonce=nonce, challenge=first["challenge"],
                           proof=prove(self.secret, b"puller", nonce, first["challenge"]))
        second = self.ask("peer_hello", **self.answer)
        if second.get("ok"):
            self.session = second["session"]
        return second

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


@pytest.mark.skipif(not HAS_PEER_SECRET, reason="before daemon.peer_secret_file")
def test_handshake_needs_the_secret_and_binds_lookups_to_a_namespace(started, tmp_path):
    from kvbm.daemon.leases import namespace_of
    from servedaemon import LAYOUT

    d = started("a")
    secret = open(peer_secret(tmp_path), "rb").read().strip()
    keys = make_keys("bound", 8)
    with d.client(salt="tenant-x") as x:
        assert x.store(keys, [block(k) for k in keys]) == 8
        ns_x = namespace_of("tiny", LAYOUT.fingerprint, "tenant-x")
        ns_y = namespace_of("tiny", LAYOUT.fingerprint, "tenant-y")
        bad = _Peer(d.address, b"wrong")
        try:
            r = bad.hello()  # a wrong secret: no session
            assert not r["ok"] and r["error"] == "unauthorized"
            r = bad.ask("peer_lookup", namespace=ns_x, keys=keys)
            assert not r["ok"]
        finally:
            bad.close()
        p = _Peer(d.address, secret)
        try:
            assert p.hello()["ok"]
            r = p.ask("peer_hello", **p.answer)  # a challenge is single-use: a replay is refused
            assert not r["ok"] and r["error"] == "unauthorized"
            r = p.ask("peer_lookup", keys=keys)  # no namespace: the old form is refused
            assert not r["ok"] and r["error"] == "bad_field"
            r = p.ask("peer_lookup", namespace=ns_y, keys=keys)  # X's keys asked within Y
            assert r["ok"] and r["n"] == 0
            r = p.ask("peer_lookup", namespace=ns_x, keys=keys)
            assert r["ok"] and r["n"] == 8 and len(r["addrs"]) == 8
            assert p.ask("peer_release", handle=r["handle"])["ok"]
        finally:
            p.close()
        st = x.stats()["daemon"]
        assert st["peer_auth_failures"] >= 1


@pytest.mark.skipif(not HAS_PEER_SECRET, reason="before daemon.peer_secret_file")
def test_peer_without_a_secret_or_with_another_one_pulls_nothing(started, tmp_path):
    a = started("a", address="tcp://127.0.0.1:*")
    keys = make_keys("guarded", 6)
    with a.client() as ca:
        assert ca.store(keys, [block(k) for k in keys]) == 6
    other = peer_secret(tmp_path, "other.secret")
    b = started("b", peers=[a.address], peer_timeout_s=60.0, peer_secret_file=other)
    with b.client() as cb:
        assert cb.lookup(keys) == (0, [])
        assert cb.stats()["daemon"]["peer_auth_failures"] >= 1  # a's proof did not verify here
    with a.client() as ca:
        assert ca.stats()["daemon"]["peer_pull_blocks"] == 0
    c = Served(tmp_path, "c", daemon={"nixl": True, "peers": [a.address], "peer_timeout_s": 60.0}).start()
    try:
        assert "peer_secret_file" in c.stderr()  # peers configured without a secret: said so, no pulls
        with c.client() as cc:
            assert cc.lookup(keys) == (0, [])
    finally:
        c.stop()


@pytest.mark.skipif(not HAS_PEER_SECRET, reason="before daemon.peer_secret_file")
def test_pull_is_bound_to_the_pulling_clients_namespace(started):
    a = started("a", address="tcp://127.0.0.1:*")
    b = started("b", address="tcp://127.0.0.1:*", peers=[a.address], peer_timeout_s=60.0)
    keys = make_keys("x-only", 8)
    with a.client(salt="tenant-x") as x:
        assert x.store(keys, [block(k) for k in keys]) == 8
    with b.client(salt="tenant-y") as y:  # Y knows X's client keys: still not X's blocks
        assert y.lookup(keys) == (0, [])
        assert y.load(keys, [np.zeros(NB, np.uint8) for _ in keys]) == 0
    with b.client(salt="tenant-x") as x:  # X at b pulls its own blocks from a
        assert x.lookup(keys) == (8, ["g2"] * 8)
        out = [np.zeros(NB, np.uint8) for _ in keys]
        assert x.load(keys, out) == 8
        assert all(np.array_equal(o, block(k)) for o, k in zip(out, keys))


def test_random_peer_lookups_leave_no_state(started, tmp_path):
    """Issue 12 (5): every peer lookup of a random key left ~236 B in the `origin` map, forever."""
    a = started("a", address="tcp://127.0.0.1:*")
    b = started("b", address="tcp://127.0.0.1:*", peers=[a.address], peer_timeout_s=60.0)
    with a.client() as ca, b.client() as cb:
        base_a, base_b = ca.stats()["daemon"], cb.stats()["daemon"]
        for i in range(20):  # 10,000 random keys missed at b: b asks a for each
            assert cb.lookup([os.urandom(16) for _ in range(500)]) == (0, [])
        p = _Peer(a.address, open(peer_secret(tmp_path), "rb").read().strip())
        try:
            assert p.hello()["ok"]
            for i in range(20):  # 10,000 random keys asked of a by a peer
                r = p.ask("peer_lookup", namespace=os.urandom(16), keys=[os.urandom(16) for _ in range(500)])
                assert r["ok"] and r["n"] == 0
        finally:
            p.close()
        st_a, st_b = ca.stats()["daemon"], cb.stats()["daemon"]
    for before, after in ((base_a, st_a), (base_b, st_b)):
        assert after["origin_keys"] == before["origin_keys"]
        assert after["peer_challenges"] <= 1
        assert after["onboarding_keys"] == 0
    assert st_a["requests"] - base_a["requests"] >= 20 and st_b["lookup_blocks"] - base_b["lookup_blocks"] == 10_000


# ---------------------------------------------------------------- the handshake's parts

def test_challenges_are_single_use_bounded_and_expire():
    from kvbm.daemon.peerauth import MAX_CHALLENGES, Challenges, prove, server_ok

    now = [0.0]
    secret = b"s" * 32
    ch = Challenges(secret, clock=lambda: now[0])
    nonce = os.urandom(32)
    challenge, proof = ch.issue(nonce)
    assert server_ok(secret, nonce, challenge, proof) and not server_ok(b"t" * 32, nonce, challenge, proof)
    # the server's proof reflected back as the puller's is refused (one label per direction)
    assert not ch.check(nonce, challenge, proof)
    challenge, _ = ch.issue(nonce)
    assert not ch.check(os.urandom(32), challenge, prove(secret, b"puller", nonce, challenge))  # other nonce
    challenge, _ = ch.issue(nonce)
    answer = prove(secret, b"puller", nonce, challenge)
    assert ch.check(nonce, challenge, answer) and not ch.check(nonce, challenge, answer)  # once only
    challenge, _ = ch.issue(nonce)
    now[0] += 3600  # expired
    assert not ch.check(nonce, challenge, prove(secret, b"puller", nonce, challenge))
    for _ in range(10 * MAX_CHALLENGES):  # a flood of first steps: bounded
        ch.issue(os.urandom(32))
    assert len(ch) <= MAX_CHALLENGES


@pytest.mark.skipif(not HAS_PEER_SECRET, reason="before daemon.peer_secret_file")
def test_bad_peer_secret_file_is_one_line_error(tmp_path):
    import subprocess
    import sys

    import yaml

    from kvbm.config import ConfigError

    loose = tmp_path / "loose.secret"
    loose.write_bytes(b"x" * 32)
    loose.chmod(0o644)
    short = tmp_path / "short.secret"
    short.write_bytes(b"tiny")
    short.chmod(0o600)
    same = tmp_path / "same.secret"
    same.write_bytes(b"the-client-token-0123456789")
    same.chmod(0o600)
    with pytest.raises(ConfigError, match="chmod 600"):
        DaemonConfig.from_dict({"peer_secret_file": str(loose)})
    with pytest.raises(ConfigError, match="at least 16"):
        DaemonConfig.from_dict({"peer_secret_file": str(short)})
    with pytest.raises(ConfigError, match="client token"):
        DaemonConfig.from_dict({"peer_secret_file": str(same), "token": "the-client-token-0123456789"})
    shm = f"kvbm-test-{os.urandom(4).hex()}"
    cfg = tmp_path / "kvbm.yaml"
    cfg.write_text(yaml.safe_dump({
        "namespace": {"model": "tiny"}, "layout": {"num_layers": 2, "num_kv_heads": 2, "head_dim": 64, "block_size": 16},
        "tiers": [{"name": "g2", "capacity": 8, "storage": "host"}],
        "daemon": {"address": f"ipc://{tmp_path}/d.sock", "events": "", "metrics": "", "shm_name": shm,
                   "nixl": False, "peer_secret_file": str(loose)}}))
    out = subprocess.run([sys.executable, "-m", "kvbm.cli", "serve", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and "peer_secret_file" in out.stderr, out.stderr
    assert not os.path.exists(f"/dev/shm/{shm}")
