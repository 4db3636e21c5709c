"""One-shot store / load: one round trip each through the session's scratch slots (the client
writes them before a store, reads them after a load), nothing held once answered. The scratch
is the session's own memory: the daemon refuses any other slot, and a client that gave up on
a one-shot (timeout) never reuses those slots, so a late copy cannot meet newer bytes."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from kvbm.client import RemoteError
from test_daemon import NB, block, daemons, make_keys  # noqa: F401  (daemons is a fixture)


def test_one_shot_ops_are_one_request_each_and_hold_nothing(daemons):
    # requests are counted: no heartbeat may fall between the two stats calls
    d = daemons(g2=64, lease_s=600.0)
    keys = make_keys("one", 4)
    with d.client(timeout=120, heartbeat=False) as c:
        first, count = c.scratch
        assert count >= 4 and first >= c.batch  # past the slots the daemon hands out
        before = c.stats()["daemon"]["requests"]
        assert c.store(keys, [block(k) for k in keys]) == 4  # request 1 (+1: the stats call)
        out = [np.zeros(NB, np.uint8) for _ in keys]
        assert c.load(keys, out) == 4  # request 2
        assert all(np.array_equal(o, block(k)) for o, k in zip(out, keys))
        st = c.stats()["daemon"]
        assert st["requests"] - before == 3
        state = st["state"]
        assert state["reservations"] == 0 and state["loads"] == 0 and state["busy_blocks"] == 0
        assert state["window_slots_used"] == 0 and state["g2_pinned"] == 0
        # a partial prefix: the load copies (and returns) only what G2 holds from the first key
        gap = keys[:2] + make_keys("absent", 1) + keys[3:]
        out = [np.zeros(NB, np.uint8) for _ in gap]
        assert c.load(gap, out) == 2 and not out[2].any()


def test_the_daemon_takes_only_the_sessions_own_scratch_slots(daemons):
    d = daemons(g2=64, lease_s=60.0)  # one session (its scratch) throughout
    keys = make_keys("slots", 2)
    with d.client(timeout=120) as c:
        first, count = c.scratch
        for slots in ([first, first], [0, 1], [first + count, first], [first], [first, -1], [first, True]):
            with pytest.raises(RemoteError) as err:
                c.call("store", keys=keys, slots=slots)
            assert err.value.code == "bad_field", slots
            with pytest.raises(RemoteError) as err:
                c.call("load", keys=keys, slots=slots)
            assert err.value.code == "bad_field", slots
        assert c.lookup(keys)[0] == 0


def test_a_timed_out_one_shot_retires_the_scratch(daemons):
    """The daemon is stopped while a one-shot store waits: the client times out and may go on
    with other blocks, but the late store, when the daemon wakes, still copies the bytes the
    client wrote for it (the scratch is not written again in this session)."""
    d = daemons(g2=64, lease_s=60.0)
    late, after = make_keys("late", 4), make_keys("after", 4)
    with d.client(timeout=120) as c:
        os.kill(d.proc.pid, signal.SIGSTOP)
        c.timeout = 0.5  # what times out is held by SIGSTOP, not by being slow
        try:
            with pytest.raises(TimeoutError):
                c.store(late, [block(k) for k in late])
            assert c.scratch is None
        finally:
            os.kill(d.proc.pid, signal.SIGCONT)
        c.timeout = 120.0
        assert c.store(after, [block(k) for k in after]) == 4  # two-phase now: its own window slots
        deadline = time.monotonic() + 180
        while c.lookup(late)[0] < 4:  # the late one-shot landed once the daemon ran again
            assert time.monotonic() < deadline, c.lookup(late)
            time.sleep(0.05)
        for keys in (late, after):
            out = [np.zeros(NB, np.uint8) for _ in keys]
            assert c.load(keys, out) == 4
            assert all(np.array_equal(o, block(k)) for o, k in zip(out, keys))
