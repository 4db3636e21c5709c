"""A tenant that tries to starve another (session 13 red team, H52).

alice holds her own token and wants bob's service to degrade: his hits, his room in G2, his
share of the daemon's loop, or the daemon's memory. Each test runs a real `kvbm serve` on tcp://
with two tenants, mounts one attack from alice and measures bob, the victim: his ops complete
(within the client's generous timeout), his bytes are right, and the daemon's state returns to
baseline once alice stops. No assertion depends on timing: conditions are waited for, and what
is compared is counted (requests, replies, busy blocks, bytes of memory).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

zmq = pytest.importorskip("zmq")

from daemonproc import wait_until  # noqa: E402
from kvbm.daemon.protocol import RemoteError, request, unpack  # noqa: E402
from servedaemon import LAYOUT_DICT, NB, block, make_keys  # noqa: E402
from test_tenant_tokens import ALICE, BOB, DEADLINE_S, _busy, _loads, _served  # noqa: E402

HELLO = {"model": "tiny", "layout": LAYOUT_DICT, "salt": "s"}


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _dealer(ctx, address: str, *, read: bool = True):
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if not read:  # a client that never reads: its zmq thread stops taking replies at once
        s.setsockopt(zmq.RCVHWM, 1)
        s.setsockopt(zmq.RCVBUF, 4096)
    s.setsockopt(zmq.SNDHWM, 0)
    s.connect(address)
    return s


def _bob_round(b, tag: str, n: int = 4) -> None:
    """One store and one load of bob's own blocks, byte for byte."""
    keys = make_keys(tag, n)
    assert b.store(keys, [block(k) for k in keys]) == n
    assert _loads(b, keys, [block(k) for k in keys])


# ---------------------------------------------------------------- replies nobody reads


def test_many_connections_that_never_read_their_replies_hold_little_of_the_daemons_memory(tmp_path):
    """alice opens 32 connections and sends 3,000 lookups on each (400 keys, her one stored block
    repeated: a 1.2 KiB reply each), never reading one. Before, each connection queued up to 4,096 replies in the
    daemon (REPLY_HWM), so this alone held ~37 MiB more and grew with every connection she opened (a
    tenant may open hundreds): ~2.4 GiB with 50 connections of 4,096-key lookups. Now a connection
    queues at most 256 (the rest are dropped: she is not listening) and the tcp send buffer is
    1 MiB, not autotuned to 4. Meanwhile bob stores and loads byte for byte; the daemon's
    resident memory grows by less than 24 MiB (measured: 13; with 4,096 a connection, 37)."""
    d = _served(tmp_path)
    ctx = zmq.Context()
    socks = []
    b = op = a = None
    try:
        b = d.client(token=BOB, salt="s", timeout=DEADLINE_S)
        op = d.client(salt="op", timeout=DEADLINE_S)  # daemon.token: the operator's stats (the node's counters)
        _bob_round(b, "bob/warm")  # the daemon's first requests import and allocate: not the attack's
        b.stats()
        base = _rss_mib(d.proc.pid)
        before = op.stats()["daemon"]["requests"]
        a = d.client(token=ALICE, salt="s", timeout=DEADLINE_S)
        k = make_keys("alice/one", 1)
        assert a.store(k, [block(k[0])]) == 1
        ask = request("lookup", 1, ALICE, a.session, keys=k * 400, remote=False)  # 7 KiB -> a 1.2 KiB reply
        n_conn, n_req = 32, 2000
        socks = [_dealer(ctx, d.address, read=False) for _ in range(n_conn)]
        for i in range(n_req):
            for s in socks:
                s.send(ask)
        # every request was handled (and its reply queued or dropped)
        assert wait_until(lambda: op.stats()["daemon"]["requests"] >= before + n_conn * n_req, 4 * DEADLINE_S)
        grown = _rss_mib(d.proc.pid) - base
        print(f"daemon RSS grew {grown:.1f} MiB for {n_conn} x {n_req} unread replies")
        assert grown < 24, grown  # 4,096 replies a connection: 37 MiB
        _bob_round(b, "bob/during")
        # what one of those connections can still read: at most the queue and the kernel buffers
        got = 0
        while socks[0].poll(2000):
            socks[0].recv()
            got += 1
        assert 0 < got < n_req, got
        assert d.proc.poll() is None
    finally:
        for s in socks:
            s.close(0)
        for c in (b, op, a):
            if c is not None:
                c.close()
        ctx.term()
        d.stop()
