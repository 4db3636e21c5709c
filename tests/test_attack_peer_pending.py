"""Pending peer pulls are shared per owner (red team H52, session 13): one tenant's local misses
may take at most half of MAX_PENDING_PULLS, and the last eighth goes only to owners with none
pending, so another tenant's lookups still go to the peers."""
from __future__ import annotations

import queue
from types import SimpleNamespace

from kvbm.daemon.peering import DEFERRED, MAX_PENDING_PULLS, Peering


class _Metrics:
    def observe(self, *_a) -> None:
        pass


class _Fake(Peering):
    """Only what _ask_peers / _lookup_done touch: no puller thread, no network, no manager."""

    def __init__(self) -> None:
        self._puller = object()  # a puller is running (never started here: the queue is read below)
        self._current = (["envelope"], 7, 0.0)
        self.peers = SimpleNamespace(live=lambda: True)
        self._pending = 0
        self._pending_by = {}
        self._pulls = queue.SimpleQueue()
        self.manager = SimpleNamespace(lookup=lambda skeys: (0, []))
        self.counters = {"requests": 0}
        self.metrics = _Metrics()
        self.sent = []

    def _lookup_reply(self, skeys, n, where) -> dict:
        return {"n": n}

    def _drain_events(self) -> None:
        pass

    def _send(self, envelope, data) -> None:
        self.sent.append(envelope)


def _session(owner):
    return SimpleNamespace(owner=owner, namespace=b"ns-" + str(owner).encode())


def test_one_owner_takes_at_most_half_of_the_pending_pulls():
    d = _Fake()
    alice, bob, carol = _session("alice"), _session("bob"), _session(1000)
    half = MAX_PENDING_PULLS // 2
    for i in range(half):
        assert d._ask_peers(alice, [i], [i], 0) is DEFERRED
    # alice's next miss is answered from local tiers only; bob's lookups still reach the peers
    assert d._ask_peers(alice, [99], [99], 0) is None
    assert d._ask_peers(bob, [1], [1], 0) is DEFERRED
    assert d._pending == half + 1 and d._pending_by == {"alice": half, "bob": 1}
    reserve = MAX_PENDING_PULLS // 8
    for i in range(MAX_PENDING_PULLS - reserve - half - 1):
        assert d._ask_peers(bob, [i], [i], 0) is DEFERRED
    # bob stops short of his half: the last eighth goes only to owners with none pending, so two
    # owners at half each cannot leave a third none (carol, a uid, still reaches the peers)
    assert d._pending == MAX_PENDING_PULLS - reserve
    assert d._ask_peers(bob, [99], [99], 0) is None
    assert d._ask_peers(carol, [1], [1], 0) is DEFERRED and d._pending_by[1000] == 1
    assert d._ask_peers(carol, [2], [2], 0) is None  # one each from the reserve
    for owner in range(reserve - 1):
        assert d._ask_peers(_session(f"t{owner}"), [1], [1], 0) is DEFERRED
    # the global bound still holds: all MAX_PENDING_PULLS pending, even dave (with none) waits
    assert d._pending == MAX_PENDING_PULLS
    assert d._ask_peers(_session("dave"), [1], [1], 0) is None
    # a pull that ends gives its owner's slot back (and the global one), and the lookup is answered
    pending, want = d._pulls.get_nowait()
    assert pending.owner == "alice" and want[0] == b"ns-alice"
    d._lookup_done(pending)
    assert d.sent == [["envelope"]] and d._pending_by["alice"] == half - 1
    assert d._ask_peers(_session("dave"), [1], [1], 0) is DEFERRED and d._pending_by["dave"] == 1
    # every pull ends: the per-owner table empties (no owner keeps a count of zero)
    while True:
        try:
            pending, _ = d._pulls.get_nowait()
        except queue.Empty:
            break
        d._lookup_done(pending)
    assert d._pending == 0 and d._pending_by == {}
    assert d.counters["requests"] == MAX_PENDING_PULLS + 1
