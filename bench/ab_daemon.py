"""A/B same-node store/load GB/s of two checkouts of kvbm, rounds interleaved (for a noisy box).

    python bench/ab_daemon.py OLD_ROOT NEW_ROOT [ROUNDS]

Each root is a source tree whose `kvbm` package imports with PYTHONPATH=ROOT (e.g. a
`git archive` of an older commit with the built `_native` copied in; KVBM_AB_PRELUDE, if set,
is prepended to PYTHONPATH). One daemon and one client process per root; each round every client
stores then loads 256 x 1 MiB fresh blocks (bytes verified), the order alternating by round.
"""
import json, os, subprocess, sys, tempfile, time, uuid, statistics
OLD, NEW = sys.argv[1], sys.argv[2]
ROUNDS = int(sys.argv[3]) if len(sys.argv) > 3 else 8
PRE = os.environ.get("KVBM_AB_PRELUDE", "")
WORKER = r'''
import sys, json, time, hashlib, numpy as np
sys.path.insert(0, sys.argv[2])
from kvbm.client import Client
from kvbm.blocks import KVLayout
layout = KVLayout(num_layers=16, num_kv_heads=8, head_dim=128, block_size=16)  # 1 MiB
nb = layout.block_nbytes
n = 256
src = [np.frombuffer(hashlib.shake_128(str(i).encode()).digest(nb), np.uint8) for i in range(n)]
dst = [np.empty(nb, np.uint8) for _ in range(n)]
c = Client(sys.argv[1], model="bench", layout=layout)
k = 0
print("ready", flush=True)
for line in sys.stdin:
    k += 1
    keys = [hashlib.blake2b(f"{k}/{i}".encode(), digest_size=16).digest() for i in range(n)]
    t0 = time.perf_counter(); s = c.store(keys, src); t1 = time.perf_counter()
    l = c.load(keys, dst); t2 = time.perf_counter()
    ok = s == n and l == n and all(np.array_equal(a, b) for a, b in zip(src, dst))
    print(json.dumps({"store": n * nb / 1e9 / (t1 - t0), "load": n * nb / 1e9 / (t2 - t1), "ok": ok}), flush=True)
'''
def daemon(root, work, name):
    import yaml
    d = os.path.join(work, name); os.makedirs(d)
    shm = f"kvbm-ab-{uuid.uuid4().hex[:8]}"
    cfg = {"namespace": {"model": "bench"}, "layout": {"num_layers": 16, "num_kv_heads": 8, "head_dim": 128, "block_size": 16},
           "tiers": [{"name": "g2", "capacity": 1024, "eviction": "lru", "storage": "host"}],
           "daemon": {"address": f"ipc://{d}/d.sock", "events": "", "metrics": "", "shm_name": shm, "lease_s": 10.0, "nixl": False}}
    open(f"{d}/k.yaml", "w").write(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": (PRE + ":" if PRE else "") + root}
    out = open(f"{d}/out", "w")
    p = subprocess.Popen([sys.executable, "-m", "kvbm.cli", "serve", "--config", f"{d}/k.yaml"], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root)
    for _ in range(600):
        txt = open(f"{d}/out").read()
        if '"ready"' in txt:
            return p, json.loads([l for l in txt.splitlines() if l.startswith('{"ready"')][0])["address"], shm
        time.sleep(0.1)
    raise SystemExit(open(f"{d}/out").read())
work = tempfile.mkdtemp(prefix="kvbm-ab-")
res = {}
procs = []
try:
    clients = {}
    for name, root in (("old", OLD), ("new", NEW)):
        p, addr, shm = daemon(root, work, name); procs.append((p, shm))
        env = {**os.environ, "PYTHONPATH": (PRE + ":" if PRE else "") + root}
        c = subprocess.Popen([sys.executable, "-c", WORKER, addr, root], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=root)
        assert c.stdout.readline().strip() == "ready"
        clients[name] = c; res[name] = []
    for r in range(ROUNDS):
        for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
            c = clients[name]; c.stdin.write("go\n"); c.stdin.flush()
            res[name].append(json.loads(c.stdout.readline()))
    for name, c in clients.items():
        c.stdin.close(); c.wait(30)
finally:
    for p, shm in procs:
        p.terminate(); p.wait(20)
        try: os.unlink(f"/dev/shm/{shm}")
        except OSError: pass
out = {}
for name, rs in res.items():
    out[name] = {k: {"median": round(statistics.median(x[k] for x in rs), 2), "best": round(max(x[k] for x in rs), 2)} for k in ("store", "load")}
    out[name]["all_ok"] = all(x["ok"] for x in rs)
out["new/old median"] = {k: round(out["new"][k]["median"] / out["old"][k]["median"], 3) for k in ("store", "load")}
out["new/old best"] = {k: round(out["new"][k]["best"] / out["old"][k]["best"], 3) for k in ("store", "load")}
out["rounds"] = ROUNDS
print(json.dumps(out, indent=1))
