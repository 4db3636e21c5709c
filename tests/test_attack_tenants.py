"""Attacks on the per-tenant tokens (`daemon.tenants`, kvbm/daemon/tenants.py) by a hostile tenant.

alice holds her own token and wants bob's bytes, to corrupt them, or to starve him (or the default
tenant, daemon.token's). Each test is one attack against a real `kvbm serve` on tcp:// and asserts
the promise: bob's bytes never reach alice, bob's ops go on, alice gets a miss, never wrong bytes.
Each narrates one line of SECURITY.md's "Tenants" section. Helpers come from test_tenant_tokens.py.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

zmq = pytest.importorskip("zmq")

from kvbm.daemon.events import topic_of  # noqa: E402
from kvbm.daemon.leases import namespace_of  # noqa: E402
from kvbm.daemon.protocol import RemoteError, request, unpack  # noqa: E402
from servedaemon import LAYOUT, LAYOUT_DICT, NB, TCP_TOKEN, Served, block, make_keys  # noqa: E402
from test_tenant_tokens import ALICE, BOB, DEADLINE_S, _busy, _loads, _raw, _served  # noqa: E402

HELLO = {"model": "tiny", "layout": LAYOUT_DICT, "salt": "s"}


def _zeros(n: int) -> list:
    return [np.zeros(NB, np.uint8) for _ in range(n)]


# ---------------------------------------------------------------- every op, alice's token, bob's session


def test_every_op_with_alices_token_on_bobs_session_is_no_session(tmp_path):
    """bob holds pins, a two-phase store and a two-phase load; alice learnt his session id and
    request ids and sends every op of the protocol with her token against them (one-shots naming
    his scratch slots, a retry of his request id, peer ops, hello fields naming him). Each gets
    no_session (or her own, empty, answer); bob's holdings are as they were, he commits, loads his
    bytes and releases, and alice's own session learnt nothing of his."""
    d = _served(tmp_path)
    ctx = zmq.Context()
    sock, call = _raw(ctx, d.address)
    b = None
    try:
        b = d.client(token=BOB, salt="s", timeout=DEADLINE_S)
        keys = make_keys("bob", 12)
        assert b.store(keys[:4], [block(k) for k in keys[:4]]) == 4
        assert b.pin(keys[:4]) == 4
        res = b.prepare_store(keys[4:8])
        for v, k in zip(res.views, keys[4:8]):
            v[:] = block(k)
        pins = b.prepare_load(keys[:4])
        assert pins.handle
        sid, scratch = b.session, b.scratch
        slots = list(range(scratch[0], scratch[0] + 4))
        junk = {"keys": keys[:4], "slots": slots}
        attempts = [
            ("heartbeat", {}), ("lookup", {"keys": keys}), ("lookup_pin", {"keys": keys, "pin_from": 0}),
            ("pin", {"keys": keys[:4]}), ("unpin", {"keys": keys[:4]}), ("store", junk), ("load", junk),
            ("store_prepare", {"keys": keys[8:]}), ("store_commit", {"handle": res.handle, "failed": [0, 1, 2, 3]}),
            ("load_prepare", {"keys": keys[:4]}), ("load_release", {"handle": pins.handle}),
            ("cancel", {"cancels": 1}), ("events", {}),
            ("peer_lookup", {"namespace": b"\0" * 16, "keys": keys[:4]}), ("peer_release", {"handle": 1}),
        ]
        for op, fields in attempts:
            r = call(op, ALICE, sid, **fields)
            assert not r["ok"] and r["error"] == "no_session", (op, r)
        assert call("bye", ALICE, sid)["ok"]  # answers as for an unknown session, closes nothing
        # the peer handshake is no door: this daemon takes no peers, whoever asks
        r = call("peer_hello", ALICE, nonce=b"x" * 16)
        assert not r["ok"] and r["error"] in ("peer_off", "nixl_off"), r
        # hello fields naming bob (a tenant, a session, a namespace) choose nothing: the token does
        r = call("hello", ALICE, tenant="bob", session=sid, namespace=b"\0" * 16, **HELLO)
        assert r["ok"] and r["tenant"] == "alice" and r["session"] != sid
        assert r["topic"] == topic_of(namespace_of("tiny", LAYOUT.fingerprint, "s", "alice")) != b.topic
        mine = r["session"]
        # in her own session: his keys miss, his request ids cancel nothing of his, no event of his
        assert call("lookup", ALICE, mine, keys=keys, remote=False)["n"] == 0
        for rid in range(1, 40):
            assert call("cancel", ALICE, mine, cancels=rid)["ok"]
        assert call("events", ALICE, mine)["events"] == []
        assert call("load", ALICE, mine, keys=keys[:4], slots=list(range(r["scratch"][0], r["scratch"][0] + 4)))["n"] == 0
        # bob: everything as he left it
        assert _busy(b) == 8 and b.rehellos == 0
        assert len(pins.views) == 4
        assert all(np.array_equal(np.asarray(v).view(np.uint8).reshape(-1)[:NB], block(k))
                   for v, k in zip(pins.views, keys[:4]))
        b.release_load(pins)
        assert b.commit_store(res) == 4
        assert _loads(b, keys[:8], [block(k) for k in keys[:8]])
        assert b.unpin(keys[:4]) == 4 and _busy(b) == 0
        assert {e[1] for e in b.events()} >= set(keys[:8])  # his events were his, still queued for him
    finally:
        if b is not None:
            b.close()
        sock.close(0)
        ctx.term()
        d.stop()


# ---------------------------------------------------------------- namespace ids: crafted strings


def _crafted(victim: str) -> list[tuple[str, str]]:
    """(model, salt) pairs alice might send hoping to land on `victim`'s id for ("tiny", "s")."""
    return [("tiny", "s"), (f"{victim}tiny", "s"), (f"{victim}/tiny", "s"), (f"{victim}:tiny", "s"),
            ("tiny", f"{victim}s"), ("tiny", f"s{victim}"), (f"tiny{victim}", "s"), (victim, "tiny"),
            (f"{victim}\u00a0tiny", "s"), ("tiny", "s\u200d"),
            (f"kvbm-daemon-tenant-ns {victim} tiny", "s")]


def test_crafted_model_and_salt_strings_never_reach_another_tenants_or_the_default_namespace(tmp_path):
    """bob and the default tenant store under ("tiny", "s"). alice says hello with model and salt
    strings holding bob's name, separators, the hash prefixes, look-alike characters: the tenant
    name is a length-prefixed field of its own under a prefix the default tenant's ids never
    start with, so every one is a namespace of hers: lookups miss, loads copy nothing, and her
    stores under the same keys leave bob's and the operator's bytes as they were. (Control
    characters are refused outright: no length prefix can be forged.)"""
    d = _served(tmp_path)
    clients = []
    try:
        b = d.client(token=BOB, salt="s", timeout=DEADLINE_S)
        op = d.client(salt="s", timeout=DEADLINE_S)
        clients += [b, op]
        keys = make_keys("shared", 4)
        bobs = [block(k) for k in keys]
        ops = [np.bitwise_xor(block(k), 0x5A) for k in keys]
        assert b.store(keys, bobs) == 4 and op.store(keys, ops) == 4
        fp = LAYOUT.fingerprint
        targets = {namespace_of("tiny", fp, "s", "bob"), namespace_of("tiny", fp, "s")}
        evil = [np.bitwise_xor(block(k), 0xFF) for k in keys]
        for model, salt in _crafted("bob"):
            assert namespace_of(model, fp, salt, "alice") not in targets
            a = d.client(token=ALICE, model=model, salt=salt, timeout=DEADLINE_S)
            clients.append(a)
            assert a.lookup(keys, remote=False)[0] == 0, (model, salt)
            assert a.load(keys, _zeros(4)) == 0
            assert a.store(keys, evil) == 4  # lands in her own namespace
        for model in ("tiny\0", "tiny\x1b[0m", "bob\x00\x00\x00\x00\x00\x00\x00\x04tiny", "kvbm-daemon-ns\x01tiny"):
            with pytest.raises((ValueError, RemoteError)):
                d.client(token=ALICE, model=model, salt="s", timeout=DEADLINE_S)
        assert _loads(b, keys, bobs) and _loads(op, keys, ops)
        # and ids only: a named tenant never makes a default id, nor another tenant's
        for victim, target in (("bob", namespace_of("tiny", fp, "s", "bob")), ("", namespace_of("tiny", fp, "s"))):
            for model, salt in _crafted(victim or "default"):
                for tenant in ("alice", "bo", "b", "bobt", "bob.", "default"):
                    if (tenant, model, salt) != (victim, "tiny", "s"):
                        assert namespace_of(model, fp, salt, tenant) != target
    finally:
        for c in clients:
            c.close()
        d.stop()


# ---------------------------------------------------------------- events: bob's rows, bob's topic


def test_alice_reads_no_event_of_bob_and_her_hello_tells_her_own_topic_only(tmp_path):
    """bob stores and drops blocks; alice, with the same model and salt, drains her `events` op
    and asks hello for a topic: she gets none of his rows (not even their keys), and a topic that
    is not his (his topic is a hash of his namespace id, which has his name in it)."""
    d = _served(tmp_path)
    clients = []
    try:
        b = d.client(token=BOB, salt="s", timeout=DEADLINE_S)
        a = d.client(token=ALICE, salt="s", timeout=DEADLINE_S)
        clients += [b, a]
        keys = make_keys("bob-ev", 6)
        assert b.store(keys, [block(k) for k in keys]) == 6
        assert {e[1] for e in b.events()} == set(keys)
        assert a.events() == []
        a2 = d.client(token=ALICE, salt="s", timeout=DEADLINE_S)
        clients.append(a2)
        assert a.topic == a2.topic != b.topic
        assert a.topic == topic_of(namespace_of("tiny", LAYOUT.fingerprint, "s", "alice"))
        assert b.topic == topic_of(namespace_of("tiny", LAYOUT.fingerprint, "s", "bob"))
        mine = make_keys("alice-ev", 2)
        assert a.store(mine, [block(k) for k in mine]) == 2
        assert {e[1] for e in a2.events()} == set(mine)  # her rows reach her sessions, only hers
        assert b.events() == []
    finally:
        for c in clients:
            c.close()
        d.stop()


# ---------------------------------------------------------------- session table


def test_a_hello_flood_and_busy_sessions_of_alice_neither_evict_nor_lock_out_bob(tmp_path):
    """The session table holds 8; max_sessions_per_uid is left at its default (512, above the
    table): alice opens busy sessions (one pin each) and floods hellos. Before, her bound was
    the table's: her busy sessions filled it, bob's idle one was closed for hers and his next
    hello was refused (`busy`). Now a named tenant holds at most half the table, and a full table
    closes an idle session of the owner holding most: bob's session lives and his hellos go on."""
    d = _served(tmp_path, max_clients=8)
    ctx = zmq.Context()
    sock, call = _raw(ctx, d.address)
    b = None
    try:
        b = d.client(token=BOB, salt="s", timeout=DEADLINE_S)
        kb = make_keys("bob", 2)
        assert b.store(kb, [block(k) for k in kb]) == 2
        ka = make_keys("alice", 1)
        busy = 0
        for _ in range(12):  # busy sessions: a pin each, as many as she is let
            r = call("hello", ALICE, **HELLO)
            if not r["ok"]:
                assert r["error"] == "busy", r
                continue
            s = r["session"]
            scratch = list(range(r["scratch"][0], r["scratch"][0] + 1))
            assert call("store", ALICE, s, keys=ka, slots=scratch)["ok"]
            if call("pin", ALICE, s, keys=ka).get("n") == 1:
                busy += 1
        for _ in range(40):  # and a flood of empty ones
            call("hello", ALICE, **HELLO)
        assert 1 <= busy <= 4
        assert b.lookup(kb, remote=False)[0] == 2 and b.rehellos == 0  # his session was never closed
        others = [d.client(token=BOB, salt=f"s{i}", timeout=DEADLINE_S) for i in range(2)]
        op = d.client(salt="s", timeout=DEADLINE_S)  # the default tenant too
        for c in others + [op]:
            assert c.lookup(kb, remote=False)[0] == 0
            c.close()
        assert _loads(b, kb, [block(k) for k in kb]) and b.rehellos == 0
    finally:
        if b is not None:
            b.close()
        sock.close(0)
        ctx.term()
        d.stop()


def test_alice_within_her_bound_cannot_evict_bobs_idle_session(tmp_path):
    """max_clients 8, 4 per tenant: bob's session is idle (used once, long ago in request
    order); the default tenant and alice fill the rest and alice, below her bound, says hello
    again and again. A full table closes an idle session of the owner holding the most
    (alice's own), never bob's single one."""
    d = _served(tmp_path, max_clients=8, max_sessions_per_uid=4)
    ctx = zmq.Context()
    sock, call = _raw(ctx, d.address)
    try:
        bob = call("hello", BOB, **HELLO)["session"]
        assert call("lookup", BOB, bob, keys=make_keys("k", 1))["ok"]  # used, then idle
        ops = [call("hello", TCP_TOKEN, **HELLO)["session"] for _ in range(4)]
        for s in ops:
            assert call("lookup", TCP_TOKEN, s, keys=make_keys("k", 1))["ok"]
        alices = []
        for _ in range(20):
            r = call("hello", ALICE, **HELLO)
            assert r["ok"], r
            alices.append(r["session"])
            assert call("lookup", ALICE, r["session"], keys=make_keys("k", 1))["ok"]  # used: as idle as bob's
        assert call("heartbeat", BOB, bob)["ok"]
        live_ops = [s for s in ops if call("heartbeat", TCP_TOKEN, s)["ok"]]
        live = [s for s in alices if call("heartbeat", ALICE, s)["ok"]]
        assert len(live) == 3 and live == alices[-3:] and len(live_ops) == 4
    finally:
        sock.close(0)
        ctx.term()
        d.stop()


# ---------------------------------------------------------------- restarts: G3 under bob's namespace


def _load_all(c, keys: list, want: list) -> None:
    """Each key loads its own bytes: one at a time (a block comes up from G3 first), a miss
    retried until the deadline (the box is loaded: onboarding may outlast onboard_wait_s), never
    a wrong byte."""
    for k, w in zip(keys, want):
        deadline = time.monotonic() + DEADLINE_S
        while True:
            dest = _zeros(1)
            n = c.load([k], dest)
            if n:
                assert np.array_equal(dest[0], w)
                break
            assert time.monotonic() < deadline, "a block of G3 never loaded"
            time.sleep(0.05)


def _g3_served(tmp_path, name: str, tenants: dict) -> Served:
    g3 = tmp_path / "g3"
    tiers = [{"name": "g2", "capacity": 4, "eviction": "lru", "storage": "host"},
             {"name": "g3", "capacity": 32, "eviction": "lru", "storage": {"name": "disk", "path": str(g3)}}]
    # a store waits for the offloader's room, a load for its G3 blocks, on the condition (a loaded
    # box may take seconds): never a timing assertion
    return Served(tmp_path, name, tiers=tiers, daemon={
        "address": "tcp://127.0.0.1:0", "token": TCP_TOKEN, "tenants": tenants, "room_wait_s": 60.0,
        "room_stall_s": 60.0, "onboard_wait_s": 60.0}).start()


def test_bobs_g3_blocks_after_a_restart_and_after_bob_is_removed_reach_no_one_else(tmp_path):
    """bob's blocks reach G3 (G2 holds 4, pushed down by 8 more of his; G2 is lost at a restart). The daemon restarts (G2 gone): alice, naming bob's
    model and salt or crafted strings, and the default tenant miss every key; bob loads his
    bytes from G3. Then bob is removed from the config and the daemon restarts again: his blocks
    stay in G3 under his namespace, served to no one (alice, the default tenant, a new tenant).
    A tenant configured later under the name bob (a new token) finds them: the name, not the
    token, is the namespace (tokens rotate; SECURITY.md says not to reuse a name)."""
    keys = make_keys("bob-g3", 8)
    bobs = [block(k) for k in keys]
    tenants = {"alice": {"token": ALICE, "share": 0.25}, "bob": {"token": BOB, "share": 0.25}}
    d = _g3_served(tmp_path, "d1", tenants)
    try:
        with d.client(token=BOB, salt="s", timeout=DEADLINE_S) as b:
            for i in range(0, 8, 2):
                assert b.store(keys[i:i + 2], bobs[i:i + 2]) == 2
            assert b.lookup(keys, remote=False)[0] == 8
            filler = make_keys("bob-filler", 8)  # bob's keys go down to G3 (the LRU's oldest)
            for i in range(0, 8, 2):
                assert b.store(filler[i:i + 2], [block(k) for k in filler[i:i + 2]]) == 2
            n, where = b.lookup(keys, remote=False)
            assert n == 8 and set(where) == {"g3"}, where
    finally:
        d.stop()

    def nobody(d: Served, tokens: list) -> None:
        for token in tokens:
            for model, salt in _crafted("bob")[:5]:
                with d.client(token=token, model=model, salt=salt, timeout=DEADLINE_S) as c:
                    assert c.lookup(keys, remote=False)[0] == 0, (token, model, salt)
                    assert c.load(keys, _zeros(8)) == 0

    d = _g3_served(tmp_path, "d2", tenants)
    try:
        nobody(d, [ALICE, TCP_TOKEN])
        with d.client(token=BOB, salt="s", timeout=DEADLINE_S) as b:
            _load_all(b, keys, bobs)
            more = make_keys("bob-filler-2", 8)  # loads brought them up to G2 (lost at a stop): down again
            for i in range(0, 8, 2):
                assert b.store(more[i:i + 2], [block(k) for k in more[i:i + 2]]) == 2
            n, where = b.lookup(keys, remote=False)
            assert n == 8 and set(where) == {"g3"}, where
    finally:
        d.stop()
    carol = "carol-token-0123456789abcdef"
    d = _g3_served(tmp_path, "d3", {"alice": {"token": ALICE}, "carol": {"token": carol}})
    try:
        nobody(d, [ALICE, TCP_TOKEN, carol])
        with pytest.raises(RemoteError) as exc:
            d.client(token=BOB, timeout=DEADLINE_S)
        assert exc.value.code == "unauthorized"
    finally:
        d.stop()
    new_bob = "bob-new-token-0123456789abcd"
    d = _g3_served(tmp_path, "d4", {"bob": {"token": new_bob}})
    try:
        with d.client(token=new_bob, salt="s", timeout=DEADLINE_S) as b:
            _load_all(b, keys, bobs)
    finally:
        d.stop()


# ---------------------------------------------------------------- the event streams


def test_alices_token_opens_none_of_the_event_streams(tmp_path):
    """Every tenant's rows go out on the event streams (one credential for routers). alice
    presents her token (and bob his) as the PLAIN password to the events PUB, its replay ROUTER,
    the kv_events PUB and its replay ROUTER: no handshake completes, so no topic of bob's is
    read or replayed; the routers' events_token opens each."""
    from test_daemon_events import _handshake

    ev = "router-token-0123456789abcdef"
    d = _served(tmp_path, events="tcp://127.0.0.1:0", events_replay=f"ipc://{tmp_path}/evr.sock",
                events_token=ev, kv_events=f"ipc://{tmp_path}/kv.sock",
                kv_events_replay=f"ipc://{tmp_path}/kvr.sock")
    ctx = zmq.Context()
    try:
        with d.client(token=BOB, salt="s", timeout=DEADLINE_S) as b:
            k = make_keys("bob-stream", 2)
            assert b.store(k, [block(x) for x in k]) == 2
        streams = ((d.info["events"], zmq.SUB), (f"ipc://{tmp_path}/evr.sock", zmq.DEALER),
                   (f"ipc://{tmp_path}/kv.sock", zmq.SUB), (f"ipc://{tmp_path}/kvr.sock", zmq.DEALER))
        for address, kind in streams:
            for creds, outcome in ((ALICE, "failed"), (BOB, "failed"), (TCP_TOKEN, "failed"), (ev, "ok")):
                sock = ctx.socket(kind)
                sock.setsockopt(zmq.LINGER, 0)
                sock.plain_username, sock.plain_password = b"kvbm", creds.encode()
                assert _handshake(sock, address) == outcome, (address, creds[:5])
                sock.close(0)
    finally:
        ctx.term()
        d.stop()


# ---------------------------------------------------------------- deferred replies: whose session remembers them


def test_bobs_deferred_load_is_remembered_in_his_session_whoever_sent_the_last_request(tmp_path):
    """bob's load_prepare waits for its blocks to come up from G3 (answered later, on the loop),
    while alice's requests are handled meanwhile. Before, the deferred reply was remembered in
    bob's session only if the request being handled at that moment was bob's tenant's (the
    check that keeps alice off bob's sessions looked at the current request's token): with
    alice's in between, bob's cancel of that request undid nothing (his window slots stayed
    taken until reserve_s) and his retry loaded again. Now it is remembered in his session: the
    retry gets the same reply and the cancel undoes it, every round."""
    tenants = {"alice": {"token": ALICE, "share": 0.25}, "bob": {"token": BOB, "share": 0.25}}
    d = _g3_served(tmp_path, "d", tenants)
    ctx = zmq.Context()
    sock, call = _raw(ctx, d.address)
    asock, acall = _raw(ctx, d.address)
    try:
        keys = make_keys("bob-deferred", 8)
        with d.client(token=BOB, salt="s", timeout=DEADLINE_S) as b:
            for i in range(0, 8, 2):
                assert b.store(keys[i:i + 2], [block(k) for k in keys[i:i + 2]]) == 2
            filler = make_keys("bob-filler", 8)
            for i in range(0, 8, 2):
                assert b.store(filler[i:i + 2], [block(k) for k in filler[i:i + 2]]) == 2
            n, where = b.lookup(keys, remote=False)
            assert n == 8 and set(where) == {"g3"}, where
        bob = call("hello", BOB, **HELLO)["session"]
        alice = acall("hello", ALICE, **HELLO)["session"]
        for rnd in range(4):
            k = keys[2 * rnd:2 * rnd + 2]
            rid = 1000 + rnd
            for _ in range(20):  # queued before bob's request: handled around it while it waits
                asock.send(request("heartbeat", 1, ALICE, alice))
            sock.send(request("load_prepare", rid, BOB, bob, keys=k))
            for _ in range(20):
                asock.send(request("heartbeat", 1, ALICE, alice))
            first = unpack(sock.recv(), 1 << 16)
            assert first["ok"] and first["id"] == rid and len(first["slots"]) == 2, first
            for _ in range(40):
                assert unpack(asock.recv(), 1 << 16)["ok"]
            sock.send(request("load_prepare", rid, BOB, bob, keys=k))  # bob's retry: the same reply
            again = unpack(sock.recv(), 1 << 16)
            assert (again["handle"], again["slots"]) == (first["handle"], first["slots"]), (rnd, first, again)
            r = call("cancel", BOB, bob, cancels=rid)
            assert r["ok"] and r["undone"], (rnd, r)
        st = call("stats", TCP_TOKEN)["stats"]["daemon"]["state"]  # the operator's view (a tenant sees its own row only)
        assert st["loads"] == 0 and st["window_slots_used"] == 0, st
    finally:
        sock.close(0)
        asock.close(0)
        ctx.term()
        d.stop()
