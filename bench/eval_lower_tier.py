"""Eviction below the first tier: G2 (the default, `auto`) over a G3 whose policy varies.

    python bench/eval_lower_tier.py [--split tune|held-out|all] [--policies NAMES]
                                    [--g2 F,...] [--g3 X,...] [--mode exclusive|inclusive] [--json OUT]
    python bench/eval_lower_tier.py --memory [--policies NAMES]    bytes per resident key on G3

A tier below the first is fed by the cascade: one demoted block per insert (its parent above),
and in the default `exclusive` mode a hit there is a promotion that *removes* the block (the
tier never sees a touch). What a policy can learn there differs from the first tier, so it is
judged on its own grid:

    rows      the rows of bench/eval_policies.py (same split: tune rows to choose on, held-out
              rows to report)
    columns   G2 at 1, 2 and 5 % of the workload's distinct blocks (--g2), G3 at 4x and 10x G2
              (--g3)
    metric    the whole hierarchy's prefix hit ratio (kvbm.sim.replay.simulate through the real
              BlockManager, metadata only); per cell each policy's shortfall against the best of
              lru/arc/s3fifo/prefix on G3 (the issue's bar for `auto`: within 0.002)
    memory    --memory: the bundled trace through G2 10,000 (auto) over G3 100,000 (lru), G3's
              inserts and removes recorded; then each policy (`auto` below the first tier:
              AutoPolicy(below=True); `auto-first`: the first tier's auto there) replays them alone under tracemalloc (evicting one key
              whenever it is full, by its own choice), compiled cores' arrays added
              (native_bytes): bytes held per resident key at the end
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from bench.eval_policies import HELD_OUT, REFERENCE, TOLERANCE, TUNE, load  # noqa: E402
from kvbm.config import KVBMConfig  # noqa: E402
from kvbm.policies.lru import LRUPolicy  # noqa: E402
from kvbm.registry import EVICTION  # noqa: E402
from kvbm.sim.replay import simulate  # noqa: E402

G2_FRACTIONS = [0.01, 0.02, 0.05]
G3_FACTORS = [4, 10]
POLICIES = ["lru", "arc", "s3fifo", "prefix", "hitdensity", "auto"]


def run_cell(trace, g2: int, g3: int, policy: str, mode: str = "exclusive", g2_policy: str = "auto") -> float:
    cfg = KVBMConfig.from_dict({"mode": mode, "tiers": [
        {"name": "g2", "capacity": g2, "eviction": g2_policy},
        {"name": "g3", "capacity": g3, "eviction": policy}]})
    return simulate(trace, cfg, progress=False).prefix_hit_ratio


def evaluate(names, policies, g2_fractions, g3_factors, mode="exclusive", log=None) -> list[dict]:
    out = []
    for name in names:
        t0 = time.perf_counter()
        trace = load(name)
        distinct = len({k for r in trace.requests for k in r.hash_ids})
        for f in g2_fractions:
            g2 = max(1, round(f * distinct))
            for x in g3_factors:
                for p in policies:
                    out.append({"workload": name, "g2_fraction": f, "g3_factor": x, "g2": g2, "g3": g2 * x,
                                "policy": p, "prefix_hit_ratio": run_cell(trace, g2, g2 * x, p, mode)})
        if log:
            log(f"{name}: {len(trace.requests):,} requests ({time.perf_counter() - t0:.0f} s)")
    return out


class _Recorder(LRUPolicy):
    """An lru G3 that writes down the calls it gets (inserts with their parent, removes)."""

    wants_structure = True
    calls: list = []

    def insert(self, key, hints=None):
        self.calls.append((0, key, hints.parent if hints is not None else None))
        super().insert(key, hints)

    def remove(self, key):
        if key in self:
            self.calls.append((1, key, None))
        super().remove(key)


def memory(policies, g2=10_000, g3=100_000) -> dict:
    import gc
    import tracemalloc

    from kvbm.cli import BUNDLED
    from kvbm.policies.base import Hints
    from kvbm.sim.traces import load_trace

    EVICTION.register("_recorder", _Recorder, clobber=True)
    _Recorder.calls = []
    cfg = KVBMConfig.from_dict({"tiers": [{"name": "g2", "capacity": g2},
                                          {"name": "g3", "capacity": g3, "eviction": "_recorder"}]})
    simulate(load_trace(BUNDLED["mooncake"]), cfg, progress=False)
    calls, out = _Recorder.calls, {}
    for name in policies:
        gc.collect()
        tracemalloc.start()
        try:
            # auto-first: the first tier's auto on that G3 (below=False), for comparison
            base = "auto" if name == "auto-first" else name
            policy = EVICTION.get(base)(g3, **({"below": name == "auto"} if base == "auto" else {}))
            for op, key, parent in calls:
                if op:
                    policy.remove(key)
                    continue
                if len(policy) >= g3:
                    policy.evict(1, ())
                policy.insert(key, Hints(parent=parent))
            gc.collect()
            subs = [policy, getattr(policy, "_real", None), *getattr(policy, "_pols", ())]
            native = sum(p._core.native_bytes() for p in subs
                         if p is not None and getattr(p, "_core", None) is not None)
            out[name] = ((tracemalloc.get_traced_memory()[0] + native) / max(1, len(policy)), len(policy), len(calls))
        finally:
            tracemalloc.stop()
    return out


def cells(records) -> dict:
    grid: dict = {}
    for r in records:
        grid.setdefault((r["workload"], r["g2_fraction"], r["g3_factor"]), {})[r["policy"]] = r["prefix_hit_ratio"]
    return grid


def markdown(records, policies) -> str:
    lines = ["| workload | G2 | G3 | " + " | ".join(policies) + " | auto - best ref | auto - lru |",
             "| --- | --- | --- | " + " | ".join("---" for _ in policies) + " | --- | --- |"]
    misses = {p: 0 for p in policies}
    worst = {p: 0.0 for p in policies}
    grid = cells(records)
    for (w, f, x), c in grid.items():
        best = max(c[p] for p in REFERENCE if p in c)
        for p in policies:
            worst[p] = max(worst[p], best - c[p])
            misses[p] += best - c[p] > TOLERANCE
        tail = (f" | {c['auto'] - best:+.4f} | {c['auto'] - c['lru']:+.4f}" if "auto" in c and "lru" in c else " | - | -")
        lines.append(f"| {w} | {f:.0%} | {x}x | " + " | ".join(f"{c[p]:.4f}" for p in policies) + tail + " |")
    lines += ["", "| policy | cells more than 0.002 below the best of " + "/".join(REFERENCE)
              + " | worst shortfall |", "| --- | --- | --- |"]
    lines += [f"| {p} | {misses[p]} of {len(grid)} | {worst[p]:+.4f} |" for p in policies]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=["tune", "held-out", "all"], default="held-out")
    ap.add_argument("--workloads", help="comma-separated rows instead of a split")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--g2", default=",".join(map(str, G2_FRACTIONS)), help="G2 sizes, fractions of distinct blocks")
    ap.add_argument("--g3", default=",".join(map(str, G3_FACTORS)), help="G3 sizes, multiples of G2")
    ap.add_argument("--mode", choices=["exclusive", "inclusive"], default="exclusive")
    ap.add_argument("--json", help="write the records here")
    ap.add_argument("--memory", action="store_true", help="bytes per resident key on a G3 of 100,000 blocks")
    args = ap.parse_args(argv)
    policies = args.policies.split(",")
    if args.memory:
        for name, (b, n, calls) in memory(policies).items():
            print(f"{name}: {b:.0f} B per resident key ({n:,} resident after {calls:,} G3 calls)")
        return 0
    for p in policies:
        EVICTION.get(p)
    names = args.workloads.split(",") if args.workloads else {
        "tune": TUNE, "held-out": HELD_OUT, "all": TUNE + HELD_OUT}[args.split]
    t0 = time.perf_counter()
    records = evaluate(names, policies, [float(x) for x in args.g2.split(",")],
                       [int(x) for x in args.g3.split(",")], args.mode,
                       log=lambda m: print(m, file=sys.stderr, flush=True))
    if args.json:
        Path(args.json).write_text(json.dumps({"policies": policies, "records": records}, indent=1))
    print(markdown(records, policies))
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
