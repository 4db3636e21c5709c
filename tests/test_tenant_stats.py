"""Per-tenant stats (`stats` op, Prometheus) on a real `kvbm serve` with `daemon.tenants`.

Before, `stats` answered any token with the node's counters: a tenant saw the others' volume
(lookups, stores, blocks per tier, sessions). Now a named tenant's token gets its own counters
only (tenants.tenant_stats), the operator's token (daemon.token) the node's with one row per
tenant, and /metrics has per-tenant series only when it wants the bearer token (on loopback it is
open to every local user: node-wide counters only).
"""

from __future__ import annotations

import urllib.request

import numpy as np
import pytest

zmq = pytest.importorskip("zmq")

from daemonproc import wait_until  # noqa: E402
from servedaemon import NB, TCP_TOKEN, Served, block, make_keys  # noqa: E402

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdef00"
DEADLINE_S = 120.0
OWN = {"tenant", "lookup_blocks", "prefix_hit_blocks", "prefix_hit_ratio", "stored_blocks", "loaded_blocks",
       "pinned_blocks", "blocks", "sessions", "busy_blocks", "busy_bound", "busy_share"}


def _served(tmp_path, name="d", *, metrics="", g3=True) -> Served:
    tiers = [{"name": "g2", "capacity": 16, "eviction": "lru", "storage": "host"}]
    if g3:
        tiers.append({"name": "g3", "capacity": 64, "eviction": "lru",
                      "storage": {"name": "disk", "path": str(tmp_path / name / "g3")}})
    return Served(tmp_path, name, tiers=tiers,
                  daemon={"address": "tcp://127.0.0.1:0", "token": TCP_TOKEN, "metrics": metrics,
                          "tenants": {"alice": {"token": ALICE, "share": 0.25}, "bob": {"token": BOB, "share": 0.25}}}
                  ).start()


def _where(c, keys) -> dict[str, int]:
    """Blocks per tier among keys, asked one lookup per key (exclusive mode: one tier each)."""
    out: dict[str, int] = {}
    for k in keys:
        n, where = c.lookup([k])
        if n:
            out[where[0]] = out.get(where[0], 0) + 1
    return out


def test_a_tenant_sees_its_own_counters_and_the_operator_sees_every_tenant(tmp_path, capsys):
    """alice stores 24 blocks over two salts (G2 holds 16: the rest goes down to G3), looks up 28
    (24 hits), loads 4, pins 2; bob stores 3. alice's `stats` is exactly hers: no node counter, no
    tier capacity, no word of bob, and it does not move when bob works; bob's is his. The
    operator's `stats` has both rows, equal to what each sees, beside the node's counters. (Her
    blocks per tier may change when bob stores: G2 is shared, his stores demote her blocks.)"""
    d = _served(tmp_path)
    clients = []
    try:
        a1 = d.client(token=ALICE, salt="s1", timeout=DEADLINE_S)
        a2 = d.client(token=ALICE, salt="s2", timeout=DEADLINE_S)
        b = d.client(token=BOB, salt="s1", timeout=DEADLINE_S)
        op = d.client(salt="s1", timeout=DEADLINE_S)
        clients += [a1, a2, b, op]
        k1, k2 = make_keys("alice/1", 16), make_keys("alice/2", 8)
        for c, keys in ((a1, k1), (a2, k2)):
            for i in range(0, len(keys), 4):
                assert c.store(keys[i:i + 4], [block(k) for k in keys[i:i + 4]]) == 4
        kb = make_keys("bob/1", 3)
        assert b.store(kb, [block(k) for k in kb]) == 3
        # every block of alice's where the tiers say: 24 in all, some in G3 (G2 holds 16)
        assert wait_until(lambda: sum(a1.stats()["blocks"].values()) == 24
                          and a1.stats()["blocks"] == {"g2": _where(a1, k1).get("g2", 0) + _where(a2, k2).get("g2", 0),
                                                       "g3": _where(a1, k1).get("g3", 0) + _where(a2, k2).get("g3", 0)},
                          DEADLINE_S), a1.stats()
        assert a1.stats()["blocks"]["g3"] >= 8
        hits = [a1.lookup(k1[:8])[0], a1.lookup(make_keys("alice/none", 4))[0]]
        assert hits == [8, 0]
        out = [np.zeros(NB, np.uint8) for _ in range(4)]
        assert a2.load(k2[4:], out) == 4 and all(np.array_equal(o, block(k)) for o, k in zip(out, k2[4:]))
        assert a2.pin(k2[4:6]) == 2
        mine = a1.stats()
        assert set(mine) == OWN, mine
        lookups_before = mine["lookup_blocks"]  # (_where's lookups count too: alice asked them)
        assert mine["tenant"] == "alice" and mine["stored_blocks"] == 24 and mine["loaded_blocks"] == 4
        assert mine["pinned_blocks"] == 2 and mine["sessions"] == 2
        assert mine["busy_blocks"] == 2 and mine["busy_bound"] == 4  # 0.25 of G2's 16
        assert mine["prefix_hit_blocks"] >= 8 and lookups_before >= 12
        assert sum(mine["blocks"].values()) == 24
        assert "bob" not in repr(mine) and "daemon" not in mine and "tiers" not in mine
        his = b.stats()
        assert set(his) == OWN and his["tenant"] == "bob"
        assert (his["stored_blocks"], his["blocks"], his["lookup_blocks"], his["sessions"], his["busy_blocks"]) == \
            (3, {"g2": 3, "g3": 0}, 0, 1, 0)
        # bob works; alice's view does not move
        kb2 = make_keys("bob/2", 4)
        assert b.store(kb2, [block(k) for k in kb2]) == 4 and b.lookup(kb2)[0] == 4
        now = a1.stats()  # (her blocks per tier may move: bob's stores evict from the G2 they share)
        assert {k: v for k, v in now.items() if k != "blocks"} == {k: v for k, v in mine.items() if k != "blocks"}
        assert sum(now["blocks"].values()) == 24
        # the operator: the node's counters and every tenant's row, the same as each sees
        def same(c, name: str) -> bool:  # (blocks per tier move while the offloader demotes: asked again)
            return op.stats()["tenants"][name] == {k: v for k, v in c.stats().items() if k != "tenant"}
        assert wait_until(lambda: same(a1, "alice") and same(b, "bob"), DEADLINE_S)
        node = op.stats()
        assert node["tenants"]["bob"]["stored_blocks"] == 7 and node["tenants"]["bob"]["lookup_blocks"] == 4
        assert node["tenants"]["default"]["stored_blocks"] == 0 and node["tenants"]["default"]["sessions"] == 1
        assert node["daemon"]["client_store_bytes"] == 31 * NB
        assert sum(node["tiers"][t]["used"] for t in ("g2", "g3")) >= 31
        # `kvbm stats`: a tenant's token prints its own line (no KeyError on the node's fields),
        # the operator's the node's and a line per tenant
        from kvbm.cli import main
        capsys.readouterr()
        assert main(["stats", "--address", d.address, "--token", ALICE]) == 0
        out = capsys.readouterr().out
        assert "tenant alice:" in out and "stored 24, loaded 4, pinned 2" in out and "bob" not in out, out
        assert main(["stats", "--address", d.address, "--token", TCP_TOKEN]) == 0
        out = capsys.readouterr().out
        assert "tenant alice:" in out and "tenant bob:" in out and "stored 7," in out, out
    finally:
        for c in clients:
            c.close()
        d.stop()


def test_metrics_carry_tenants_only_behind_the_token(tmp_path):
    """On loopback /metrics is open: node-wide series only, no tenant's name. Bound beyond
    loopback it wants the token, and then has kvbm_tenant_* series per tenant."""
    for name, addr, protected in (("open", "127.0.0.1:0", False), ("closed", "0.0.0.0:0", True)):
        d = _served(tmp_path, name, metrics=addr, g3=False)
        c = None
        try:
            c = d.client(token=ALICE, salt="m", timeout=DEADLINE_S)
            keys = make_keys(f"m/{name}", 5)
            assert c.store(keys, [block(k) for k in keys]) == 5
            port = int(d.info["metrics"].rsplit(":", 1)[1])
            req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
            if protected:
                req.add_header("Authorization", f"Bearer {TCP_TOKEN}")

            def scrape() -> str:
                with urllib.request.urlopen(req, timeout=DEADLINE_S) as r:
                    return r.read().decode()

            if protected:
                assert wait_until(lambda: 'kvbm_tenant_stored_blocks_total{tenant="alice"} 5.0' in scrape(),
                                  DEADLINE_S), scrape()
                text = scrape()
                assert 'kvbm_tenant_blocks{tenant="alice",tier="g2"} 5.0' in text
                assert 'kvbm_tenant_stored_blocks_total{tenant="bob"} 0.0' in text
            else:
                assert wait_until(lambda: "kvbm_tier_used_blocks" in scrape() and 'tier="g2"} 5.0' in scrape(),
                                  DEADLINE_S), scrape()
                text = scrape()
                assert "alice" not in text and "bob" not in text and "kvbm_tenant_" not in text
        finally:
            if c is not None:
                c.close()
            d.stop()


def test_without_named_tenants_the_default_row_is_the_node(tmp_path):
    """No daemon.tenants: nothing is counted apart (no per-tenant bookkeeping on the request
    loop); the one row, "default", is the node's own figures."""
    d = Served(tmp_path, "solo").start()
    c = None
    try:
        c = d.client(salt="solo")
        keys = make_keys("solo", 5)
        assert c.store(keys, [block(k) for k in keys]) == 5 and c.lookup(keys)[0] == 5
        st = c.stats()
        row = st["tenants"]["default"]
        assert list(st["tenants"]) == ["default"] and set(row) == OWN - {"tenant"}
        assert (row["stored_blocks"], row["lookup_blocks"], row["prefix_hit_blocks"], row["blocks"], row["sessions"]) == \
            (5, 5, 5, {"g2": 5}, 1)
        assert row["lookup_blocks"] == st["daemon"]["lookup_blocks"]
    finally:
        if c is not None:
            c.close()
        d.stop()
