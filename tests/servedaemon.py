"""A `kvbm serve` subprocess with a config of the test's choosing (peer, event and G4 tests).

    d = Served(tmp, "a", tiers=[...], daemon={...}, env={...}, layout={...}).start()
    d.address, d.info, d.client(salt=...), d.stop(), d.kill()
    peer_secret(tmp) -> path of a 0600 cluster secret shared by the daemons of one test
    block(key), make_keys(tag, n), LAYOUT, NB       bytes derived from the key, so any reader verifies
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import yaml

from kvbm.blocks import KVLayout
from daemonproc import wait_ready

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, block_size=16)  # 16 KiB blocks
LAYOUT_DICT = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 64, "block_size": 16}
NB = LAYOUT.block_nbytes


def block(key: bytes) -> np.ndarray:
    return np.frombuffer(hashlib.shake_128(key).digest(NB), dtype=np.uint8)


def make_keys(tag: str, n: int) -> list[bytes]:
    return [hashlib.blake2b(f"{tag}/{i}".encode(), digest_size=16).digest() for i in range(n)]


def peer_secret(tmp: Path, name: str = "peer.secret", data: bytes | None = None) -> str:
    path = tmp / name
    if not path.exists():
        path.write_bytes(data or os.urandom(32).hex().encode())
        path.chmod(0o600)
    return str(path)


TCP_TOKEN = "kvbm-test-tcp-token"  # the token of the test daemons bound on tcp:// (and of their peers)


class Served:
    def __init__(self, tmp: Path, name: str, *, tiers: list | None = None, daemon: dict | None = None,
                 env: dict | None = None, layout: dict | None = None) -> None:
        self.dir = tmp / name
        self.dir.mkdir(exist_ok=True)
        self.shm = f"kvbm-test-{uuid.uuid4().hex[:12]}"
        daemon = dict(daemon or {})
        if str(daemon.get("address", "")).startswith("tcp://") or daemon.get("peers"):
            daemon.setdefault("token", TCP_TOKEN)  # tcp:// needs one (config.py); a cluster's daemons share it
        self.token = str(daemon.get("token") or "")
        tiers = tiers or [{"name": "g2", "capacity": 64, "eviction": "lru", "storage": "host"}]
        cfg = {"namespace": {"model": "tiny"}, "layout": layout or LAYOUT_DICT, "tiers": tiers,
               "daemon": {"address": f"ipc://{self.dir}/d.sock", "events": "", "metrics": "",
                          "shm_name": self.shm, "lease_s": 10.0, "nixl": False, **(daemon or {})}}
        self.config = self.dir / "kvbm.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("KVBM_")}, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}

    def start(self, timeout: float = 180.0) -> "Served":
        out = self.dir / "stdout.txt"
        out.write_text("")
        self.proc = subprocess.Popen([sys.executable, "-m", "kvbm.cli", "serve", "--config", str(self.config)],
                                     stdout=out.open("w"), stderr=(self.dir / "stderr.txt").open("w"),
                                     env=self.env)
        self.info = wait_ready(self.proc, out, timeout)
        if self.info is None:
            self.kill()
            raise RuntimeError(f"daemon did not start: {self.stderr()[-3000:]}")
        return self

    def stderr(self) -> str:
        p = self.dir / "stderr.txt"
        return p.read_text() if p.exists() else ""

    @property
    def address(self) -> str:
        return self.info["address"]

    def client(self, **kw: object):
        from kvbm.client import Client

        if self.token:
            kw.setdefault("token", self.token)
        kw.setdefault("model", "tiny")
        kw.setdefault("layout", LAYOUT)
        # a daemon on a loaded box may answer late; a test of the client's timeout passes its own
        kw.setdefault("timeout", 120.0)
        return Client(self.address, **kw)

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(60)
        try:
            os.unlink(f"/dev/shm/{self.shm}")
        except FileNotFoundError:
            pass


def manager_over_g4(tmp: Path, tag: str, g2: int, g4: int):
    """An in-process BlockManager of G2 (`g2` blocks) over a file:// G4, filled with 2 x g2 blocks
    of `tag` one by one: -> (manager, keys, the keys that went down to G4). Close the manager."""
    from kvbm.config import KVBMConfig
    from kvbm.manager import BlockManager

    cfg = KVBMConfig.from_dict({
        "layout": LAYOUT_DICT,
        "tiers": [{"name": "g2", "capacity": g2, "storage": {"name": "host", "pin": "never"}},
                  {"name": "g4", "capacity": g4, "storage": {"name": "object", "url": f"file://{tmp}/g4"}}]})
    m = BlockManager.from_config(cfg)
    keys = make_keys(tag, 2 * g2)
    for k in keys:
        assert not m.store([k], source=[block(k)]).rejected
    return m, keys, [k for k, w in zip(keys, m.lookup(keys)[1]) if w == "g4"]
