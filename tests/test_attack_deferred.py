"""Requests that wait (red team round 3, H58): a tenant queueing deferred requests.

A load whose blocks sit in G3/G4 waits (its reply deferred) while they come up to G2; a store into
a full G2 waits for the offloader (kvbm/daemon/onboard.py). Such a request leaves libzmq's queue,
so a raw client may pipeline as many as it likes, and before each one was held until its deadline
whatever its session or tenant already had waiting: keys, a closure, the offloader's headroom, and
a look on every turn of the loop. Now they are bounded per session (onboard.SESSION_DEFERRED), per
owner (half of onboard.MAX_DEFERRED, the last eighth for owners with none waiting) and in all;
past a bound the request is answered `busy` at once, and a session that ends (bye, lease) has its
waiting requests answered `no_session` at once, their counts given back.

alice's G4 objects are FIFOs (a read of one hangs for good: the G4 timeout here is 300 s) and the
onboard wait is 300 s, so her loads wait for as long as the test wants; nothing is timed: counts
are read from the operator's stats, replies are waited for with generous deadlines.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

zmq = pytest.importorskip("zmq")

from daemonproc import wait_until  # noqa: E402
from kvbm.daemon.onboard import MAX_DEFERRED, SESSION_DEFERRED  # noqa: E402
from kvbm.daemon.protocol import pack, request, unpack  # noqa: E402
from servedaemon import LAYOUT_DICT, NB, TCP_TOKEN, Served, block, make_keys  # noqa: E402
from test_tenant_tokens import ALICE, BOB, DEADLINE_S  # noqa: E402

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")


def _served(tmp_path) -> Served:
    tiers = [{"name": "g2", "capacity": 16, "eviction": "lru", "storage": "host", "headroom": 4},
             {"name": "g4", "capacity": 256, "eviction": "lru",
              "storage": {"name": "object", "url": f"file://{tmp_path}/bucket/g4", "timeout": 300.0}}]
    return Served(tmp_path, "d", tiers=tiers, daemon={
        "address": "tcp://127.0.0.1:0", "token": TCP_TOKEN, "onboard_wait_s": 300.0, "lease_s": 300.0,
        "tenants": {"alice": {"token": ALICE, "share": 0.25}, "bob": {"token": BOB, "share": 0.25}}}).start()


def _objects(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def _in_g4(c, keys: list) -> bool:
    n, where = c.lookup(keys, remote=False)
    return n == len(keys) and all(w == "g4" for w in where)


def _deferred(op) -> dict:
    return op.stats()["daemon"]["deferred"]


def _hello(sock, token: str, salt: str) -> bytes:
    sock.send(request("hello", 1, token, model="tiny", layout=LAYOUT_DICT, salt=salt))
    assert sock.poll(int(DEADLINE_S * 1000))
    r = unpack(sock.recv(), 1 << 20)
    assert r["ok"], r
    return r["session"]


def _replies(sock, n: int) -> list[dict]:
    out = []
    while len(out) < n:
        assert sock.poll(int(DEADLINE_S * 1000)), f"{len(out)} of {n} replies"
        out.append(unpack(sock.recv(), 1 << 20))
    return out


def _gather(socks: list, n: int) -> list[dict]:
    """n replies from any of socks (the daemon answers connections in turn)."""
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    out: list[dict] = []
    while len(out) < n:
        ready = poller.poll(int(DEADLINE_S * 1000))
        assert ready, f"{len(out)} of {n} replies"
        for s, _ in ready:
            while len(out) < n and s.poll(0):
                out.append(unpack(s.recv(), 1 << 20))
    return out


def test_a_tenants_deferred_loads_are_bounded_per_session_and_per_tenant_and_released_when_it_goes(tmp_path):
    d = _served(tmp_path)
    ctx = zmq.Context()
    socks = []
    fifos: list[Path] = []
    a = b = op = None
    try:
        op = d.client(salt="op", timeout=DEADLINE_S)  # daemon.token: the operator's stats
        a = d.client(token=ALICE, salt="s", timeout=DEADLINE_S)
        cold = make_keys("alice/cold", 32)
        for i in range(0, 32, 4):
            assert a.store(cold[i:i + 4], [block(k) for k in cold[i:i + 4]]) == 4
        assert wait_until(lambda: _in_g4(a, cold[:4]), DEADLINE_S)
        # every object in the bucket is alice's: each becomes a FIFO, whose read hangs
        root = tmp_path / "bucket" / "g4"
        for p in _objects(root):
            p.unlink()
            os.mkfifo(p, 0o600)
            fifos.append(p)
        assert fifos
        victim = [cold[0]]

        # one session, 100 loads of one cold block pipelined: SESSION_DEFERRED wait, the rest busy
        s1 = ctx.socket(zmq.DEALER)
        s1.setsockopt(zmq.LINGER, 0)
        s1.connect(d.address)
        socks.append(s1)
        sid = _hello(s1, ALICE, "s")
        for i in range(100):
            s1.send(request("load_prepare", 10 + i, ALICE, sid, keys=victim))
        got = _replies(s1, 100 - SESSION_DEFERRED)
        assert all(not r["ok"] and r["error"] == "busy" and "session" in r["message"] for r in got), got[:3]
        assert _deferred(op)["waiting"] == SESSION_DEFERRED
        # many sessions: her requests waiting stop at half of the daemon's bound, whichever of
        # her sessions they came on (the router takes connections in turn)
        sids = []
        for j in range(40):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(d.address)
            socks.append(s)
            sid_j = _hello(s, ALICE, "s")
            sids.append((s, sid_j))
            for i in range(SESSION_DEFERRED):
                s.send(request("load_prepare", 10 + i, ALICE, sid_j, keys=victim))
        want = 40 * SESSION_DEFERRED + SESSION_DEFERRED - MAX_DEFERRED // 2
        refused = _gather([s for s, _ in sids], want)
        assert all(not r["ok"] and r["error"] == "busy" and "tenant" in r["message"] for r in refused), refused[:3]
        st = _deferred(op)
        assert st["waiting"] == MAX_DEFERRED // 2 and st["owners"] == 1, st

        # bob: his G2 ops are answered, his own G4 block comes up (his request may wait: the rest
        # of the bound is not alice's), byte for byte
        b = d.client(token=BOB, salt="s", timeout=DEADLINE_S)
        mine = make_keys("bob/cold", 32)
        for i in range(0, 32, 4):
            assert b.store(mine[i:i + 4], [block(k) for k in mine[i:i + 4]]) == 4
        assert wait_until(lambda: _in_g4(b, mine[:2]), DEADLINE_S)
        hot = make_keys("bob/hot", 2)
        assert b.store(hot, [block(k) for k in hot]) == 2
        out = [np.zeros(NB, np.uint8) for _ in hot]
        assert b.load(hot, out) == 2 and all(np.array_equal(o, block(k)) for o, k in zip(out, hot))

        def bob_loads_his_cold_block() -> bool:
            o = [np.zeros(NB, np.uint8)]
            n = b.load(mine[:1], o)
            assert n == 0 or np.array_equal(o[0], block(mine[0]))
            return n == 1

        assert wait_until(bob_loads_his_cold_block, DEADLINE_S)

        # alice says bye: every load of hers still waiting is answered no_session now, not at its
        # deadline (300 s), and its count comes back
        everyone = [(s1, sid)] + sids
        for s, sid_j in everyone:
            s.send(request("bye", 99, ALICE, sid_j))
        rs = _gather([s for s, _ in everyone], len(everyone) + MAX_DEFERRED // 2)
        assert sum(r.get("error") == "no_session" for r in rs) == MAX_DEFERRED // 2, rs
        assert sum(r["ok"] and r["id"] == 99 for r in rs) == len(everyone)
        st = _deferred(op)
        assert st["waiting"] == 0 and st["owners"] == 0, st
        assert d.proc.poll() is None
    finally:
        for p in fifos:  # let the hung reads go
            try:
                os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        for s in socks:
            s.close(0)
        for c in (a, b, op):
            if c is not None:
                c.close()
        ctx.term()
        d.stop()
