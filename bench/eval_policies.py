"""Every eviction policy over a grid of workloads and capacities: prefix hit ratio, gap closed, worst cell.

    python bench/eval_policies.py [--split tune|held-out|all] [--policies NAMES] [--fractions F,...]
                                  [--jobs 2] [--json OUT]
    python bench/eval_policies.py --merge A.json,B.json [--json OUT]   (runs of different policies:
                                  one grid, printed per split; later files win on a repeated cell)

Grid
    rows      workloads: the synthetic family of kvbm/sim/synth.py (WORKLOADS; seeds fixed there)
              and the bundled Mooncake conversation trace's two halves (6,015 and 6,016
              requests, each replayed from an empty cache).
    columns   capacities of 1, 2, 5, 10 and 25 % of the workload's distinct blocks, so every
              workload is cut at the same relative pressure.
    split     `tune`: chat, agent, docqa, fanout -- the only rows auto's constants (Z, MARGIN,
              PERSIST, KEEP, sample_slots) were chosen on. `held-out`: mix, tenants, assistant,
              rag, another seed of agent and of docqa, mooncake-1, mooncake-2 -- never looked
              at while choosing them. Report the held-out rows.
Per cell: each policy's prefix hit ratio and its share of the LRU->Belady gap closed
((p - lru) / (belady - lru); cells with less than 0.005 of room are left out of the shares,
where the share is noise). Per policy: its worst cell (lowest share), its largest shortfall
against the best of lru/arc/s3fifo/prefix (the issue's criterion for `auto`: within 0.002),
and the cells where it is below LRU. Single tier, metadata only, through the real BlockManager
(kvbm.sim.replay.sweep): the policy measured is the policy that runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from kvbm.cli import BUNDLED  # noqa: E402
from kvbm.registry import EVICTION  # noqa: E402
from kvbm.sim.replay import sweep  # noqa: E402
from kvbm.sim.synth import workload  # noqa: E402
from kvbm.sim.traces import load_trace  # noqa: E402

FRACTIONS = [0.01, 0.02, 0.05, 0.10, 0.25]
TUNE = ["chat", "agent", "docqa", "fanout"]
HELD_OUT = ["mooncake-1", "mix", "agent@12", "tenants", "rag", "docqa@14", "mooncake-2", "assistant"]
BASELINE, CEILING = "lru", "belady"
REFERENCE = ("lru", "arc", "s3fifo", "prefix")  # auto must be within TOLERANCE of their best
TOLERANCE = 0.002
MIN_ROOM = 0.005


def load(name: str):
    """The trace of a grid row: a synth WORKLOADS name (optionally name@seed) or mooncake-1/-2."""
    if name in ("mooncake-1", "mooncake-2"):
        whole = load_trace(BUNDLED["mooncake"])
        half = len(whole.requests) // 2
        requests = whole.requests[:half] if name == "mooncake-1" else whole.requests[half:]
        return dataclasses.replace(whole, requests=requests)
    base, _, seed = name.partition("@")
    return workload(base, int(seed) if seed else None)


def capacities(trace, fractions) -> list[int]:
    distinct = len({k for r in trace.requests for k in r.hash_ids})
    return [max(1, round(f * distinct)) for f in fractions]


def every_policy() -> list[str]:
    names = [n for n in EVICTION.names() if n not in (BASELINE, CEILING)]
    return [BASELINE, *names, CEILING]


def evaluate(rows_names, policies, fractions, jobs=1, progress=False, log=None, save=None) -> list[dict]:
    """One record per (workload, fraction, policy): prefix_hit_ratio, capacity, seconds.
    save(records) is called after each workload (a long grid keeps what it has)."""
    out = []
    for name in rows_names:
        t0 = time.perf_counter()
        trace = load(name)
        caps = capacities(trace, fractions)
        for r in sweep(trace, policies, caps, jobs=jobs, progress=progress):
            out.append({"workload": name, "fraction": fractions[caps.index(r["capacity"])], **r})
        if save:
            save(out)
        if log:
            log(f"{name}: {len(trace.requests):,} requests, {trace.block_accesses:,} accesses, "
                f"capacities {caps} ({time.perf_counter() - t0:.0f} s)")
    return out


def cells(records) -> dict:
    """{(workload, fraction): {policy: prefix hit ratio}}."""
    grid: dict = {}
    for r in records:
        grid.setdefault((r["workload"], r["fraction"]), {})[r["policy"]] = r["prefix_hit_ratio"]
    return grid


def gap_closed(cell: dict, policy: str) -> float | None:
    if BASELINE not in cell or CEILING not in cell:
        return None
    room = cell[CEILING] - cell[BASELINE]
    return (cell[policy] - cell[BASELINE]) / room if room >= MIN_ROOM else None


def shortfall(cell: dict, policy: str) -> float | None:
    """How far the policy is below the best of the reference policies (negative: above)."""
    ref = [cell[p] for p in REFERENCE if p in cell]
    return max(ref) - cell[policy] if ref else None


def summary(records, policies) -> dict:
    """Per policy: worst gap-closed cell, worst shortfall vs the reference best, cells below LRU."""
    grid = cells(records)
    out = {}
    for p in policies:
        if p == CEILING:
            continue
        shares = [(gap_closed(c, p), k) for k, c in grid.items() if gap_closed(c, p) is not None]
        falls = [(shortfall(c, p), k) for k, c in grid.items() if p in c]
        below = [k for k, c in grid.items() if p in c and c[p] < c.get(BASELINE, 0) - 1e-12]
        worst_share = min(shares) if shares else (None, None)
        worst_fall = max(falls) if falls else (None, None)
        out[p] = {"worst_gap_closed": worst_share[0], "worst_gap_cell": worst_share[1],
                  "median_gap_closed": sorted(s for s, _ in shares)[len(shares) // 2] if shares else None,
                  "worst_shortfall": worst_fall[0], "worst_shortfall_cell": worst_fall[1],
                  "cells_below_lru": len(below), "cells": len(grid)}
    return out


def markdown(records, policies) -> str:
    grid = cells(records)
    lines = ["| workload | capacity | " + " | ".join(policies) + " |",
             "| --- | --- | " + " | ".join("---" for _ in policies) + " |"]
    for (w, f), c in grid.items():
        row = []
        for p in policies:
            share = gap_closed(c, p) if p not in (BASELINE, CEILING) else None
            row.append(f"{c[p]:.4f}" + (f" ({share:+.0%})" if share is not None else ""))
        lines.append(f"| {w} | {f:.0%} | " + " | ".join(row) + " |")
    lines += ["", "| policy | worst gap closed (cell) | median gap closed | worst shortfall vs best of "
              + "/".join(REFERENCE) + " (cell) | cells below LRU |", "| --- | --- | --- | --- | --- |"]
    for p, s in summary(records, policies).items():
        cell = lambda k: f"{k[0]} {k[1]:.0%}" if k else "-"  # noqa: E731
        wg = f"{s['worst_gap_closed']:+.0%} ({cell(s['worst_gap_cell'])})" if s["worst_gap_closed"] is not None else "-"
        mg = f"{s['median_gap_closed']:+.0%}" if s["median_gap_closed"] is not None else "-"
        wf = f"{s['worst_shortfall']:+.4f}" if s["worst_shortfall"] is not None else "-"
        lines.append(f"| {p} | {wg} | {mg} | {wf} ({cell(s['worst_shortfall_cell'])}) "
                     f"| {s['cells_below_lru']} of {s['cells']} |")
    return "\n".join(lines)


def merge(paths, out=None) -> int:
    """One grid from runs of different policies over the same rows; markdown per split."""
    records: dict = {}
    policies: list = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            print(f"eval_policies: cannot read {path}: {e}; give record files written by --json", file=sys.stderr)
            return 2
        policies += [p for p in data["policies"] if p not in policies]
        for r in data["records"]:
            records[(r["workload"], r["fraction"], r["policy"])] = r
    order = [BASELINE, *[p for p in policies if p not in (BASELINE, CEILING)], CEILING]
    policies = [p for p in order if p in policies]
    rows = list(dict.fromkeys(w for w, _, _ in records))
    merged = sorted(records.values(), key=lambda r: (rows.index(r["workload"]), r["fraction"],
                                                     policies.index(r["policy"])))
    if out:
        Path(out).write_text(json.dumps({"policies": policies, "records": merged}, indent=1))
    for split, names in (("tune", TUNE), ("held-out", HELD_OUT), ("other", None)):
        part = [r for r in merged if (r["workload"] in names if names else
                                      r["workload"] not in TUNE + HELD_OUT)]
        if part:
            print(f"\n**{split} rows**\n\n" + markdown(part, policies))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=["tune", "held-out", "all"], default="held-out")
    ap.add_argument("--workloads", help="comma-separated rows instead of a split (name, name@seed, mooncake-1/-2)")
    ap.add_argument("--policies", help="comma-separated (default: every registered policy)")
    ap.add_argument("--fractions", default=",".join(map(str, FRACTIONS)))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--json", help="write the records here (bench/plots and notebook 01 read them)")
    ap.add_argument("--merge", help="comma-separated record files of earlier runs: merge, print, write --json")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge.split(","), args.json)
    policies = args.policies.split(",") if args.policies else every_policy()
    for p in policies:
        EVICTION.get(p)
    if args.workloads:
        names = args.workloads.split(",")
    else:
        names = {"tune": TUNE, "held-out": HELD_OUT, "all": TUNE + HELD_OUT}[args.split]
    fractions = [float(x) for x in args.fractions.split(",")]
    t0 = time.perf_counter()
    def save(records):
        if args.json:
            Path(args.json).write_text(json.dumps({"policies": policies, "records": records}, indent=1))

    records = evaluate(names, policies, fractions, jobs=args.jobs, save=save,
                       log=lambda m: print(m, file=sys.stderr, flush=True))
    print(markdown(records, policies))
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
