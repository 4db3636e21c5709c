"""Two cache daemons in separate network namespaces: the second pulls a prefix over NIXL.

The acceptance item of issue 5 ("two daemons in separate processes, in separate network
namespaces made with `ip netns`"): two namespaces joined by one veth pair on a private /30 that
exists only inside them; daemon A in one, bound to its veth address (so a token is required),
daemon B in the other with A as its only peer. A client inside A's namespace stores a prefix at
A; a client inside B's namespace looks it up and loads it at B, which must pull the blocks from
A over NIXL (UCX restricted to TCP over the veth, so the bytes really cross the link between the
namespaces: B's veth counters must grow by at least the payload). Bytes are derived from the key.

Skipped (with the reason) where namespaces cannot be made: not root, no `ip`, or `ip netns add`
refused (an unprivileged container). Skipped when nixl is missing, unless KVBM_REQUIRE_NIXL=1.
Everything it creates (daemons, clients, namespaces and with them the veth pair, /dev/shm pool
files) is removed in the fixture's teardown, also when the test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import yaml

from kvbm.blocks import KVLayout
from daemonproc import HAVE_NIXL, wait_ready, write_peer_secret


pytestmark = pytest.mark.skipif(not HAVE_NIXL, reason="nixl is not installed")

BLOCKS = 20   # stored at A, pulled by B
ASKED = 24    # B asks for 4 more than A holds: the prefix stops at 20
PORT = 5557   # in both namespaces: they hold nothing else
LAYOUT = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 64, "block_size": 16}
NB = KVLayout(**LAYOUT).block_nbytes  # 16 KiB (checked against the daemon's below)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=60, check=check)


def _cannot_make_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed: apt-get install iproute2"
    return None


class NetnsPair:
    """Namespaces A and B joined by a veth pair: A = 10.199.X.1/30, B = 10.199.X.2/30."""

    def __init__(self) -> None:
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.ns = {"a": f"kvbm-a-{tag}", "b": f"kvbm-b-{tag}"}
        # Interface names live only inside the namespaces (created there, never in the root one).
        self.dev = {"a": "kvbm-va", "b": "kvbm-vb"}
        x = 1 + int.from_bytes(os.urandom(1), "little") % 250
        self.ip = {"a": f"10.199.{x}.1", "b": f"10.199.{x}.2"}
        self.made: list[str] = []

    def create(self) -> None:
        for side in ("a", "b"):
            r = _ip("netns", "add", self.ns[side], check=False)
            if r.returncode != 0:
                raise _Refused(f"`ip netns add` failed: {r.stderr.strip()}")
            self.made.append(self.ns[side])
        a, b = self.ns["a"], self.ns["b"]
        _ip("-n", a, "link", "add", self.dev["a"], "type", "veth", "peer", "name", self.dev["b"], "netns", b)
        for side in ("a", "b"):
            _ip("-n", self.ns[side], "addr", "add", f"{self.ip[side]}/30", "dev", self.dev[side])
            _ip("-n", self.ns[side], "link", "set", "lo", "up")
            _ip("-n", self.ns[side], "link", "set", self.dev[side], "up")

    def exec(self, side: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[side]]

    def rx_bytes(self, side: str) -> int:
        link = json.loads(_ip("-n", self.ns[side], "-s", "-j", "link", "show", "dev", self.dev[side]).stdout)
        return int(link[0]["stats64"]["rx"]["bytes"])

    def destroy(self) -> None:
        for name in self.made:
            # Anything still running in a namespace we made was started by this test: stop it by
            # pid, so the namespace (and the veth pair with it) really goes away.
            r = _ip("netns", "pids", name, check=False)
            for pid in r.stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", name, check=False)
        self.made.clear()


class _Refused(Exception):
    pass


class NsDaemon:
    """`kvbm serve` run with `ip netns exec` (which execs: the Popen pid is the daemon's)."""

    def __init__(self, tmp: Path, name: str, prefix: list[str], env: dict, **daemon: object) -> None:
        self.dir = tmp / name
        self.dir.mkdir()
        self.prefix = prefix
        self.env = env
        self.shm = f"kvbm-test-{uuid.uuid4().hex[:12]}"
        cfg = {"namespace": {"model": "tiny"}, "layout": LAYOUT,
               "tiers": [{"name": "g2", "capacity": 64, "eviction": "lru", "storage": "host"}],
               "daemon": {"events": "", "metrics": "", "shm_name": self.shm, "lease_s": 60.0,
                          "nixl": True, "peer_secret_file": write_peer_secret(tmp), **daemon}}
        self.config = self.dir / "kvbm.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}

    def launch(self) -> NsDaemon:
        with (self.dir / "stdout.txt").open("w") as o, (self.dir / "stderr.txt").open("w") as e:
            self.proc = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "kvbm.cli", "serve", "--config", str(self.config)],
                stdout=o, stderr=e, env=self.env)
        return self

    def wait_ready(self, timeout: float = 180.0) -> NsDaemon:
        self.info = wait_ready(self.proc, self.dir / "stdout.txt", timeout)
        if self.info is not None:
            return self
        raise RuntimeError(f"daemon {self.dir.name} did not start:\n{self.log()}")

    def log(self) -> str:
        parts = []
        for f in ("stdout.txt", "stderr.txt"):
            p = self.dir / f
            if p.exists():
                parts.append(f"--- {self.dir.name}/{f}\n{p.read_text()[-3000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(60)
        try:
            os.unlink(f"/dev/shm/{self.shm}")  # a killed daemon leaves its pool file behind
        except FileNotFoundError:
            pass


CLIENT_PRELUDE = textwrap.dedent("""
    import sys, json, hashlib, numpy as np
    from kvbm.client import Client
    from kvbm.blocks import KVLayout
    LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, block_size=16)
    NB = LAYOUT.block_nbytes
    def block(key): return np.frombuffer(hashlib.shake_128(key).digest(NB), dtype=np.uint8)
    def make_keys(tag, n): return [hashlib.blake2b(f"{tag}/{i}".encode(), digest_size=16).digest() for i in range(n)]
    address, token, tag = sys.argv[1], sys.argv[2], sys.argv[3]
    c = Client(address, model="tiny", layout=LAYOUT, token=token, timeout=120)
""")

STORE = """
    keys = make_keys(tag, int(sys.argv[4]))
    print(json.dumps({"stored": c.store(keys, [block(k) for k in keys]), "nb": c.block_nbytes}))
    c.close()
"""

PULL = """
    keys = make_keys(tag, int(sys.argv[4]))
    before = c.stats()
    n, where = c.lookup(keys)  # a miss at B: B asks A and READs the prefix into its own G2
    out = [np.zeros(NB, np.uint8) for _ in keys]
    m = c.load(keys, out)
    bad = sum(not np.array_equal(o, block(k)) for o, k in zip(out[:m], keys))
    print(json.dumps({"n": n, "where": where, "loaded": m, "bad": bad,
                      "before": before["daemon"], "after": c.stats()}))
    c.close()
"""


@pytest.fixture
def netns_daemons(tmp_path):
    """-> start(a={daemon keys}, b={...}) -> [NsDaemon]; `.client(side, script, *args)`; `.pair`."""
    why = _cannot_make_namespaces()
    if why:
        pytest.skip(why)
    pair = NetnsPair()
    started: list[NsDaemon] = []
    try:
        try:
            pair.create()
        except _Refused as exc:
            pytest.skip(f"cannot create network namespaces here: {exc}")

        env = {k: v for k, v in os.environ.items() if not k.startswith(("KVBM_", "UCX_"))}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                          env.get("PYTHONPATH", "")]))

        def daemon_env(side: str) -> dict:
            # NIXL's UCX backend would otherwise pick shared memory (both daemons run on one
            # kernel): TCP over this namespace's veth makes the pull cross the link.
            return {**env, "UCX_TLS": "tcp", "UCX_NET_DEVICES": pair.dev[side]}

        def start(**sides: dict) -> list[NsDaemon]:
            """Launch one daemon per side at once (each takes seconds to bring NIXL up), then wait."""
            ds = [NsDaemon(tmp_path, side, pair.exec(side), daemon_env(side), **daemon)
                  for side, daemon in sides.items()]
            started.extend(ds)
            for d in ds:
                d.launch()
            return [d.wait_ready() for d in ds]

        def run_client(side: str, script: str, *args: str) -> dict:
            r = subprocess.run([*pair.exec(side), sys.executable, "-c", CLIENT_PRELUDE + textwrap.dedent(script),
                                *args], check=False, capture_output=True, text=True, timeout=300, env=env)
            if r.returncode != 0:
                logs = "\n".join(d.log() for d in started)
                raise AssertionError(f"client in ns {side} failed ({r.returncode}):\n{r.stderr[-3000:]}\n{logs}")
            return json.loads(r.stdout.strip().splitlines()[-1])

        start.pair = pair  # type: ignore[attr-defined]
        start.client = run_client  # type: ignore[attr-defined]
        start.daemons = started  # type: ignore[attr-defined]
        yield start
    finally:
        for d in started:
            d.stop()
        pair.destroy()


def test_daemon_in_other_netns_pulls_prefix_over_nixl(netns_daemons):
    pair = netns_daemons.pair
    token = uuid.uuid4().hex
    tag = f"netns-{uuid.uuid4().hex[:8]}"
    # Each binds its veth address: not loopback, so it needs (and every request carries) the
    # token. A fixed port is safe: nothing else lives in these namespaces. B's only peer is A.
    a_addr, b_addr = f"tcp://{pair.ip['a']}:{PORT}", f"tcp://{pair.ip['b']}:{PORT}"
    a, b = netns_daemons(a={"address": a_addr, "token": token},
                         b={"address": b_addr, "token": token, "peers": [a_addr], "peer_timeout_s": 60.0})
    assert a.info["address"] == a_addr and b.info["address"] == b_addr, (a.info, b.info)
    assert a.info["nixl"] and b.info["nixl"], (a.info, b.info)

    stored = netns_daemons.client("a", STORE, a_addr, token, tag, str(BLOCKS))
    assert stored == {"stored": BLOCKS, "nb": NB}

    rx0 = pair.rx_bytes("b")
    got = netns_daemons.client("b", PULL, b_addr, token, tag, str(ASKED))
    rx = pair.rx_bytes("b") - rx0
    logs = "\n".join(d.log() for d in netns_daemons.daemons)

    assert got["before"]["peer_pull_blocks"] == 0, got  # nothing at B before the lookup
    assert got["n"] == BLOCKS and set(got["where"]) == {"g2"}, (got, logs)
    assert got["loaded"] == BLOCKS and got["bad"] == 0, got
    st = got["after"]
    assert st["daemon"]["peer_pull_blocks"] == BLOCKS and st["daemon"]["peer_errors"] == 0, (st, logs)
    assert st["transfers"]["peer->host"]["bytes"] == BLOCKS * NB, st
    # The blocks came over the veth (NIXL over UCX/TCP), not through shared memory: B received
    # at least the payload on its end of the pair (the control messages carry no block bytes).
    assert rx >= BLOCKS * NB, f"B's veth received {rx} bytes, expected >= {BLOCKS * NB}"
