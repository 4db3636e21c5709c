"""A hung object store (a SIGSTOPped moto server) must not stall the daemon's request loop.

Before: a load_prepare of G4-resident blocks read them inside the request, and a store into a
full G2 demoted victims to G4 inside the request: while the endpoint hung, every client (G2-only
ones too) waited up to the object store's timeout (10 s, the client's own timeout).
Now G3/G4 reads run on transfer threads (kvbm.daemon.onboard), the request that needs them waits
at most onboard.WAIT_S, and the G4 timeout is onboard.G4_TIMEOUT_S.

The G2-only client's latency is measured twice in the same test, endpoint up and endpoint hung:
no op may wait 1 s while the store hangs (before: seconds), and its p99 must stay within 2x the
normal p99 (a ratio, so a slow box slows both; measured up to three times against CPU hogs).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from servedaemon import NB, Served, block, make_keys

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

BUCKET = "kvbm-g4-latency"
ROUNDS = 100  # 3 ops each: lookup, load (bytes checked), store of a fresh block


@pytest.fixture
def s3(monkeypatch):
    import fsspec

    from s3server import FAKE_CREDENTIALS, MotoServer

    for name, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    server = MotoServer().start()
    try:
        fsspec.filesystem("s3", endpoint_url=server.endpoint, skip_instance_cache=True).mkdir(BUCKET)
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()


def _g2_only_rounds(c, hot: list, tag: str) -> list[float]:
    lat: list[float] = []
    out = [np.zeros(NB, np.uint8) for _ in hot]
    for r in range(ROUNDS):
        t0 = time.perf_counter()
        n, _ = c.lookup(hot, remote=False)
        lat.append(time.perf_counter() - t0)
        assert n == len(hot)
        t0 = time.perf_counter()
        got = c.load(hot, out)
        lat.append(time.perf_counter() - t0)
        assert got == len(hot) and all(np.array_equal(o, block(k)) for o, k in zip(out, hot))
        fresh = make_keys(f"{tag}/fresh{r}", 1)
        t0 = time.perf_counter()
        c.store(fresh, [block(fresh[0])])
        lat.append(time.perf_counter() - t0)
    return lat


def _wait_for_headroom(c, n: int) -> None:
    deadline = time.monotonic() + 60
    while True:
        g2 = c.stats()["tiers"]["g2"]
        if g2["capacity"] - g2["used"] >= n:
            return
        assert time.monotonic() < deadline, f"the offloader made no room in G2: {g2}"
        time.sleep(0.02)


def _p99(lat: list[float]) -> float:
    return float(np.percentile(np.array(lat), 99))


def test_hung_object_store_does_not_delay_a_g2_only_client(tmp_path, s3):
    from s3server import FAKE_CREDENTIALS

    tiers = [{"name": "g2", "capacity": 96, "eviction": "lru", "storage": "host", "headroom": 8},
             {"name": "g4", "capacity": 512, "eviction": "lru",
              "storage": {"name": "object", "url": f"s3://{BUCKET}/run",
                          "storage_options": {"endpoint_url": s3.endpoint}}}]
    d = Served(tmp_path, "d", tiers=tiers, env=FAKE_CREDENTIALS).start()
    try:
        cold = make_keys("cold", 160)
        with d.client(salt="cold") as a, d.client(salt="hot") as b:
            # A's oldest blocks end up in G4 (the background offloader demotes them). Batches no
            # bigger than G2's headroom, each once the offloader made room: a burst beyond it
            # would make a store demote synchronously, which the daemon refuses to do into G4
            # on its request loop (those victims drop; see kvbm/daemon/onboard.py).
            for i in range(0, len(cold), 8):
                _wait_for_headroom(a, 8)
                assert a.store(cold[i:i + 8], [block(k) for k in cold[i:i + 8]]) == 8
            deadline = time.monotonic() + 60
            while a.lookup(cold[:64], remote=False)[1] != ["g4"] * 64:
                assert time.monotonic() < deadline, a.lookup(cold[:64], remote=False)
                time.sleep(0.05)
            # the endpoint is up: G4 blocks onboard (off the loop) and come back byte for byte
            out = [np.zeros(NB, np.uint8) for _ in range(4)]
            assert a.load(cold[:4], out) == 4
            assert all(np.array_equal(o, block(k)) for o, k in zip(out, cold[:4]))
            hot = make_keys("hot", 8)
            assert b.store(hot, [block(k) for k in hot]) == 8

            worst, tries = 0.0, []
            for attempt in range(3):
                os.kill(s3.proc.pid, signal.SIGCONT)
                normal = _g2_only_rounds(b, hot, f"n{attempt}")
                os.kill(s3.proc.pid, signal.SIGSTOP)
                stop = threading.Event()
                a_lat: list[float] = []
                errors: list[BaseException] = []

                def g4_reader(first: int = 8 + attempt * 16) -> None:
                    # A keeps asking for G4 blocks while the endpoint hangs
                    i = first
                    try:
                        while not stop.is_set() and i + 4 <= 64:
                            dst = [np.zeros(NB, np.uint8) for _ in range(4)]
                            t0 = time.perf_counter()
                            n = a.load(cold[i:i + 4], dst)
                            a_lat.append(time.perf_counter() - t0)
                            assert all(np.array_equal(o, block(k)) for o, k in zip(dst[:n], cold[i:i + 4]))
                            i += 4
                    except BaseException as exc:  # re-raised below, on the test's thread
                        errors.append(exc)

                reader = threading.Thread(target=g4_reader, daemon=True)
                reader.start()
                hung = _g2_only_rounds(b, hot, f"h{attempt}")
                stats = b.stats()["daemon"]  # the daemon answers while G4 hangs
                stop.set()
                reader.join(60)
                assert not reader.is_alive()
                if errors:
                    raise errors[0]
                worst = max(worst, max(hung))
                # A's loads of hung G4 blocks are answered (a miss or a short prefix), never hang
                assert a_lat and max(a_lat) < 5.0, a_lat
                assert stats["onboard"]["deferred"] >= 1
                tries.append((_p99(normal), _p99(hung)))
                assert worst < 1.0, f"a G2-only op waited {worst:.2f}s while G4 hung"
                if tries[-1][1] <= 2 * tries[-1][0]:
                    break
            p99_normal, p99_hung = tries[-1]
            print(f"G2-only client p99 (ms) normal/hung per try: "
                  f"{[(round(a * 1e3, 2), round(b * 1e3, 2)) for a, b in tries]}; worst hung op {worst * 1e3:.1f} ms")
            assert p99_hung <= 2 * p99_normal, f"p99 {p99_hung * 1e3:.2f} ms hung vs {p99_normal * 1e3:.2f} ms normal: {tries}"
            os.kill(s3.proc.pid, signal.SIGCONT)
            assert d.proc.poll() is None
    finally:
        os.kill(s3.proc.pid, signal.SIGCONT)
        d.stop()


def test_daemon_gives_g4_a_timeout_well_below_the_clients(tmp_path):
    from kvbm.client import Client
    from kvbm.config import KVBMConfig
    from kvbm.daemon.config import DaemonConfig
    from kvbm.daemon.onboard import G4_TIMEOUT_S
    from kvbm.daemon.server import _daemon_tiers

    def tiers(g4_options: dict) -> list:
        return [{"name": "g2", "capacity": 8, "storage": "host"},
                {"name": "g4", "capacity": 8, "storage": {"name": "object", "url": f"file://{tmp_path}/g4",
                                                          **g4_options}}]

    layout = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 64, "block_size": 16}
    client_timeout = Client.__init__.__kwdefaults__["timeout"]
    cfg = _daemon_tiers(KVBMConfig.from_dict({"layout": layout, "tiers": tiers({})}), DaemonConfig())
    assert cfg.tiers[1].storage.options["timeout"] == G4_TIMEOUT_S <= client_timeout / 4
    cfg = _daemon_tiers(KVBMConfig.from_dict({"layout": layout, "tiers": tiers({"timeout": 7})}), DaemonConfig())
    assert cfg.tiers[1].storage.options["timeout"] == 7  # the operator's own choice stands


def test_onboarder_waits_bounded_then_releases_everything(tmp_path):
    """The onboarder alone, over a manager whose G4 reads hang until a gate opens: the waiter is
    answered at its deadline with the blocks still in flight (a miss, not a hang); once the read
    ends, the blocks are in G2 with their bytes and no pin or map entry is left behind."""
    from kvbm.config import KVBMConfig
    from kvbm.daemon.onboard import Onboarder
    from kvbm.manager import BlockManager

    cfg = KVBMConfig.from_dict({
        "layout": {"num_layers": 2, "num_kv_heads": 2, "head_dim": 64, "block_size": 16},
        "tiers": [{"name": "g2", "capacity": 4, "storage": {"name": "host", "pin": "never"}},
                  {"name": "g4", "capacity": 16, "storage": {"name": "object", "url": f"file://{tmp_path}/g4"}}]})
    m = BlockManager.from_config(cfg)
    try:
        keys = make_keys("onboarder", 8)
        for k in keys:
            assert not m.store([k], source=[block(k)]).rejected
        cold = [k for k, w in zip(keys, m.lookup(keys)[1]) if w == "g4"]
        assert len(cold) == 4
        g4 = m.tiers[1].storage
        gate, real = threading.Event(), g4.read
        g4.read = lambda items: (gate.wait(60), real(items))[1]
        woken = threading.Event()
        ob = Onboarder(m, woken.set, wait_s=0.5)
        assert ob.start(cold[:2]) and len(ob) == 2
        finished: list = []
        ob.wait(cold[:2], lambda: finished.append(m.lookup(cold[:2])[1]))
        ob.service(time.monotonic())
        assert finished == []  # in flight, before its deadline
        ob.service(time.monotonic() + 1)
        assert finished == [["g4", "g4"]] and len(ob) == 2  # answered at the deadline: still below G2
        gate.set()
        assert woken.wait(60)
        ob.service()
        assert len(ob) == 0 and not m.tiers[1].pins and not m.tiers[0].pending
        assert m.lookup(cold[:2]) == (2, ["g2", "g2"])
        out = [np.zeros(NB, np.uint8) for _ in range(2)]
        assert m.load(cold[:2], destination=out).loaded == 2
        assert all(np.array_equal(o, block(k)) for o, k in zip(out, cold[:2]))
        # G2 full of pinned blocks: nothing can come up, nothing waits, and the G4 sources it
        # pinned for the attempt are released once the transfer thread is done with them
        hot = list(m.tiers[0].ready)
        assert m.pin(hot) == 4
        woken.clear()
        assert not ob.start(cold[2:4])
        assert woken.wait(60)
        ob.service()
        assert not m.tiers[1].pins and len(ob) == 0
        m.unpin(hot)
    finally:
        m.close()
