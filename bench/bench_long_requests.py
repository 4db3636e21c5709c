"""Replay time of every eviction policy on agent sessions with very long requests (10,000+ blocks).

    python bench/bench_long_requests.py [--sessions 10] [--capacity 15900] [--policies NAMES]

The trace is kvbm.sim.synth's `long-agent` workload (tool loops appending ~80k tokens a turn,
512-token blocks, contexts up to 8M tokens) cut to --sessions sessions; each policy replays it
through the real BlockManager (kvbm.sim.replay.simulate), one tier of --capacity blocks. A long
store arrives as many runs when a policy has left holes in its prefix, and the blocks stored so
far stay protected until it completes: a policy that walks past protected keys on every evict
goes quadratic there (s3fifo and frequency did: 10-65x LRU). Prints CPU seconds of the replay
(process time: on a shared machine wall time measures the neighbours) and the ratio to LRU
(the issue's bound: within 5x).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from kvbm.registry import EVICTION  # noqa: E402
from kvbm.sim.replay import simulate, single_tier  # noqa: E402
from kvbm.sim.synth import WORKLOADS, generate  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=6)
    ap.add_argument("--capacity", type=int, default=15_900)
    ap.add_argument("--policies", default=",".join(n for n in EVICTION.names() if n != "belady"))
    args = ap.parse_args(argv)
    names = args.policies.split(",")
    if "lru" in names:  # the baseline first
        names.remove("lru")
    names.insert(0, "lru")
    trace = generate(**{**WORKLOADS["long-agent"], "n_sessions": args.sessions})
    longest = max(len(r.hash_ids) for r in trace.requests)
    print(f"long-agent, {args.sessions} sessions: {len(trace.requests):,} requests, "
          f"{trace.block_accesses:,} block accesses, longest request {longest:,} blocks; "
          f"one tier of {args.capacity:,} blocks")
    base = None
    print(f"{'policy':<12}{'CPU s':>10}{'x LRU':>8}{'prefix hit ratio':>18}")
    for name in names:
        t0 = time.process_time()
        res = simulate(trace, single_tier(args.capacity, name), progress=False)
        s = time.process_time() - t0
        base = base or s
        print(f"{name:<12}{s:>10.1f}{s / base:>8.1f}{res.prefix_hit_ratio:>18.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
