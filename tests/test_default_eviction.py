"""The eviction policy of a tier whose config names none (issue 15): `auto` on every tier. On the
first tier, where every store lands, it follows its miniature simulations; below it (KVBMConfig
gives it `below`), where the cascade feeds one demoted block at a time and a hit removes the
block, it runs lru (policies/auto_lower.py says why; bench/eval_lower_tier.py measures it).
With those defaults the manager's contract holds wherever it uses a policy: pins and in-flight
blocks protected, a failed evict changing nothing, remove, the cascade G2 -> G3 -> G4, blocks G3
and G4 recover after a restart, tiers of one block, and hints without a parent (TensorRT-LLM's
per-block priorities)."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kvbm import BlockManager, KVBMConfig, KVLayout
from kvbm.cli import build_parser, parse_tier, trace_path
from kvbm.config import DEFAULT_EVICTION, DEFAULT_LOWER_EVICTION, TierConfig, load_with
from kvbm.demo import block_content, run_demo
from kvbm.policies.base import Hints
from kvbm.sim.replay import single_tier

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, block_size=16)  # 16 KiB blocks
N = LAYOUT.block_nbytes


def meta(*caps, **kw) -> BlockManager:
    names = ["g2", "g3", "g4"]
    return BlockManager.from_config(KVBMConfig.from_dict(
        {"tiers": [{"name": n, "capacity": c} for n, c in zip(names, caps)], **kw}))


def consistent(m: BlockManager) -> None:
    """Every tier: within capacity, its policy tracks exactly its ready and pending blocks."""
    for t in m.tiers:
        held = set(t.ready) | set(t.pending)
        assert len(held) <= t.capacity, t
        assert len(t.policy) == len(held), (t, len(t.policy), len(held))
        assert all(k in t.policy for k in held), t


# ---------------------------------------------------------------- where the default is set

def test_every_place_a_tier_gets_its_default_eviction():
    from kvbm.policies.auto import AutoPolicy
    from kvbm.policies.auto_lower import LowerTierAuto

    assert (DEFAULT_EVICTION, DEFAULT_LOWER_EVICTION) == ("auto", "auto")
    cfg = KVBMConfig.from_dict({"tiers": [{"name": "g2", "capacity": 10}, {"name": "g3", "capacity": 20},
                                          {"name": "g4", "capacity": 40}]})
    assert [t.eviction.name for t in cfg.tiers] == ["auto", "auto", "auto"]
    assert [t.eviction.options for t in cfg.tiers] == [{}, {"below": True}, {"below": True}]
    assert [t.admission.name for t in cfg.tiers] == ["always"] * 3
    m = BlockManager.from_config(cfg)
    assert [t.policy.name for t in m.tiers] == ["auto", "auto", "auto"]
    assert [type(t.policy) for t in m.tiers] == [AutoPolicy, LowerTierAuto, LowerTierAuto]
    # the first tier is whichever comes first: G3 alone takes the stores, so it gets the first
    # tier's auto
    alone = KVBMConfig.from_dict({"tiers": [{"name": "g3", "capacity": 20}, {"name": "g4", "capacity": 40}]})
    assert [(t.eviction.name, t.eviction.options) for t in alone.tiers] == [("auto", {}), ("auto", {"below": True})]
    # built in code: TierConfig leaves it open, KVBMConfig fills it in by place
    built = KVBMConfig(tiers=[TierConfig("g2", 10), TierConfig("g3", 20)])
    assert [(t.eviction.name, t.eviction.options) for t in built.tiers] == [("auto", {}), ("auto", {"below": True})]
    assert single_tier(10).tiers[0].eviction.name == "auto"
    # kvbm simulate --tier NAME=CAP: the same defaults; a named policy is kept
    assert parse_tier("g2=100", None).eviction is None and parse_tier("g3=100::n_hit", None).eviction is None
    assert parse_tier("g3=100:arc", None).eviction.name == "arc"
    # kvbm demo: each tier's default unless --policy names one for all
    assert inspect.signature(run_demo).parameters["eviction"].default is None
    assert build_parser().parse_args(["demo"]).policy is None


def test_auto_named_below_the_first_tier_gets_the_lower_tier_mode():
    """`eviction: auto` named on a lower tier (file, override, --tier g3=N:auto) is the same as the
    default there; `below: false` asks for the first tier's auto anyway (a measurement)."""
    from kvbm.policies.auto import AutoPolicy
    from kvbm.policies.auto_lower import LowerTierAuto

    cfg = KVBMConfig.from_dict({"tiers": [{"name": "g2", "capacity": 10, "eviction": "auto"},
                                          {"name": "g3", "capacity": 20, "eviction": "auto"},
                                          {"name": "g4", "capacity": 40,
                                           "eviction": {"name": "auto", "below": False}}]})
    assert [type(t.policy) for t in BlockManager.from_config(cfg).tiers] == [AutoPolicy, LowerTierAuto, AutoPolicy]
    # the first tier's options are taken and have nothing to choose below it
    assert isinstance(AutoPolicy(8, below=True, candidates=("prefix", "s3fifo"), sample_slots=64), LowerTierAuto)


def test_a_named_eviction_and_an_override_still_win(tmp_path):
    path = tmp_path / "kvbm.yaml"
    path.write_text("tiers:\n  - {name: g2, capacity: 10, eviction: lru}\n  - {name: g3, capacity: 20}\n")
    cfg = load_with(KVBMConfig.from_dict, str(path), {})
    assert [t.eviction.name for t in cfg.tiers] == ["lru", "auto"]
    cfg = load_with(KVBMConfig.from_dict, str(path), {"KVBM_TIERS__G3__EVICTION": "arc"})
    assert [t.eviction.name for t in cfg.tiers] == ["lru", "arc"]
    cfg = load_with(KVBMConfig.from_dict, str(path), {"KVBM_TIERS__G2__EVICTION": "auto"})
    assert [(t.eviction.name, t.eviction.options) for t in cfg.tiers] == [("auto", {}), ("auto", {"below": True})]


# ---------------------------------------------------------------- the manager's contract, default tiers

def test_pinned_and_in_flight_blocks_are_never_victims():
    m = meta(4)
    m.store([1, 2, 3, 4])
    assert m.pin([1, 2, 3, 4]) == 4
    job = m.store([5, 6])  # no unpinned block: refused, nothing changes
    assert job.rejected and all(k in m for k in (1, 2, 3, 4)) and 5 not in m
    consistent(m)
    m.unpin([1, 2])
    pending = m.prepare_store([7, 8])  # evicts the two unpinned blocks, keeps 7 and 8 in flight
    assert not pending.rejected
    assert {k for k in (1, 2, 3, 4) if k in m} == {3, 4}
    again = m.store([9])  # all of G2 pinned or in flight now
    assert again.rejected and 9 not in m
    m.complete_store(pending)
    assert all(k in m for k in (3, 4, 7, 8))
    consistent(m)


def test_remove_and_a_failed_evict_leave_auto_consistent():
    m = meta(3, 3)
    m.store([1, 2, 3])
    m.store([4, 5, 6])  # 1..3 cascade to G3
    assert m.remove([2, 5]) == 2
    consistent(m)
    assert 2 not in m.tiers[1].policy and 5 not in m.tiers[0].policy
    m.pin([4, 6])
    m.pin([1, 3])
    before = [set(t.ready) for t in m.tiers]
    assert m.store([7, 8, 9]).rejected  # needs 3 of G2's slots, 1 is free, the rest pinned
    assert [set(t.ready) for t in m.tiers] == before
    consistent(m)


def test_cascade_g2_g3_g4_with_default_tiers_keeps_every_bound():
    m = meta(8, 16, 32)
    rng = np.random.default_rng(5)
    for r in range(300):  # requests sharing prefixes, as a chat service sends them
        root = int(rng.integers(0, 20)) * 1000
        n = int(rng.integers(1, 12))
        m.serve([root + i for i in range(n)])
        consistent(m)
    st3 = m.stats()["tiers"]
    assert st3["g3"]["demotions_in"] > 0 and st3["g4"]["demotions_in"] > 0
    assert all(v["used"] <= v["capacity"] for v in st3.values())


@pytest.mark.parametrize("cap", [1, 2])
def test_tiers_of_one_or_two_blocks(cap):
    m = meta(cap, cap, cap)
    for r in range(60):
        keys = [r % 7 * 100 + i for i in range(r % 4 + 1)]
        m.serve(keys)
        consistent(m)
    assert m.stats()["tiers"]["g4"]["demotions_in"] > 0


def test_hints_without_a_parent_trtllm_priorities():
    """TensorRT-LLM's connector stores per-block Hints (priority, duration) and no parent: the
    manager links them itself; auto ignores the priority (name `priority` to honour it)."""
    m = meta(6, 6)
    for r in range(40):
        keys = [r % 9 * 100 + i for i in range(4)]
        hints = [Hints(priority=p) for p in (80, 35, 35, 10)]
        m.store(keys, hints)
        consistent(m)
    policy = m.tiers[0].policy
    for k in list(m.tiers[0].ready):  # auto's own view of structure: a parent or None each
        assert k in policy


# ---------------------------------------------------------------- bytes: cascade and restart

def manager(tmp_path, g2=4, g3=8, g4=32, lower_auto=False) -> BlockManager:
    """Default evictions (auto everywhere: lru below the first tier); lower_auto names the first
    tier's auto on G3 and G4 (below: false), so that their recovered blocks go into its minis."""
    cfg = KVBMConfig.from_dict({
        "namespace": {"model": "test-model"},
        "tiers": [
            {"name": "g2", "capacity": g2, "storage": {"name": "host", "pin": "never"}},
            {"name": "g3", "capacity": g3, "storage": {"name": "disk", "path": str(tmp_path / "g3")},
             **({"eviction": {"name": "auto", "below": False}} if lower_auto else {})},
            {"name": "g4", "capacity": g4, "storage": {"name": "object", "url": f"file://{tmp_path / 'g4'}"},
             **({"eviction": {"name": "auto", "below": False}} if lower_auto else {})},
        ],
    })
    cfg.layout = LAYOUT
    return BlockManager.from_config(cfg)


def store_requests(m, first, count, length=3):
    for r in range(first, first + count):
        keys = [r * 100 + i for i in range(length)]
        job = m.store(keys, source=[block_content(k, N) for k in keys])
        assert not job.rejected


def loads_verify(m, keys):
    for i in range(0, len(keys), 2):
        chunk = keys[i:i + 2]
        out = [np.zeros(N, np.uint8) for _ in chunk]
        job = m.load(chunk, destination=out)
        for k, buf in zip(chunk[:job.loaded], out):
            assert np.array_equal(buf, block_content(k, N)), f"block {k} came back with wrong bytes"


@pytest.mark.parametrize("lower_auto", [False, True], ids=["defaults", "first-tier-auto-below"])
def test_restart_recovers_g3_g4_into_their_policies_and_evicts_them_later(tmp_path, lower_auto):
    m = manager(tmp_path, lower_auto=lower_auto)
    store_requests(m, 1, 12)  # 36 blocks over 4 + 8 + 32 slots
    assert [t.policy.name for t in m.tiers] == ["auto", "auto", "auto"]
    assert [getattr(t.policy, "below", False) for t in m.tiers] == [False, not lower_auto, not lower_auto]
    m.close()
    m2 = manager(tmp_path, lower_auto=lower_auto)
    rec3, rec4 = m2.tiers[1].stats.recovered, m2.tiers[2].stats.recovered
    assert rec3 == 8 and rec4 == 24  # G2 was memory; G3 full, G4 holds the rest
    consistent(m2)  # every recovered block is tracked by its tier's auto
    held = [k for k in (r * 100 + i for r in range(1, 13) for i in range(3)) if k in m2]
    assert len(held) == 32
    loads_verify(m2, held[:6])
    store_requests(m2, 100, 20)  # 60 new blocks: recovered ones are evicted and dropped
    consistent(m2)
    assert m2.tiers[2].stats.drops > 0
    alive = [k for k in held if k in m2]
    loads_verify(m2, alive[:8])
    consistent(m2)
    m2.close()


# ---------------------------------------------------------------- random verbs, default tiers

_req = st.tuples(st.integers(0, 6), st.integers(1, 5))  # (prefix root, length)
_op = st.one_of(
    st.tuples(st.just("serve"), _req), st.tuples(st.just("serve"), _req),
    st.tuples(st.just("pin"), _req), st.tuples(st.just("unpin"), _req),
    st.tuples(st.just("prepare"), _req), st.tuples(st.just("complete"), st.just(None)),
    st.tuples(st.just("remove"), _req),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_op, min_size=5, max_size=60), caps=st.tuples(st.integers(1, 5), st.integers(1, 6),
                                                                  st.integers(1, 8)))
@example(ops=[("prepare", (0, 5)), ("serve", (0, 5)), ("complete", None), ("serve", (1, 5))], caps=(1, 1, 1))
def test_random_verbs_on_default_tiers_keep_the_contract(ops, caps):
    m = meta(*caps)
    pinned: list = []
    pending = []
    for op, arg in ops:
        if arg is not None:
            root, n = arg
            keys = [root * 100 + i for i in range(n)]
        if op == "serve":
            m.serve(keys)
        elif op == "pin":
            got = m.pin(keys)
            pinned.append(keys[:got])
        elif op == "unpin" and pinned:
            m.unpin(pinned.pop())
        elif op == "prepare":
            pending.append(m.prepare_store(keys))
        elif op == "complete" and pending:
            m.complete_store(pending.pop(0))
        elif op == "remove":
            busy = any(k in t.busy for t in m.tiers for k in keys)
            if busy:
                with pytest.raises(RuntimeError):
                    m.remove(keys)
            else:
                m.remove(keys)
        consistent(m)
        for keys in pinned:  # a pinned block stays ready where it is
            assert all(k in m for k in keys)
    for job in pending:
        m.complete_store(job)
    consistent(m)


# ---------------------------------------------------------------- auto below the first tier (H33)

def test_auto_below_the_first_tier_keeps_the_newest_demoted_blocks():
    """What a G3 gets: one demoted block per insert, each with its parent (which stays above:
    roots are hot), and an evict of one when full. No block is ever hit here, so no policy has
    a reason to keep an old block over a new one: after 2,000 such inserts into 100 slots the
    newest demoted block is resident and the tier holds mostly the last few hundred. (Failed
    before 3148dc4: auto read the stream as one request and kept blocks 1-99 and 2,000.)"""
    from kvbm.policies.auto import AutoPolicy

    p = AutoPolicy(100)
    for k in range(1, 2001):
        if len(p) >= 100:
            assert len(p.evict(1, ())) == 1
        p.insert(k, Hints(parent=k + 100_000))
    held = [k for k in range(1, 2001) if k in p]
    assert len(held) == 100
    assert 2000 in p
    assert sum(k > 1500 for k in held) >= 50, held


def _two_tier(trace, g2, g3, lower):
    from kvbm.sim.replay import simulate

    cfg = KVBMConfig.from_dict({"tiers": [{"name": "g2", "capacity": g2},
                                          {"name": "g3", "capacity": g3, "eviction": lower}]})
    return simulate(trace, cfg, progress=False).prefix_hit_ratio


def test_auto_below_the_first_tier_is_within_0002_of_lru_there():
    """Was a strict xfail (first 4,000 Mooncake requests, G2 1k auto over G3 10k: the first tier's
    auto on G3 0.1391 before 3148dc4, 0.0036 below lru after). Auto named on G3 now runs its
    lower-tier mode: lru's decisions, so the same prefix hits to the last digit."""
    from kvbm.sim.traces import load_trace

    trace = load_trace(trace_path("mooncake"), limit=4000)
    ratio = {lower: _two_tier(trace, 1000, 10000, lower) for lower in ("lru", "auto")}
    assert ratio["auto"] >= ratio["lru"] - 0.002, ratio
    assert ratio["auto"] == ratio["lru"], ratio


@pytest.mark.parametrize("workload,g2_fraction,factor", [("agent", 0.01, 10), ("fanout", 0.01, 4)])
def test_lower_tier_auto_on_the_cells_where_the_first_tiers_auto_lost_most(workload, g2_fraction, factor):
    """bench/eval_lower_tier.py's tune cells where the first tier's auto on G3 was furthest below
    lru (-0.048 and -0.046 there): the lower-tier mode equals lru, and the first tier's auto
    (below: false) is the measured loss it replaces."""
    sys_path_bench()
    from eval_policies import load

    trace = load(workload)
    distinct = len({k for r in trace.requests for k in r.hash_ids})
    g2 = round(g2_fraction * distinct)
    lru = _two_tier(trace, g2, g2 * factor, "lru")
    auto = _two_tier(trace, g2, g2 * factor, "auto")
    assert auto == lru, (auto, lru)
    first = _two_tier(trace, g2, g2 * factor, {"name": "auto", "below": False})
    assert first < lru - 0.02, (first, lru)


def sys_path_bench():
    import sys
    from pathlib import Path

    bench = str(Path(__file__).resolve().parents[1] / "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
