"""How long the engine's thread is held by a connector store once G2 is full, with and without
background offload (kvbm.offload): vLLM's CPU layout (Llama-3.1-8B TP1: 32 layers, 2 MiB a
block), G2 host 256 blocks over G3 O_DIRECT disk in a temp dir, 32-block stores, the offloader
given the time between steps to catch up.

    python bench/bench_offload.py [--steps 40] [--headroom 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time


def run(headroom: int, steps: int) -> list[float]:
    import torch

    from kvbm.blocks import KVLayout, Namespace
    from kvbm.connectors import core

    layout = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, block_size=16, dtype="bfloat16")
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        cfg = core.resolve_config({"tiers": [
            {"name": "g2", "capacity": 256, "storage": {"name": "host", "pin": "never"}, "headroom": headroom},
            {"name": "g3", "capacity": 4096, "storage": {"name": "disk", "path": d}}]}, layout, "bench")
        manager, lock = core.shared_manager(cfg)
        try:
            sched = core.SchedulerSide(manager, lock, Namespace("bench", layout), 16)
            worker = core.WorkerSide(manager, lock)
            worker.register([torch.zeros(512, 8, 16, 256, dtype=torch.bfloat16) for _ in range(32)])
            offloader = core._OFFLOADERS.get(id(manager))
            times = []
            for r in range(steps):
                sched.keys(f"r{r}", [r * 1000 + i for i in range(32)])
                plan = sched.plan_store(f"r{r}", list(range(32)), 32 * 16 + 1)
                t = time.perf_counter()
                worker.start_store(plan)
                times.append(time.perf_counter() - t)
                worker.poll(wait=True)
                if offloader is not None:
                    offloader.wait_idle(10)  # the gap between engine steps
            return times
        finally:
            core.release_managers()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--headroom", type=int, default=64)
    args = ap.parse_args()
    for h in (0, args.headroom):
        t = run(h, args.steps)[10:]  # G2 is full from step 8 on
        print(f"headroom {h:4d}: store holds the engine median {1e3 * statistics.median(t):6.1f} ms, "
              f"max {1e3 * max(t):6.1f} ms (32 x 2 MiB, G2 full)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
