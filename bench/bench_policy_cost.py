"""Cost per operation of eviction policies beside LRU, on the same streams.

    python bench/bench_policy_cost.py [--capacity 10000] [--repeat 3] [--policies lru,hitdensity,auto]

Two streams, each run on a fresh policy per repeat; best of --repeat is reported, in ns per key:

    trace    the bundled Mooncake trace at the policy level, as the simulator drives it: per
             request touch(hit prefix), touch(later block hits), evict(room) and
             insert_many(new keys). Each call is timed (timer overhead subtracted) and charged
             per key: insert = insert_many time / keys, touch = touch time / keys, evict =
             evict time / victims. Table updates land on the inserts that trigger them.
             Policies that want structure (prefix, auto) get each block's parent in Hints, as
             the manager gives them. "per access" is all the policy's time over the trace's
             block accesses: the cost a replay or an engine pays per block looked up.
    micro    N single-key calls on a synthetic key range: insert into an empty policy, touch of
             resident keys in random order, evict(1) from a full policy until empty.

    memory   --memory: bytes traced (tracemalloc) per resident key after the trace stream, at
             --capacity: the policy's whole state, ghosts and samples included.

The hit ratio each policy reaches on the trace stream is printed as a check that the streams
did the same work (they differ only where the policies choose different victims).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from kvbm.cli import BUNDLED  # noqa: E402
from kvbm.policies.base import Hints  # noqa: E402
from kvbm.registry import EVICTION  # noqa: E402
from kvbm.sim.traces import load_trace  # noqa: E402

OPS = ("insert", "touch", "evict")


def _timer_overhead() -> float:
    """Median ns between two back-to-back clock reads: what each timed interval carries extra."""
    clock = time.perf_counter_ns
    gaps = []
    for _ in range(100_000):
        a = clock()
        gaps.append(clock() - a)
    gaps.sort()
    return float(gaps[len(gaps) // 2])


def trace_stream(name: str, requests, capacity: int, overhead: float) -> tuple[dict, float]:
    """Replay the trace through the policy alone; return (ns per key by op, prefix hit ratio)."""
    policy = EVICTION.get(name)(capacity)
    structured = policy.wants_structure
    clock = time.perf_counter_ns
    spent = dict.fromkeys(OPS, 0.0)
    count = dict.fromkeys(OPS, 0)
    hits = accesses = 0
    for keys in requests:
        accesses += len(keys)
        n = 0
        while n < len(keys) and keys[n] in policy:
            n += 1
        hits += n
        if n:
            prefix = list(keys[:n])
            t0 = clock()
            policy.touch(prefix)
            spent["touch"] += clock() - t0 - overhead
            count["touch"] += n
        rest = keys[n:]
        later = [k for k in rest if k in policy]
        if later:
            t0 = clock()
            policy.touch(later)
            spent["touch"] += clock() - t0 - overhead
            count["touch"] += len(later)
        new = [k for k in dict.fromkeys(rest) if k not in policy]
        if not new:
            continue
        room = len(policy) + len(new) - capacity
        if room > 0:
            t0 = clock()
            victims = policy.evict(room, ())
            spent["evict"] += clock() - t0 - overhead
            count["evict"] += len(victims)
        hints = None
        if structured:  # built outside the timed call: the manager builds them too
            pos = {k: i for i, k in enumerate(keys)}
            hints = [Hints(parent=keys[pos[k] - 1] if pos[k] else None, position=pos[k]) for k in new]
        t0 = clock()
        policy.insert_many(new, hints)
        spent["insert"] += clock() - t0 - overhead
        count["insert"] += len(new)
    out = {op: spent[op] / max(1, count[op]) for op in OPS}
    out["per access"] = sum(spent.values()) / accesses
    return out, hits / accesses


def memory(name: str, requests, capacity: int) -> float:
    """Bytes held per resident key after the trace stream (the stream's own lists freed)."""
    import gc
    import tracemalloc

    gc.collect()
    tracemalloc.start()
    try:
        policy = EVICTION.get(name)(capacity)
        for keys in requests:
            n = 0
            while n < len(keys) and keys[n] in policy:
                n += 1
            if n:
                policy.touch(list(keys[:n]))
            later = [k for k in keys[n:] if k in policy]
            if later:
                policy.touch(later)
            new = [k for k in dict.fromkeys(keys[n:]) if k not in policy]
            if not new:
                continue
            room = len(policy) + len(new) - capacity
            if room > 0:
                policy.evict(room, ())
            hints = None
            if policy.wants_structure:
                pos = {k: i for i, k in enumerate(keys)}
                hints = [Hints(parent=keys[pos[k] - 1] if pos[k] else None, position=pos[k]) for k in new]
            policy.insert_many(new, hints)
        gc.collect()
        return tracemalloc.get_traced_memory()[0] / max(1, len(policy))
    finally:
        tracemalloc.stop()


def micro(name: str, n: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    keys = list(range(n))
    order = keys[:]
    rng.shuffle(order)
    policy = EVICTION.get(name)(n)
    clock = time.perf_counter_ns
    t0 = clock()
    for k in keys:
        policy.insert(k)
    t_insert = clock() - t0
    t0 = clock()
    for k in order:
        policy.touch((k,))
    t_touch = clock() - t0
    t0 = clock()
    while policy.evict(1, ()):
        pass
    t_evict = clock() - t0
    return {"insert": t_insert / n, "touch": t_touch / n, "evict": t_evict / n}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--capacity", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--micro-n", type=int, default=50_000)
    ap.add_argument("--policies", default="lru,hitdensity,auto")
    ap.add_argument("--memory", action="store_true", help="report bytes per resident key only")
    args = ap.parse_args(argv)
    names = args.policies.split(",")
    requests = [r.hash_ids for r in load_trace(BUNDLED["mooncake"]).requests]
    if args.memory:
        for name in args.policies.split(","):
            print(f"{name}: {memory(name, requests, args.capacity):.0f} B per resident key "
                  f"(capacity {args.capacity:,})", flush=True)
        return 0
    overhead = _timer_overhead()

    results: dict = {}
    for name in names:
        best_trace, best_micro, ratio = None, None, 0.0
        for _ in range(args.repeat):
            t, ratio = trace_stream(name, requests, args.capacity, overhead)
            m = micro(name, args.micro_n)
            best_trace = t if best_trace is None else {op: min(best_trace[op], t[op]) for op in t}
            best_micro = m if best_micro is None else {op: min(best_micro[op], m[op]) for op in OPS}
        results[name] = (best_trace, best_micro, ratio)

    base = names[0]
    print(f"Python {sys.version.split()[0]}, best of {args.repeat}; ns per key "
          f"(timer overhead {overhead:.0f} ns per call subtracted on the trace stream)")
    for label, idx in (("trace", 0), ("micro", 1)):
        what = (f"Mooncake trace at the policy level, capacity {args.capacity:,}" if idx == 0
                else f"{args.micro_n:,} single-key calls")
        print(f"\n{label}: {what}")
        print(f"{'op':<8}" + "".join(f"{n:>14}" for n in names) + "".join(f"{n + '/' + base:>20}" for n in names[1:]))
        for op in (OPS + ("per access",) if idx == 0 else OPS):
            cells = [results[n][idx][op] for n in names]
            print(f"{op:<8}" + "".join(f"{c:>14.0f}" for c in cells)
                  + "".join(f"{c / cells[0]:>19.1f}x" for c in cells[1:]))
    print("\nprefix hit ratio on the trace stream: "
          + ", ".join(f"{n} {results[n][2]:.4f}" for n in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
