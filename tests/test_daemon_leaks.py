"""Every per-client resource has an owner, a bound and a release path (issue 12, item 5).

Abuse comes from raw DEALER sockets (what a buggy or hostile client can send) and from real
clients whose requests time out; afterwards the sizes of the daemon's per-client maps
(stats()["daemon"]["state"]) must be back at their baseline.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import msgpack
import numpy as np
import zmq

from kvbm.blocks import KVLayout
from kvbm.client import Client
from test_daemon import NB, block, daemons, make_keys  # noqa: F401  (daemons is a fixture)

SMALL = KVLayout(num_layers=1, num_kv_heads=1, head_dim=64, block_size=16)  # 4 KiB blocks
SMALL_LAYOUT = {"num_layers": 1, "num_kv_heads": 1, "head_dim": 64, "block_size": 16}
# the per-client maps that must drain back (replies / cancelled are bounded per session instead)
DRAINED = ("reservations", "loads", "pins", "busy_blocks", "window_slots_used", "busy_namespaces",
           "busy_uids", "g2_pinned", "g2_pending")


class Raw:
    """A raw DEALER socket with one session: requests without waiting, replies counted."""

    def __init__(self, address: str, model: str, layout: dict) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.connect(address)
        self.sent = self.got = 0
        self.errors: dict[str, int] = {}
        self.session = self.call("hello", model=model, layout=layout)["session"]

    def send(self, op: str, req_id: int, **fields) -> None:
        msg = {"op": op, "id": req_id, **fields}
        if getattr(self, "session", None) is not None:
            msg["session"] = self.session
        self.sock.send(msgpack.packb(msg, use_bin_type=True))
        self.sent += 1

    def call(self, op: str, **fields) -> dict:
        self.send(op, 1, **fields)
        assert self.sock.poll(180_000), f"no reply to {op}"
        reply = msgpack.unpackb(self.sock.recv(), raw=False)
        self.got += 1
        assert reply["ok"], reply
        return reply

    def drain(self, timeout: float = 180.0) -> None:
        """Until every request sent has its reply (the daemon answers a socket in order)."""
        deadline = time.monotonic() + timeout
        while self.got < self.sent - 0:
            assert time.monotonic() < deadline, f"{self.sent - self.got} replies missing"
            if self.sock.poll(200):
                reply = msgpack.unpackb(self.sock.recv(), raw=False)
                self.got += 1
                if not reply.get("ok"):
                    self.errors[reply["error"]] = self.errors.get(reply["error"], 0) + 1

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def state(c: Client) -> dict:
    return c.stats()["daemon"]["state"]


def drained(c: Client, baseline: dict) -> bool:
    now = state(c)
    return all(now[k] == baseline[k] for k in DRAINED)


def wait_for(cond, what: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_10000_abandoned_reservations_return_to_baseline(daemons):
    """store_prepare and never commit, 10,000 times (before: ~226 B of daemon memory per key
    for ever, and the reservation held for the session's life): each is rolled back within
    daemon.reserve_s although the session heartbeats, and every map is back at its baseline."""
    # the abandoner heartbeats once per wave: its lease outlasts any wave on a loaded box
    d = daemons(g2=2048, layout=SMALL_LAYOUT, reserve_s=0.5, namespace_share=1.0, window_mib=16, lease_s=600.0)
    with Client(d.address, model="tiny", layout=SMALL, timeout=120) as c:
        base = state(c)
        origin0 = c.stats()["daemon"]["origin_keys"]
        raw = Raw(d.address, "abandoner", SMALL_LAYOUT)
        try:
            for wave in range(10):
                for i in range(1000):
                    raw.send("store_prepare", 10 + wave * 1000 + i, keys=make_keys(f"ab{wave}", 1000)[i:i + 1])
                raw.drain()
                assert raw.errors == {}, raw.errors  # each one was reserved (then abandoned)
                wait_for(lambda: state(c)["reservations"] == 0, "abandoned reservations to expire")
                raw.send("heartbeat", 0)  # the abandoner is alive throughout
            wait_for(lambda: drained(c, base), "daemon state to return to baseline")
            st = c.stats()["daemon"]
            assert st["reservation_expiries"] >= 10_000
            assert st["origin_keys"] <= origin0 + 1024  # the origin map holds no abandoned key for long
            assert st["state"]["replies"] <= base["replies"] + 32  # a bounded reply cache per session
            assert c.lookup(make_keys("ab0", 8))[0] == 0  # nothing abandoned was ever served
        finally:
            raw.close()


def test_10000_timed_out_requests_are_cancelled(daemons):
    """A client gives up on a request and cancels it (the Client does this on a timeout); the
    cancel may reach the daemon before or after the request. 10,000 of them: nothing is held
    afterwards, well before any reserve_s or pin_s bound could have released it."""
    # the raw socket never heartbeats: a lease no starved scheduler can run out
    d = daemons(g2=256, layout=SMALL_LAYOUT, reserve_s=600.0, pin_s=600.0, namespace_share=1.0, window_mib=4,
                lease_s=600.0)
    keys = make_keys("held", 64)
    with Client(d.address, model="tiny", layout=SMALL, timeout=120) as c:
        assert c.store(keys, [np.full(SMALL.block_nbytes, 7, np.uint8)] * 64) == 64
        base = state(c)
        raw = Raw(d.address, "tiny", SMALL_LAYOUT)
        try:
            rid = 100
            for i in range(2500):
                ops = (("store_prepare", {"keys": make_keys(f"to{i}", 2)}), ("load_prepare", {"keys": keys[:4]}),
                       ("pin", {"keys": keys[i % 60:i % 60 + 4]}), ("store_prepare", {"keys": make_keys(f"tb{i}", 1)}))
                for j, (op, fields) in enumerate(ops):
                    rid += 1
                    if j % 2:  # the cancel overtook the request (a fresh socket, say)
                        raw.send("cancel", 1, cancels=rid)
                        raw.send(op, rid, **fields)
                    else:
                        raw.send(op, rid, **fields)
                        raw.send("cancel", 1, cancels=rid)
                if i % 250 == 0:
                    raw.drain()
            raw.drain()
            assert raw.errors.get("cancelled", 0) == 5000  # refused on arrival: cancelled first
            assert set(raw.errors) <= {"cancelled"}, raw.errors
            st = state(c)
            assert all(st[k] == base[k] for k in DRAINED), (st, base)
            assert st["cancelled"] <= base["cancelled"] + 256 and st["replies"] <= base["replies"] + 32
            assert c.stats()["daemon"]["cancelled"] >= 5000
        finally:
            raw.close()


def test_client_timeout_leaves_nothing_behind(daemons):
    """The real Client against a frozen daemon: prepare/pin time out, the client cancels, the
    daemon wakes and undoes each (reserve_s and pin_s are far away)."""
    d = daemons(g2=64, reserve_s=600.0, pin_s=600.0, namespace_share=1.0, lease_s=60.0)
    keys = make_keys("t", 8)
    with d.client(timeout=120) as c, d.client(timeout=120) as impatient:
        assert c.store(keys, [block(k) for k in keys]) == 8
        base = state(c)
        os.kill(d.proc.pid, signal.SIGSTOP)
        impatient.timeout = 0.5  # what times out is held by SIGSTOP, not by being slow
        try:
            for call in (lambda: impatient.prepare_store(make_keys("late", 4)),
                         lambda: impatient.pin(keys[:4]), lambda: impatient.prepare_load(keys[4:])):
                try:
                    call()
                    raise AssertionError("the daemon is stopped: the call should time out")
                except TimeoutError:
                    pass
        finally:
            os.kill(d.proc.pid, signal.SIGCONT)
        wait_for(lambda: drained(c, base), "timed-out requests to be undone")
        impatient.timeout = 120.0  # patient from here on: a loaded CI machine must not time these out
        assert impatient.lookup(make_keys("late", 4))[0] == 0
        assert impatient.pin(keys[:2]) == 2  # and the impatient client works on


def test_pins_are_bounded_by_namespace_share_and_time(daemons):
    """Eight sessions of one tenant cannot pin more than its share of G2 between them, and a
    heartbeating client's pins lapse after daemon.pin_s (before: one client pinned all of G2
    for ever, and more sessions bypassed max_session_blocks)."""
    # pin_s far beyond the pin phase (no pin may lapse before all eight sessions tried), and
    # three leases long, so the pins lapse under heartbeating sessions
    d = daemons(g2=64, namespace_share=0.25, pin_s=30.0, lease_s=10.0, max_session_blocks=12)
    keys = make_keys("p", 48)
    with d.client(timeout=120) as c:
        assert c.store(keys, [block(k) for k in keys]) == 48
        base = state(c)
        clients = [d.client(timeout=120) for _ in range(8)]
        try:
            pinned = 0
            for i, cl in enumerate(clients):
                try:
                    pinned += cl.pin(keys[i * 4:i * 4 + 4])
                except Exception as exc:  # RemoteError quota
                    assert "quota" in str(exc)
            assert pinned == 16  # 0.25 of 64, across sessions
            assert state(c)["busy_blocks"] == 16
            other = d.client(timeout=120, model="other-tenant")
            assert other.store(make_keys("o", 4), [block(k) for k in make_keys("o", 4)]) == 4  # room for others
            other.close()
            assert c.stats()["daemon"]["pin_expiries"] == 0  # all of the above ran within pin_s
            wait_for(lambda: state(c)["pins"] == 0, "pins to lapse after pin_s", timeout=240)
            assert c.stats()["daemon"]["pin_expiries"] >= 16
            assert drained(c, base)
        finally:
            for cl in clients:
                cl.close()


def test_hello_flood_cannot_lock_out_clients(daemons):
    """1,024 hellos (before: they exhausted the session table and every later client got
    `busy`): a client with work in flight keeps its session; an idle one is closed to make room
    and says hello again on its next call, transparently."""
    d = daemons(g2=64, max_clients=16, lease_s=300.0)
    keys = make_keys("f", 4)
    with d.client(timeout=120) as busy, d.client(timeout=120) as idle:
        assert busy.store(keys, [block(k) for k in keys]) == 4
        assert busy.pin(keys[:2]) == 2
        raw = Raw(d.address, "flood", {"num_layers": 2, "num_kv_heads": 2, "head_dim": 64, "block_size": 16})
        try:
            raw.session = None
            for i in range(1024):
                raw.send("hello", 10 + i, model=f"flood-{i}",
                         layout={"num_layers": 2, "num_kv_heads": 2, "head_dim": 64, "block_size": 16})
            raw.drain()
            assert raw.errors == {}, raw.errors  # every hello got a session (evicting idle ones)
        finally:
            raw.close()
        assert state(busy)["sessions"] <= 16
        assert busy.unpin(keys[:2]) == 2 and busy.rehellos == 0  # its pins and session survived
        assert idle.lookup(keys) == (4, ["g2"] * 4) and idle.rehellos == 1
        assert idle.stats()["daemon"]["sessions_evicted"] >= 1000


def test_300_clients_survive_a_daemon_stall_of_twice_the_lease(daemons, tmp_path):
    """The daemon is stopped for 2 x lease_s under 300 heartbeating clients (before: with more
    than 256 clients, heartbeats queued beyond the first burst came after the expiry sweep, and
    live clients lost their sessions). No lease expires and no client needs a new session."""
    lease = 5.0  # heartbeats every 1.25 s: a loaded box does not starve one for a whole lease
    d = daemons(g2=64, lease_s=lease, window_mib=1)
    go = tmp_path / "check"
    script = textwrap.dedent("""
        import os, sys, time
        from kvbm.client import Client
        from kvbm.blocks import KVLayout
        LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, block_size=16)
        cs = [Client(sys.argv[1], model=f"m{i % 4}", layout=LAYOUT, timeout=60) for i in range(50)]
        print("ready", flush=True)
        while not os.path.exists(sys.argv[2]):
            time.sleep(0.05)
        for c in cs:
            c.lookup([b"k" * 16])
        print("rehellos", sum(c.rehellos for c in cs), flush=True)
        for c in cs:
            c.close()
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, d.address, str(go)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(6)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        with d.client(timeout=120) as c:
            assert c.stats()["daemon"]["clients"] == 301
            time.sleep(lease)  # heartbeats flowing (a wait for them, not a timing assertion)
            os.kill(d.proc.pid, signal.SIGSTOP)
            time.sleep(2 * lease)  # the stall under test
            os.kill(d.proc.pid, signal.SIGCONT)
            go.touch()
            for p in procs:
                out, err = p.communicate(timeout=300)
                assert p.returncode == 0, err
                assert out.split()[-2:] == ["rehellos", "0"]
            st = c.stats()["daemon"]
            assert st["lease_expiries"] == 0 and st["stalls"] >= 1
    finally:
        for p in procs:
            p.kill()
