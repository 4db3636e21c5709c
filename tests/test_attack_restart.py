"""The daemon killed and restarted while its clients are mid-operation (session 13 red team, H52).

A client's stores and loads are in flight (one-shot and two-phase, its window mapped) when the
daemon is SIGKILLed; a new `kvbm serve` comes up on the same socket, G2 empty and G3 recovered
from its index. The promise: every load the client makes, before, during and after, gives the
key's own bytes or a miss, never another key's or a torn block; the client finds the new daemon
by itself (hello again) and goes on; nothing is left of the old daemon in /dev/shm.

Held: the client's window of the old daemon is its own mapping (the old file was unlinked), so
nothing of the new daemon is read through it; a request the old daemon never answered times out
and is redone (or cancelled) on a fresh socket; the new daemon knows no old session (no_session:
hello again), no old handle and no old request id.
"""

from __future__ import annotations

import glob
import threading

import numpy as np
import pytest

zmq = pytest.importorskip("zmq")

from daemonproc import wait_until  # noqa: E402
from kvbm.daemon.protocol import RemoteError  # noqa: E402
from servedaemon import NB, Served, block, make_keys  # noqa: E402

DEADLINE_S = 180.0


def test_a_daemon_killed_and_restarted_mid_operation_gives_its_clients_right_bytes_or_misses(tmp_path):
    tiers = [{"name": "g2", "capacity": 16, "eviction": "lru", "storage": "host"},
             {"name": "g3", "capacity": 256, "eviction": "lru", "storage": {"name": "disk", "path": str(tmp_path / "g3")}}]
    d = Served(tmp_path, "d", tiers=tiers, daemon={"room_wait_s": 60.0, "room_stall_s": 60.0,
                                                    "onboard_wait_s": 60.0}).start()
    stop = threading.Event()
    counts = {"rounds": 0, "loaded": 0, "wrong": 0, "errors": 0, "twophase": 0}
    c = d.client(salt="s", timeout=5.0)  # short: ops the dead daemon never answers time out soon

    def work() -> None:
        i = 0
        while not stop.is_set():
            keys = make_keys(f"restart/{i % 24}", 4)  # 96 distinct blocks: G2 holds 16, G3 the rest
            i += 1
            try:
                if i % 3 == 0:  # two-phase: the window slots the daemon hands out
                    res = c.prepare_store(keys)
                    for v, k in zip(res.views, keys):
                        if v is not None:
                            v[:] = block(k)
                    if res.handle:
                        c.commit_store(res)
                    pins = c.prepare_load(keys)
                    try:
                        for v, k in zip(pins.views, keys):
                            counts["loaded"] += 1
                            if not np.array_equal(np.asarray(v), block(k)):
                                counts["wrong"] += 1
                    finally:
                        c.release_load(pins)
                    counts["twophase"] += 1
                else:  # one-shot
                    c.store(keys, [block(k) for k in keys])
                    dest = [np.zeros(NB, np.uint8) for _ in keys]
                    n = c.load(keys, dest)
                    counts["loaded"] += n
                    counts["wrong"] += sum(not np.array_equal(x, block(k)) for x, k in zip(dest[:n], keys))
                counts["rounds"] += 1
            except (TimeoutError, RemoteError):
                counts["errors"] += 1  # the daemon was down or forgot us: the next round goes on

    t = threading.Thread(target=work, daemon=True)
    try:
        t.start()
        for _ in range(3):  # three kills, each mid-operation
            at = counts["rounds"]
            assert wait_until(lambda: counts["rounds"] >= at + 15, DEADLINE_S), counts
            old = d.proc.pid
            d.proc.kill()
            d.proc.wait(60)
            d.start()  # the same socket, config and G3 folder
            assert d.proc.pid != old
        at = counts["rounds"]
        assert wait_until(lambda: counts["rounds"] >= at + 15, DEADLINE_S), counts
        stop.set()
        t.join(DEADLINE_S)
        print(counts, "rehellos", c.rehellos)
        assert counts["wrong"] == 0, counts
        assert counts["loaded"] > 0 and counts["twophase"] > 0
        assert c.rehellos >= 1
    finally:
        stop.set()
        t.join(30)
        c.close()
        d.stop()
    # the killed daemons' windows: swept by the next daemon or unlinked once mapped
    assert not glob.glob(f"/dev/shm/{d.shm}*"), glob.glob(f"/dev/shm/{d.shm}*")
