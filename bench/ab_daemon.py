"""A/B of two checkouts of kvbm's daemon, rounds interleaved (for a noisy box).

    python bench/ab_daemon.py OLD_ROOT NEW_ROOT [ROUNDS]
        same-node store/load GB/s: one daemon and one client process per root; each round every
        client stores then loads 256 x 1 MiB fresh blocks (bytes verified)
    python bench/ab_daemon.py OLD_ROOT NEW_ROOT ROUNDS load [CLIENTS] [OPS]
        small ops: one daemon and CLIENTS (8) client processes per root, kept alive; each round
        every client of one root runs OPS (1000) mixed ops of bench_daemon.py's load (4 x 64 KiB
        blocks per op, loads verified) at once; ops/s of the round, p50/p99 of its ops
    python bench/ab_daemon.py --snapshot COMMIT DIR
        make DIR a self-contained OLD_ROOT of COMMIT: `git archive`, policies/ mapped into
        kvbm/policies, the built kvbm._native copied in, and a sitecustomize.py that turns off
        the editable install's finder (which would import /work/main's kvbm instead)

Each root is a source tree whose `kvbm` package imports with PYTHONPATH=ROOT (KVBM_AB_PRELUDE, if
set, is prepended to PYTHONPATH); the order of old and new alternates by round, and the ratio is
taken between the medians of the rounds.
"""
import json, os, subprocess, sys, tempfile, time, uuid, statistics
if sys.argv[1] == "--snapshot":
    import glob, shutil
    commit, out = sys.argv[2], sys.argv[3]
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.makedirs(out)
    subprocess.run(f"git -C {here} archive {commit} | tar -x -C {out}", shell=True, check=True)
    shutil.copytree(os.path.join(out, "policies"), os.path.join(out, "kvbm", "policies"))
    import kvbm._native as native
    shutil.copy(native.__file__, os.path.join(out, "kvbm"))
    open(os.path.join(out, "sitecustomize.py"), "w").write(
        "import sys\nsys.meta_path[:] = [f for f in sys.meta_path if '_editable' not in type(f).__module__]\n")
    print(out)
    raise SystemExit(0)
OLD, NEW = sys.argv[1], sys.argv[2]
ROUNDS = int(sys.argv[3]) if len(sys.argv) > 3 else 8
MODE = sys.argv[4] if len(sys.argv) > 4 else "local"
CLIENTS = int(sys.argv[5]) if len(sys.argv) > 5 else 8
OPS = int(sys.argv[6]) if len(sys.argv) > 6 else 1000
PRE = os.environ.get("KVBM_AB_PRELUDE", "")
BENCH = os.path.dirname(os.path.abspath(__file__))
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
LOAD_WORKER = r'''
import sys, json, time, numpy as np
sys.path.insert(0, sys.argv[2]); sys.path.insert(0, sys.argv[3])
from kvbm.client import Client
import bench_daemon as B
layout = B.layout_of(1 / 16)
c = Client(sys.argv[1], model="bench", layout=layout)
idx, ops = int(sys.argv[4]), int(sys.argv[5])
rng = np.random.default_rng(7 + idx)
print("ready", flush=True)
import resource
def cpu():
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime
for line in sys.stdin:
    c0 = cpu()
    r = B.mixed_ops(c, idx, ops, layout.block_nbytes, rng)
    r["cpu_s"] = cpu() - c0
    print(json.dumps(r), flush=True)
c.close()
'''
def daemon(root, work, name):
    import yaml
    d = os.path.join(work, name); os.makedirs(d)
    shm = f"kvbm-ab-{uuid.uuid4().hex[:8]}"
    lay = ({"num_layers": 1, "num_kv_heads": 8, "head_dim": 128, "block_size": 16} if MODE == "load" else
           {"num_layers": 16, "num_kv_heads": 8, "head_dim": 128, "block_size": 16})
    cfg = {"namespace": {"model": "bench"}, "layout": lay,
           "tiers": [{"name": "g2", "capacity": 8192 if MODE == "load" else 1024, "eviction": "lru", "storage": "host"}],
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
def _cpu(pid):
    """CPU seconds of a process, all its threads (the daemon's zmq I/O thread too)."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
def ab_load():
    """Small mixed ops: CLIENTS persistent client processes per root, rounds alternating."""
    import numpy as np
    work = tempfile.mkdtemp(prefix="kvbm-ab-")
    res, procs, clients = {}, [], {}
    try:
        pids = {}
        for name, root in (("old", OLD), ("new", NEW)):
            p, addr, shm = daemon(root, work, name); procs.append((p, shm)); pids[name] = p.pid
            env = {**os.environ, "PYTHONPATH": (PRE + ":" if PRE else "") + root}
            clients[name] = [subprocess.Popen([sys.executable, "-c", LOAD_WORKER, addr, root, BENCH, str(i), str(OPS)],
                                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=root)
                             for i in range(CLIENTS)]
            for c in clients[name]:
                assert c.stdout.readline().strip() == "ready"
            res[name] = []
        for r in range(ROUNDS):
            for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
                d0 = _cpu(pids[name])
                t0 = time.perf_counter()
                for c in clients[name]:
                    c.stdin.write("go\n"); c.stdin.flush()
                rs = [json.loads(c.stdout.readline()) for c in clients[name]]
                wall = time.perf_counter() - t0
                dcpu = _cpu(pids[name]) - d0
                lat = np.concatenate([np.array(v) for x in rs for v in x["lat"].values()])
                res[name].append({"ops_per_s": CLIENTS * OPS / wall, "p50_us": float(np.percentile(lat, 50)) * 1e6,
                                  "p99_us": float(np.percentile(lat, 99)) * 1e6, "load": os.getloadavg()[0],
                                  "errors": sum(len(x["errors"]) for x in rs), "wrong": sum(x["wrong"] for x in rs),
                                  "loaded": sum(x["loaded"] for x in rs),
                                  "daemon_cpu_us_per_op": dcpu / (CLIENTS * OPS) * 1e6,
                                  "client_cpu_us_per_op": sum(x["cpu_s"] for x in rs) / (CLIENTS * OPS) * 1e6})
        for cs in clients.values():
            for c in cs:
                c.stdin.close(); c.wait(30)
    finally:
        for p, shm in procs:
            p.terminate(); p.wait(20)
            try: os.unlink(f"/dev/shm/{shm}")
            except OSError: pass
    out = {}
    for name, rs in res.items():
        out[name] = {k: round(statistics.median(x[k] for x in rs), 1)
                     for k in ("ops_per_s", "p50_us", "p99_us", "daemon_cpu_us_per_op", "client_cpu_us_per_op")}
        out[name]["rounds_ops_per_s"] = [round(x["ops_per_s"]) for x in rs]
        out[name].update(errors=sum(x["errors"] for x in rs), wrong=sum(x["wrong"] for x in rs),
                         loaded=sum(x["loaded"] for x in rs))
    out["new/old median ops/s"] = round(out["new"]["ops_per_s"] / out["old"]["ops_per_s"], 3)
    out["new/old CPU per op (daemon + clients)"] = round(
        (out["new"]["daemon_cpu_us_per_op"] + out["new"]["client_cpu_us_per_op"])
        / (out["old"]["daemon_cpu_us_per_op"] + out["old"]["client_cpu_us_per_op"]), 3)
    out["new/old per round"] = [round(n["ops_per_s"] / o["ops_per_s"], 3) for o, n in zip(res["old"], res["new"])]
    out.update(rounds=ROUNDS, clients=CLIENTS, ops=OPS, load_average=[round(x["load"], 1) for x in res["new"]])
    print(json.dumps(out, indent=1))
    raise SystemExit(0)
if MODE == "load":
    ab_load()
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
