"""One hit request's phases, the daemon backend against the in-process manager (issue 14, f vs e).

    python bench/hit_phases.py [--rounds 2]

The connector's own halves (SchedulerSide, WorkerSide) over each backend, G2 32 blocks over a G3
slot file (the tiny model's 128-token bf16 blocks, 128 KiB): 40 prompts of 14 blocks are stored
(most reach G3), then the first 20 are asked again; per request, p50 of: match (lookup + pin),
start_load (the worker's synchronous part), and the wait until poll() reports the load done.
Rounds alternate daemon, in-process. A measurement, not a test: compare only within one run.
"""
import argparse
from pathlib import Path
import sys, time, threading, statistics, tempfile, uuid
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import torch
from kvbm.blocks import Namespace, KVLayout
from kvbm.connectors import core
from kvbm.connectors.manager_backend import ManagerBackend
from kvbm.config import parse_config
from kvbm.manager import BlockManager
from servedaemon import Served, LAYOUT_DICT

LD = {"num_layers": 2, "num_kv_heads": 4, "head_dim": 64, "block_size": 128, "dtype": "bfloat16"}
LAYOUT = KVLayout(**{**LD})
BS = 128
NBLK = 64  # engine pages

def tiers(d):
    return [{"name": "g2", "capacity": 32, "eviction": "lru", "storage": "host"},
            {"name": "g3", "capacity": 1024, "eviction": "lru", "storage": {"name": "disk", "path": str(d / "g3")}}]

class Eng:
    def __init__(self, backend):
        self.backend = backend
        self.sched = core.SchedulerSide(backend, None, Namespace("tiny", LAYOUT, ""), BS)
        self.worker = core.WorkerSide(backend)
        self.worker.register([torch.zeros(2, NBLK, BS, 4, 64, dtype=torch.bfloat16) for _ in range(2)])
    def prompt(self, req, hashes, blocks, t):
        t0 = time.perf_counter()
        keys = self.sched.keys(req, hashes)
        hit = self.sched.match(req, keys, len(hashes) * BS + 1, 0, must_compute_one=True) // BS
        t1 = time.perf_counter()
        plan = self.sched.plan_load(req, blocks, hit * BS)
        if plan is not None:
            self.worker.start_load(plan)
        t2 = time.perf_counter()
        while plan is not None:
            loads, _ = self.worker.poll(wait=False)
            if loads:
                break
            time.sleep(0.0005)
        t3 = time.perf_counter()
        store = self.sched.plan_store(req, blocks, len(hashes) * BS + 1)
        if store is not None:
            self.worker.start_store(store)
        self.worker.poll(wait=True)
        self.sched.finished(req)
        t.append((hit, (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3))
        return hit

def run(eng, label):
    # store 40 prompts of 14 blocks (560 blocks: most go to G3), then hit the first 20 again
    for i in range(40):
        eng.prompt(f"s{i}", [uuid.uuid5(uuid.NAMESPACE_OID, f"p{i}/{j}").bytes * 2 for j in range(14)], list(range(14)), [])
    time.sleep(1.0)
    t = []
    for i in range(20):
        eng.prompt(f"h{i}", [uuid.uuid5(uuid.NAMESPACE_OID, f"p{i}/{j}").bytes * 2 for j in range(14)], list(range(14)), t)
    hits = [x[0] for x in t]
    print(label, "hits", statistics.median(hits), "match ms p50 %.2f" % statistics.median(x[1] for x in t),
          "start_load ms %.2f" % statistics.median(x[2] for x in t), "load wait ms p50 %.2f max %.2f" % (
              statistics.median(x[3] for x in t), max(x[3] for x in t)), flush=True)

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--rounds", type=int, default=2)
args = ap.parse_args()
tmp = Path(tempfile.mkdtemp(prefix="kvbm-hit-phases-"))
for rnd in range(args.rounds):
    d = tmp / f"d{rnd}"; d.mkdir()
    s = Served(d, "x", tiers=tiers(d), layout=LD).start()
    try:
        be = core.DaemonBackend.connect(s.address, LAYOUT, "tiny")
        run(Eng(be), f"daemon[{rnd}]")
        be.close()
    finally:
        s.stop()
    d2 = tmp / f"m{rnd}"; d2.mkdir()
    cfg = parse_config({"namespace": {"model": "tiny"}, "layout": LD, "tiers": tiers(d2)})
    m = BlockManager.from_config(cfg)
    run(Eng(ManagerBackend(m, threading.RLock())), f"inproc[{rnd}]")
    m.close()
import shutil  # noqa: E402
shutil.rmtree(tmp, ignore_errors=True)
