"""Tenants sharing one daemon: no client can obtain or overwrite another namespace's bytes
through the memory it maps (issue 12, items 1 and 3).

The daemon's G2 pool is its private memory; a client maps only its own staging window, which
the daemon copies into G2 at store_commit and out of G2 at load_prepare. These tests try the
attacks that worked when every client mapped the whole pool read-write.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np

from test_daemon import NB, block, daemons, make_keys  # noqa: F401  (daemons is a fixture)

PRELUDE = textwrap.dedent("""
    import os, sys, time, hashlib, numpy as np
    from kvbm.client import Client
    from kvbm.blocks import KVLayout
    LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, block_size=16)
    NB = LAYOUT.block_nbytes
    def block(key): return np.frombuffer(hashlib.shake_128(key).digest(NB), dtype=np.uint8)
    def make_keys(tag, n): return [hashlib.blake2b(f"{tag}/{i}".encode(), digest_size=16).digest() for i in range(n)]
    address = sys.argv[1]
""")


def spawn(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(script), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(cond, what: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_frozen_writer_never_lands_bytes_in_a_recycled_slot(daemons, tmp_path):
    """Issue 12 (1): A reserves 16 slots, is SIGSTOPped past its lease, B's 16 blocks take the
    recycled G2 slots, A wakes and writes 16 blocks of garbage where it was told to: B loads
    16 of 16 right (before: 1 of 16 came back holding A's bytes)."""
    # A is held by SIGSTOP past its lease; B heartbeats 4 times a lease (no loaded box starves it that long)
    d = daemons(g2=16, lease_s=5.0, namespace_share=1.0)
    go = tmp_path / "go"
    writer = spawn("""
        c = Client(address, model="tenant-a", layout=LAYOUT, timeout=120)
        res = c.prepare_store(make_keys("frozen", 16))
        print("reserved", sum(v is not None for v in res.views), flush=True)
        while not os.path.exists(sys.argv[2]):  # SIGSTOPped in here
            time.sleep(0.01)
        for v in res.views:
            v[:] = 0xEE  # the stray write: every byte it was ever told it may write
        print("committed", c.commit_store(res), flush=True)
    """, d.address, str(go))
    try:
        assert writer.stdout.readline().split() == ["reserved", "16"], writer.stderr.read()
        writer.send_signal(signal.SIGSTOP)
        with d.client(timeout=120, model="tenant-b") as b:
            wait_for(lambda: (lambda st: st["lease_expiries"] >= 1 and st["state"]["reservations"] == 0)(
                b.stats()["daemon"]), "A's lease to expire and its reservation to go")
            keys = make_keys("victim", 16)
            assert b.store(keys, [block(k) for k in keys]) == 16  # all 16 G2 slots: A's old ones
            go.touch()
            writer.send_signal(signal.SIGCONT)
            assert writer.stdout.readline().split() == ["committed", "0"], writer.stderr.read()
            assert writer.wait(120) == 0
            out = [np.zeros(NB, np.uint8) for _ in keys]
            assert b.load(keys, out) == 16
            wrong = sum(not np.array_equal(o, block(k)) for o, k in zip(out, keys))
            assert wrong == 0
            assert b.lookup(make_keys("frozen", 16))[0] == 0  # A's reservation was never committed
    finally:
        writer.send_signal(signal.SIGCONT)
        writer.kill()


def test_a_client_maps_no_byte_of_another_namespace(daemons):
    """Issue 12 (1, 3): B's blocks pass through G2 and B's window; A, in another process, maps
    exactly one daemon file (its own window, already unlinked) and none of B's bytes are in it.
    The G2 pool has no file at all."""
    d = daemons(g2=64, lease_s=60.0)  # A's one session throughout (a lapsed lease maps a second window)
    assert d.info["shm"] is None
    with d.client(timeout=120, model="tenant-b") as b:
        kb = make_keys("secret", 24)
        assert b.store(kb, [block(k) for k in kb]) == 24
        out = [np.zeros(NB, np.uint8) for _ in kb]
        assert b.load(kb, out) == 24
        a = spawn("""
            c = Client(address, model="tenant-a", layout=LAYOUT, timeout=120)
            ka = make_keys("own", 8)
            assert c.store(ka, [block(k) for k in ka]) == 8
            out = [np.zeros(NB, np.uint8) for _ in ka]
            assert c.load(ka, out) == 8 and all(np.array_equal(o, block(k)) for o, k in zip(out, ka))
            assert c.load(make_keys("secret", 24), out[:1]) == 0  # B's keys are not A's blocks
            shm = [l.split()[-2:] for l in open("/proc/self/maps") if "/dev/shm/" in l]
            print("maps", len(shm), all(x[-1] == "(deleted)" for x in shm), flush=True)
            rows = c._pool.reshape(-1, c.stride)[:, :NB]
            print("rows", " ".join(hashlib.blake2b(r.tobytes(), digest_size=8).hexdigest() for r in rows), flush=True)
            c.close()
        """, d.address)
        outs, err = a.communicate(timeout=300)
        assert a.returncode == 0, err
        lines = dict(line.split(" ", 1) for line in outs.splitlines())
        assert lines["maps"] == "1 True"  # one mapping of a daemon file: its own, unlinked window
        seen = set(lines["rows"].split())
        b_rows = {hashlib.blake2b(block(k).tobytes(), digest_size=8).hexdigest() for k in kb}
        assert not seen & b_rows
        own = {hashlib.blake2b(block(k).tobytes(), digest_size=8).hexdigest() for k in make_keys("own", 8)}
        assert own <= seen  # (the scan does see what passed through A's window)
    assert not list(Path("/dev/shm").glob(d.shm + "*"))  # windows are unlinked once mapped


def test_window_scribbler_cannot_touch_other_tenants(daemons):
    """A hostile client writes every byte of its window, non-stop, while B stores and loads:
    B never sees a wrong byte, and A's own scribbles never reach G2 unless A commits them."""
    d = daemons(g2=48, lease_s=60.0)  # A's reservation is open throughout
    stop = threading.Event()
    with d.client(timeout=120, model="tenant-a") as a, d.client(timeout=120, model="tenant-b") as b:
        res = a.prepare_store(make_keys("a-open", 4))  # a reservation it holds open throughout

        def scribble() -> None:
            full = a._pool  # the whole mapping, reserved slots or not
            while not stop.is_set():
                full[:] = 0xAB

        t = threading.Thread(target=scribble, daemon=True)
        t.start()
        wrong = loaded = 0
        try:
            for r in range(20):
                keys = make_keys(f"b{r}", 8)
                assert b.store(keys, [block(k) for k in keys]) == 8
                out = [np.zeros(NB, np.uint8) for _ in keys]
                n = b.load(keys, out)
                loaded += n
                wrong += sum(not np.array_equal(o, block(k)) for o, k in zip(out[:n], keys))
        finally:
            stop.set()
            t.join(60)
        assert loaded >= 100 and wrong == 0
        a.commit_store(res, failed=list(range(4)))  # A says it wrote nothing: nothing is stored
        assert b.lookup(make_keys("a-open", 4))[0] == 0
        assert a.lookup(make_keys("a-open", 4))[0] == 0
