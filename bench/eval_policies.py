"""Every built-in eviction policy and Belady on every trace we have: prefix hit ratio vs capacity.

    python bench/eval_policies.py [--traces mooncake,mooncake-1,mooncake-2,chat,agent,mix] [--policies NAMES] [--jobs 2] [--out DIR]

Traces
    mooncake  the bundled Mooncake conversation trace (FAST'25 release, 12,031 requests, 512-token
              blocks); capacities of the reference table in ../shared/traces/README.md.
    mooncake-1, mooncake-2  its first and second half (6,015 and 6,016 requests), each replayed
              from an empty cache at 1k/5k/10k/20k/50k blocks: a policy fitted to the whole
              trace's order of events would not carry over to both halves.
    chat      kvbm.sim.synth.generate(n_sessions=3000, seed=1, mode="chat"): multi-turn chat,
              shared Zipf system prompts, user think time ~60 s (see synth.py for the model).
    agent     kvbm.sim.synth.generate(n_sessions=600, seed=2, mode="agent"): long tool outputs,
              short tool waits, ~12 turns a session.
    mix       kvbm.sim.synth.generate(n_sessions=1500, seed=3, mode="mix"): half of each.
Synthetic capacities are 1, 2, 5, 10 and 25 % of the trace's distinct blocks, so every trace is
cut at the same relative pressure. Seeds and sizes are fixed here, chosen before any result.

For each trace: a table of prefix hit ratios (policy x capacity), the share of the LRU->Belady
gap each policy closes at each capacity (where that gap is at least 0.01), and a PNG (kvbm.sim.plot.plot_sweep) under --out.
Single tier, metadata only, through the real BlockManager (kvbm.sim.replay.sweep).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from kvbm.cli import BUNDLED  # noqa: E402
from kvbm.registry import EVICTION  # noqa: E402
from kvbm.sim.replay import sweep  # noqa: E402
from kvbm.sim.synth import generate  # noqa: E402
from kvbm.sim.traces import load_trace  # noqa: E402

MOONCAKE_CAPACITIES = [1_000, 10_000, 30_000, 50_000, 100_000]
HALF_CAPACITIES = [1_000, 5_000, 10_000, 20_000, 50_000]
SYNTH_FRACTIONS = [0.01, 0.02, 0.05, 0.10, 0.25]
SYNTH = {
    "chat": dict(n_sessions=3000, seed=1, mode="chat"),
    "agent": dict(n_sessions=600, seed=2, mode="agent"),
    "mix": dict(n_sessions=1500, seed=3, mode="mix"),
}
BASELINE, CEILING = "lru", "belady"


def load(name: str):
    """(trace, capacities) for a trace name."""
    if name == "mooncake":
        return load_trace(BUNDLED["mooncake"]), MOONCAKE_CAPACITIES
    if name in ("mooncake-1", "mooncake-2"):
        whole = load_trace(BUNDLED["mooncake"])
        half = len(whole.requests) // 2
        requests = whole.requests[:half] if name == "mooncake-1" else whole.requests[half:]
        return dataclasses.replace(whole, requests=requests), HALF_CAPACITIES
    if name in SYNTH:
        trace = generate(**SYNTH[name])
        distinct = len({k for r in trace.requests for k in r.hash_ids})
        return trace, [max(1, round(f * distinct)) for f in SYNTH_FRACTIONS]
    raise SystemExit(f"unknown trace {name!r}; choose from mooncake, mooncake-1, mooncake-2, {', '.join(SYNTH)}")


def builtin_policies() -> list[str]:
    """Every registered eviction policy, the baseline first and the ceiling last."""
    names = [n for n in EVICTION.names() if n not in (BASELINE, CEILING)]
    return [BASELINE, *names, CEILING]


def print_table(name, trace, rows, policies, caps) -> None:
    by = {(r["policy"], r["capacity"]): r["prefix_hit_ratio"] for r in rows}
    distinct = len({k for r in trace.requests for k in r.hash_ids})
    print(f"\n== {name}: prefix hit ratio ({len(trace.requests):,} requests, "
          f"{trace.block_accesses:,} block accesses, {distinct:,} distinct blocks)")
    print(f"{'policy':<12}" + "".join(f"{c:>10,}" for c in caps))
    for p in policies:
        print(f"{p:<12}" + "".join(f"{by[(p, c)]:>10.4f}" for c in caps))
    if BASELINE in policies and CEILING in policies:
        print(f"share of the {BASELINE}->{CEILING} gap closed")
        for p in policies:
            if p in (BASELINE, CEILING):
                continue
            cells = []
            for c in caps:
                gap = by[(CEILING, c)] - by[(BASELINE, c)]
                # below one point of headroom the share is noise: leave it out
                cells.append(f"{(by[(p, c)] - by[(BASELINE, c)]) / gap:>10.1%}" if gap >= 0.01 else f"{'-':>10}")
            print(f"{p:<12}" + "".join(cells))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", default="mooncake,mooncake-1,mooncake-2,chat,agent,mix")
    ap.add_argument("--policies", help="comma-separated (default: every registered policy)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "kvbm-eval"),
                    help="folder for the PNGs (default: %(default)s)")
    args = ap.parse_args(argv)
    policies = args.policies.split(",") if args.policies else builtin_policies()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from kvbm.sim.plot import plot_sweep

    for name in args.traces.split(","):
        t0 = time.perf_counter()
        trace, caps = load(name)
        rows = sweep(trace, policies, caps, jobs=args.jobs, progress=False)
        print_table(name, trace, rows, policies, caps)
        png = plot_sweep(rows, out / f"eval_{name}.png", title=f"{name}: prefix hit ratio vs capacity")
        print(f"({time.perf_counter() - t0:.0f} s; plot: {png})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
