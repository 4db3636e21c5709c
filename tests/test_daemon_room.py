"""A burst of stores larger than G2's headroom, the background offloader behind: the stores wait
(off the request loop) for the offloader to make room, so G2's victims are demoted to G4, not
dropped. Before: such a store demoted its victims synchronously, and the daemon refuses a G4 put
on its request loop, so they dropped (kvbm/daemon/onboard.py).

The hung-store side (a store never waits long on a stuck offloader) is
test_daemon_g4_latency.py::test_hung_object_store_does_not_delay_a_g2_only_client."""

from __future__ import annotations

import time

import numpy as np

from servedaemon import NB, Served, block, make_keys


def test_a_burst_beyond_the_headroom_waits_for_room_and_drops_nothing(tmp_path):
    tiers = [{"name": "g2", "capacity": 32, "eviction": "lru", "storage": "host", "headroom": 4},
             {"name": "g4", "capacity": 512, "eviction": "lru",
              "storage": {"name": "object", "url": f"file://{tmp_path}/g4"}}]
    # generous bounds: the stores wait until the offloader made room, however slow the box
    d = Served(tmp_path, "d", tiers=tiers,
               daemon={"room_wait_s": 60.0, "room_stall_s": 60.0, "onboard_wait_s": 60.0}).start()
    try:
        one_shot = make_keys("burst", 96)  # 6 one-shot stores of 16 (the scratch), back to back
        two_phase = make_keys("long", 64)  # 2 stores of 32, each in two-phase batches of 8
        with d.client(salt="a") as a, d.client(salt="b") as b:
            assert a.scratch[1] == 16 and b.batch == 8  # two-phase: pipelined batches of 8 (share of G2 / 2)
            for i in range(0, len(one_shot), 16):
                assert a.store(one_shot[i:i + 16], [block(k) for k in one_shot[i:i + 16]]) == 16
            for i in range(0, len(two_phase), 32):
                assert b.store(two_phase[i:i + 32], [block(k) for k in two_phase[i:i + 32]]) == 32
            st = a.stats()
            # every victim went down to G4: none dropped, none failed
            assert st["tiers"]["g2"]["drops"] == 0 and st["tiers"]["g4"]["failed"] == 0, st["tiers"]
            assert st["daemon"]["room"]["waited"] >= 1 and st["daemon"]["room"]["waiting"] == 0
            for c, keys in ((a, one_shot), (b, two_phase)):  # all 160 held, in G2 or G4
                deadline = time.monotonic() + 180  # a block on its way down is a brief miss
                while c.lookup(keys, remote=False)[0] < len(keys):
                    assert time.monotonic() < deadline, (len(keys), c.lookup(keys, remote=False), c.stats()["tiers"])
                    time.sleep(0.05)
            # bytes: b's last blocks (G2), then a's first ones (G4: they come up off the loop)
            # (a load waits daemon.onboard_wait_s for blocks coming up, then answers G2's prefix;
            # should a loaded box take longer, the onboarding goes on and a later load has them)
            for c, keys in ((b, two_phase[-8:]), (a, one_shot[:8])):
                deadline = time.monotonic() + 180
                while True:
                    out = [np.zeros(NB, np.uint8) for _ in keys]
                    n = c.load(keys, out)
                    assert all(np.array_equal(o, block(k)) for o, k in zip(out[:n], keys))
                    if n == len(keys):
                        break
                    assert time.monotonic() < deadline, (n, c.stats()["tiers"])
                    time.sleep(0.05)
            state = a.stats()["daemon"]["state"]
            assert state["reservations"] == 0 and state["busy_blocks"] == 0
    finally:
        d.stop()
