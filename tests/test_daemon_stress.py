"""Multi-tenant chaos (issue 12): 4 namespaces, 8 client processes sharing their key names,
while clients are SIGSTOPped past their lease, SIGKILLed and replaced, and the daemon itself is
SIGKILLed and restarted. Every loaded block is checked against the bytes its own namespace
stored under that key: at least 100,000 loaded, 0 wrong.

Blocks are 4 KiB so the run is short; the chaos schedule only paces the faults, the test ends
when enough blocks were verified (with a generous deadline), never on a timer.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

from kvbm.blocks import KVLayout
from kvbm.client import Client
from test_daemon import Daemon

SMALL_LAYOUT = {"num_layers": 1, "num_kv_heads": 1, "head_dim": 64, "block_size": 16}  # 4 KiB
TENANTS = 4
PER_TENANT = 2
TARGET = 100_000

WORKER = textwrap.dedent("""
    import hashlib, json, os, random, sys, time
    import numpy as np
    from kvbm.client import Client
    from kvbm.blocks import KVLayout
    address, tenant, progress = sys.argv[1], sys.argv[2], sys.argv[3]
    layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=64, block_size=16)
    nb = layout.block_nbytes
    keys = [hashlib.blake2b(f"shared/{i}".encode(), digest_size=16).digest() for i in range(512)]  # same names in every tenant
    def content(k):  # what this tenant stores under k: any other tenant's bytes are wrong here
        return np.frombuffer(hashlib.shake_128(tenant.encode() + k).digest(nb), np.uint8)
    want = {k: content(k) for k in keys}
    rng = random.Random(os.getpid())
    stats = {"loaded": 0, "wrong": 0, "errors": 0, "stored": 0}
    c = None
    out = [np.zeros(nb, np.uint8) for _ in range(64)]
    last = time.monotonic()
    while True:
        try:
            if c is None:
                c = Client(address, model=tenant, layout=layout, timeout=30.0)
            lo = rng.randrange(0, 512 - 64)
            ks = keys[lo:lo + rng.randint(8, 64)]
            if rng.random() < 0.5:
                stats["stored"] += c.store(ks, [want[k] for k in ks])
            n = c.load(ks, out[:len(ks)])
            stats["loaded"] += n
            stats["wrong"] += sum(not np.array_equal(out[i], want[ks[i]]) for i in range(n))
        except Exception:  # a daemon restarting, a timeout: the engine would recompute
            stats["errors"] += 1
            time.sleep(0.05)
        if time.monotonic() - last > 0.2:
            last = time.monotonic()
            with open(progress + ".tmp", "w") as f:
                json.dump(stats, f)
            os.replace(progress + ".tmp", progress)
""")


def test_chaos_four_tenants_100k_blocks_zero_wrong(tmp_path):
    d = Daemon(tmp_path, "chaos", g2=384, layout=SMALL_LAYOUT, lease_s=1.0, reserve_s=2.0,
               namespace_share=0.5).start()
    rng = random.Random(12)
    workers: dict[int, tuple[subprocess.Popen, str]] = {}
    done: dict = {"loaded": 0, "wrong": 0, "errors": 0}  # from workers killed along the way
    faults = {"sigstop": 0, "sigkill": 0, "daemon_kill": 0, "expiries": 0, "expired_before": 0}

    def spawn(i: int) -> None:
        progress = str(tmp_path / f"w{i}-{time.monotonic_ns()}.json")
        p = subprocess.Popen([sys.executable, "-c", WORKER, d.address, f"tenant-{i % TENANTS}", progress],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        workers[i] = (p, progress)

    def read(progress: str) -> dict:
        try:
            with open(progress) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def totals() -> dict:
        t = dict(done)
        for _, progress in workers.values():
            for k, v in read(progress).items():
                if k in t:
                    t[k] += v
        return t

    def expiries() -> int:
        """Sessions the running daemon released for a frozen or dead client (0 if it cannot say)."""
        try:
            with Client(d.address, model="observer", layout=KVLayout(**SMALL_LAYOUT), timeout=120.0) as c:
                st = c.stats()["daemon"]
                return st["lease_expiries"] + st["dead_clients"]
        except Exception:
            return 0

    try:
        for i in range(TENANTS * PER_TENANT):
            spawn(i)
        deadline = time.monotonic() + 1200  # a condition wait: ends when enough() holds
        # the faults start once every client is at work (a process still importing numpy would
        # take a SIGSTOP or a daemon kill without noticing: a fault on paper only)
        while not all(read(progress).get("loaded", 0) > 0 for _, progress in workers.values()):
            assert time.monotonic() < deadline, "the clients did not start loading"
            time.sleep(0.2)
        step = 0

        def enough() -> bool:  # the target and every kind of fault, seen by the daemon, however fast the machine
            if not (totals()["loaded"] >= TARGET and faults["sigstop"] >= 2 and faults["sigkill"] >= 2
                    and faults["daemon_kill"] >= 1):
                return False
            faults["expiries"] = faults["expired_before"] + expiries()
            return faults["expiries"] >= 1

        while not enough():
            assert time.monotonic() < deadline, f"only {totals()} after 1200 s"
            step += 1
            time.sleep(0.5)
            i = rng.randrange(TENANTS * PER_TENANT)
            p, progress = workers[i]
            if step % 3 == 0:  # frozen past its lease: its session is released under it
                p.send_signal(signal.SIGSTOP)
                time.sleep(2.5)  # > lease_s and > reserve_s (the fault itself)
                p.send_signal(signal.SIGCONT)
                faults["sigstop"] += 1
            elif step % 3 == 1:  # killed mid-request, replaced
                p.kill()
                p.wait(60)
                for k, v in read(progress).items():
                    if k in done:
                        done[k] += v
                spawn(i)
                faults["sigkill"] += 1
            if step % 8 == 4:  # the daemon itself: SIGKILL, restart on the same socket
                faults["expired_before"] += expiries()  # (the killed daemon's count goes with it)
                d.proc.kill()
                d.proc.wait(60)
                d.start()
                faults["daemon_kill"] += 1
            for j, (q, _) in workers.items():
                assert q.poll() is None or j == i, q.stderr.read().decode()[-2000:]
        t = totals()
        print(f"chaos: {t}, faults {faults}")
        assert t["loaded"] >= TARGET
        assert t["wrong"] == 0
        assert faults["sigstop"] >= 2 and faults["sigkill"] >= 2 and faults["daemon_kill"] >= 1
        assert faults["expiries"] >= 1
    finally:
        for p, _ in workers.values():
            p.send_signal(signal.SIGCONT)
            p.kill()
        try:
            d.stop(60)
        except subprocess.TimeoutExpired:
            pass
        d.kill()
