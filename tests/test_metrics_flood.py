"""The metrics port vs a connection flood from any local process (no credentials on loopback).

Before: every connection held a descriptor forever (no socket timeout, no cap), so a local user
could take all of the daemon's descriptors, after which libzmq aborts the daemon on its next
ipc:// accept. Now the port holds at most `cap` connections, refuses the rest at accept, and
closes a connection that sends nothing within IDLE_S; scrapes work again once the flood goes
idle or leaves.
"""

from __future__ import annotations

import socket
import time
import urllib.request

import pytest

from kvbm.daemon import metrics as metrics_mod
from kvbm.daemon.metrics import Metrics

DEADLINE_S = 120.0


def _get(host: str, port: int) -> int:
    with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=30) as r:
        return r.status


def test_a_connection_flood_holds_at_most_the_cap_and_scrapes_come_back(monkeypatch):
    monkeypatch.setattr(metrics_mod, "IDLE_S", 600.0)  # no idle timeout fires during the test
    m = Metrics()
    host, port = m.serve("127.0.0.1:0")
    server = m._server
    flood = []
    try:
        assert _get(host, port) == 200
        deadline = time.monotonic() + DEADLINE_S
        while server.active and time.monotonic() < deadline:  # the scrape's connection is gone
            time.sleep(0.02)
        cap = server.cap
        assert 4 <= cap <= metrics_mod.MAX_HTTP_PEERS
        extra = 40
        for _ in range(cap + extra):  # idle connections: each held a descriptor forever before
            flood.append(socket.create_connection((host, port), timeout=30))
        while server.active + server.refused < cap + extra and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (server.active, server.refused) == (cap, extra)  # the ones past the cap: shut at accept
        with pytest.raises(OSError):  # a scrape meanwhile is refused, not queued
            _get(host, port)
        # the flood leaves: its connections are released and a scrape is served again
        for s in flood:
            s.close()
        flood.clear()
        while server.active and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.active == 0
        assert _get(host, port) == 200
    finally:
        for s in flood:
            s.close()
        m.close()


def test_a_slow_request_does_not_hold_its_connection(monkeypatch):
    """A slow-loris client: half a request line, then nothing. The server closes it after IDLE_S."""
    monkeypatch.setattr(metrics_mod, "IDLE_S", 1.0)
    m = Metrics()
    host, port = m.serve("127.0.0.1:0")
    try:
        s = socket.create_connection((host, port), timeout=30)
        s.sendall(b"GET /metr")
        deadline = time.monotonic() + DEADLINE_S
        while m._server.active == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        s.settimeout(DEADLINE_S)
        try:
            data = s.recv(4096)
        except ConnectionResetError:
            data = b""
        assert b"200 OK" not in data
        while m._server.active and time.monotonic() < deadline:
            time.sleep(0.05)
        assert m._server.active == 0
        s.close()
        assert _get(host, port) == 200
    finally:
        m.close()
