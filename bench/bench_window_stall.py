"""What a client that holds its window's file busy costs everyone else: A/B of two checkouts.

    python bench/bench_window_stall.py OLD_ROOT NEW_ROOT [SECONDS] [GIB]

Per root: one `kvbm serve` (G2 only), an attacker session that loops fallocate(GIB GiB past its
window's end) + ftruncate back on its window's file (each fallocate holds the tmpfs inode lock)
while it asks one-shot loads of 4 blocks through that window, and a victim client (its own
session and window) that runs one-shot store + load of 4 x 16 KiB blocks back to back, bytes
verified. Reports the victim's op latency (p50/p99/max) and ops done in SECONDS, the attacker's
loads answered and errors (window_stalled ends its session: it opens a new one), per root, the
roots run one after the other twice in alternating order (old, new, new, old). Reports only.
BENCH_KVBM_NATIVE=0 in the environment runs both daemons without the extension (pread/pwrite).
"""
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import numpy as np

OLD, NEW = sys.argv[1], sys.argv[2]
SECONDS = float(sys.argv[3]) if len(sys.argv) > 3 else 10.0
GIB = float(sys.argv[4]) if len(sys.argv) > 4 else 1.0
LAYOUT = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 64, "block_size": 16}  # 16 KiB

VICTIM = r'''
import sys, json, time, hashlib, numpy as np
sys.path.insert(0, sys.argv[2])
from kvbm.client import Client
from kvbm.blocks import KVLayout
lay = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, block_size=16)
nb = lay.block_nbytes
c = Client(sys.argv[1], model="victim", layout=lay, timeout=120)
lat, wrong, k = [], 0, 0
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    k += 1
    keys = [hashlib.blake2b(f"{k}/{i}".encode(), digest_size=16).digest() for i in range(4)]
    src = [np.frombuffer(hashlib.shake_128(x).digest(nb), np.uint8) for x in keys]
    dst = [np.empty(nb, np.uint8) for _ in keys]
    t0 = time.perf_counter(); c.store(keys, src); t1 = time.perf_counter()
    n = c.load(keys, dst); t2 = time.perf_counter()
    lat += [t1 - t0, t2 - t1]
    wrong += sum(not np.array_equal(a, b) for a, b in zip(src[:n], dst[:n]))
c.close()
a = np.array(lat)
print(json.dumps({"ops": len(lat), "p50_ms": float(np.percentile(a, 50)) * 1e3, "p99_ms": float(np.percentile(a, 99)) * 1e3,
                  "max_ms": float(a.max()) * 1e3, "wrong": int(wrong)}))
'''

ATTACKER = r'''
import sys, os, json, time, ctypes, threading, zmq
sys.path.insert(0, sys.argv[2])
from kvbm.daemon import protocol as P
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
lay = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 64, "block_size": 16}
ctx = zmq.Context(); s = ctx.socket(zmq.DEALER); s.setsockopt(zmq.LINGER, 0); s.connect(sys.argv[1])
rid = [0]
def call(op, sid=None, **f):
    rid[0] += 1; s.send(P.request(op, rid[0], "", sid, **f))
    while True:
        r = P.unpack(s.recv(), 1 << 20)
        if r["id"] == rid[0]: return r
end = time.monotonic() + float(sys.argv[3]); gib = float(sys.argv[4])
answered = errors = sessions = 0; stop = threading.Event(); cur = {}
def hold():
    while not stop.is_set():
        fd, size = cur.get("fd"), cur.get("size")
        if fd is None: time.sleep(0.001); continue
        try:
            libc.fallocate(fd, 0, size, int(gib * (1 << 30))); os.ftruncate(fd, size)
        except OSError: pass
t = threading.Thread(target=hold, daemon=True); t.start()
while time.monotonic() < end:
    h = call("hello", model="evil", layout=lay, salt="")
    if not h["ok"]: time.sleep(0.05); continue
    sessions += 1
    fd = os.open(h["window_path"], os.O_RDWR); os.unlink(h["window_path"])
    first = h["scratch"][0]; keys = [os.urandom(16) for _ in range(4)]
    call("store", h["session"], keys=keys, slots=list(range(first, first + 4)))
    cur.update(fd=fd, size=h["window_bytes"])
    while time.monotonic() < end:
        r = call("load", h["session"], keys=keys, slots=list(range(first, first + 4)))
        if r["ok"]: answered += 1
        else:
            errors += 1; break
    cur.clear(); time.sleep(0.01); os.close(fd)
stop.set(); t.join()
print(json.dumps({"loads_answered": answered, "errors": errors, "sessions": sessions}))
'''


def run(root: str, work: str) -> dict:
    import yaml
    d = os.path.join(work, uuid.uuid4().hex[:8])
    os.makedirs(d)
    shm = f"kvbm-stall-{uuid.uuid4().hex[:8]}"
    cfg = {"namespace": {"model": "bench"}, "layout": LAYOUT,
           "tiers": [{"name": "g2", "capacity": 4096, "eviction": "lru", "storage": "host"}],
           "daemon": {"address": f"ipc://{d}/d.sock", "events": "", "metrics": "", "shm_name": shm, "lease_s": 30.0,
                      "nixl": False}}
    open(f"{d}/k.yaml", "w").write(yaml.safe_dump(cfg))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("KVBM_")}, "PYTHONPATH": root}
    if os.environ.get("BENCH_KVBM_NATIVE"):  # e.g. 0: both daemons without the extension (pread/pwrite)
        env["KVBM_NATIVE"] = os.environ["BENCH_KVBM_NATIVE"]
    out = open(f"{d}/out", "w")
    p = subprocess.Popen([sys.executable, "-m", "kvbm.cli", "serve", "--config", f"{d}/k.yaml"], stdout=out,
                         stderr=subprocess.STDOUT, env=env, cwd=root)
    try:
        for _ in range(600):
            txt = open(f"{d}/out").read()
            if '"ready"' in txt:
                addr = json.loads([ln for ln in txt.splitlines() if ln.startswith('{"ready"')][0])["address"]
                break
            time.sleep(0.1)
        else:
            raise SystemExit(open(f"{d}/out").read())
        a = subprocess.Popen([sys.executable, "-c", ATTACKER, addr, root, str(SECONDS), str(GIB)], stdout=subprocess.PIPE,
                             text=True, env=env, cwd=root)
        v = subprocess.Popen([sys.executable, "-c", VICTIM, addr, root, str(SECONDS)], stdout=subprocess.PIPE, text=True,
                             env=env, cwd=root)
        vo, ao = v.communicate(SECONDS + 300)[0], a.communicate(SECONDS + 300)[0]
        res = {"victim": json.loads(vo.strip().splitlines()[-1]), "attacker": json.loads(ao.strip().splitlines()[-1]),
               "daemon_alive": p.poll() is None, "load": round(os.getloadavg()[0], 1)}
    finally:
        p.terminate()
        p.wait(30)
    res["shm_left"] = sorted(n for n in os.listdir("/dev/shm") if n.startswith(shm))
    return res


work = tempfile.mkdtemp(prefix="kvbm-stall-")
out = {"old": [], "new": []}
for name in ("old", "new", "new", "old"):
    out[name].append(run(OLD if name == "old" else NEW, work))
out["seconds"], out["gib"] = SECONDS, GIB
print(json.dumps(out, indent=1))
