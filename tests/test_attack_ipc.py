"""Tenants on the ipc:// socket (red team round 3, H58).

A named tenant's token works on ipc:// as on tcp:// (its clients run as the daemon's uid, or the
operator opened the socket to their users). Before, the tcp gate's bounds (kvbm/daemon/conn_gate.py)
did not exist on ipc://: one tenant could hold every connection the daemon could take (a share of
the loop growing with them, RCVHWM requests and REPLY_HWM replies queued for each), and replies it
never read stayed queued in the daemon whatever their size. Now the gate runs on ipc:// too: a
connection whose requests carry a tenant's token (or come from another uid) is counted and cut as
on tcp; one of the daemon's own uid without a tenant's token (the operator's) is left alone.
Counts decide, never time: conditions are waited for with generous deadlines.
"""

from __future__ import annotations

import subprocess

import pytest

zmq = pytest.importorskip("zmq")

from daemonproc import wait_until  # noqa: E402
from kvbm.daemon.conn_gate import owner_cap  # noqa: E402
from kvbm.daemon.protocol import request, unpack  # noqa: E402
from servedaemon import TCP_TOKEN, Served, block, make_keys  # noqa: E402
from test_attack_starve import _bob_round, _dealer, _rss_mib  # noqa: E402
from test_tenant_tokens import ALICE, BOB, DEADLINE_S  # noqa: E402


def _served_ipc(tmp_path, nofile: int | None = None) -> Served:
    """alice and bob (tokens) and the operator (daemon.token) on an ipc:// socket."""
    import resource
    from unittest import mock

    tiers = [{"name": "g2", "capacity": 64, "eviction": "lru", "storage": "host"}]
    d = Served(tmp_path, "d", tiers=tiers, daemon={
        "token": TCP_TOKEN,
        "tenants": {"alice": {"token": ALICE, "share": 0.25}, "bob": {"token": BOB, "share": 0.25}}})
    if nofile is None:
        return d.start()
    real = subprocess.Popen

    def popen(*a, **kw):
        kw["preexec_fn"] = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        return real(*a, **kw)

    with mock.patch.object(subprocess, "Popen", popen):
        return d.start()


def _ask(s, msg: bytes) -> dict:
    s.send(msg)
    assert s.poll(int(DEADLINE_S * 1000)), "no answer"
    return unpack(s.recv(), 1 << 22)


def test_one_tenant_holds_at_most_a_quarter_of_the_ipc_connections_the_operator_is_not_capped(tmp_path):
    """Under a 256-descriptor limit (128 connections, conn_gate.caps) alice opens 60 ipc
    connections, one lookup each: before, all 60 were served. Now at most a quarter (32, minus
    her Client's own) are; the others get `busy` and are shut down. bob is served byte for byte.
    The operator's (the daemon's own uid, daemon.token) 60 connections are all served: the gate
    leaves them alone."""
    d = _served_ipc(tmp_path, nofile=256)
    assert d.address.startswith("ipc://")
    ctx = zmq.Context()
    socks = []
    a = b = op = None
    try:
        a = d.client(token=ALICE, salt="s", timeout=DEADLINE_S)
        b = d.client(token=BOB, salt="s", timeout=DEADLINE_S)
        op = d.client(salt="op", timeout=DEADLINE_S)
        k = make_keys("alice/one", 1)
        assert a.store(k, [block(k[0])]) == 1
        ask = request("lookup", 1, ALICE, a.session, keys=k * 64, remote=False)
        served = refused = 0
        for _ in range(60):
            s = _dealer(ctx, d.address)
            socks.append(s)
            r = _ask(s, ask)
            if r["ok"]:
                assert r["n"] == 64
                served += 1
            else:
                assert r["error"] == "busy" and "connections" in r["message"], r
                refused += 1
        cap = owner_cap(128)
        assert cap == 32
        assert served <= cap - 1 and refused >= 60 - (cap - 1), (served, refused)
        conns = op.stats()["daemon"]["connections"]
        assert wait_until(lambda: op.stats()["daemon"]["connections"]["refused"] >= refused, DEADLINE_S), conns
        _bob_round(b, "bob/ipc")
        # the operator's own connections: not counted, all served
        mine = request("lookup", 1, TCP_TOKEN, op.session, keys=make_keys("op/none", 4), remote=False)
        for _ in range(60):
            s = _dealer(ctx, d.address)
            socks.append(s)
            r = _ask(s, mine)
            assert r["ok"] and r["n"] == 0, r
        _bob_round(b, "bob/ipc2")
        assert d.proc.poll() is None
    finally:
        for s in socks:
            s.close(0)
        for c in (a, b, op):
            if c is not None:
                c.close()
        ctx.term()
        d.stop()


def test_a_tenants_ipc_connections_that_never_read_are_cut_and_hold_little_memory(tmp_path):
    """alice opens 16 ipc connections and sends 2,000 lookups on each (400 keys: a 1.2 KiB reply),
    never reading one. Before, each queued up to REPLY_HWM (2,048) replies in the daemon: ~2.5 MiB
    a connection, growing with every connection she opened. Now the gate reads each unix
    connection's unread bytes (SIOCOUTQ) and shuts down one past half its send buffer: her
    connections are cut, the daemon's memory grows little, bob stores and loads byte for byte."""
    d = _served_ipc(tmp_path)
    ctx = zmq.Context()
    socks = []
    a = b = op = None
    try:
        b = d.client(token=BOB, salt="s", timeout=DEADLINE_S)
        op = d.client(salt="op", timeout=DEADLINE_S)
        _bob_round(b, "bob/warm")
        base = _rss_mib(d.proc.pid)
        a = d.client(token=ALICE, salt="s", timeout=DEADLINE_S)
        k = make_keys("alice/one", 1)
        assert a.store(k, [block(k[0])]) == 1
        ask = request("lookup", 1, ALICE, a.session, keys=k * 400, remote=False)
        n_conn, n_req = 16, 2000
        socks = [_dealer(ctx, d.address, read=False) for _ in range(n_conn)]
        for _ in range(n_req):
            for s in socks:
                s.send(ask)
        assert wait_until(lambda: op.stats()["daemon"]["connections"]["silent"] >= n_conn // 2, 4 * DEADLINE_S), \
            op.stats()["daemon"]["connections"]
        grown = _rss_mib(d.proc.pid) - base
        print(f"daemon RSS grew {grown:.1f} MiB; {op.stats()['daemon']['connections']}")
        assert grown < 24, grown
        _bob_round(b, "bob/during")
        got = 0
        while socks[0].poll(2000):
            socks[0].recv()
            got += 1
        assert got < n_req, got
        assert d.proc.poll() is None
    finally:
        for s in socks:
            s.close(0)
        for c in (b, op, a):
            if c is not None:
                c.close()
        ctx.term()
        d.stop()
