"""lookup_pin: the daemon's lookup and pin of the ready prefix in one round trip (issue 14).

The vLLM connector's scheduler promises a hit and pins it until the load holds it; through a
daemon that was a lookup and a pin, two round trips on the engine's scheduler thread per hit.
lookup_pin does both in one request and keeps every contract of op pin: the pins belong to the
session, count against its quota (a refusal still answers the lookup, and pins nothing), go with
unpin, bye and the session's end; a replayed request id gets the first reply and pins nothing
again; a cancel undoes them. An older daemon (unknown_op) gets the two requests as before.
A real `kvbm serve` subprocess; waits are condition waits with deadlines of 60 s or more.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("zmq")
pytest.importorskip("yaml")

sys.path.insert(0, str(Path(__file__).parent))
from daemonproc import wait_until  # noqa: E402
from servedaemon import LAYOUT, Served, block, make_keys  # noqa: E402

from kvbm.blocks import Namespace  # noqa: E402
from kvbm.client import QuotaRefused  # noqa: E402
from kvbm.connectors import core  # noqa: E402
from kvbm.daemon.protocol import RemoteError, request  # noqa: E402

G2 = 8


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = Served(tmp_path_factory.mktemp("kvbm-lookup-pin"), "d",
               tiers=[{"name": "g2", "capacity": G2, "eviction": "lru", "storage": {"name": "host", "pin": "never"}}],
               daemon={"lease_s": 60.0, "max_session_blocks": 4, "namespace_share": 1.0}).start()
    try:
        yield d
    finally:
        d.stop()


def state(probe) -> dict:
    return probe.stats()["daemon"]["state"]


def stored(client, tag: str, n: int) -> list[bytes]:
    """n blocks stored (in batches of 2: under the session quota of 4) and ready."""
    keys = make_keys(tag, n)
    for i in range(0, n, 2):
        assert client.store(keys[i:i + 2], [block(k) for k in keys[i:i + 2]]) == len(keys[i:i + 2])
    assert client.lookup(keys)[0] == n
    return keys


def test_lookup_pin_pins_the_ready_prefix_from_pin_from(served):
    with served.client() as c, served.client(model="probe") as probe:
        keys = stored(c, "lp-a", 4)
        missing = make_keys("lp-a-missing", 2)
        taken = probe.stats()["daemon"]["pinned_blocks"]
        n, where, pinned = c.lookup_pin(keys + missing, 1)
        assert (n, len(where), pinned) == (4, 4, 3)  # keys[1:4]: the ready prefix past pin_from
        assert state(probe)["pins"] == 3
        assert probe.stats()["daemon"]["pinned_blocks"] == taken + 3
        # pinned blocks stay while another session floods G2 (8 blocks) with its own
        with served.client(salt="other") as other:
            for i in range(6):
                other.store(make_keys(f"lp-flood-{i}", 2), [block(k) for k in make_keys(f"lp-flood-{i}", 2)])
        assert c.lookup(keys[1:4])[0] == 3
        assert c.unpin(keys[1:4]) == 3
        assert wait_until(lambda: state(probe)["pins"] == 0)


def test_lookup_pin_nothing_ready_pins_nothing(served):
    with served.client() as c, served.client(model="probe") as probe:
        keys = stored(c, "lp-b", 2)
        assert c.lookup_pin(keys, 2)[::2] == (2, 0)  # pin_from at the end of the prefix
        assert c.lookup_pin(make_keys("lp-b-none", 3), 0)[::2] == (0, 0)
        assert state(probe)["pins"] == 0


def test_a_replayed_lookup_pin_pins_once_and_a_cancel_undoes_it(served):
    with served.client() as c, served.client(model="probe") as probe:
        keys = stored(c, "lp-c", 3)
        rid = c._take_id()
        msg = request("lookup_pin", rid, c.token, c.session, keys=keys, pin_from=0)
        with c._lock:
            first = c._roundtrip("lookup_pin", rid, msg)
            again = c._roundtrip("lookup_pin", rid, msg)  # a client's retry: the same id
        assert first["pinned"] == 3 and again == first
        assert state(probe)["pins"] == 3
        assert probe.stats()["daemon"]["pinned_blocks"] >= 3
        # each key pinned once: one unpin releases it
        assert c.call("cancel", cancels=rid)["undone"] is True
        assert state(probe)["pins"] == 0
        assert c.unpin(keys) == 0  # nothing left to release


def test_the_quota_refuses_the_pins_and_still_answers_the_lookup(served):
    with served.client() as c, served.client(model="probe") as probe:
        keys = stored(c, "lp-d", 6)
        assert c.lookup_pin(keys[:3], 0)[2] == 3
        with pytest.raises(QuotaRefused) as err:  # 3 held + 3 new > 4 (daemon.max_session_blocks)
            c.lookup_pin(keys, 3)
        assert (err.value.code, err.value.n, len(err.value.where)) == ("quota", 6, 6)
        assert state(probe)["pins"] == 3  # nothing of the refused request was pinned
        assert c.lookup_pin(keys[:3], 1)[2] == 2  # already pinned by this session: no new quota
        assert c.unpin(keys[:3]) == 3 and c.unpin(keys[1:3]) == 2
        assert state(probe)["pins"] == 0


def test_bye_and_the_lease_release_lookup_pins(served):
    with served.client(model="probe") as probe:
        c = served.client()
        keys = stored(c, "lp-e", 3)
        assert c.lookup_pin(keys, 0)[2] == 3
        assert state(probe)["pins"] == 3
        c.close()  # bye
        assert wait_until(lambda: state(probe)["pins"] == 0 and state(probe)["busy_blocks"] == 0)


class _Counting:
    """A Client whose round trips are counted by op."""

    def __init__(self, client, drop_lookup_pin: bool = False) -> None:
        self._c, self.ops, self.drop = client, [], drop_lookup_pin

    def __getattr__(self, name):
        return getattr(self._c, name)

    def call(self, op, **fields):
        self.ops.append(op)
        if op == "lookup_pin" and self.drop:
            raise RemoteError("unknown_op", "unknown op 'lookup_pin'")  # a daemon before lookup_pin
        return self._c.call(op, **fields)

    def lookup(self, keys, remote=True):
        r = self.call("lookup", keys=list(keys), remote=remote)
        return r["n"], r["where"]

    def lookup_pin(self, keys, pin_from=0, remote=True):
        r = self.call("lookup_pin", keys=list(keys), pin_from=pin_from, remote=remote)
        return r["n"], r["where"], r.get("pinned")

    def pin(self, keys):
        return self.call("pin", keys=list(keys))["n"]


@pytest.mark.parametrize("older_daemon", [False, True])
def test_the_schedulers_hit_is_one_round_trip(served, older_daemon):
    """SchedulerSide.match on a hit through a DaemonBackend: one request on the scheduler's
    thread (lookup_pin); against a daemon without it, lookup then pin, and the hit is pinned alike."""
    with served.client() as writer, served.client(model="probe") as probe:
        counting = _Counting(served.client(), drop_lookup_pin=older_daemon)
        backend = core.DaemonBackend(client=counting)
        try:
            sched = core.SchedulerSide(backend, None, Namespace("tiny", LAYOUT), LAYOUT.block_size)
            keys = sched.keys("r1", [f"h{older_daemon}-{i}".encode() for i in range(5)])
            assert writer.store(keys[:3], [block(k) for k in keys[:3]]) == 3
            counting.ops.clear()
            tokens = sched.match("r1", keys, 5 * LAYOUT.block_size, LAYOUT.block_size, must_compute_one=False)
            assert tokens == 2 * LAYOUT.block_size  # blocks 1 and 2 (block 0 is computed)
            assert counting.ops == (["lookup_pin", "lookup", "pin"] if older_daemon else ["lookup_pin"])
            assert state(probe)["pins"] == 2
            counting.ops.clear()
            assert sched.match("r2", keys, 5 * LAYOUT.block_size, 0, must_compute_one=False) == 3 * LAYOUT.block_size
            assert counting.ops == (["lookup", "pin"] if older_daemon else ["lookup_pin"])  # remembered
            sched.finished("r1")
            sched.finished("r2")
            backend._loads.submit(lambda: None).result(timeout=120)  # the unpins, on the load lane
            assert wait_until(lambda: state(probe)["pins"] == 0)
        finally:
            backend.close()
