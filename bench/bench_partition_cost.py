"""Cost of the per-tenant partition (policies/partition.py) against the plain policy it wraps.

    python bench/bench_partition_cost.py [--capacity 10000] [--repeat 3] [--tenants 1,4] [--policies lru,auto]

The bundled Mooncake trace at the policy level, as bench_policy_cost.py drives it (per request:
touch the hit prefix, touch later hits, evict the room, insert_many the new keys), with request
i given to tenant i % tenants and its keys put in that tenant's namespace (key * tenants + tenant:
tenants share no block, as in the daemon; a tenant's requests share their prefixes). Every
insert carries Hints(owner=tenant) (and parent/position for structured policies); the plain
policy ignores the owner. Each policy's own calls are
recorded once and replayed on fresh instances, CPU (process) time, the bare loop subtracted;
best of --repeat, ns per block access. Also single-key micro ops (wall): insert, touch, evict(1).
The prefix hit ratio is printed as a check (the partition's victims differ by design).

    --manager   the same requests through a BlockManager as the daemon drives it (lookup,
                prepare_load/complete_load of the hit prefix with promotion, prepare_store /
                complete_store of the rest), G2 --capacity and G3 2x that, metadata only (null
                storage): plain lru tiers without hints, lru tiers given Hints(owner) (what the
                hints alone cost the manager), and partition(lru) tiers with them (what a daemon
                with tenants runs). CPU ns per block access, best of --repeat.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_policy_cost import EVICT, INSERT, TOUCH, replay_cpu  # noqa: E402
from kvbm.cli import BUNDLED  # noqa: E402
from kvbm.policies.base import Hints  # noqa: E402
from kvbm.policies.partition import PartitionPolicy  # noqa: E402
from kvbm.registry import EVICTION  # noqa: E402
from kvbm.sim.traces import load_trace  # noqa: E402


def factory(inner: str, tenants: int | None):
    """A plain policy (tenants None) or the partition of it among `tenants` equal owners."""
    if tenants is None:
        return EVICTION.get(inner)
    weights = {f"t{i}": 1 for i in range(tenants)}
    return lambda capacity: PartitionPolicy(capacity, policy=inner, weights=weights, other_weight=0)


def record(make, requests, capacity: int, tenants: int) -> tuple[list, int, float]:
    policy = make(capacity)
    structured = policy.wants_structure
    owners = [Hints(owner=f"t{i}") for i in range(tenants)]
    calls, hits, accesses = [], 0, 0
    for i, keys in enumerate(requests):
        accesses += len(keys)
        t = i % tenants
        owner = owners[t]
        keys = [k * tenants + t for k in keys]
        n = 0
        while n < len(keys) and keys[n] in policy:
            n += 1
        hits += n
        if n:
            calls.append((TOUCH, list(keys[:n]), None))
            policy.touch(calls[-1][1])
        later = [k for k in keys[n:] if k in policy]
        if later:
            calls.append((TOUCH, later, None))
            policy.touch(later)
        new = [k for k in dict.fromkeys(keys[n:]) if k not in policy]
        if not new:
            continue
        room = len(policy) + len(new) - capacity
        if room > 0:
            calls.append((EVICT, room, ()))
            policy.evict(room, ())
        if structured:
            pos = {k: i for i, k in enumerate(keys)}
            hints = [Hints(parent=keys[pos[k] - 1] if pos[k] else None, position=pos[k], owner=owner.owner)
                     for k in new]
        else:
            hints = owner
        calls.append((INSERT, new, hints))
        policy.insert_many(new, hints)
    return calls, accesses, hits / accesses


def micro(make, n: int, tenants: int) -> dict:
    import random

    rng = random.Random(0)
    keys = list(range(n))
    order = keys[:]
    rng.shuffle(order)
    owners = [Hints(owner=f"t{i}") for i in range(max(1, tenants))]
    policy = make(n)
    clock = time.perf_counter_ns
    t0 = clock()
    for k in keys:
        policy.insert(k, owners[k % len(owners)])
    t_insert = clock() - t0
    t0 = clock()
    for k in order:
        policy.touch((k,))
    t_touch = clock() - t0
    t0 = clock()
    while policy.evict(1, ()):
        pass
    return {"insert": t_insert / n, "touch": t_touch / n, "evict": (clock() - t0) / n}


def manager_cpu(requests, capacity: int, tenants: int, eviction: str, owners: bool) -> tuple[float, float]:
    """(CPU ns per block access, prefix hit ratio) of the daemon's manager calls, metadata only."""
    import gc

    from kvbm.config import KVBMConfig
    from kvbm.manager import BlockManager

    ev = eviction if tenants is None else {"name": "partition", "policy": eviction,
                                           "weights": {f"t{i}": 1 for i in range(tenants)}, "other_weight": 0}
    m = BlockManager.from_config(KVBMConfig.from_dict({"tiers": [
        {"name": "g2", "capacity": capacity, "eviction": ev},
        {"name": "g3", "capacity": 2 * capacity, "eviction": ev}]}))
    n_t = tenants or 4
    hints = [Hints(owner=f"t{i}") if owners else None for i in range(n_t)]
    reqs = [([k * n_t + i % n_t for k in keys], hints[i % n_t]) for i, keys in enumerate(requests)]
    gc.collect()
    hits = accesses = 0
    clock = time.process_time_ns
    t0 = clock()
    for keys, h in reqs:
        n, _ = m.lookup(keys)
        if n:
            m.complete_load(m.prepare_load(keys[:n]))
        rest = list(dict.fromkeys(keys[n:]))
        if rest:
            m.complete_store(m.prepare_store(rest, h, keys[n - 1] if n else None, position=n))
        hits += n
        accesses += len(keys)
    return (clock() - t0) / accesses, hits / accesses


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--capacity", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--micro-n", type=int, default=50_000)
    ap.add_argument("--tenants", default="1,4")
    ap.add_argument("--policies", default="lru,auto")
    ap.add_argument("--manager", action="store_true", help="the daemon's manager calls instead (see above)")
    args = ap.parse_args(argv)
    try:
        tenant_counts = [int(t) for t in args.tenants.split(",")]
        for name in args.policies.split(","):
            EVICTION.get(name)
    except Exception as e:  # one line, exit 2
        print(f"bench_partition_cost: {e}", file=sys.stderr)
        return 2
    requests = [r.hash_ids for r in load_trace(BUNDLED["mooncake"]).requests]
    if args.manager:
        print(f"Python {sys.version.split()[0]}; Mooncake trace through a BlockManager (G2 {args.capacity:,}, "
              f"G3 {2 * args.capacity:,}, null storage); best of {args.repeat}; CPU ns per block access")
        for tenants in tenant_counts:
            for label, part, owners in (("lru, no hints", None, False), ("lru, Hints(owner)", None, True),
                                        ("partition(lru)", tenants, True)):
                runs = [manager_cpu(requests, args.capacity, part, "lru", owners) for _ in range(args.repeat)]
                print(f"{label:<22}{tenants:>3} tenants {min(r[0] for r in runs):>8.0f} ns   hit ratio "
                      f"{runs[0][1]:.4f}", flush=True)
        return 0
    print(f"Python {sys.version.split()[0]}; Mooncake trace at the policy level, capacity {args.capacity:,}; "
          f"best of {args.repeat}")
    print(f"{'policy':<22}{'tenants':>8}{'ns/access CPU':>15}{'x plain':>9}{'hit ratio':>11}"
          f"{'insert':>9}{'touch':>9}{'evict':>9}  (micro, ns wall)")
    for inner in args.policies.split(","):
        for tenants in tenant_counts:
            rows = []
            for label, make in ((inner, factory(inner, None)), (f"partition({inner})", factory(inner, tenants))):
                calls, accesses, ratio = record(make, requests, args.capacity, tenants)
                cpu = min(replay_cpu(make, calls, args.capacity) for _ in range(args.repeat)) / accesses
                m = None
                for _ in range(args.repeat):
                    r = micro(make, args.micro_n, tenants)
                    m = r if m is None else {k: min(m[k], r[k]) for k in r}
                rows.append((label, cpu, ratio, m))
                del calls
            base = rows[0][1]
            for label, cpu, ratio, m in rows:
                print(f"{label:<22}{tenants:>8}{cpu:>15.0f}{cpu / base:>9.2f}{ratio:>11.4f}"
                      f"{m['insert']:>9.0f}{m['touch']:>9.0f}{m['evict']:>9.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
