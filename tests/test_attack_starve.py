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
from kvbm.daemon.protocol import request, unpack  # noqa: E402
from servedaemon import NB, block, make_keys  # noqa: E402
from test_tenant_tokens import ALICE, BOB, DEADLINE_S, _loads, _served  # noqa: E402

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
    """alice opens 32 connections and sends 2,000 lookups on each (400 keys, her one stored block
    repeated: a 1.2 KiB reply each), never reading one. Before, each connection queued up to
    4,096 replies in the daemon (REPLY_HWM), whatever their size, so this alone held 37 MiB more
    and grew with every connection she opened (a tenant may open hundreds; 12 KiB replies of
    4,096-key lookups: 48 MiB a connection). Now the gate reads each tcp connection's unsent bytes
    from the kernel and shuts down one that leaves SNDBUF / 2 of replies unread (its queue is
    freed), and the tcp send buffer is 1 MiB, not autotuned to 4. Meanwhile bob stores and loads
    byte for byte; the daemon's resident memory grows by less than 24 MiB."""
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
        # the gate shut her silent connections down (their queued replies freed); her requests
        # already sent on them are lost with them: wait until the daemon has read all it will
        cut0 = op.stats()["daemon"]["connections"]["cut"]
        assert wait_until(lambda: op.stats()["daemon"]["connections"]["cut"] - cut0 >= n_conn // 2
                          or op.stats()["daemon"]["requests"] >= before + n_conn * n_req, 4 * DEADLINE_S)
        grown = _rss_mib(d.proc.pid) - base
        print(f"daemon RSS grew {grown:.1f} MiB for {n_conn} x {n_req} unread replies; "
              f"{op.stats()['daemon']['connections']} connections")
        assert grown < 24, grown  # 4,096 replies a connection, no cut: 37 MiB
        assert op.stats()["daemon"]["connections"]["cut"] > cut0
        _bob_round(b, "bob/during")
        # what one of those connections can still read: at most what its kernel took before the cut
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


# ---------------------------------------------------------------- a tenant's many connections


def _served_with_nofile(tmp_path, limit: int):
    """_served's daemon (alice and bob, tcp://) under an RLIMIT_NOFILE of `limit`."""
    import resource
    from unittest import mock

    real = subprocess.Popen

    def popen(*a, **kw):
        kw["preexec_fn"] = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
        return real(*a, **kw)

    with mock.patch.object(subprocess, "Popen", popen):
        return _served(tmp_path)


def test_one_tenants_many_connections_take_at_most_a_quarter_and_bob_is_served_in_turn(tmp_path):
    """Under a 256-descriptor limit the daemon takes 128 connections (conn_gate.caps). alice opens
    100 and floods lookups of 4,096 keys on every one that is served (two in flight each). The
    loop serves connections in turn (the ROUTER's fair queue), so each of bob's requests waited
    behind one of each of hers: before, all 100 were served and 2,001 of her lookups were answered
    during bob's 20 requests (and each connection may queue RCVHWM requests and REPLY_HWM replies
    in the daemon). Now one tenant holds at most a quarter (32; conn_gate.owner_cap): her
    connections past it get `busy` and are shut down; bob's store/load rounds are byte for byte,
    and while he runs she is answered at most 2 x 32 lookups per request of his (counted, not
    timed; measured 604 during his 20)."""
    from kvbm.daemon.conn_gate import owner_cap

    d = _served_with_nofile(tmp_path, 256)
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, 4096)
    socks = []
    a = b = None
    stop = threading.Event()
    answered = [0]
    errors: list = []
    try:
        b = d.client(token=BOB, salt="s", timeout=DEADLINE_S)
        a = d.client(token=ALICE, salt="s", timeout=DEADLINE_S)
        k = make_keys("alice/one", 1)
        assert a.store(k, [block(k[0])]) == 1
        ask = request("lookup", 1, ALICE, a.session, keys=k * 4096, remote=False)
        served, refused = [], 0
        for _ in range(100):  # one after the other: a burst of new connections rotates through the
            s = _dealer(ctx, d.address)  # waiting slots (conn_gate's stranger flood), cut before a word
            socks.append(s)
            s.send(ask)
            assert s.poll(int(DEADLINE_S * 1000)), "no answer"
            r = unpack(s.recv(), 1 << 22)
            if r["ok"]:
                assert r["n"] == 4096
                served.append(s)
            else:
                assert r["error"] == "busy" and "connections" in r["message"], r
                refused += 1
                s.close(0)  # (the daemon shuts it down 2 s after its refusal: conn_gate.DOOM_S)
                socks.remove(s)
        # 256 // 2 = 128 connections in all (conn_gate.caps), a quarter of them hers; she has 1 or 2
        # more (her Client's request socket, its heartbeat's once it beat)
        cap = owner_cap(128)
        assert cap == 32
        assert len(served) <= cap - 1 + 1 and refused >= 100 - cap, (len(served), refused)

        def flood() -> None:
            poller = zmq.Poller()
            for s in served:
                poller.register(s, zmq.POLLIN)
                s.send(ask)
                s.send(ask)
            while not stop.is_set():
                for s, _ in poller.poll(100):
                    try:
                        r = unpack(s.recv(), 1 << 22)
                    except zmq.ZMQError as exc:
                        errors.append(exc)
                        return
                    if not r.get("ok"):
                        errors.append(r)
                    answered[0] += 1
                    s.send(ask)

        t = threading.Thread(target=flood, daemon=True)
        t.start()
        assert wait_until(lambda: answered[0] >= 200, DEADLINE_S)  # her flood is on
        rounds = 10
        start = answered[0]
        for i in range(rounds):
            _bob_round(b, f"bob/{i}")  # one `store` and one `load` (one-shot ops: a request each)
        during = answered[0] - start
        stop.set()
        t.join(DEADLINE_S)
        print(f"alice answered {during} lookups during bob's {2 * rounds} requests ({len(served)} connections)")
        assert not errors, errors[:3]
        assert during <= 2 * cap * 2 * rounds, during
        assert d.proc.poll() is None
    finally:
        stop.set()
        for s in socks:
            s.close(0)
        for c in (a, b):
            if c is not None:
                c.close()
        ctx.term()
        d.stop()


# ---------------------------------------------------------------- a frozen client holding things


_FROZEN = r"""
import sys
sys.path.insert(0, {tests!r})
import numpy as np
from kvbm.client import Client
from servedaemon import LAYOUT, NB, block, make_keys
c = Client({address!r}, model="tiny", layout=LAYOUT, salt="s", token={token!r}, timeout=120.0)
keys = make_keys("frozen", 12)
assert c.store(keys[:8], [block(k) for k in keys[:8]]) == 8
assert c.pin(keys[:8]) == 8                      # 8 pinned
res = c.prepare_store(keys[8:12])                # 4 reserved, never committed
assert res.handle
pins = c.prepare_load(keys[:4])                  # 4 window slots held by a load never released
assert pins.handle
print("holding", c.session.hex(), flush=True)
sys.stdin.readline()                             # (SIGSTOPped here; woken, it goes on)
dest = [np.zeros(NB, np.uint8) for _ in range(4)]
n = c.load(keys[:4], dest)                       # its session is gone: hello again, a miss or its bytes
assert all(np.array_equal(d, block(k)) for d, k in zip(dest[:n], keys[:n]))
print("woke", n, c.rehellos, flush=True)
c.close()
"""


def test_a_sigstopped_client_holding_pins_a_reservation_and_a_load_is_released_at_its_lease(tmp_path):
    """alice's engine holds 8 pins, a 4-block reservation and a 4-block load, then is SIGSTOPped
    (its heartbeat thread too). While it is frozen bob stores, pins and loads within his own share;
    once its lease (5 s here) has run out every block and window slot it held is released (the
    node's busy blocks, pins, reservations and loads back to bob's own), not at pin_s (300 s).
    Woken, it says hello again and loads a miss or its own bytes, never another's."""
    d = _served(tmp_path, lease_s=5.0)
    b = op = None
    proc = None
    try:
        op = d.client(salt="op", timeout=DEADLINE_S)
        b = d.client(token=BOB, salt="s", timeout=DEADLINE_S)
        tests = os.path.dirname(os.path.abspath(__file__))
        code = _FROZEN.format(tests=tests, address=d.address, token=ALICE)
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)
        line = proc.stdout.readline()
        assert line.startswith("holding"), line
        state = lambda: op.stats()["daemon"]["state"]  # noqa: E731
        st = state()
        assert st["busy_blocks"] == 12 and st["loads"] == 1 and st["reservations"] == 1, st
        os.kill(proc.pid, signal.SIGSTOP)
        # bob, frozen alice beside him: his share is his own
        kb = make_keys("bob/frozen", 8)
        assert b.store(kb, [block(k) for k in kb]) == 8
        assert b.pin(kb) == 8
        assert _loads(b, kb, [block(k) for k in kb])
        assert b.unpin(kb) == 8
        # alice's lease runs out: all she held goes (a condition, waited for)
        assert wait_until(lambda: state()["busy_blocks"] == 0 and state()["loads"] == 0
                          and state()["reservations"] == 0 and state()["g2_pinned"] == 0, DEADLINE_S), state()
        assert op.stats()["daemon"]["lease_expiries"] >= 1
        os.kill(proc.pid, signal.SIGCONT)
        proc.stdin.write("\n")
        proc.stdin.flush()
        out, _ = proc.communicate(timeout=DEADLINE_S)
        assert proc.returncode == 0 and out.startswith("woke"), out
        assert int(out.split()[2]) >= 1  # it said hello again
        assert _loads(b, kb, [block(k) for k in kb])
    finally:
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait(30)
        for c in (b, op):
            if c is not None:
                c.close()
        d.stop()


# ---------------------------------------------------------------- a tenant that keeps storing


def test_a_tenant_storing_without_end_leaves_bob_room_his_pinned_hits_and_right_bytes(tmp_path):
    """alice stores new blocks without end (one-shot stores: nothing of hers stays busy, so no
    quota stops her), ten times G2 over, on two threads, while bob works. bob's stores always
    find room (her blocks are evictable, his busy share is his own), his two-phase stores get
    every slot they ask for, the 8 blocks he pinned hit byte for byte all along, and every load
    of his is his bytes or a miss. What does not hold: his unpinned blocks are evicted by her
    flood (G2's eviction is shared, by design: SECURITY.md; pin what must stay)."""
    d = _served(tmp_path, capacity=64)
    stop = threading.Event()
    per = {"x": 0, "y": 0}  # blocks each of alice's threads stored (one writer each)
    stored = lambda: sum(per.values())  # noqa: E731
    errors: list = []
    clients = []
    try:
        b = d.client(token=BOB, salt="s", timeout=DEADLINE_S)
        clients.append(b)
        hot = make_keys("bob/hot", 8)
        assert b.store(hot, [block(k) for k in hot]) == 8
        assert b.pin(hot) == 8

        def flood(tag: str) -> None:
            a = d.client(token=ALICE, salt=tag, timeout=DEADLINE_S)
            clients.append(a)
            i = 0
            while not stop.is_set():
                ks = make_keys(f"alice/{tag}/{i}", 8)
                i += 1
                try:
                    n = a.store(ks, [block(k) for k in ks])
                    per[tag] += n
                except Exception as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)
                    return

        threads = [threading.Thread(target=flood, args=(t,), daemon=True) for t in ("x", "y")]
        for t in threads:
            t.start()
        assert wait_until(lambda: stored() >= 64, DEADLINE_S)
        cold_hits = 0
        for i in range(20):
            ks = make_keys(f"bob/cold/{i}", 4)
            if i % 2:
                assert b.store(ks, [block(k) for k in ks]) == 4  # room, whatever she stores
            else:
                res = b.prepare_store(ks)
                assert res.handle and all(v is not None for v in res.views)
                for v, k in zip(res.views, ks):
                    v[:] = block(k)
                assert b.commit_store(res) == 4
            dest = [np.zeros(NB, np.uint8) for _ in ks]
            n = b.load(ks, dest)
            assert all(np.array_equal(x, block(k)) for x, k in zip(dest[:n], ks))
            cold_hits += n
            assert _loads(b, hot, [block(k) for k in hot])  # pinned: always there
        assert wait_until(lambda: stored() >= 10 * 64, 4 * DEADLINE_S)
        stop.set()
        for t in threads:
            t.join(DEADLINE_S)
        assert not errors, errors[:3]
        assert _loads(b, hot, [block(k) for k in hot])
        print(f"alice stored {stored()}; bob's fresh blocks loaded at once: {cold_hits} of 80")
        assert b.unpin(hot) == 8
    finally:
        stop.set()
        for c in clients:
            c.close()
        d.stop()


# ---------------------------------------------------------------- decoding bombs, before the token


def _bomb() -> bytes:
    """~1 MiB: a request map whose `keys` are 250 arrays of 4,000 empty arrays (each within the
    per-container bound, a million containers in all)."""
    import msgpack

    inner = b"\xdc" + (4000).to_bytes(2, "big") + b"\x90" * 4000
    return (b"\x83" + msgpack.packb("op") + msgpack.packb("lookup") + msgpack.packb("id") + b"\x07"
            + msgpack.packb("keys") + b"\xdc" + (250).to_bytes(2, "big") + inner * 250)


def test_a_strangers_msgpack_bombs_stop_decoding_early_and_bob_is_served(tmp_path):
    """A stranger with no token sends, on 8 tcp connections, ~1 MiB requests of a million nested
    empty arrays, back to back. The token is checked after decoding, and each bounded container
    passed msgpack's limits: decoding one cost the loop 0.7 s and ~70 MiB, so 8 such connections
    held every tenant's requests for seconds each, token or not. Now decoding stops once a
    request holds more than max_keys + 80 lists and maps (protocol.unpack): each bomb is answered
    `bad_message` naming that bound, the daemon's memory does not grow with them, and bob stores
    and loads byte for byte in between."""
    from kvbm.daemon import protocol as P

    bomb = _bomb()
    assert len(bomb) < 1 << 20  # within max_message_bytes: it reaches the decoder
    with pytest.raises(P.ProtocolError, match="lists and maps"):
        P.unpack(bomb, 4096 + 16)
    d = _served(tmp_path)
    ctx = zmq.Context()
    socks = []
    b = None
    try:
        b = d.client(token=BOB, salt="s", timeout=DEADLINE_S)
        _bob_round(b, "bob/warm")
        base = _rss_mib(d.proc.pid)
        socks = [_dealer(ctx, d.address) for _ in range(8)]
        answered = 0
        for i in range(6):
            for s in socks:
                s.send(bomb)
            for s in socks:
                assert s.poll(int(DEADLINE_S * 1000)), "no answer"
                r = unpack(s.recv(), 1 << 20)
                assert not r["ok"] and r["error"] == "bad_message" and "lists and maps" in r["message"], r
                answered += 1
            _bob_round(b, f"bob/{i}")
        assert answered == 48
        grown = _rss_mib(d.proc.pid) - base
        print(f"48 bombs: daemon RSS grew {grown:.1f} MiB")
        assert grown < 32, grown
        assert d.proc.poll() is None
    finally:
        for s in socks:
            s.close(0)
        if b is not None:
            b.close()
        ctx.term()
        d.stop()
