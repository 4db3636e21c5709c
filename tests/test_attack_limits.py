"""Every field at and past its limit, from a tenant (red team round 3, H58): held.

alice, with her own token on tcp://, sends raw requests with key lists at and one past
`max_keys`, keys of the wrong size or type, repeated keys, scratch slots outside her scratch,
commit lists longer than the reservation, a handle of another session, priorities that do not
match the keys, `pin_from` past the keys, a token of a megabyte, and a message past
`max_message_bytes`. Each is answered with its own error code (or, for the oversized message,
her connection is dropped by libzmq), nothing of hers is left held, the daemon lives, and bob
stores and loads byte for byte throughout.
"""

from __future__ import annotations

import pytest

zmq = pytest.importorskip("zmq")

from daemonproc import wait_until  # noqa: E402
from kvbm.daemon.protocol import request, unpack  # noqa: E402
from servedaemon import LAYOUT_DICT, TCP_TOKEN, Served, block, make_keys  # noqa: E402
from test_attack_starve import _bob_round  # noqa: E402
from test_tenant_tokens import ALICE, BOB, DEADLINE_S  # noqa: E402

MAX_KEYS = 256


def _sock(ctx, address: str):
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(address)
    return s


_ids = iter(range(1, 1 << 30))


def _ask(s, op: str, session=None, token: str = ALICE, **fields) -> dict:
    s.send(request(op, next(_ids), token, session, **fields))  # (a new id: a repeated one gets its first reply)
    assert s.poll(int(DEADLINE_S * 1000)), f"no answer to {op}"
    return unpack(s.recv(), 1 << 22)


def _err(r: dict) -> str:
    assert not r["ok"], r
    return r["error"]


def test_fields_at_and_past_their_limits_are_refused_one_by_one_and_leave_nothing(tmp_path):
    tiers = [{"name": "g2", "capacity": 64, "eviction": "lru", "storage": "host"}]
    d = Served(tmp_path, "d", tiers=tiers, daemon={
        "address": "tcp://127.0.0.1:0", "token": TCP_TOKEN, "max_keys": MAX_KEYS,
        "tenants": {"alice": {"token": ALICE, "share": 0.25}, "bob": {"token": BOB, "share": 0.25}}}).start()
    ctx = zmq.Context()
    socks: list = []
    b = op = None
    try:
        b = d.client(token=BOB, salt="s", timeout=DEADLINE_S)
        op = d.client(salt="op", timeout=DEADLINE_S)
        _bob_round(b, "bob/0")
        s = _sock(ctx, d.address)
        socks.append(s)
        h = _ask(s, "hello", model="tiny", layout=LAYOUT_DICT, salt="s")
        sid, scratch = h["session"], h["scratch"]
        keys = make_keys("alice/limits", MAX_KEYS + 1)
        # key lists: at the limit served, one past refused
        r = _ask(s, "lookup", sid, keys=keys[:MAX_KEYS], remote=False)
        assert r["ok"] and r["n"] == 0
        assert _err(_ask(s, "lookup", sid, keys=keys, remote=False)) == "too_many"
        assert _err(_ask(s, "pin", sid, keys=keys)) == "too_many"
        # keys of the wrong size or type, repeated keys where they must be distinct
        assert _err(_ask(s, "lookup", sid, keys=[b"x" * 15])) == "bad_field"
        assert _err(_ask(s, "lookup", sid, keys=[b"x" * 17])) == "bad_field"
        assert _err(_ask(s, "lookup", sid, keys=["k" * 16])) == "bad_field"
        assert _err(_ask(s, "store_prepare", sid, keys=[keys[0], keys[0]])) == "bad_field"
        # one-shot slots: one past the scratch, outside it, repeated
        first, count = scratch
        assert _err(_ask(s, "store", sid, keys=keys[:count + 1],
                         slots=list(range(first, first + count + 1)))) == "bad_field"
        assert _err(_ask(s, "store", sid, keys=keys[:1], slots=[0])) == "bad_field"  # a window slot
        assert _err(_ask(s, "store", sid, keys=keys[:1], slots=[first + count])) == "bad_field"
        assert _err(_ask(s, "load", sid, keys=keys[:2], slots=[first, first])) == "bad_field"
        # a reservation: its commit's `failed` longer than the reservation, out of range
        r = _ask(s, "store_prepare", sid, keys=keys[:4])
        assert r["ok"] and r["handle"]
        handle = r["handle"]
        assert _err(_ask(s, "store_commit", sid, handle=handle, failed=list(range(5)))) == "too_many"
        # (the refused commit took nothing: the reservation is still there, and commits)
        assert _err(_ask(s, "store_commit", sid, handle=handle, failed=[4])) == "bad_field"
        r = _ask(s, "store_commit", sid, handle=handle, failed=[0, 1, 2, 3])
        assert r["ok"] and r["stored"] == 0
        # bob's handles from alice's session: her own session has no such reservation
        res = b.prepare_store(make_keys("bob/held", 2))
        assert _err(_ask(s, "store_commit", sid, handle=res.handle, failed=[])) == "bad_handle"
        for v, k in zip(res.views, make_keys("bob/held", 2)):
            v[:] = block(k)
        assert b.commit_store(res) == 2
        # priorities that do not match, pin_from past the keys
        assert _err(_ask(s, "store_prepare", sid, keys=keys[:2], priorities=[[35, None]])) == "bad_field"
        assert _err(_ask(s, "store_prepare", sid, keys=keys[:1], priorities=[[101, None]])) == "bad_field"
        assert _err(_ask(s, "lookup_pin", sid, keys=keys[:2], pin_from=3)) == "bad_field"
        assert _err(_ask(s, "store_prepare", sid, keys=keys[:1], parent=b"p" * 15)) == "bad_field"
        assert _err(_ask(s, "store_prepare", sid, keys=keys[:1], position=2**40)) == "bad_field"
        # a token of nearly a megabyte (one byte off alice's at the end, and a prefix of it)
        assert _err(_ask(s, "lookup", sid, token="a" * (1 << 19), keys=keys[:1])) in ("bad_message", "unauthorized")
        assert _err(_ask(s, "lookup", sid, token=ALICE[:-1] + "x", keys=keys[:1])) == "unauthorized"
        assert _err(_ask(s, "lookup", sid, token=ALICE[:-1], keys=keys[:1])) == "unauthorized"
        assert _err(_ask(s, "lookup", sid, token=ALICE + "\0", keys=keys[:1])) == "unauthorized"
        # a message past max_message_bytes: libzmq drops the connection, nothing answers it
        big = _sock(ctx, d.address)
        socks.append(big)
        big.send(request("lookup", 1, ALICE, sid, keys=keys[:1], pad=b"x" * (1 << 20)))
        assert not big.poll(2000)
        # nothing of hers is held; the daemon and bob go on
        _ask(s, "bye", sid)
        state = op.stats()["daemon"]["state"]
        assert wait_until(lambda: op.stats()["daemon"]["state"]["reservations"] == 0, DEADLINE_S), state
        state = op.stats()["daemon"]["state"]
        assert state["busy_blocks"] == 0 and state["pins"] == 0 and state["loads"] == 0, state
        _bob_round(b, "bob/1")
        assert d.proc.poll() is None
    finally:
        for x in socks:  # (ctx.term waits for every socket: close them all, failed or not)
            x.close(0)
        for c in (b, op):
            if c is not None:
                c.close()
        ctx.destroy(linger=0)  # closes any socket left open too (a plain term() hung once under load)
        d.stop()
