"""Long stores and loads go in batches of half the session's window, two in flight: the client
fills batch i+1 while the daemon copies batch i (and the reverse for loads). Bytes, partial
results and errors must be exactly those of one batch at a time."""

from __future__ import annotations

import numpy as np

from kvbm.client import RemoteError
from test_daemon import NB, block, daemons, make_keys  # noqa: F401  (daemons is a fixture)
# (lease_s 60: the fixture's 1 s lease could lapse under a heartbeat starved on a loaded box,
# taking the session's pins and reservations with it)


def test_pipelined_store_and_load_move_exact_bytes(daemons):
    d = daemons(g2=512, lease_s=60.0, window_mib=1)  # 64 window slots of 16 KiB: batches of 32
    keys = make_keys("pipe", 200)
    with d.client(timeout=120) as c:
        assert c.batch == 32
        assert c.store(keys, [block(k) for k in keys]) == 200
        out = [np.zeros(NB, np.uint8) for _ in keys]
        assert c.load(keys, out) == 200
        assert all(np.array_equal(o, block(k)) for o, k in zip(out, keys))
        # a gap at 150: the load stops there, whole batches before it intact
        gap = keys[:150] + make_keys("missing", 1) + keys[151:]
        out = [np.zeros(NB, np.uint8) for _ in gap]
        assert c.load(gap, out) == 150
        assert all(np.array_equal(o, block(k)) for o, k in zip(out[:150], keys))
        assert not out[150].any()
        st = c.stats()["daemon"]["state"]
        assert st["loads"] == 0 and st["reservations"] == 0 and st["window_slots_used"] == 0


def test_pipelined_store_stays_within_the_quota(daemons):
    """max_session_blocks 40: batches of 20; with 10 blocks pinned two batches in flight would
    exceed it, so the store falls back to one batch at a time and still stores all 100."""
    d = daemons(g2=512, lease_s=60.0, window_mib=1, max_session_blocks=40)
    keys = make_keys("quota-pipe", 110)
    with d.client(timeout=120) as c:
        assert c.batch == 20
        assert c.store(keys[100:], [block(k) for k in keys[100:]]) == 10
        assert c.pin(keys[100:]) == 10
        assert c.store(keys[:100], [block(k) for k in keys[:100]]) == 100
        out = [np.zeros(NB, np.uint8) for _ in keys]
        assert c.load(keys, out) == 110
        assert all(np.array_equal(o, block(k)) for o, k in zip(out, keys))
        assert c.unpin(keys[100:]) == 10
        assert c.stats()["daemon"]["state"]["busy_blocks"] == 0


def test_pipelined_store_with_a_bad_buffer_rolls_back_and_raises(daemons):
    d = daemons(g2=512, lease_s=60.0, window_mib=1)
    keys = make_keys("bad-pipe", 100)
    bufs = [block(k) for k in keys]
    bufs[70] = np.zeros(3, np.uint8)  # wrong size, in the third batch
    with d.client(timeout=120) as c:
        try:
            c.store(keys, bufs)
            raise AssertionError("a wrong-sized buffer must raise")
        except ValueError:
            pass
        assert c.lookup(keys)[0] == 64  # the two whole batches before it, nothing of the third
        st = c.stats()["daemon"]["state"]
        assert st["reservations"] == 0 and st["window_slots_used"] == 0
        assert not isinstance(st, RemoteError)
