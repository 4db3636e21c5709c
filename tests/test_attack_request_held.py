"""Hostile-client classes on the request path that held when tried (session 11 review): each is
an attack, written as a test so it keeps holding.

- Namespace names that look alike: no normalisation anywhere (Unicode forms, case, spaces,
  where model ends and salt begins), so each spelling is its own namespace: never a shared one.
- A store whose commit never comes, on a connection that dies (tcp: the daemon knows no pid):
  the reservation is rolled back at the lease, the keys are storable again, nothing leaks.
- Pins right at the quota edge from many sessions of one namespace: the namespace holds exactly
  its share, never one block more, and a refused request pins nothing.
"""

from __future__ import annotations

import numpy as np
import pytest

zmq = pytest.importorskip("zmq")

from daemonproc import wait_until  # noqa: E402
from kvbm.daemon.protocol import RemoteError, request, unpack  # noqa: E402
from servedaemon import LAYOUT_DICT, NB, TCP_TOKEN, Served, block, make_keys  # noqa: E402

DEADLINE_S = 120.0


@pytest.fixture
def served(tmp_path):
    ds: list[Served] = []

    def start(name: str = "d", **daemon) -> Served:
        ds.append(Served(tmp_path, name, daemon=daemon).start())
        return ds[-1]

    yield start
    for d in ds:
        d.stop()


def test_names_that_look_alike_are_different_namespaces(served):
    d = served()
    spellings = [("café", ""), ("cafe\u0301", ""), ("Café", ""), ("café ", ""), (" café", ""),
                 ("caf\u200dé", ""), ("café", "x"), ("cafés", ""), ("caf", "é"), ("café", " ")]
    keys = make_keys("look-alike", 3)
    owner = d.client(model=spellings[0][0], salt=spellings[0][1])
    others = [d.client(model=m, salt=s) for m, s in spellings[1:]]
    try:
        assert owner.store(keys, [block(k) for k in keys]) == 3
        for c in others:
            assert c.lookup(keys) == (0, [])
            assert c.load(keys, [np.zeros(NB, np.uint8) for _ in keys]) == 0
        assert owner.lookup(keys)[0] == 3
        assert len({c.topic for c in [owner, *others]}) == len(spellings)  # distinct event topics too
    finally:
        for c in [owner, *others]:
            c.close()


def test_a_store_whose_commit_never_comes_on_a_dying_tcp_connection(served):
    """store_prepare, then the connection dies (no bye, no commit; on tcp no pid to watch)."""
    d = served(address="tcp://127.0.0.1:0", lease_s=1.0)
    watcher = d.client()
    base = watcher.stats()["daemon"]["state"]
    keys = make_keys("never-committed", 8)
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(d.address)
    try:
        s.send(request("hello", 1, TCP_TOKEN, None, model="tiny", layout=LAYOUT_DICT))
        assert s.poll(DEADLINE_S * 1000)
        sid = unpack(s.recv(), 1 << 20)["session"]
        s.send(request("store_prepare", 2, TCP_TOKEN, sid, keys=keys))
        assert s.poll(DEADLINE_S * 1000)
        prep = unpack(s.recv(), 1 << 20)
        assert prep["ok"] and prep["handle"] and sum(x >= 0 for x in prep["slots"]) == 8
        assert watcher.stats()["daemon"]["state"]["reservations"] == base["reservations"] + 1
    finally:
        s.close(0)  # the connection dies with the reservation open
        ctx.term()

    def back() -> bool:
        st = watcher.stats()["daemon"]["state"]
        return all(st[k] == base[k] for k in ("reservations", "busy_blocks", "window_slots_used", "g2_pending"))

    assert wait_until(back, DEADLINE_S), watcher.stats()["daemon"]["state"]
    assert watcher.lookup(keys) == (0, [])  # nothing of it was ever served
    assert watcher.store(keys, [block(k) for k in keys]) == 8  # the keys are storable again
    out = [np.zeros(NB, np.uint8) for _ in keys]
    assert watcher.load(keys, out) == 8 and all(np.array_equal(o, block(k)) for o, k in zip(out, keys))
    watcher.close()


def test_pins_at_the_quota_edge_from_many_sessions_of_one_namespace(served):
    d = served()  # G2: 64 blocks, namespace_share 0.5: 32 busy at most per namespace
    keys = make_keys("edge", 64)
    writer = d.client()
    sessions = [d.client() for _ in range(8)]
    try:
        for i in range(0, 64, 8):
            assert writer.store(keys[i:i + 8], [block(k) for k in keys[i:i + 8]]) == 8
        pinned = 0
        for j, c in enumerate(sessions[:6]):  # 6 x 5 = 30
            pinned += c.pin(keys[5 * j:5 * j + 5])
        assert pinned == 30
        with pytest.raises(RemoteError) as exc:  # 5 more would be 35: refused whole
            sessions[6].pin(keys[30:35])
        assert exc.value.code == "quota"
        assert sessions[6].pin(keys[30:32]) == 2  # exactly at the edge
        with pytest.raises(RemoteError):
            sessions[7].pin(keys[32:33])  # one past it, from yet another session
        with pytest.raises(RemoteError):
            sessions[7].pin(keys[0:1])  # a block another session pins counts again for this one
        st = writer.stats()["daemon"]["state"]
        assert st["busy_blocks"] == 32 and st["g2_pinned"] == 32 and st["pins"] == 32, st
    finally:
        for c in [writer, *sessions]:
            c.close()
