"""Crafted parent keys (red team round 3, H58).

A store names the key before its first one (`parent`, protocol.py), for structure-aware eviction
(`eviction: prefix`: leaves before their parents). Keys are namespaced (the parent too), so a
parent never names another tenant's block. But a tenant may link its own blocks in a cycle: A's
parent B, then B's parent A. Neither is ever a leaf, so `prefix` never evicts them, and a tenant
filling G2 with such pairs leaves every other tenant's store nothing to evict: bob's stores store
nothing. Found in session 14 and fixed in the policy (policies/prefix.py and its native core fall
back to the oldest unprotected inner blocks when no leaf is left); `auto` and `lru` held already.
"""

from __future__ import annotations

import pytest

zmq = pytest.importorskip("zmq")

from servedaemon import TCP_TOKEN, Served, block, make_keys  # noqa: E402
from test_tenant_tokens import ALICE, BOB, DEADLINE_S, _loads  # noqa: E402


def _served(tmp_path, eviction: str) -> Served:
    tiers = [{"name": "g2", "capacity": 16, "eviction": eviction, "storage": "host"}]
    return Served(tmp_path, eviction, tiers=tiers, daemon={
        "address": "tcp://127.0.0.1:0", "token": TCP_TOKEN,
        "tenants": {"alice": {"token": ALICE, "share": 0.5}, "bob": {"token": BOB, "share": 0.5}}}).start()


def _cycles_then_bob(d: Served) -> int:
    """alice fills G2 with 2-cycles of her own keys; how many of bob's 4 blocks then store."""
    with d.client(token=ALICE, salt="s", timeout=DEADLINE_S) as a, \
            d.client(token=BOB, salt="s", timeout=DEADLINE_S) as b:
        ks = make_keys("alice/cycle", 16)
        for i in range(0, 16, 2):
            x, y = ks[i], ks[i + 1]
            assert a.store([x], [block(x)], parent=y) == 1
            assert a.store([y], [block(y)], parent=x) == 1
        mine = make_keys("bob/after", 4)
        stored = b.store(mine, [block(k) for k in mine])
        if stored:
            assert _loads(b, mine[:stored], [block(k) for k in mine[:stored]])
        return stored


@pytest.mark.parametrize("eviction", ["auto", "lru"])
def test_parent_cycles_do_not_pin_g2_under_the_default_and_lru(tmp_path, eviction):
    d = _served(tmp_path, eviction)
    try:
        assert _cycles_then_bob(d) == 4
    finally:
        d.stop()


def test_parent_cycles_do_not_pin_g2_under_prefix(tmp_path):
    d = _served(tmp_path, "prefix")
    try:
        assert _cycles_then_bob(d) == 4
    finally:
        d.stop()
