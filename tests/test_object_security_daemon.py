"""Two `kvbm serve` daemons with different G4 secrets share one file:// prefix: neither loads
the other's blocks, neither overwrites them, and an object forged with a valid header and
CRC-32C is a counted miss. Real daemons, real clients (tests/servedaemon.py)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("zmq")
pytest.importorskip("msgpack")
sys.path.insert(0, str(Path(__file__).parent))

from servedaemon import NB, Served, block, make_keys  # noqa: E402

from kvbm.ops import crc32c  # noqa: E402
from kvbm.tiers.object import HEADER, HEADER_MIN  # noqa: E402

N = 24  # blocks stored by each daemon; G2 holds 16, so the oldest reach G4


def secret(tmp: Path, name: str) -> str:
    path = tmp / name
    path.write_bytes(os.urandom(32).hex().encode())
    path.chmod(0o600)
    return str(path)


def daemon(tmp: Path, name: str, url: str, secret_file: str) -> Served:
    tiers = [{"name": "g2", "capacity": 16, "eviction": "lru", "storage": "host", "headroom": 4},
             {"name": "g4", "capacity": 64, "eviction": "lru",
              "storage": {"name": "object", "url": url, "secret_file": secret_file}}]
    return Served(tmp, name, tiers=tiers)


def wait_for(what, check, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not (got := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return got


def store_into_g4(c, keys, content) -> list[bytes]:
    """Store in batches G2's offloader keeps room for; the keys that reached G4."""
    for i in range(0, len(keys), 4):
        wait_for("the offloader made no room in G2",
                 lambda: (lambda g2: g2["capacity"] - g2["used"] >= 4)(c.stats()["tiers"]["g2"]))
        assert c.store(keys[i:i + 4], [content(k) for k in keys[i:i + 4]]) == 4
    where = wait_for("no block reached G4", lambda: (lambda w: w if w.count("g4") >= 4 else None)(
        c.lookup(keys, remote=False)[1]))
    return [k for k, w in zip(keys, where) if w == "g4"]


def load(c, keys) -> tuple[int, list[np.ndarray]]:
    out = [np.zeros(NB, np.uint8) for _ in keys]
    return c.load(keys, out), out


def test_two_daemons_with_different_secrets_never_meet_and_a_forgery_is_a_counted_miss(tmp_path):
    url = f"file://{tmp_path}/shared-g4"
    sa, sb = secret(tmp_path, "a.secret"), secret(tmp_path, "b.secret")
    keys = make_keys("prompt", N)
    other = lambda k: np.full(NB, 0xEE, np.uint8)  # noqa: E731  (B's bytes for the same keys)

    a = daemon(tmp_path, "a", url, sa).start()
    try:
        with a.client() as c:
            in_g4 = store_into_g4(c, keys, block)
    finally:
        a.stop()

    b = daemon(tmp_path, "b", url, sb).start()  # the same model, layout and salt: the same keys
    try:
        with b.client() as c:
            assert c.lookup(keys, remote=False)[0] == 0  # A's objects are not B's blocks
            assert c.stats()["tiers"]["g4"]["foreign_objects"] >= len(in_g4)
            store_into_g4(c, keys, other)  # B's own objects, under B's names
    finally:
        b.stop()

    folder = next(p for p in (tmp_path / "shared-g4").iterdir() if p.is_dir())
    objects = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    assert len(objects) >= 2 * len(in_g4)  # both deployments' blocks, side by side

    a = daemon(tmp_path, "a", url, sa).start()
    try:
        with a.client() as c:
            where = c.lookup(keys, remote=False)[1]
            back = [k for k, w in zip(keys, where) if w == "g4"]
            assert set(in_g4) <= set(back)  # all of A's (the offloader kept demoting after the look)
            n, out = load(c, back[:4])  # with A's bytes, not B's
            assert n == 4 and all(np.array_equal(o, block(k)) for o, k in zip(out, back[:4]))
            # forge every object that is still in G4: a valid header and CRC-32C, no valid MAC
            forged = 0
            for p in sorted(p for p in folder.iterdir() if not p.name.startswith(".")):
                try:  # (the loads above move 4 of A's up to G2 on the daemon's own threads)
                    data = bytearray(p.read_bytes())
                except FileNotFoundError:  # promoted (removed from G4) since the listing
                    continue
                payload = np.full(NB, 0x66, np.uint8)
                fields = HEADER.unpack_from(data)
                data[:HEADER.size] = HEADER.pack(*fields[:3], crc32c(payload), fields[4])
                data[HEADER_MIN:] = payload.tobytes()
                p.write_bytes(bytes(data))
                forged += 1
            assert forged >= len(back) - 4 + 1  # A's objects still in G4, and B's
            rest = [k for k in back[4:] if c.lookup([k], remote=False)[1] == ["g4"]]
            assert rest
            n, out = load(c, rest[:1])
            assert n == 0 and not out[0].any()  # a miss: no byte of the forgery is served
            assert c.stats()["tiers"]["g4"]["foreign_objects"] >= 1
    finally:
        a.stop()
