"""Per-tenant tokens (`daemon.tenants`, kvbm/daemon/tenants.py) on a real `kvbm serve` over tcp://.

Before, every tcp client held the one `daemon.token`: all of them counted as one uid for the busy
G2 bound (a hostile holder took it all and every other tcp tenant's pins and two-phase stores were
refused), and any of them could name any namespace (isolation rested on secret salts). Now a
token is a tenant: its busy blocks have their own bound, its namespaces have its name mixed in,
its sessions answer only its token. Each test narrates one line of SECURITY.md.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import yaml

zmq = pytest.importorskip("zmq")

from daemonproc import wait_until  # noqa: E402
from kvbm.config import ConfigError  # noqa: E402
from kvbm.daemon.config import load_daemon_config  # noqa: E402
from kvbm.daemon.leases import namespace_of  # noqa: E402
from kvbm.daemon.protocol import RemoteError, pack, request, unpack  # noqa: E402
from kvbm.daemon.tenants import TenantIndex, parse_tenants  # noqa: E402
from servedaemon import LAYOUT, LAYOUT_DICT, NB, TCP_TOKEN, Served, block, make_keys  # noqa: E402

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdef00"
DEADLINE_S = 120.0
TIERS = [{"name": "g2", "capacity": 64, "eviction": "lru", "storage": "host"}]  # a loaded box answers late; nothing here waits on time otherwise


def _served(tmp_path, name: str = "d", *, env: dict | None = None, capacity: int = 64, **daemon) -> Served:
    daemon.setdefault("tenants", {"alice": {"token": ALICE, "share": 0.25}, "bob": {"token": BOB, "share": 0.25}})
    tiers = [{"name": "g2", "capacity": capacity, "eviction": "lru", "storage": "host"}]
    # room_wait_s short: a store into a G2 it cannot make room in answers soon (not a timing assertion)
    return Served(tmp_path, name, tiers=tiers, env=env,
                  daemon={"address": "tcp://127.0.0.1:0", "token": TCP_TOKEN, "room_wait_s": 0.2,
                          "room_stall_s": 0.1, **daemon}).start()


def _busy(d) -> int:
    """G2 blocks kept busy on the node (d: a Served; the operator's `stats`), or by a client's
    tenant (d: a Client of a named tenant: its `stats` has its own counters only)."""
    if not isinstance(d, Served):
        return d.call("stats")["stats"]["busy_blocks"]
    op = d.client(salt="busy-probe", timeout=DEADLINE_S)  # daemon.token: the default tenant
    try:
        return op.call("stats")["stats"]["daemon"]["state"]["busy_blocks"]
    finally:
        op.close()


def _loads(c, keys: list, want: list) -> bool:
    dest = [np.zeros(NB, np.uint8) for _ in keys]
    return c.load(keys, dest) == len(keys) and all(np.array_equal(d, w) for d, w in zip(dest, want))


# ---------------------------------------------------------------- quotas: each tenant its own bound


def test_a_tenant_holding_its_whole_share_does_not_stop_another_tenants_pins_and_stores(tmp_path):
    """alice keeps her whole share (16 of 64 blocks) busy, 12 pinned and 4 reserved by a
    two-phase store she never commits, across two salts. Before, all tcp clients were one uid:
    bob's pins and two-phase stores were refused (`quota`) for as long as she held them. Now
    her own further pins are refused and bob's go through, byte for byte."""
    d = _served(tmp_path)
    clients = []
    try:
        a1 = d.client(token=ALICE, salt="s1", timeout=DEADLINE_S)
        a2 = d.client(token=ALICE, salt="s2", timeout=DEADLINE_S)
        b = d.client(token=BOB, salt="s1", timeout=DEADLINE_S)
        clients += [a1, a2, b]
        assert (a1.tenant, b.tenant) == ("alice", "bob")
        # alice: 12 blocks stored and pinned in one namespace ...
        ka = make_keys("alice/1", 12)
        for i in range(0, 12, 4):
            assert a1.store(ka[i:i + 4], [block(k) for k in ka[i:i + 4]]) == 4
        assert a1.pin(ka) == 12
        # ... and 4 reserved in another (a two-phase store left uncommitted)
        kr = make_keys("alice/2", 8)
        res_a = a2.prepare_store(kr[:4])
        assert res_a.handle and sum(s >= 0 for s in res_a.slots) == 4
        assert _busy(d) == 16  # her whole share: 0.25 of 64
        # past it, whatever the namespace: her pins and reservations are refused
        assert a2.store(kr[4:], [block(k) for k in kr[4:]]) == 4  # one-shot stores hold nothing: they go on
        with pytest.raises(RemoteError) as exc:
            a2.pin(kr[4:])
        assert exc.value.code == "quota" and "tenant 'alice'" in str(exc.value) and "daemon.tenants.alice.share" in str(exc.value)
        with pytest.raises(RemoteError) as exc:
            a1.prepare_store(make_keys("alice/3", 1))
        assert exc.value.code == "quota"
        # bob: a two-phase store and pins, his own bound (before: refused, the uid's bound was alice's)
        kb = make_keys("bob/1", 8)
        res = b.prepare_store(kb)
        assert res.handle and all(v is not None for v in res.views)
        for v, k in zip(res.views, kb):
            v[:] = block(k)
        assert b.commit_store(res) == 8
        assert b.pin(kb) == 8
        assert _busy(d) == 24
        assert _loads(b, kb, [block(k) for k in kb])
        # the default tenant (daemon.token) has its own bound too
        op = d.client(salt="s1", timeout=DEADLINE_S)
        clients.append(op)
        assert op.tenant == "default"
        ko = make_keys("op/1", 4)
        assert op.store(ko, [block(k) for k in ko]) == 4 and op.pin(ko) == 4
        assert _busy(d) == 28
        # alice's reservation still commits: her bytes, in her namespace
        for v, k in zip(res_a.views, kr[:4]):
            v[:] = block(k)
        assert a2.commit_store(res_a) == 4 and _busy(d) == 24
        assert _loads(a2, kr, [block(k) for k in kr])
    finally:
        for c in clients:
            c.close()
        d.stop()


# ---------------------------------------------------------------- namespaces: bound to the tenant


def test_tenants_naming_the_same_model_and_salt_never_share_a_block(tmp_path):
    """alice and bob both say model "tiny", salt "shared" (bob learnt alice's salt). The daemon
    mixes the tenant into the namespace id: bob's lookup of alice's keys misses, his store of
    other bytes under the same keys lands in his own blocks, and each loads exactly its own
    bytes. The default tenant (daemon.token) is a third namespace."""
    d = _served(tmp_path)
    clients = []
    try:
        a = d.client(token=ALICE, salt="shared", timeout=DEADLINE_S)
        b = d.client(token=BOB, salt="shared", timeout=DEADLINE_S)
        op = d.client(salt="shared", timeout=DEADLINE_S)
        clients += [a, b, op]
        keys = make_keys("same-keys", 8)
        mine = [block(k) for k in keys]
        theirs = [np.bitwise_xor(block(k), 0xFF) for k in keys]
        assert a.store(keys[:4], mine[:4]) == 4 and a.store(keys[4:], mine[4:]) == 4
        assert a.lookup(keys, remote=False)[0] == 8
        assert b.lookup(keys, remote=False)[0] == 0  # alice's blocks are not in bob's namespace
        assert op.lookup(keys, remote=False)[0] == 0
        assert b.pin(keys) == 0
        assert b.load(keys, [np.zeros(NB, np.uint8) for _ in keys]) == 0
        assert b.store(keys[:4], theirs[:4]) == 4 and b.store(keys[4:], theirs[4:]) == 4  # new blocks, his
        assert _loads(a, keys, mine)  # alice's bytes unchanged
        assert _loads(b, keys, theirs)
        assert op.lookup(keys, remote=False)[0] == 0
        assert len({a.topic, b.topic, op.topic}) == 3  # and three event topics
        g2 = op.call("stats")["stats"]["tiers"]["g2"]
        assert g2["used"] == 16, g2  # 16 distinct blocks: nothing shared
        # the namespace ids: the default tenant's are kvbm's before tenants
        fp = LAYOUT.fingerprint
        assert namespace_of("tiny", fp, "shared") == namespace_of("tiny", fp, "shared", "")
        assert len({namespace_of("tiny", fp, "shared", t) for t in ("", "alice", "bob")}) == 3
    finally:
        for c in clients:
            c.close()
        d.stop()


# ---------------------------------------------------------------- sessions: answered to their tenant only


def _raw(ctx, address: str):
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, int(DEADLINE_S * 1000))
    s.connect(address)
    n = [0]

    def call(op: str, token: str, session=None, **fields) -> dict:
        n[0] += 1
        s.send(request(op, n[0], token, session, **fields))
        return unpack(s.recv(), 1 << 16)

    return s, call


def test_another_tenants_token_cannot_use_a_session_and_a_wrong_token_is_refused(tmp_path):
    """bob learns alice's session id (a bearer secret) and sends her ops with his own token: the
    daemon answers no_session to each (as for a session that does not exist), her pins and her
    reservation stay hers, she commits it and loads her bytes. A wrong or missing token is
    refused (`unauthorized`), before anything."""
    d = _served(tmp_path)
    ctx = zmq.Context()
    sock, call = _raw(ctx, d.address)
    a = None
    try:
        a = d.client(token=ALICE, salt="s", timeout=DEADLINE_S)
        keys = make_keys("alice", 8)
        assert a.store(keys[:4], [block(k) for k in keys[:4]]) == 4
        assert a.pin(keys[:4]) == 4
        res = a.prepare_store(keys[4:])
        for v, k in zip(res.views, keys[4:]):
            v[:] = block(k)
        sid = a.session
        for op, fields in (("heartbeat", {}), ("lookup", {"keys": keys}), ("pin", {"keys": keys[:4]}),
                           ("unpin", {"keys": keys[:4]}), ("store_commit", {"handle": res.handle, "failed": []}),
                           ("load_prepare", {"keys": keys[:4]}), ("cancel", {"cancels": 1}), ("events", {})):
            r = call(op, BOB, sid, **fields)
            assert not r["ok"] and r["error"] == "no_session", (op, r)
        assert call("bye", BOB, sid)["ok"]  # bye answers as for an unknown session ...
        assert _busy(d) == 8  # ... and closed nothing: alice's 4 pins and 4 reserved blocks
        assert a.commit_store(res) == 4 and a.rehellos == 0
        assert _loads(a, keys, [block(k) for k in keys])
        assert a.unpin(keys[:4]) == 4 and _busy(d) == 0
        # the operator's token is not alice's either
        r = call("heartbeat", TCP_TOKEN, sid)
        assert r["error"] == "no_session"
        # wrong tokens: refused before any op
        for token in ("", "alice-token-0123456789abcdeX", ALICE + " ", ALICE[:-1]):
            r = call("hello", token, model="tiny", layout=LAYOUT_DICT)
            assert not r["ok"] and r["error"] == "unauthorized", (token, r)
            r = call("heartbeat", token, sid)
            assert r["error"] == "unauthorized", (token, r)
        sock.send(pack({"op": "stats", "id": 99, "auth": 12345}))  # not even a string
        assert unpack(sock.recv(), 1 << 16)["error"] == "unauthorized"
        with pytest.raises(RemoteError) as exc:
            d.client(token="not-a-tenant-0123456789", timeout=DEADLINE_S)
        assert exc.value.code == "unauthorized"
        assert call("stats", TCP_TOKEN)["stats"]["daemon"]["unauthorized"] == 10
        assert set(call("stats", ALICE)["stats"]) >= {"tenant", "stored_blocks"}  # hers: not the node's
    finally:
        if a is not None:
            a.close()
        sock.close(0)
        ctx.term()
        d.stop()


def test_the_session_table_is_bounded_per_tenant(tmp_path):
    """max_sessions_per_uid holds per tenant on tcp:// (before, all tcp clients shared it): alice
    opening more sessions than that closes her own idlest empty ones, never bob's."""
    d = _served(tmp_path, max_sessions_per_uid=3)
    ctx = zmq.Context()
    sock, call = _raw(ctx, d.address)
    try:
        hello = {"model": "tiny", "layout": LAYOUT_DICT, "salt": ""}
        bobs = [call("hello", BOB, **hello)["session"] for _ in range(3)]
        alices = [call("hello", ALICE, **hello)["session"] for _ in range(10)]
        for sid in bobs:
            assert call("heartbeat", BOB, sid)["ok"]
        live = [sid for sid in alices if call("heartbeat", ALICE, sid)["ok"]]
        assert live == alices[-3:]
        assert call("stats", TCP_TOKEN)["stats"]["daemon"]["state"]["sessions"] == 6
        assert (call("stats", BOB)["stats"]["sessions"], call("stats", ALICE)["stats"]["sessions"]) == (3, 3)
    finally:
        sock.close(0)
        ctx.term()
        d.stop()


# ---------------------------------------------------------------- config: one line, env overrides


def _bad_configs(tmp_path) -> list[tuple[dict, str]]:
    lax = tmp_path / "lax.token"
    lax.write_text(ALICE)
    lax.chmod(0o644)
    return [
        ({"alice": {"token": ALICE}, "bob": {"token": ALICE}}, "daemon.tenants.bob.token equals daemon.tenants.alice.token"),
        ({"alice": {"token": TCP_TOKEN + "-long"}}, None),  # fine: checked below as a good one
        ({"alice": {"token": TCP_TOKEN}}, "daemon.tenants.alice.token equals daemon.token"),
        ({"": {"token": ALICE}}, "tenant name ''"),
        ({"Alice": {"token": ALICE}}, "tenant name 'Alice'"),
        ({"default": {"token": ALICE}}, "daemon.tenants.default"),
        ({"alice": {"token": ALICE, "share": 1.5}}, "daemon.tenants.alice.share"),
        ({"alice": {"token": ALICE, "share": True}}, "daemon.tenants.alice.share"),
        ({"alice": {"token": "short"}}, "daemon.tenants.alice.token has 5 characters"),
        ({"alice": {}}, "daemon.tenants.alice has no token"),
        ({"alice": {"token": ALICE, "tokn": 1}}, "daemon.tenants.alice.'tokn'"),
        ({"alice": {"token_file": str(lax)}}, "daemon.tenants.alice.token_file"),
        ({"alice": ALICE}, "daemon.tenants.alice must be a mapping"),
        (["alice"], "daemon.tenants must be a mapping"),
        ({"alice": {"token": "kvbm-events-token-0123456789"}}, "equals daemon.events_token"),
        ({"alice": {"token": ALICE, "generation": -1}}, "daemon.tenants.alice.generation"),
        ({"alice": {"token": ALICE, "generation": True}}, "daemon.tenants.alice.generation"),
        ({"alice": {"token": ALICE, "generation": "2"}}, "daemon.tenants.alice.generation"),
        ({"alice": {"token": ALICE, "generation": 1.5}}, "daemon.tenants.alice.generation"),
    ]


def test_bad_tenants_are_refused_at_load_naming_the_key(tmp_path):
    for tenants, want in _bad_configs(tmp_path):
        cfg = tmp_path / "kvbm.yaml"
        cfg.write_text(yaml.safe_dump({"layout": LAYOUT_DICT, "tiers": TIERS, "daemon": {
            "address": "tcp://127.0.0.1:0", "token": TCP_TOKEN, "events_token": "kvbm-events-token-0123456789",
            "tenants": tenants}}))
        if want is None:
            assert set(load_daemon_config(cfg, env={})[1].tenants) == {"alice"}
            continue
        with pytest.raises(ConfigError) as exc:
            load_daemon_config(cfg, env={})
        msg = str(exc.value)
        assert want in msg and "\n" not in msg, (tenants, msg)
        assert ALICE not in msg and TCP_TOKEN not in msg  # an error never echoes a token
    # tenants alone (no daemon.token) open tcp://, but the event streams then need their own credential
    cfg.write_text(yaml.safe_dump({"layout": LAYOUT_DICT, "tiers": TIERS, "daemon": {
        "address": "tcp://127.0.0.1:0", "tenants": {"alice": {"token": ALICE}}}}))
    with pytest.raises(ConfigError) as exc:
        load_daemon_config(cfg, env={})
    assert "daemon.events" in str(exc.value) and "daemon.events_token_file" in str(exc.value)
    _, dcfg = load_daemon_config(cfg, env={"KVBM_DAEMON__EVENTS": ""})
    assert dcfg.authenticated and not dcfg.token and dcfg.tenants["alice"].share == dcfg.namespace_share


def test_kvbm_serve_with_a_bad_tenant_is_one_line_and_exit_2(tmp_path):
    for i, (tenants, want) in enumerate([({"alice": {"token": ALICE}, "bob": {"token": ALICE}}, "daemon.tenants.bob.token"),
                                         ({"alice": {"token": ALICE, "share": 0}}, "daemon.tenants.alice.share")]):
        d = Served(tmp_path, f"bad{i}", daemon={"address": "tcp://127.0.0.1:0", "tenants": tenants})
        r = subprocess.run([sys.executable, "-m", "kvbm.cli", "serve", "--config", str(d.config)],
                           capture_output=True, text=True, env=d.env, timeout=300)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr and want in lines[0], r.stderr


def test_a_name_given_to_a_new_owner_does_not_reach_the_old_owners_g3_blocks(tmp_path):
    """alice stores 12 blocks; G2 holds 4, so her first 8 go down to G3 (disk, kept across restarts).
    1. Her token is rotated (a new token_file, the same generation): after the restart her
       blocks are hers still, byte for byte (her namespace ids mix in her name, not her token).
    2. The name goes to a new owner with generation 1: after the restart the same model, salt and
       keys miss, and what the new owner stores is its own. Before (no generation), a name given
       again reached the old owner's blocks: SECURITY.md could only say never to reuse a name.
    3. The old owner's blocks are still there for generation 0 (an operator's mistake undone by
       setting it back reaches them again: the generation chooses the owner, nothing is deleted)."""
    def config(token: str, **alice) -> dict:
        return {"address": "tcp://127.0.0.1:0", "token": TCP_TOKEN,
                "tenants": {"alice": {"token": token, **alice}, "bob": {"token": BOB}}}

    tiers = [{"name": "g2", "capacity": 4, "eviction": "lru", "storage": "host"},
             {"name": "g3", "capacity": 64, "eviction": "lru", "storage": {"name": "disk", "path": str(tmp_path / "g3")}}]
    keys = make_keys("alice-g3", 8)
    theirs = [block(k) for k in keys]
    rotated, newcomer = "alice-rotated-0123456789abcd", "alice-new-owner-0123456789ab"

    def run(token: str, check, **alice) -> None:
        d = Served(tmp_path, f"gen-{token[:12]}-{alice.get('generation', 0)}", tiers=tiers, daemon=config(token, **alice))
        d.start()
        c = None
        try:
            c = d.client(token=token, salt="s", timeout=DEADLINE_S)
            check(c)
        finally:
            if c is not None:
                c.close()
            d.stop()

    def first(c) -> None:
        assert c.tenant == "alice"
        for i in range(0, 8, 4):
            assert c.store(keys[i:i + 4], theirs[i:i + 4]) == 4
        more = make_keys("alice-g2", 4)  # 4 more: the first 8 go down to G3 (G2 starts empty after a restart)
        assert c.store(more, [block(k) for k in more]) == 4
        assert wait_until(lambda: all(c.lookup([k], remote=False)[1] == ["g3"] for k in keys), DEADLINE_S)

    def hers(n: int):
        def check(c) -> None:  # her first n blocks found; the last 2 of them loaded, byte for byte
            assert c.tenant == "alice" and c.lookup(keys[:n], remote=False)[0] == n
            # her stats count the recovered G3 blocks as hers (once a client of hers said hello)
            assert wait_until(lambda: c.stats()["blocks"]["g3"] >= n, DEADLINE_S), c.stats()
            for k, want in zip(keys[n - 2:n], theirs[n - 2:n]):  # (a load moves them up to G2, lost at the
                assert wait_until(lambda: _loads(c, [k], [want]), DEADLINE_S)  # next restart: G2 is memory)
        return check

    def new_owner(c) -> None:
        assert c.tenant == "alice~1"
        assert c.lookup(keys, remote=False)[0] == 0
        assert c.load(keys, [np.zeros(NB, np.uint8) for _ in keys]) == 0
        mine = [block(k + b"new") for k in keys]
        assert c.store(keys[:4], mine[:4]) == 4 and _loads(c, keys[:4], mine[:4])

    run(ALICE, first)
    run(rotated, hers(8))  # 1. the token rotated: her blocks
    run(newcomer, new_owner, generation=1)  # 2. a new owner: none of hers
    run(rotated, hers(6), generation=0)  # 3. generation 0 again: hers, untouched by the new owner


def test_tenant_tokens_come_from_0600_files_and_the_environment(tmp_path):
    """A token file (0600) or KVBM_DAEMON__TENANTS__<NAME>__TOKEN / __SHARE, like every key; the
    environment can add a tenant the file does not name."""
    tok = tmp_path / "alice.token"
    tok.write_text(ALICE + "\n")
    tok.chmod(0o600)
    carol = "carol-token-0123456789abcdef"
    env = {"KVBM_DAEMON__TENANTS__CAROL__TOKEN": carol, "KVBM_DAEMON__TENANTS__CAROL__SHARE": "0.125"}
    d = _served(tmp_path, env=env, tenants={"alice": {"token_file": str(tok)}})
    clients = []
    try:
        a = d.client(token=ALICE, timeout=DEADLINE_S)
        c = d.client(token=carol, timeout=DEADLINE_S)
        clients += [a, c]
        assert (a.tenant, c.tenant) == ("alice", "carol")
        keys = make_keys("carol", 12)
        for i in range(0, 12, 4):
            assert c.store(keys[i:i + 4], [block(k) for k in keys[i:i + 4]]) == 4
        assert c.pin(keys[:8]) == 8  # her share from the environment: 0.125 of 64
        with pytest.raises(RemoteError) as exc:
            c.pin(keys[8:])
        assert exc.value.code == "quota" and "at most 8" in str(exc.value)
        assert a.pin([]) == 0 and a.lookup(keys, remote=False)[0] == 0  # not alice's blocks
    finally:
        for cl in clients:
            cl.close()
        d.stop()
    # from the environment, a bad value names its variable
    with pytest.raises(ConfigError) as exc:
        load_daemon_config(d.config, env={"KVBM_DAEMON__TENANTS__CAROL__SHARE": "2"})
    assert "daemon.tenants.carol" in str(exc.value)


def test_token_index_finds_each_tenant_and_nothing_else():
    tenants = parse_tenants({"alice": {"token": ALICE}, "bob": {"token": BOB, "share": 0.1}}, 0.5)
    idx = TenantIndex(TCP_TOKEN, tenants)
    assert [idx.identify(t) for t in (ALICE, BOB, TCP_TOKEN)] == ["alice", "bob", ""]
    assert [idx.identify(t) for t in ("", ALICE[:-1], ALICE + "x", None, 1, b"x")] == [None] * 6
    assert tenants["bob"].share == 0.1 and TCP_TOKEN not in repr(vars(idx))  # keyed hashes only
    assert not TenantIndex("", {}).required
