"""Per-policy operation rates (ops/s) on a fixed synthetic stream, with pytest-benchmark.

    python -m pytest bench/bench_policies.py -q --benchmark-columns=mean,stddev,rounds

    insert   N inserts into an empty policy (no evictions), one key per call
    touch    N touches of resident keys, in batches of 16 (a request's blocks)
    evict    evict(1) calls from a full policy until it gives None, 8 keys protected
             throughout (prefix stops earlier: a protected block pins its whole prefix)
    replay   a chat-like request stream, capacity = 5% of its distinct blocks: look up,
             touch hits, insert misses, evict one per insert at capacity (the simulator's
             loop); ops = block accesses; its block hit ratio is printed beside the rates

The ops/s table is printed at the end of the module; benchmark JSON carries it as extra_info.
"""

from __future__ import annotations

import itertools
import random
import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import pytest  # noqa: E402

from kvbm.policies.base import Hints  # noqa: E402
from kvbm.registry import EVICTION  # noqa: E402

N = 20_000


def _stream(seed: int = 0, requests: int = 8_000, p_continue: float = 0.35) -> list[list[int]]:
    """Chat-like requests: a new conversation starts from one of 30 shared system prompts, or a
    recent one continues (its whole history is the prefix); 2-12 new blocks each turn, at most 64.
    ~110k block accesses, ~56k distinct blocks (an infinite cache hits ~49%)."""
    rng = random.Random(seed)
    fresh = itertools.count()
    prompts = [[next(fresh) for _ in range(rng.randint(1, 6))] for _ in range(30)]
    conversations: list = []
    out = []
    for _ in range(requests):
        if conversations and rng.random() < p_continue:
            conv = rng.choice(conversations[-300:])
        else:
            conv = list(rng.choice(prompts))
            conversations.append(conv)
        conv.extend(next(fresh) for _ in range(rng.randint(2, 12)))
        out.append(conv[:64])
    return out


STREAM = _stream()
KEYS = list(range(N))
TOUCH_ORDER = random.Random(1).choices(KEYS, k=N)
PROTECTED = frozenset(random.Random(2).sample(KEYS, 8))
HINTS = [Hints(parent=k - 1 if k % 32 else None, position=k % 32, priority=(10, 35, 35, 80)[k % 4]) for k in KEYS]
RATES: dict = {}


def make(name: str, capacity: int, cursor: list | None = None):
    cls = EVICTION.get(name)
    if cls.simulation_only:
        cursor = cursor if cursor is not None else [0]
        return cls(capacity, future=STREAM, now=lambda: cursor[0])
    return cls(capacity)


def filled(name: str):
    policy = make(name, N)
    for key, hints in zip(KEYS, HINTS):
        policy.insert(key, hints)
    return policy


def do_insert(policy):
    for key, hints in zip(KEYS, HINTS):
        policy.insert(key, hints)


def do_touch(policy):
    for i in range(0, N, 16):
        policy.touch(TOUCH_ORDER[i : i + 16])


def do_evict(policy):
    done = 0
    while policy.evict(1, PROTECTED) is not None:
        done += 1
    return done


def do_replay(policy, cursor):
    capacity, hits = policy.capacity, 0
    for cursor[0], keys in enumerate(STREAM):
        hits += sum(key in policy for key in keys)
        parent = None
        for position, key in enumerate(keys):
            if key in policy:
                policy.touch((key,))
            else:
                if len(policy) >= capacity:
                    policy.evict(1)
                policy.insert(key, Hints(parent=parent, position=position))
            parent = key
    return hits


REPLAY_OPS = sum(map(len, STREAM))
REPLAY_CAPACITY = len({k for keys in STREAM for k in keys}) // 20


def _record(benchmark, name, what, ops):
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing timed
        return
    rate = ops / benchmark.stats.stats.mean
    benchmark.extra_info["ops_per_s"] = rate
    RATES.setdefault(name, {})[what] = rate


@pytest.fixture(scope="module", autouse=True)
def _print_rates(request):
    yield
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if not RATES or reporter is None or capture is None:
        return
    columns = ["insert", "touch", "evict", "replay"]
    lines = [
        "",
        f"ops/s (N={N}; replay: {REPLAY_OPS} block accesses, capacity {REPLAY_CAPACITY})",
        f"{'policy':<10}" + "".join(f"{c:>12}" for c in columns) + f"{'hit ratio':>12}",
    ]
    for name in sorted(RATES):
        row = RATES[name]
        rates = "".join(f"{row.get(c, float('nan')):>12,.0f}" for c in columns)
        lines.append(f"{name:<10}{rates}{row.get('hit ratio', float('nan')):>12.3f}")
    with capture.global_and_fixture_disabled():
        for line in lines:
            reporter.write_line(line)


@pytest.mark.parametrize("name", EVICTION.names())
def test_insert(benchmark, name):
    benchmark.pedantic(do_insert, setup=lambda: ((make(name, N),), {}), rounds=5)
    _record(benchmark, name, "insert", N)


@pytest.mark.parametrize("name", EVICTION.names())
def test_touch(benchmark, name):
    benchmark.pedantic(do_touch, setup=lambda: ((filled(name),), {}), rounds=5)
    _record(benchmark, name, "touch", N)


@pytest.mark.parametrize("name", EVICTION.names())
def test_evict(benchmark, name):
    def setup():
        policy = filled(name)
        do_touch(policy)
        return (policy,), {}

    done = benchmark.pedantic(do_evict, setup=setup, rounds=5)
    _record(benchmark, name, "evict", done)


@pytest.mark.parametrize("name", EVICTION.names())
def test_replay(benchmark, name):
    def setup():
        cursor = [0]
        return (make(name, REPLAY_CAPACITY, cursor), cursor), {}

    hits = benchmark.pedantic(do_replay, setup=setup, rounds=3)
    _record(benchmark, name, "replay", REPLAY_OPS)
    RATES[name]["hit ratio"] = hits / REPLAY_OPS
