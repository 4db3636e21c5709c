"""Cost per operation of eviction policies beside LRU, on the same streams.

    python bench/bench_policy_cost.py [--capacity 10000] [--repeat 3] [--policies lru,hitdensity,auto]

Two streams, each run on a fresh policy per repeat; best of --repeat is reported, in ns per key:

    trace    the bundled Mooncake trace at the policy level, as the simulator drives it: per
             request touch(hit prefix), touch(later block hits), evict(room) and
             insert_many(new keys). The calls a policy gets are recorded once, then replayed on
             a fresh instance (deterministic: same calls, same choices). "per access (CPU)", the
             headline: the replay's CPU time (process time, the bare dispatch loop subtracted)
             over the trace's block accesses -- the cost a replay or an engine pays per block
             looked up; CPU time because wall time on a shared machine measures the neighbours.
             The breakdown by op is wall time, each call timed (timer overhead subtracted) and
             charged per key: insert = insert_many time / keys, touch = touch time / keys,
             evict = evict time / victims (noisy under load). Table updates land on the inserts
             that trigger them. Policies that want structure (prefix, auto) get each block's
             parent in Hints, built outside the timed replay, as the manager gives them.
    micro    N single-key calls on a synthetic key range: insert into an empty policy, touch of
             resident keys in random order, evict(1) from a full policy until empty.

    memory   --memory: bytes traced (tracemalloc) per resident key after the trace stream, at
             --capacity: the policy's whole state, ghosts and samples included.
    floor    --floor: hitdensity's recorded calls also replayed into a skeleton of its per-key
             state (a class map, queues, ghosts bounded FIFO; no scores, no learning): the dict
             traffic that any pure-Python version with that state pays, in the same run.

    a/b      --ab: hitdensity and auto as they were before session 8's cost work
             (tests/frozen_policies, kept for the decision-equality test) replayed on the same
             recorded calls, alternating with the current code, --repeat pairs: new/old per pair.
    native   --native-ab: hitdensity, prefix, s3fifo and auto with their compiled cores
             (kvbm._native; auto's minis and mini feed too) and with their Python versions
             (what KVBM_POLICY_NATIVE=0 runs), same recorded calls, alternating, --repeat
             pairs: compiled/Python per pair.

    split    --auto-split: auto's recorded calls also replayed with its miniature simulations
             skipped (`_feed` a no-op: a measurement, not a policy; no switch can happen),
             alternating with auto itself: what the wrapper and the active policy cost alone.

hitdensity's, prefix's and s3fifo's per-key state runs in compiled code (kvbm._native's
HitDensityCore, PrefixCore, S3FifoCore; auto's minis fed by its MiniFeed) where the extension
has it; --memory adds their arrays, which tracemalloc does not see (native_bytes()).

hitdensity's table update runs as a numba kernel when numba is installed; it is built before
any timing here (a policy builds it in the background and runs the Python loop meanwhile).

The hit ratio each policy reaches on the trace stream is printed as a check that the streams
did the same work (they differ only where the policies choose different victims).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import OrderedDict, deque
from functools import partial
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from kvbm.cli import BUNDLED  # noqa: E402
from kvbm.policies.base import Hints  # noqa: E402
from kvbm.registry import EVICTION  # noqa: E402
from kvbm.sim.traces import load_trace  # noqa: E402

_drain = partial(deque, maxlen=0)
TOUCH, EVICT, INSERT = 0, 1, 2
OPS = ("touch", "evict", "insert")  # indexed by TOUCH, EVICT, INSERT


def _timer_overhead() -> float:
    """Median ns between two back-to-back clock reads: what each timed interval carries extra."""
    clock = time.perf_counter_ns
    gaps = []
    for _ in range(100_000):
        a = clock()
        gaps.append(clock() - a)
    gaps.sort()
    return float(gaps[len(gaps) // 2])


def record(name: str, requests, capacity: int) -> tuple[list, int, float]:
    """Drive a fresh policy through the trace as the simulator does; return (the calls it got,
    block accesses, prefix hit ratio). The policy is deterministic, so a fresh instance given
    the same calls makes the same choices: the calls can be replayed and timed alone."""
    policy = EVICTION.get(name)(capacity)
    structured = policy.wants_structure
    calls = []
    hits = accesses = 0
    for keys in requests:
        accesses += len(keys)
        n = 0
        while n < len(keys) and keys[n] in policy:
            n += 1
        hits += n
        if n:
            prefix = list(keys[:n])
            calls.append((TOUCH, prefix, None))
            policy.touch(prefix)
        rest = keys[n:]
        later = [k for k in rest if k in policy]
        if later:
            calls.append((TOUCH, later, None))
            policy.touch(later)
        new = [k for k in dict.fromkeys(rest) if k not in policy]
        if not new:
            continue
        room = len(policy) + len(new) - capacity
        if room > 0:
            calls.append((EVICT, room, ()))
            policy.evict(room, ())
        hints = None
        if structured:  # built outside the timed replay: the manager builds them too
            pos = {k: i for i, k in enumerate(keys)}
            hints = [Hints(parent=keys[pos[k] - 1] if pos[k] else None, position=pos[k]) for k in new]
        calls.append((INSERT, new, hints))
        policy.insert_many(new, hints)
    return calls, accesses, hits / accesses



def replay_cpu(name: str, calls, capacity: int) -> float:
    """CPU ns of the recorded calls on a fresh policy, the dispatch loop's own time subtracted.
    CPU (process) time, not wall time: on a shared machine wall time measures the neighbours."""
    import gc

    policy = (EVICTION.get(name) if isinstance(name, str) else name)(capacity)
    touch, evict, insert = policy.touch, policy.evict, policy.insert_many
    gc.collect()
    clock = time.process_time_ns
    t0 = clock()
    for op, a, b in calls:
        if op is TOUCH:
            touch(a)
        elif op is EVICT:
            evict(a, b)
        else:
            insert(a, b)
    spent = clock() - t0
    t0 = clock()
    for op, a, b in calls:  # the same loop, no calls
        if op is TOUCH:
            pass
        elif op is EVICT:
            pass
        else:
            pass
    return spent - (clock() - t0)


def replay_wall(name: str, calls, capacity: int, overhead: float) -> dict:
    """Wall ns per key by op, each call timed (timer overhead subtracted): the breakdown.
    insert = insert_many time / keys, touch = touch time / keys, evict = evict time / victims."""
    policy = EVICTION.get(name)(capacity)
    clock = time.perf_counter_ns
    spent = dict.fromkeys(OPS, 0.0)
    count = dict.fromkeys(OPS, 0)
    for op, a, b in calls:
        t0 = clock()
        if op is TOUCH:
            policy.touch(a)
        elif op is EVICT:
            policy.evict(a, b)
        else:
            policy.insert_many(a, b)
        spent[OPS[op]] += clock() - t0 - overhead
        count[OPS[op]] += a if op is EVICT else len(a)
    return {op: spent[op] / max(1, count[op]) for op in OPS}


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
        # the compiled cores (alone, auto's real tier and minis): arrays tracemalloc misses
        cores = [getattr(p, "_core", None) for p in [policy, getattr(policy, "_real", None)]
                 + list(getattr(policy, "_minis", ()))]
        # each core once: at rate 1 auto's real tier is one of its minis (the shared mini)
        native = sum(c.native_bytes() for c in {id(c): c for c in cores if c is not None}.values())
        return (tracemalloc.get_traced_memory()[0] + native) / max(1, len(policy))
    finally:
        tracemalloc.stop()


class _Skeleton:
    """hitdensity's per-key state without scores or learning (--floor): a key -> class map,
    queues (new, reused) in access order, ghosts bounded FIFO. Same calls, same dict work."""

    wants_structure = False

    def __init__(self, capacity):
        self.queues, self.klass, self.ghosts = [OrderedDict(), OrderedDict()], {}, OrderedDict()
        self.most, self.now = max(1, capacity), 0

    def insert_many(self, keys, hints=None):
        stamps = dict(zip(keys, range(self.now + 1, self.now + len(keys) + 1)))
        self.now += len(keys)
        if not self.klass.keys().isdisjoint(stamps):  # its victims differ from hitdensity's
            for key in self.klass.keys() & stamps.keys():
                del self.queues[self.klass.pop(key)][key]
        _drain(map(self.ghosts.pop, self.ghosts.keys() & stamps.keys()))
        self.queues[0].update(stamps)
        self.klass.update(dict.fromkeys(stamps, 0))

    def touch(self, keys):
        klass, queues, now = self.klass, self.queues, self.now
        for key in keys:
            c = klass.get(key)
            if c is not None:
                del queues[c][key]
                klass[key] = 1
                queues[1][key] = now

    def evict(self, n, protected=()):
        new, reused = self.queues
        klass, ghosts, most, out = self.klass, self.ghosts, self.most, []
        for _ in range(n):
            if not new and not reused:
                break
            key, last = (new if new else reused).popitem(last=False)
            del klass[key]
            ghosts[key] = (0, last)
            out.append(key)
            if len(ghosts) > most:
                ghosts.popitem(last=False)
        return out


def _auto_without_minis():
    from kvbm.policies.auto import AutoPolicy

    class AutoWithoutMinis(AutoPolicy):
        """auto with `_feed` skipped (--auto-split): the wrapper and the active policy alone."""

        def _feed(self, keys, stored):
            pass

    return AutoWithoutMinis


def _AutoWithoutMinis(capacity):
    return _auto_without_minis()(capacity)


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
    ap.add_argument("--ab", action="store_true",
                    help="hitdensity and auto against their frozen pre-session-8 code, same calls, alternating")
    ap.add_argument("--native-ab", action="store_true",
                    help="hitdensity, prefix, s3fifo and auto with the compiled cores and the Python versions, same calls, alternating")
    ap.add_argument("--auto-split", action="store_true",
                    help="also replay auto's calls with its miniature simulations skipped (measurement only)")
    ap.add_argument("--floor", action="store_true",
                    help="also replay hitdensity's calls into a skeleton of its per-key state (no scoring)")
    args = ap.parse_args(argv)
    names = args.policies.split(",")
    for name in names:
        try:
            EVICTION.get(name)
        except Exception as e:  # one line, exit 2: a bad name is the caller's to fix
            print(f"bench_policy_cost: --policies: {e}", file=sys.stderr)
            return 2
    if args.capacity < 1 or args.repeat < 1 or args.micro_n < 1:
        print("bench_policy_cost: --capacity, --repeat and --micro-n must be >= 1", file=sys.stderr)
        return 2
    from kvbm.policies import _gittins

    # hitdensity's table kernel, built before any timing or tracing (a policy would build it in
    # the background; numba's import would then land in the timed replay or the traced bytes)
    kernel = _gittins.compiled()
    native = EVICTION.get("hitdensity")(1)._core is not None
    requests = [r.hash_ids for r in load_trace(BUNDLED["mooncake"]).requests]
    if args.memory:
        for name in args.policies.split(","):
            print(f"{name}: {memory(name, requests, args.capacity):.0f} B per resident key "
                  f"(capacity {args.capacity:,})", flush=True)
        return 0
    overhead = _timer_overhead()

    results: dict = {}
    floor = None
    for name in names:
        calls, accesses, ratio = record(name, requests, args.capacity)
        cpu, wall, best_micro = None, None, None
        for _ in range(args.repeat):
            c = replay_cpu(name, calls, args.capacity) / accesses
            w = replay_wall(name, calls, args.capacity, overhead)
            m = micro(name, args.micro_n)
            cpu = c if cpu is None else min(cpu, c)
            wall = w if wall is None else {op: min(wall[op], w[op]) for op in OPS}
            best_micro = m if best_micro is None else {op: min(best_micro[op], m[op]) for op in OPS}
        wall["per access (CPU)"] = cpu
        results[name] = (wall, best_micro, ratio)
        if args.ab and name in ("hitdensity", "auto"):
            sys.path.insert(0, str(Path(_ROOT) / "tests"))
            from frozen_policies.auto import AutoPolicy as OldAuto
            from frozen_policies.hitdensity import HitDensityPolicy as OldHitDensity

            old = OldHitDensity if name == "hitdensity" else OldAuto
            pairs = [(replay_cpu(old, calls, args.capacity), replay_cpu(name, calls, args.capacity))
                     for _ in range(args.repeat)]
            print(f"a/b {name}: new/old per pair " + ", ".join(f"{n / o:.2f}" for o, n in pairs)
                  + f" (old best {min(o for o, _ in pairs) / accesses:.0f}, new best "
                  f"{min(n for _, n in pairs) / accesses:.0f} ns per access, CPU)", flush=True)
        if args.native_ab and name in ("hitdensity", "auto", "prefix", "s3fifo"):
            from kvbm.policies import _hitdensity_native, _policy_native

            pairs = []
            for _ in range(args.repeat):
                # every hitdensity, prefix and s3fifo made meanwhile (auto's minis too): the Python version
                _hitdensity_native.USE = _policy_native.USE = False
                try:
                    python = replay_cpu(name, calls, args.capacity)
                finally:
                    _hitdensity_native.USE = _policy_native.USE = None
                pairs.append((python, replay_cpu(name, calls, args.capacity)))
            print(f"native a/b {name}: compiled/Python per pair " + ", ".join(f"{n / o:.2f}" for o, n in pairs)
                  + f" (Python best {min(o for o, _ in pairs) / accesses:.0f}, compiled best "
                  f"{min(n for _, n in pairs) / accesses:.0f} ns per access, CPU)", flush=True)
        if args.auto_split and name == "auto":
            pairs = [(replay_cpu(name, calls, args.capacity), replay_cpu(_AutoWithoutMinis, calls, args.capacity))
                     for _ in range(args.repeat)]
            print("auto split: without its minis / auto per pair " + ", ".join(f"{w / a:.2f}" for a, w in pairs)
                  + f" (auto best {min(a for a, _ in pairs) / accesses:.0f}, without minis best "
                  f"{min(w for _, w in pairs) / accesses:.0f} ns per access, CPU)", flush=True)
        if args.floor and name == "hitdensity":
            floor = min(replay_cpu(_Skeleton, calls, args.capacity) for _ in range(args.repeat)) / accesses
        del calls

    base = names[0]
    print(f"Python {sys.version.split()[0]}, best of {args.repeat}; ns per key (timer overhead "
          f"{overhead:.0f} ns per call subtracted on the trace stream's wall-clock breakdown); "
          f"hitdensity: {'compiled core' if native else 'Python version, table update by ' + ('numba kernel' if kernel else 'Python loop')}")
    for label, idx in (("trace", 0), ("micro", 1)):
        what = (f"Mooncake trace at the policy level, capacity {args.capacity:,}" if idx == 0
                else f"{args.micro_n:,} single-key calls (wall)")
        print(f"\n{label}: {what}")
        print(f"{'op':<18}" + "".join(f"{n:>12}" for n in names) + "".join(f"{n + '/' + base:>18}" for n in names[1:]))
        for op in (OPS + ("per access (CPU)",) if idx == 0 else OPS):
            cells = [results[n][idx][op] for n in names]
            print(f"{op + (' (wall)' if idx == 0 and op in OPS else ''):<18}" + "".join(f"{c:>12.0f}" for c in cells)
                  + "".join(f"{c / cells[0]:>17.1f}x" for c in cells[1:]))
    if floor is not None:
        lru = results[base][0]["per access (CPU)"]
        print(f"\nfloor: hitdensity's calls into a skeleton of its per-key state (no scoring, no "
              f"learning): {floor:.0f} ns per access (CPU), {floor / lru:.1f}x {base}")
    print("\nprefix hit ratio on the trace stream: "
          + ", ".join(f"{n} {results[n][2]:.4f}" for n in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
