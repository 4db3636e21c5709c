"""Replay speed: the full BlockManager (metadata only) vs a plain OrderedDict LRU loop.

Both replay the bundled Mooncake trace with one LRU tier of 10,000 blocks, under the
reference semantics of ../shared/traces/README.md, in the same process and run; each is
timed best-of-N. Both must give the same hit ratios (checked), so the ratio compares equal work.

    python bench/bench_replay.py [--repeat 5] [--capacity 10000] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
from collections import OrderedDict

from kvbm.cli import BUNDLED
from kvbm.sim.replay import simulate, single_tier
from kvbm.sim.traces import load_trace
from common import best_of  # bench/common.py


def plain_lru(requests, capacity):
    od = OrderedDict()
    block = prefix = 0
    for keys in requests:
        in_prefix = True
        for k in keys:
            if k in od:
                block += 1
                prefix += in_prefix
            else:
                in_prefix = False
        for k in keys:
            if k in od:
                od.move_to_end(k)
            else:
                od[k] = None
                if len(od) > capacity:
                    od.popitem(last=False)
    return block, prefix


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--capacity", type=int, default=10_000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    trace = load_trace(BUNDLED["mooncake"])
    requests = [r.hash_ids for r in trace.requests]
    n = trace.block_accesses
    t_plain, (block, prefix) = best_of(lambda: plain_lru(requests, args.capacity), args.repeat)
    res = None

    def replay():
        return simulate(trace, single_tier(args.capacity, "lru"), progress=False)

    t_mgr, res = best_of(replay, args.repeat)
    assert (res.block_hits, res.prefix_hits) == (block, prefix), "manager and plain loop disagree"
    out = {
        "block_accesses": n,
        "capacity": args.capacity,
        "plain_lru_accesses_per_s": n / t_plain,
        "manager_accesses_per_s": n / t_mgr,
        "manager_over_plain_time": t_mgr / t_plain,
        "prefix_hit_ratio": res.prefix_hit_ratio,
        "machine": f"{platform.machine()} {platform.processor() or ''} python {platform.python_version()}".strip(),
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"trace: {len(requests):,} requests, {n:,} block accesses; LRU {args.capacity:,} blocks; best of {args.repeat}")
    print(f"plain OrderedDict LRU loop : {n / t_plain:>12,.0f} accesses/s  ({t_plain:.3f} s)")
    print(f"BlockManager replay        : {n / t_mgr:>12,.0f} accesses/s  ({t_mgr:.3f} s)")
    print(f"manager time / plain time  : {t_mgr / t_plain:.2f}x   (prefix hit ratio {res.prefix_hit_ratio:.4f} in both)")


if __name__ == "__main__":
    main()
