"""The cache daemon end to end: real `kvbm serve` subprocesses, clients in other processes.

Each test starts its daemons on ipc:// paths or ephemeral loopback ports under tmp_path, with
their own /dev/shm file, and stops them with SIGTERM (or SIGKILL, where that is the point).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
import zmq

from kvbm.blocks import KVLayout
from kvbm.client import Client, RemoteError
from kvbm.config import ConfigError
from kvbm.daemon.config import DaemonConfig, is_local
from daemonproc import HAVE_NIXL, wait_ready, wait_until, write_peer_secret

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, block_size=16)  # 16 KiB blocks
NB = LAYOUT.block_nbytes



def block(key: bytes) -> np.ndarray:
    """The bytes every test stores under `key`: derived from it, so any reader can verify."""
    return np.frombuffer(hashlib.shake_128(key).digest(NB), dtype=np.uint8)


def make_keys(tag: str, n: int) -> list[bytes]:
    return [hashlib.blake2b(f"{tag}/{i}".encode(), digest_size=16).digest() for i in range(n)]


TCP_TOKEN = "kvbm-test-tcp-token"  # the token of the test daemons bound on tcp:// (and of their peers)


class Daemon:
    """A `kvbm serve` subprocess; `info` is its ready line (address, metrics, shm, ...)."""

    def __init__(self, tmp: Path, name: str, *, g2: int = 64, g3: int = 0, nixl: bool = False,
                 headroom: int | None = None, eviction: str = "lru", layout: dict | None = None,
                 **daemon: object) -> None:
        self.dir = tmp / name
        self.dir.mkdir(exist_ok=True)
        if nixl:  # peers prove the cluster's secret to each other
            daemon.setdefault("peer_secret_file", write_peer_secret(tmp))
        if str(daemon.get("address", "")).startswith("tcp://") or daemon.get("peers"):
            daemon.setdefault("token", TCP_TOKEN)  # tcp:// needs one (config.py); a cluster's daemons share it
        self.token = str(daemon.get("token") or "")
        tiers = [{"name": "g2", "capacity": g2, "eviction": eviction, "storage": "host"}]
        if headroom is not None:
            tiers[0]["headroom"] = headroom
        if g3:
            tiers.append({"name": "g3", "capacity": g3, "eviction": "lru",
                          "storage": {"name": "disk", "path": str(self.dir / "g3"), "direct": False}})
        self.shm = f"kvbm-test-{uuid.uuid4().hex[:12]}"
        cfg = {"namespace": {"model": "tiny"},
               "layout": layout or {"num_layers": 2, "num_kv_heads": 2, "head_dim": 64, "block_size": 16},
               "tiers": tiers,
               "daemon": {"address": f"ipc://{self.dir}/d.sock", "events": "", "metrics": "",
                          "shm_name": self.shm, "lease_s": 1.0, "nixl": nixl, **daemon}}
        self.config = self.dir / "kvbm.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}

    def start(self, timeout: float = 180.0) -> "Daemon":  # (a condition wait: a loaded CI start takes long)
        out = self.dir / "stdout.txt"
        out.write_text("")
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVBM_")}
        self.proc = subprocess.Popen([sys.executable, "-m", "kvbm.cli", "serve", "--config", str(self.config)],
                                     stdout=out.open("w"), stderr=(self.dir / "stderr.txt").open("w"), env=env)
        self.info = wait_ready(self.proc, out, timeout)
        if self.info is not None:
            return self
        self.kill()
        raise RuntimeError(f"daemon did not start: {(self.dir / 'stderr.txt').read_text()[-2000:]}")

    @property
    def address(self) -> str:
        return self.info["address"]

    def client(self, **kw: object) -> Client:
        if self.token:
            kw.setdefault("token", self.token)
        kw.setdefault("model", "tiny")
        kw.setdefault("layout", LAYOUT)
        return Client(self.address, **kw)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        try:
            os.unlink(f"/dev/shm/{self.shm}")  # a killed daemon leaves its pool file behind
        except FileNotFoundError:
            pass


@pytest.fixture
def daemons(tmp_path):
    started: list[Daemon] = []

    def start(name: str = "d", **kw: object) -> Daemon:
        d = Daemon(tmp_path, name, **kw).start()
        started.append(d)
        return d

    yield start
    for d in started:
        try:
            d.stop(5)
        except subprocess.TimeoutExpired:
            pass
        d.kill()


def run_client(script: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """A client in its own process; the script sees `address`, helpers and argv."""
    prelude = textwrap.dedent("""
        import sys, json, hashlib, numpy as np
        from kvbm.client import Client
        from kvbm.blocks import KVLayout
        LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, block_size=16)
        NB = LAYOUT.block_nbytes
        def block(key): return np.frombuffer(hashlib.shake_128(key).digest(NB), dtype=np.uint8)
        def make_keys(tag, n): return [hashlib.blake2b(f"{tag}/{i}".encode(), digest_size=16).digest() for i in range(n)]
        address = sys.argv[1]
    """)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(script), *args],
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- sharing on one node

def test_two_client_processes_share_blocks(daemons):
    d = daemons()
    # client A stores 40 blocks through the shared G2 pool
    a = run_client("""
        c = Client(address, model="tiny", layout=LAYOUT)
        keys = make_keys("shared", 40)
        print(c.store(keys, [block(k) for k in keys]))
        c.close()
    """, d.address)
    assert a.returncode == 0, a.stderr
    assert a.stdout.strip() == "40"
    # client B, another process, finds and loads all 40; bytes identical
    b = run_client("""
        c = Client(address, model="tiny", layout=LAYOUT)
        keys = make_keys("shared", 40)
        n, where = c.lookup(keys)
        out = [np.zeros(NB, np.uint8) for _ in keys]
        m = c.load(keys, out)
        bad = sum(not np.array_equal(o, block(k)) for o, k in zip(out, keys))
        print(json.dumps([n, m, bad]))
        c.close()
    """, d.address)
    assert b.returncode == 0, b.stderr
    assert json.loads(b.stdout) == [40, 40, 0]


def test_zero_copy_halves_and_events(daemons):
    d = daemons(g2=16)
    with d.client() as c:
        keys = make_keys("zc", 4)
        # prepare store [k0..k3] -> 4 slots; write them in place; commit, k2 reported failed
        res = c.prepare_store(keys)
        assert all(s >= 0 for s in res.slots)
        for k, v in zip(keys, res.views):
            v[:] = block(k)
        assert c.commit_store(res, failed=[2]) == 3
        assert c.lookup(keys) == (2, ["g2", "g2"])  # k2 rolled back: the prefix stops there
        # a second store of the same keys writes only the missing one
        res = c.prepare_store(keys)
        assert [s >= 0 for s in res.slots] == [False, False, True, False]
        res.views[2][:] = block(keys[2])
        c.commit_store(res)
        pins = c.prepare_load(keys)
        assert len(pins.views) == 4 and all(np.array_equal(v, block(k)) for v, k in zip(pins.views, keys))
        c.release_load(pins)
        kinds = [(kind, key) for kind, key, _ in c.events()]
        assert ("stored", keys[2]) in kinds and sum(kind == "stored" for kind, _ in kinds) == 4


def test_namespaces_never_share_blocks(daemons):
    d = daemons()
    keys = make_keys("ns", 8)
    with d.client() as a, d.client(salt="tenant-b") as b, d.client(model="other") as m:
        assert a.store(keys, [block(k) for k in keys]) == 8
        assert b.lookup(keys) == (0, [])
        assert m.lookup(keys) == (0, [])
        assert b.load(keys, [np.zeros(NB, np.uint8) for _ in keys]) == 0
        assert b.pin(keys) == 0 and b.unpin(keys) == 0
        assert b.events() == [] and m.events() == []
        assert a.lookup(keys)[0] == 8
    with pytest.raises(RemoteError, match="layout_mismatch"):
        d.client(layout=KVLayout(num_layers=4, num_kv_heads=2, head_dim=64, block_size=16))


def test_refused_hello_leaves_nothing_open(daemons, monkeypatch):
    # a Client whose hello fails must close its socket and context: one left to the garbage
    # collector ran zmq's term() inside an unrelated import and hung that process for good
    import kvbm.client

    made = []

    class Recorded(kvbm.client.zmq.Context):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    d = daemons()
    monkeypatch.setattr(kvbm.client.zmq, "Context", Recorded)
    with pytest.raises(RemoteError, match="layout_mismatch"):
        d.client(layout=KVLayout(num_layers=4, num_kv_heads=2, head_dim=64, block_size=16))
    with pytest.raises(ValueError, match="control character"):
        d.client(model="bad\x00model")  # refused before anything is opened
    assert len(made) == 1 and made[0].closed


def test_unpin_only_releases_own_pins(daemons):
    d = daemons(g2=4, namespace_share=1.0)  # one namespace may pin 3 of 4 here
    keys = make_keys("pins", 4)
    with d.client() as a, d.client() as b:
        assert a.store(keys[:3], [block(k) for k in keys[:3]]) == 3
        assert a.pin(keys[:3]) == 3
        assert b.unpin(keys[:3]) == 0  # b never pinned them
        # a's three pinned blocks cannot be evicted: 2 new blocks do not fit beside them
        others = make_keys("others", 2)
        assert b.store(others, [block(k) for k in others]) == 0
        assert a.unpin(keys[:3]) == 3
        assert b.store(others, [block(k) for k in others]) == 2


# ---------------------------------------------------------------- security and config

def test_loopback_only_without_token():
    assert is_local("tcp://127.0.0.1:5557") and is_local("ipc:///tmp/x.sock") and is_local("tcp://[::1]:1")
    assert not is_local("tcp://0.0.0.0:5557") and not is_local("tcp://*:5557")
    with pytest.raises(ConfigError, match="token"):
        DaemonConfig.from_dict({"address": "tcp://0.0.0.0:5557"})
    with pytest.raises(ConfigError, match="tcp:// without a token: every local user"):  # loopback too
        DaemonConfig.from_dict({"address": "tcp://127.0.0.1:5557"})
    assert DaemonConfig.from_dict({"address": "tcp://0.0.0.0:5557", "token": "s3cret"}).token == "s3cret"
    with pytest.raises(ConfigError, match="did you mean 'lease_s'"):
        DaemonConfig.from_dict({"lease": 3})
    with pytest.raises(ConfigError, match="lease_s"):
        DaemonConfig.from_dict({"lease_s": -1})
    assert DaemonConfig.from_dict({}).onboard_wait_s == 2.0
    assert DaemonConfig.from_dict({"onboard_wait_s": 8}).onboard_wait_s == 8
    with pytest.raises(ConfigError, match="onboard_wait_s must be a positive number"):
        DaemonConfig.from_dict({"onboard_wait_s": 0})


def test_token_is_required_on_every_request(daemons):
    d = daemons(token="s3cret")
    with pytest.raises(RemoteError, match="unauthorized"):
        d.client(token="")
    with pytest.raises(ValueError, match="control character"):
        d.client(model="bad\x00model")  # control characters are refused (the daemon refuses them too)
    with d.client(token="s3cret") as c:
        keys = make_keys("tok", 2)
        assert c.store(keys, [block(k) for k in keys]) == 2
        c.token = "wrong"  # a valid session without the token is still refused
        with pytest.raises(RemoteError, match="unauthorized"):
            c.lookup(keys)
        c.token = "s3cret"


def test_stats_cli_metrics_and_health(daemons):
    d = daemons(metrics="127.0.0.1:0", events="tcp://127.0.0.1:*")
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(d.info["events"])
    # PUB/SUB: a subscriber sees only what is sent after it joined; probe from another namespace
    # (its own topic) until one probe's event arrives, however long the join takes on a loaded box
    probes = []
    with d.client(salt="probe") as probe:
        def joined() -> bool:
            probes.append(probe.store(k := make_keys(f"probe-{time.monotonic_ns()}", 1), [block(k[0])]))
            return bool(sub.poll(500))
        assert wait_until(joined, 120)
        while sub.poll(200):  # the probes' events, gone before the real ones
            sub.recv_multipart()
    keys = make_keys("ops", 3)
    with d.client() as c:
        c.store(keys, [block(k) for k in keys])
        c.lookup(keys + make_keys("miss", 1))
        assert sub.poll(120_000)
        topic, body = sub.recv_multipart()[:2]  # a third frame carries seq + epoch
        assert topic == c.topic
        import msgpack

        rows = msgpack.unpackb(body)
        assert [r[0] for r in rows] == ["stored"] * 3 and [r[1] for r in rows] == keys
    sub.close(0)
    ctx.term()
    out = subprocess.run([sys.executable, "-m", "kvbm.cli", "stats", "--address", d.address],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "prefix hit ratio 0.750" in out.stdout and "g2" in out.stdout
    base = f"http://{d.info['metrics']}"
    health = json.loads(urllib.request.urlopen(base + "/health", timeout=5).read())
    assert health["status"] == "ok"

    def metrics() -> str:
        return urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()

    # the snapshot behind /metrics refreshes every 0.25 s: wait for it (a loaded box may take longer)
    stores = f'kvbm_tier_stores_total{{tier="g2"}} {3.0 + sum(probes)}'  # ours and the probes'
    assert all(n == 1 for n in probes)
    assert wait_until(lambda: stores in metrics(), 60)
    text = metrics()
    assert "kvbm_prefix_hit_ratio 0.75" in text
    assert stores in text
    assert 'kvbm_request_seconds_count{op="store"}' in text  # 3 blocks: one one-shot store


# ---------------------------------------------------------------- leases and faults

def test_killed_client_pins_released_by_lease(daemons):
    d = daemons(g2=8, namespace_share=1.0)
    # the holder fills G2: 6 pinned blocks + a 2-block reservation it never commits (an open
    # load holds no G2 slot: its bytes were copied into the holder's window); then it hangs
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time, hashlib, numpy as np
        from kvbm.client import Client
        from kvbm.blocks import KVLayout
        LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, block_size=16)
        keys = [hashlib.blake2b(f"held/{i}".encode(), digest_size=16).digest() for i in range(8)]
        c = Client(sys.argv[1], model="tiny", layout=LAYOUT)
        bufs = [np.frombuffer(hashlib.shake_128(k).digest(LAYOUT.block_nbytes), np.uint8) for k in keys]
        assert c.store(keys[:6], bufs[:6]) == 6
        assert c.pin(keys[:6]) == 6
        assert len(c.prepare_load(keys[3:6]).views) == 3
        res = c.prepare_store(keys[6:])
        res.views[0][:] = 0  # half-written, never committed
        print("holding", flush=True)
        time.sleep(600)
    """), d.address], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        held = make_keys("held", 8)
        others = make_keys("after", 1)
        with d.client() as c:
            assert c.store(others, [block(k) for k in others]) == 0  # every G2 slot is busy
            holder.kill()  # SIGKILL: no bye, no unpin, no commit
            holder.wait(60)
            deadline = time.monotonic() + 120
            while c.store(others, [block(k) for k in others]) == 0:
                assert time.monotonic() < deadline, "the killed client's pins were never released"
                time.sleep(0.2)
            st = c.stats()["daemon"]
            assert st["lease_expiries"] + st["dead_clients"] >= 1  # (its pid is gone: no lease wait)
            assert c.lookup(held[6:]) == (0, [])  # the reservation was rolled back, never served
            assert c.lookup(held[:6])[0] >= 5  # the pinned blocks are ordinary blocks again
    finally:
        holder.kill()


def test_session_quota_bounds_busy_blocks(daemons):
    d = daemons(g2=16, max_session_blocks=4)
    keys = make_keys("quota", 6)
    with d.client() as c:
        assert c.store(keys[:4], [block(k) for k in keys[:4]]) == 4
        assert c.pin(keys[:3]) == 3
        pins = c.prepare_load(keys[:2])  # a load holds no G2 block past its request: no quota
        assert len(pins.views) == 2
        with pytest.raises(RemoteError, match="quota"):
            c.prepare_store(keys[4:6])  # 3 pinned + 2 reserved would exceed 4
        c.release_load(pins)
        c.unpin(keys[:3])
        assert c.store(keys[4:6], [block(k) for k in keys[4:6]]) == 2


def test_background_offload_keeps_room_in_g2(daemons):
    """The daemon demotes ahead of time (copy off its request loop), so G2 keeps `headroom`
    free slots for the next store, and every block reads back right from G2 or G3."""
    d = daemons(g2=32, g3=256, headroom=8)
    keys = make_keys("offload", 96)
    with d.client() as c:
        for i in range(0, 96, 12):
            assert c.store(keys[i:i + 12], [block(k) for k in keys[i:i + 12]]) == 12
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            tiers = c.stats()["tiers"]
            if tiers["g2"]["used"] <= 24:
                break
            time.sleep(0.05)
        assert tiers["g2"]["used"] <= 24 and tiers["g3"]["demotions_in"] >= 96 - 32
        assert c.stats()["daemon"]["offloaded_blocks"] >= 8
        for i in range(0, 96, 16):
            out = [np.zeros(NB, np.uint8) for _ in range(16)]
            assert c.load(keys[i:i + 16], out) == 16
            for k, o in zip(keys[i:i + 16], out):
                assert np.array_equal(o, block(k))


def test_retention_priorities_cross_the_protocol(daemons):
    """TensorRT-LLM's retention priorities reach the daemon's `priority` policy: a system prompt
    stored at 90 outlives a stream of default-priority blocks; bad priorities are refused."""
    from kvbm.policies.base import Hints

    d = daemons(g2=8, eviction="priority")
    system = make_keys("system", 2)
    others = make_keys("chatter", 24)
    with d.client() as c:
        assert c.store(system, [block(k) for k in system], hints=[Hints(priority=90)] * 2) == 2
        for i in range(0, 24, 4):
            assert c.store(others[i:i + 4], [block(k) for k in others[i:i + 4]]) == 4
        assert c.lookup(system)[0] == 2  # kept: every victim came from the default priority
        assert c.lookup(others[:4])[0] == 0
        with pytest.raises(RemoteError, match="priority is an integer in"):
            c.call("store_prepare", keys=make_keys("bad", 1), priorities=[[101, None]])
        with pytest.raises(RemoteError, match="a duration is nil or seconds"):
            c.call("store_prepare", keys=make_keys("bad", 1), priorities=[[50, -1]])
        with pytest.raises(RemoteError, match="entries for 2 keys"):
            c.call("store_prepare", keys=make_keys("bad", 2), priorities=[[50, None]])


def test_shared_pool_option_of_host_storage():
    from kvbm.tiers.host import HostStorage

    name = f"kvbm-test-{uuid.uuid4().hex[:12]}"
    h = HostStorage(4, NB, shm_name=name)
    try:
        assert h.shm_path == f"/dev/shm/{name}" and os.stat(h.shm_path).st_mode & 0o777 == 0o600
        with pytest.raises(ValueError, match="in use"):
            HostStorage(4, NB, shm_name=name)  # a live owner holds the flock
        other = np.memmap(h.shm_path, dtype=np.uint8, mode="r+")  # what a client maps
        h.view(2)[:] = 7
        assert (other[h.offset(2):h.offset(2) + NB] == 7).all()
        del other
    finally:
        h.close()
    assert not os.path.exists(f"/dev/shm/{name}")
    with pytest.raises(ValueError, match="plain file name"):
        HostStorage(4, NB, shm_name="../etc")
    plain = HostStorage(4, NB)  # without the option: private anonymous memory, as before
    assert plain.shm_path is None
    plain.close()


def test_daemon_killed_mid_write_recovers_g3(daemons, tmp_path):
    d = daemons("crash", g2=8, g3=512)
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, hashlib, numpy as np
        from kvbm.client import Client
        from kvbm.blocks import KVLayout
        LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, block_size=16)
        c = Client(sys.argv[1], model="tiny", layout=LAYOUT, timeout=2)
        for i in range(100000):
            k = hashlib.blake2b(f"crash/{i}".encode(), digest_size=16).digest()
            c.store([k], [np.frombuffer(hashlib.shake_128(k).digest(LAYOUT.block_nbytes), np.uint8)])
            if i == 150:
                print("writing", flush=True)
    """), d.address], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert writer.stdout.readline().strip() == "writing"
    time.sleep(0.3)
    d.proc.kill()  # SIGKILL mid-stream: demotions to G3 may be torn
    d.proc.wait(5)
    writer.wait(10)
    d.kill()
    d.start()
    assert d.info["tiers"]["g3"]["recovered"] > 0
    keys = make_keys("crash", 3000)
    with d.client() as c:
        found = wrong = 0
        for k in keys:  # key by key: any recovered block, wherever it sits in the sequence
            out = np.zeros(NB, np.uint8)
            if c.load([k], [out]):
                found += 1
                wrong += not np.array_equal(out, block(k))
        assert found >= d.info["tiers"]["g3"]["recovered"]  # every recovered block is servable
        assert wrong == 0  # and none is served with wrong bytes


def test_sigterm_shuts_down_cleanly_and_keeps_g3(daemons):
    d = daemons("term", g2=4, g3=64)
    keys = make_keys("term", 20)
    with d.client() as c:
        assert c.store(keys, [block(k) for k in keys]) == 20
        res = c.prepare_store(make_keys("inflight", 2))  # a reservation left open at shutdown
        assert res.handle
    assert d.stop() == 0
    assert d.info["shm"] is None  # G2 is the daemon's private memory, not a file
    assert not list(Path("/dev/shm").glob(d.shm + "*"))  # and no window file is left behind
    d.start()
    # the reservation evicted 2 more blocks to G3, then was rolled back; G2 lived in memory only
    assert d.info["tiers"]["g3"]["recovered"] == 18
    with d.client() as c:
        out = [np.zeros(NB, np.uint8) for _ in keys]
        assert c.lookup(keys) == (18, ["g3"] * 18)
        assert c.load(keys, out) == 18
        assert all(np.array_equal(o, block(k)) for o, k in zip(out[:18], keys))
        assert c.lookup(make_keys("inflight", 2))[0] == 0


# ---------------------------------------------------------------- cross-node over NIXL

@pytest.mark.skipif(not HAVE_NIXL, reason="nixl is not installed")
def test_second_daemon_pulls_prefix_over_nixl(daemons):
    a = daemons("a", nixl=True, address="tcp://127.0.0.1:*")
    b = daemons("b", nixl=True, address="tcp://127.0.0.1:*", peers=[a.address], peer_timeout_s=5.0)
    keys = make_keys("remote", 24)
    with a.client() as ca:
        assert ca.store(keys[:20], [block(k) for k in keys[:20]]) == 20
    with b.client() as cb:
        n, where = cb.lookup(keys)  # a miss at b: b asks a, READs 20 blocks into its own G2
        assert n == 20 and set(where) == {"g2"}
        out = [np.zeros(NB, np.uint8) for _ in keys]
        assert cb.load(keys, out) == 20
        assert all(np.array_equal(o, block(k)) for o, k in zip(out[:20], keys))
        st = cb.stats()
        assert st["daemon"]["peer_pull_blocks"] == 20 and st["daemon"]["peer_errors"] == 0
        assert st["transfers"]["peer->host"]["bytes"] == 20 * NB
    with a.client() as ca:  # a released its pins after the pull
        assert ca.stats()["daemon"]["clients"] == 1
        more = make_keys("later", 4)
        assert ca.store(more, [block(k) for k in more]) == 4
    time.sleep(1.5)  # b's peer session at a lapses (lease 1 s): b says hello again and pulls
    with b.client() as cb:
        assert cb.lookup(more) == (4, ["g2"] * 4)


@pytest.mark.skipif(not HAVE_NIXL, reason="nixl is not installed")
def test_peer_down_falls_back_to_local(daemons):
    ctx = zmq.Context()
    hole = ctx.socket(zmq.ROUTER)  # a peer that accepts connections but never answers
    port = hole.bind_to_random_port("tcp://127.0.0.1")
    b = daemons("b", nixl=True, peers=[f"tcp://127.0.0.1:{port}"], peer_timeout_s=0.3)
    keys = make_keys("local", 6)
    with b.client() as c:
        c.store(keys[:3], [block(k) for k in keys[:3]])
        assert c.lookup(keys) == (3, ["g2"] * 3)  # the peer timed out: the local prefix
        assert hole.poll(60_000)
        asked = _drain(hole)
        for _ in range(20):
            assert c.lookup(keys)[0] == 3
        # backed off: the 20 misses after the first did not each go to the dead peer (counted
        # at the peer, not timed: a busy CI box may stretch the back-off window once)
        asked += _drain(hole)
        assert 1 <= asked <= 3, asked
    hole.close(0)
    ctx.term()


# ---------------------------------------------------------------- pulls off the request loop

class ScriptedPeer:
    """A stand-in peer daemon in its own process (daemonproc.scripted_peer): a real NIXL agent
    over `keys`' bytes, answering every request after `delay` seconds (a slow or overloaded
    node). `bad`: block indices with a wrong crc32c; `later`: crc32c with peer_release."""

    def __init__(self, keys: list, *, delay: float = 0.0, later: bool = True, bad: tuple = (), gate: str = "") -> None:
        import multiprocessing as mp

        from daemonproc import scripted_peer

        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        lay = {k: getattr(LAYOUT, k) for k in ("num_layers", "num_kv_heads", "head_dim", "block_size")}
        self.proc = ctx.Process(target=scripted_peer, args=(keys, lay, delay, later, bad, child, gate), daemon=True)
        self.proc.start()
        if not self._conn.poll(60):
            self.proc.kill()
            raise RuntimeError("the scripted peer did not start")
        self.address = self._conn.recv()
        self.asked: list[str] | None = None

    def close(self) -> list[str]:
        if self.asked is None and self.proc.is_alive():
            self._conn.send("stop")
            if self._conn.poll(10):
                self.asked = self._conn.recv()
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
        return self.asked or []


def _until(cond, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def _drain(sock) -> int:
    """Messages waiting on sock (taken), after a short quiet period."""
    n = 0
    while sock.poll(200):
        sock.recv_multipart()
        n += 1
    return n


class Background:
    """Run fn() on a thread; .done, .result (or the exception, re-raised by .get())."""

    def __init__(self, fn) -> None:
        self.result: object = None
        self.error: BaseException | None = None
        self.finished_at = 0.0
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn) -> None:
        try:
            self.result = fn()
        except BaseException as exc:
            self.error = exc
        self.finished_at = time.monotonic()

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def get(self, timeout: float) -> object:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "still running"
        if self.error is not None:
            raise self.error
        return self.result


def _busy_client_rounds(c: Client, tag: str, rounds: int, bound: float) -> list[float]:
    """store, lookup and load of fresh blocks, `rounds` times; every op within `bound` seconds and
    every byte checked. Returns each op's latency."""
    lat = []

    def timed(fn, *args, **kw) -> object:
        t0 = time.monotonic()
        result = fn(*args, **kw)
        lat.append(time.monotonic() - t0)
        assert lat[-1] < bound, f"an op took {lat[-1]:.2f}s while a pull was outstanding"
        return result

    for r in range(rounds):
        keys = make_keys(f"{tag}{r}", 4)
        out = [np.zeros(NB, np.uint8) for _ in keys]
        assert timed(c.store, keys, [block(k) for k in keys]) == 4
        assert timed(c.lookup, keys) == (4, ["g2"] * 4)  # a full local hit: no peer asked
        assert timed(c.lookup, make_keys(f"{tag}-miss{r}", 2), remote=False) == (0, [])
        assert timed(c.load, keys, out) == 4
        assert all(np.array_equal(o, block(k)) for o, k in zip(out, keys))
    return lat


@pytest.mark.skipif(not HAVE_NIXL, reason="nixl is not installed")
@pytest.mark.parametrize("later", [True, False], ids=["crcs-with-release", "crcs-with-lookup"])
def test_slow_peer_pull_does_not_stall_other_clients(daemons, later, tmp_path):
    keys = make_keys("slowpeer", 12)
    gate = tmp_path / "gate"  # the peer holds its lookup answer until the test opens the gate
    peer = ScriptedPeer(keys, later=later, gate=str(gate))
    try:
        b = daemons("b", g2=256, nixl=True, peers=[peer.address], peer_timeout_s=120.0, lease_s=60.0)
        with b.client(timeout=240) as c1, b.client() as c2:
            pull = Background(lambda: c1.lookup(keys))
            _until(lambda: os.path.exists(f"{gate}.asked"))  # b's puller now waits on the peer
            # every op of the other client completes (no TimeoutError) while the pull is held
            _busy_client_rounds(c2, "busy", 20, bound=60.0)
            ops_done = time.monotonic()
            assert not pull.done, "the pull ended before the peer answered"
            gate.touch()
            assert pull.get(timeout=240) == (12, ["g2"] * 12)
            assert pull.finished_at > ops_done
            out = [np.zeros(NB, np.uint8) for _ in keys]
            assert c1.load(keys, out) == 12
            assert all(np.array_equal(o, block(k)) for o, k in zip(out, keys))
            st = c2.stats()["daemon"]
            assert st["peer_pull_blocks"] == 12 and st["peer_errors"] == 0
        assert peer.close() == ["peer_hello", "peer_hello", "peer_lookup", "peer_release"]
    finally:
        peer.close()


@pytest.mark.skipif(not HAVE_NIXL, reason="nixl is not installed")
def test_hung_peer_does_not_stall_other_clients(daemons):
    ctx = zmq.Context()
    hole = ctx.socket(zmq.ROUTER)  # accepts the connection, never answers
    port = hole.bind_to_random_port("tcp://127.0.0.1")
    try:
        b = daemons("b", g2=256, nixl=True, peers=[f"tcp://127.0.0.1:{port}"], peer_timeout_s=30.0, lease_s=60.0)
        keys = make_keys("hung", 6)
        with b.client(timeout=120) as c1, b.client() as c2:
            assert c1.store(keys[:2], [block(k) for k in keys[:2]]) == 2
            pull = Background(lambda: c1.lookup(keys))  # a miss: the puller waits 30 s for the hole
            assert hole.poll(120_000), "the daemon did not ask the peer"
            # none of the other client's ops waits out the hung peer (each ends in well under 30 s)
            _busy_client_rounds(c2, "beside-hung", 5, bound=15.0)
            assert pull.get(timeout=240) == (2, ["g2"] * 2)  # the timeout, then the local prefix
            assert b.proc.poll() is None
    finally:
        hole.close(0)
        ctx.term()


@pytest.mark.skipif(not HAVE_NIXL, reason="nixl is not installed")
def test_pulled_block_with_bad_checksum_is_dropped(daemons):
    keys = make_keys("badcrc", 8)
    peer = ScriptedPeer(keys, bad=(5,))
    try:
        b = daemons("b", nixl=True, peers=[peer.address], peer_timeout_s=5.0)
        with b.client() as c:
            assert c.lookup(keys) == (5, ["g2"] * 5)  # block 5 failed its crc32c: never served
            out = [np.zeros(NB, np.uint8) for _ in keys]
            assert c.load(keys, out) == 5
            assert all(np.array_equal(o, block(k)) for o, k in zip(out[:5], keys))
            st = c.stats()["daemon"]
            assert st["peer_pull_blocks"] == 7 and st["peer_errors"] == 1
            assert c.lookup(keys[6:], remote=False) == (2, ["g2"] * 2)  # the good blocks after it stay
    finally:
        peer.close()


@pytest.mark.skipif(not HAVE_NIXL, reason="nixl is not installed")
def test_sigterm_with_a_pull_outstanding_answers_and_exits(daemons):
    ctx = zmq.Context()
    hole = ctx.socket(zmq.ROUTER)
    port = hole.bind_to_random_port("tcp://127.0.0.1")
    try:
        b = daemons("b", nixl=True, peers=[f"tcp://127.0.0.1:{port}"], peer_timeout_s=2.0, lease_s=60.0)
        keys = make_keys("term", 4)
        with b.client(timeout=120) as c:
            assert c.store(keys[:1], [block(keys[0])]) == 1
            pull = Background(lambda: c.lookup(keys))
            assert hole.poll(120_000)
            b.proc.send_signal(signal.SIGTERM)
            assert b.proc.wait(180) == 0  # the pull ran out its peer timeout, then a clean exit
            assert pull.get(timeout=180) == (1, ["g2"])  # the waiting lookup got its (local) answer
            c.session = None  # the daemon is gone: no bye
    finally:
        hole.close(0)
        ctx.term()


@pytest.mark.skipif(not HAVE_NIXL, reason="nixl is not installed")
def test_peer_pulls_blocks_resident_in_its_g3(daemons):
    """A block the peer keeps in G3 is onboarded into its G2 (the READ's source) and pulled."""
    a = daemons("a", g2=16, g3=64, nixl=True, address="tcp://127.0.0.1:*")
    b = daemons("b", nixl=True, address="tcp://127.0.0.1:*", peers=[a.address], peer_timeout_s=5.0)
    cold, hot = make_keys("cold", 10), make_keys("hot", 16)
    with a.client() as ca:
        assert ca.store(cold, [block(k) for k in cold]) == 10
        assert ca.store(hot, [block(k) for k in hot]) == 16  # pushes `cold` down to G3
        assert ca.lookup(cold, remote=False) == (10, ["g3"] * 10)
    with b.client() as cb:
        assert cb.lookup(cold) == (10, ["g2"] * 10)
        out = [np.zeros(NB, np.uint8) for _ in cold]
        assert cb.load(cold, out) == 10
        assert all(np.array_equal(o, block(k)) for o, k in zip(out, cold))
