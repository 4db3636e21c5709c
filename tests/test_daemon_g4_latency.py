"""A hung object store (a SIGSTOPped moto server) must not stall the daemon's request loop.

Before: a load_prepare of G4-resident blocks read them inside the request, and a store into a
full G2 demoted victims to G4 inside the request: while the endpoint hung, every client (G2-only
ones too) waited up to the object store's timeout (10 s, the client's own timeout).
Now G3/G4 reads run on transfer threads (kvbm.daemon.onboard), the request that needs them waits
at most onboard.WAIT_S, and the G4 timeout is onboard.G4_TIMEOUT_S.

No clock decides the outcome: the store is held (SIGSTOP, not slowness) for the whole phase and
the test's G4 timeout is HANG_S (300 s), so a request loop that waited on a G4 read would hold
every op for minutes (the clients' 120 s timeout fails the test), while a working one answers in
milliseconds; a G4 read is known to be hung (the daemon counted its onboarding) before the
G2-only client's 300 ops start, and every one of them must come back, bytes checked, while the
store is still stopped.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from servedaemon import NB, Served, block, make_keys, manager_over_g4

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

BUCKET = "kvbm-g4-latency"
ROUNDS = 100  # 3 ops each: lookup, load (bytes checked), store of a fresh block
HANG_S = 300.0  # the G4 timeout here: a hung read stays in flight for the whole hung phase


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


def _until(cond, what: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not in {timeout} s"
        time.sleep(0.05)


def _wait_for_headroom(c, n: int) -> None:
    deadline = time.monotonic() + 180
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
              "storage": {"name": "object", "url": f"s3://{BUCKET}/run", "timeout": HANG_S,
                          "storage_options": {"endpoint_url": s3.endpoint,
                                              "config_kwargs": {"read_timeout": HANG_S}}}}]
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
            _until(lambda: a.lookup(cold[:64], remote=False)[1] == ["g4"] * 64, "A's oldest blocks in G4")
            # the endpoint is up: G4 blocks onboard (off the loop) and come back byte for byte
            # (a load waits daemon.onboard_wait_s for them, then answers G2's prefix; a later one has them)
            out = [np.zeros(NB, np.uint8) for _ in range(4)]
            _until(lambda: a.load(cold[:4], out) == 4, "A's first G4 blocks onboarded")
            assert all(np.array_equal(o, block(k)) for o, k in zip(out, cold[:4]))
            hot = make_keys("hot", 8)
            assert b.store(hot, [block(k) for k in hot]) == 8
            normal = _g2_only_rounds(b, hot, "n")

            os.kill(s3.proc.pid, signal.SIGSTOP)
            started = b.stats()["daemon"]["onboard"]["started"]
            stop = threading.Event()
            answers: list[int] = []
            errors: list[BaseException] = []

            def g4_reader() -> None:
                # A keeps asking for G4 blocks while the endpoint hangs
                i = 8
                try:
                    while not stop.is_set() and i + 4 <= 64:
                        dst = [np.zeros(NB, np.uint8) for _ in range(4)]
                        n = a.load(cold[i:i + 4], dst)
                        answers.append(n)
                        assert all(np.array_equal(o, block(k)) for o, k in zip(dst[:n], cold[i:i + 4]))
                        i += 4
                except BaseException as exc:  # re-raised below, on the test's thread
                    errors.append(exc)

            reader = threading.Thread(target=g4_reader, daemon=True)
            reader.start()
            # a G4 read is in flight on the stopped store before the G2-only client starts
            _until(lambda: errors or b.stats()["daemon"]["onboard"]["started"] > started, "A's G4 read started")
            t0 = time.monotonic()
            hung = _g2_only_rounds(b, hot, "h")  # 300 ops, bytes checked, each under 120 s
            phase = time.monotonic() - t0
            stats = b.stats()["daemon"]  # the daemon answers while G4 hangs
            _until(lambda: errors or answers, "an answer to A's load of hung G4 blocks")
            stop.set()
            reader.join(HANG_S)
            assert not reader.is_alive()
            if errors:
                raise errors[0]
            # every G2-only op came back while the store was still stopped and a read of it was
            # in flight: the loop never waited on it (waiting would take HANG_S, not seconds)
            assert phase < HANG_S / 2, f"the G2-only ops took {phase:.0f} s: they waited on the hung store"
            # A's loads of hung G4 blocks are answered before the read ends: a miss, not a hang
            # (the store is stopped, so no byte of them can have come up)
            assert answers and set(answers) == {0}, answers
            assert stats["onboard"]["deferred"] >= 1
            print(f"G2-only client p99 (ms) normal {_p99(normal) * 1e3:.2f}, hung {_p99(hung) * 1e3:.2f}; "
                  f"worst hung op {max(hung) * 1e3:.1f} ms; hung phase {phase:.1f} s")
            os.kill(s3.proc.pid, signal.SIGCONT)
            # the held reads end once the store answers again: the blocks come up, bytes intact
            out = [np.zeros(NB, np.uint8) for _ in range(4)]
            _until(lambda: a.load(cold[8:12], out) == 4, "A's G4 blocks after the store resumed", HANG_S)
            assert all(np.array_equal(o, block(k)) for o, k in zip(out, cold[8:12]))
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
    from kvbm.daemon.onboard import Onboarder

    m, keys, cold = manager_over_g4(tmp_path, "onboarder", 4, 16)
    try:
        assert len(cold) == 4
        g4 = m.tiers[1].storage
        gate, real = threading.Event(), g4.read
        g4.read = lambda items: (gate.wait(600), real(items))[1]
        woken = threading.Event()
        ob = Onboarder(m, woken.set, wait_s=600.0)  # the clock is injected: service(now) below
        assert ob.start(cold[:2]) and len(ob) == 2
        finished: list = []
        ob.wait(cold[:2], lambda: finished.append(m.lookup(cold[:2])[1]))
        ob.service(time.monotonic())
        assert finished == []  # in flight, before its deadline
        ob.service(time.monotonic() + 601)
        assert finished == [["g4", "g4"]] and len(ob) == 2  # answered at the deadline: still below G2
        gate.set()
        assert woken.wait(180)
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
        assert woken.wait(180)
        ob.service()
        assert not m.tiers[1].pins and len(ob) == 0
        m.unpin(hot)
    finally:
        m.close()


def test_one_owner_holds_at_most_half_of_the_onboarding_slots(tmp_path):
    """Onboarding transfers in flight are bounded (max_jobs); one owner (a tenant, a uid) holds at
    most half of them. Before, alice loading her own G4 blocks from a hung store (each transfer
    held for the store's timeout) took every slot, and bob's G3/G4 hits came back as misses."""
    from kvbm.daemon.onboard import Onboarder

    m, _, cold = manager_over_g4(tmp_path, "owners", 8, 32)
    try:
        assert len(cold) == 8
        g4 = m.tiers[1].storage
        gate, real = threading.Event(), g4.read
        g4.read = lambda items: (gate.wait(600), real(items))[1]  # a hung store
        woken = threading.Event()
        ob = Onboarder(m, woken.set, wait_s=600.0, max_jobs=4)
        assert ob.per_owner == 2
        # alice takes her two slots; her third request finds none (answered from G2: a miss)
        assert ob.start([cold[0]], "alice") and ob.start([cold[1]], "alice")
        assert not ob.start([cold[2]], "alice") and cold[2] not in ob._inflight
        # bob's blocks still come up: half the slots are not alice's
        assert ob.start([cold[3]], "bob") and ob.start([cold[4]], 1000)  # a tenant, a uid
        assert not ob.start([cold[5]], "carol")  # all four slots in flight: the global bound
        gate.set()
        deadline = time.monotonic() + 180

        def drain() -> None:  # until every transfer in flight is completed (or the deadline)
            while len(ob) and time.monotonic() < deadline:
                woken.wait(1)
                woken.clear()
                ob.service()

        drain()
        assert len(ob) == 0 and ob._tickets == [] and ob.held_by("alice") == 0
        assert m.lookup([cold[0]])[1] == ["g2"] and m.lookup([cold[3]])[1] == ["g2"]
        assert ob.start([cold[2]], "alice")  # her slots are back
        drain()
        out = [np.zeros(NB, np.uint8) for _ in range(3)]
        got = [cold[0], cold[2], cold[3]]
        assert m.load(got, destination=out).loaded == 3
        assert all(np.array_equal(o, block(k)) for o, k in zip(out, got))
    finally:
        m.close()


def test_a_third_owner_gets_an_onboarding_slot_while_two_hold_their_share(tmp_path):
    """The last max_jobs // 8 onboarding slots go only to owners holding none (red team H52,
    session 13). Before, with max_jobs 8 and a share of 4 each, alice and bob in flight at 4 each
    took every slot and carol's G3/G4 hits came back as misses."""
    from kvbm.daemon.onboard import Onboarder

    m, _, cold = manager_over_g4(tmp_path, "three", 16, 64)
    try:
        assert len(cold) == 16
        g4 = m.tiers[1].storage
        gate, real = threading.Event(), g4.read
        g4.read = lambda items: (gate.wait(600), real(items))[1]  # a hung store
        woken = threading.Event()
        ob = Onboarder(m, woken.set, wait_s=600.0, max_jobs=8)
        assert ob.per_owner == 4
        for i in range(4):  # alice takes her share
            assert ob.start([cold[i]], "alice")
        assert not ob.start([cold[4]], "alice")
        for i in range(5, 8):  # bob takes what is left but the reserve: his fourth finds none
            assert ob.start([cold[i]], "bob")
        assert not ob.start([cold[8]], "bob") and cold[8] not in ob._inflight
        assert ob.held_by("alice") == 4 and ob.held_by("bob") == 3
        assert ob.start([cold[9]], "carol")  # holding none: the reserve is hers
        assert ob.held_by("carol") == 1 and len(ob._tickets) == 8
        assert not ob.start([cold[10]], 1000)  # all eight in flight: the global bound still holds
        gate.set()
        deadline = time.monotonic() + 180
        while len(ob) and time.monotonic() < deadline:
            woken.wait(1)
            woken.clear()
            ob.service()
        assert len(ob) == 0 and ob._tickets == []
        assert m.lookup([cold[9]])[1] == ["g2"]  # carol's block came up
    finally:
        m.close()
