"""KV events tell a namespace about its own blocks only, and hand out nothing a pull needs.

Issue 12 (2, 3): the PUB stream's topic was the namespace id (with a client key, the server key
of the block: what a peer pull asked for), and the PUB socket and /metrics authenticated nothing
once a token let them bind a non-loopback address.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import msgpack
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from kvbm.daemon.leases import namespace_of, server_key
from servedaemon import LAYOUT, Served, block, make_keys


@pytest.fixture
def served(tmp_path):
    ds: list[Served] = []

    def start(name="d", **daemon):
        d = Served(tmp_path, name, daemon=daemon).start()
        ds.append(d)
        return d

    yield start
    for d in ds:
        d.stop()


def _handshake(sub: zmq.Socket, address: str, timeout: float = 120.0) -> str:
    """Connect; 'ok' or 'failed': the first handshake outcome the SUB socket's monitor reports
    (the monitor is attached before the connect, so no outcome can slip past it)."""
    mon = sub.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                 | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
    sub.connect(address)
    try:
        assert mon.poll(int(timeout * 1000)), "no handshake within the deadline"
        ev = recv_monitor_message(mon)["event"]
        return "ok" if ev == zmq.EVENT_HANDSHAKE_SUCCEEDED else "failed"
    finally:
        sub.disable_monitor()
        mon.close(0)


def _sub(ctx: zmq.Context, address: str, token: str | None = None, topic: bytes = b"") -> zmq.Socket:
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    if token is not None:
        sub.plain_username = b"kvbm"
        sub.plain_password = token.encode()
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    return sub


def test_stream_topic_is_not_the_namespace_id_and_rows_carry_client_keys(served):
    d = served(events="tcp://127.0.0.1:*")
    ctx = zmq.Context()
    sub = _sub(ctx, d.info["events"])
    sub.connect(d.info["events"])
    keys = make_keys("topic", 4)
    try:
        with d.client(salt="tenant-t") as c:
            ns = namespace_of("tiny", LAYOUT.fingerprint, "tenant-t")
            deadline = time.monotonic() + 180
            warm: set = set()
            while not sub.poll(50):  # PUB/SUB: store until the subscriber is in
                assert time.monotonic() < deadline
                k = make_keys(f"warm{len(warm)}", 1)
                c.store(k, [block(k[0])])
                warm.add(k[0])
            assert c.store(keys, [block(k) for k in keys]) == 4
            while True:  # the warm-up's batches may still be on their way: recognised by their keys
                assert sub.poll(180_000), "no event batch for the store"
                topic, body, seq = sub.recv_multipart()  # (seq: test_events_seq.py)
                rows = msgpack.unpackb(body)
                if not {r[1] for r in rows} <= warm:
                    break
            assert topic == c.topic
            assert topic != ns.hex().encode() and ns.hex().encode() not in topic  # no namespace id to derive keys from
            assert [r[1] for r in rows] == keys  # the client's own keys, as it stored them
            assert not {server_key(ns, k) for k in keys} & {r[1] for r in rows}
    finally:
        sub.close(0)
        ctx.term()


def test_events_op_returns_only_the_sessions_namespace(served):
    d = served()
    a_keys, b_keys = make_keys("ev-a", 3), make_keys("ev-b", 3)
    with d.client(salt="a") as a, d.client(salt="b") as b, d.client(salt="a") as a2:
        assert a.store(a_keys, [block(k) for k in a_keys]) == 3
        assert b.store(b_keys, [block(k) for k in b_keys]) == 3
        assert [k for kind, k, _ in a.events()] == a_keys
        assert [k for kind, k, _ in a2.events()] == a_keys  # another session of the same namespace
        assert [k for kind, k, _ in b.events()] == b_keys


def test_stream_with_a_token_takes_only_subscribers_that_present_it(served):
    d = served(events="tcp://127.0.0.1:*", token="s3cret")
    ctx = zmq.Context()
    anonymous, wrong, good = _sub(ctx, ""), _sub(ctx, "", "nope"), _sub(ctx, "", "s3cret")
    try:
        for s, want in ((anonymous, "failed"), (wrong, "failed"), (good, "ok")):
            assert _handshake(s, d.info["events"]) == want
        with d.client(token="s3cret") as c:
            deadline = time.monotonic() + 180
            i = 0
            while not good.poll(50):  # PUB/SUB: store until the subscriber is in
                assert time.monotonic() < deadline
                k = make_keys(f"tok-ev{i}", 1)
                c.store(k, [block(k[0])])
                i += 1
        assert not anonymous.poll(0) and not wrong.poll(0)
    finally:
        for s in (anonymous, wrong, good):
            s.close(0)
        ctx.term()


def test_metrics_beyond_loopback_need_the_token(served):
    d = served(metrics="0.0.0.0:0", token="s3cret")
    host_port = d.info["metrics"].replace("0.0.0.0", "127.0.0.1")
    base = f"http://{host_port}"
    for path in ("/metrics", "/health"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base + path, timeout=120)
        assert err.value.code == 401
        req = urllib.request.Request(base + path, headers={"Authorization": "Bearer nope"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=120)
        assert err.value.code == 401
    req = urllib.request.Request(base + "/health", headers={"Authorization": "Bearer s3cret"})
    assert json.loads(urllib.request.urlopen(req, timeout=120).read())["status"] == "ok"
    req = urllib.request.Request(base + "/metrics", headers={"Authorization": "Bearer s3cret"})
    assert b"kvbm_clients" in urllib.request.urlopen(req, timeout=120).read()


# ---------------------------------------------------------------- the drain, without a daemon

class _Tier:
    def __init__(self) -> None:
        self.ready: dict = {}
        self.pending: dict = {}


class _Manager:
    def __init__(self) -> None:
        self.tiers = [_Tier()]
        self.events: list = []

    def take_events(self) -> list:
        out, self.events = self.events, []
        return out

    def __contains__(self, key) -> bool:
        return any(key in t.ready for t in self.tiers)


class _Sessions:
    def __init__(self, sessions) -> None:
        self.sessions = sessions

    def in_namespace(self, ns):
        return [s for s in self.sessions if s.namespace == ns]


class _S:
    def __init__(self, ns) -> None:
        self.namespace, self.events = ns, []


def _drainer(sessions=()):
    from kvbm.daemon.events import Events, Origins

    d = Events()
    d.manager, d.origin, d.pub, d.sessions, d._event_sinks = _Manager(), Origins(), None, _Sessions(list(sessions)), []
    return d


def test_drain_goes_to_the_owning_namespace_and_to_sinks():
    from kvbm.manager import Event

    a, b = _S(b"A" * 16), _S(b"B" * 16)
    d = _drainer([a, b])
    seen = []
    d.add_event_sink(lambda ns, rows: seen.append((ns, rows)))
    d.add_event_sink(lambda ns, rows: 1 / 0)  # a broken sink is logged, the others still run
    d.origin[b"s1"] = (a.namespace, b"client-1")
    d.origin[b"s2"] = (b.namespace, b"client-2")
    d.manager.tiers[0].ready.update({b"s1": 0, b"s2": 1})
    d.manager.events = [Event("stored", b"s1", "g2"), Event("stored", b"s2", "g2"), Event("stored", b"s9", "g2")]
    d._drain_events()
    assert a.events == [["stored", b"client-1", "g2"]] and b.events == [["stored", b"client-2", "g2"]]
    assert seen == [(a.namespace, [["stored", b"client-1", "g2"]]), (b.namespace, [["stored", b"client-2", "g2"]])]
    del d.manager.tiers[0].ready[b"s1"]
    d.manager.events = [Event("removed", b"s1", "g2")]
    d._drain_events()
    assert b"s1" not in d.origin and a.events[-1] == ["removed", b"client-1", "g2"]


def test_origins_of_abandoned_keys_are_swept():
    """A key reserved and rolled back produces no event: the sweep bounds what such keys leave."""
    from kvbm.daemon.events import SWEEP_SLACK

    d = _drainer()
    held = {f"held{i}".encode(): i for i in range(100)}
    d.manager.tiers[0].ready.update(held)
    for k in held:
        d.origin[k] = (b"A" * 16, k)
    for i in range(10_000):
        d.origin[f"gone{i}".encode()] = (b"A" * 16, b"x")
        d._drain_events()
        assert len(d.origin) <= 2 * len(held) + SWEEP_SLACK + 1
    d.origin.sweep(d.manager)
    assert all(k in d.origin for k in held)
