"""auto: miniature simulations choose the policy that orders the tier.

Grids replayed through the real BlockManager (kvbm.sim.replay), as `kvbm simulate` does. The
issue's criterion is that at every cell auto's prefix hit ratio is within 0.002 of the best of
lru, arc, s3fifo and prefix (bench/eval_policies.py; the full grid is in bench/RESULTS.md):

- TUNE_CELLS: cells of the robustness grid's tune rows where a different reference policy
  leads (s3fifo on document QA at 5 %, prefix on fan-out agents at 2 %).
- COLUMN: the reduced grid, the 5 % column of every synthetic row of the robustness grid
  (tune and held-out): the 0.002 bar is asserted on each cell.
- FIXED: cells that were known misses and are not any more (chat 2 %, agent@12 25 %; tenants
  25 % since session 12's floor for hitdensity's `once` class; mooncake-1 2 % since session 14).
- KNOWN_MISSES: the grid's synthetic cells where auto is more than 0.002 below the best
  reference (bench/RESULTS.md says why): strict expected failures, so a change that closes one
  shows up here and the list must shrink with it. None since session 12 (the grid's one miss
  since then, mooncake-1 2 %, is in FIXED since session 14).
- REDUCED: small members of the family (11k-16k block accesses), too short for auto to learn
  on: a hard bound (0.015) on the cells whose tier holds the longest request.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kvbm.policies.auto import AutoPolicy
from kvbm.policies.base import Hints
from kvbm.sim.replay import simulate, single_tier
from kvbm.sim.synth import generate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from eval_policies import capacities, load  # noqa: E402

REFERENCE = ("lru", "arc", "s3fifo", "prefix")
TOLERANCE = 0.002
TUNE_CELLS = [("docqa", 0.05), ("fanout", 0.02)]
COLUMN = [(w, 0.05) for w in ("chat", "agent", "fanout", "mix", "agent@12", "tenants", "rag",
                              "docqa@14", "assistant")]  # docqa 5 % is a tune cell above
# fixed in session 10 (shared minis at rate 1, S3FIFO_WARM, PERSIST 3): chat 2 % (tune),
# agent@12 25 % (held out); in session 12 (hitdensity's `once` floor): tenants 25 % (held out);
# in session 14 (cold switches judged on what came after them, hitdensity resumed on its own
# tables): mooncake-1 2 % (held out; a Mooncake half, a few seconds); asserted with the others
FIXED = [("chat", 0.02), ("agent@12", 0.25), ("tenants", 0.25), ("mooncake-1", 0.02)]
KNOWN_MISSES: list = []  # the xfail test below is kept for the next known miss
# small members of the family: chat, agent tool loops, document QA, fan-out
REDUCED = {
    "chat": dict(n_sessions=600, seed=21, mode="chat"),
    "agent": dict(n_sessions=20, seed=22, mode="agent"),
    "docqa": dict(n_sessions=300, seed=23, mode="doc", n_documents=40, doc_tokens=6000, turns_mean=3.0),
    "fanout": dict(n_sessions=15, seed=24, mode="agent", fanout_prob=0.25, fanout=4),
}
FRACTIONS = (0.02, 0.10)
HARD = 0.015


def _ratio(trace, policy, capacity):
    return simulate(trace, single_tier(capacity, policy), progress=False).prefix_hit_ratio


def _cell(workload, fraction):
    trace = load(workload)
    capacity = capacities(trace, [fraction])[0]
    ref = {p: _ratio(trace, p, capacity) for p in REFERENCE}
    auto = _ratio(trace, "auto", capacity)
    print(workload, fraction, capacity, f"auto {auto:.4f}", {p: round(r, 4) for p, r in ref.items()})
    return auto, max(ref.values())


@pytest.mark.parametrize("workload,fraction", TUNE_CELLS + COLUMN + FIXED)
def test_auto_is_within_0002_of_the_best_reference_policy(workload, fraction):
    auto, best = _cell(workload, fraction)
    assert auto >= best - TOLERANCE, (workload, fraction, auto, best)


@pytest.mark.parametrize("workload,fraction", KNOWN_MISSES)
@pytest.mark.xfail(strict=True, reason="known miss of the 0.002 bar (bench/RESULTS.md, issue 15)")
def test_known_misses_of_the_0002_bar(workload, fraction):
    auto, best = _cell(workload, fraction)
    assert auto >= best - TOLERANCE, (workload, fraction, auto, best)


@pytest.fixture(scope="module")
def grid():
    out = []
    for name, knobs in REDUCED.items():
        trace = generate(**knobs)
        distinct = len({k for r in trace.requests for k in r.hash_ids})
        for fraction in FRACTIONS:
            capacity = max(1, round(fraction * distinct))
            best = max(_ratio(trace, p, capacity) for p in REFERENCE)
            longest = max(len(r.hash_ids) for r in trace.requests)
            out.append((name, fraction, _ratio(trace, "auto", capacity), best, capacity >= longest))
    return out


def test_auto_is_never_far_below_the_best_reference_policy(grid):
    for cell in grid:
        print(*cell)
    bad = [cell for cell in grid if cell[4] and cell[2] < cell[3] - HARD]
    assert not bad
    assert sum(cell[4] for cell in grid) >= 4


def _request(policy, keys):
    """One request as the manager drives a structured policy: hits touched, misses stored."""
    hit = [k for k in keys if k in policy]
    if hit:
        policy.touch(hit)
    new = [k for k in keys if k not in policy]
    if new:
        room = len(policy) + len(new) - policy.capacity
        if room > 0:
            assert policy.evict(room, ()) is not None
        parent = keys[keys.index(new[0]) - 1] if keys.index(new[0]) else None
        hints = []
        for k in new:
            hints.append(Hints(parent=parent))
            parent = k
        policy.insert_many(new, hints)


def test_a_loop_larger_than_the_tier_moves_auto_off_lru():
    # 150 one-block requests cycled through a 100-block tier: LRU misses every time, policies
    # that keep part of the loop (arc, s3fifo, hitdensity) hit; the minis see it and auto
    # switches away from its start, after which it hits too.
    policy = AutoPolicy(100, candidates=("lru", "arc", "s3fifo", "prefix", "hitdensity"),
                        start="lru", sample_slots=100)
    assert policy.rate == 1.0 and policy.active == "lru"
    hits = 0
    for rnd in range(80):
        for k in range(150):
            if rnd >= 50 and k in policy:
                hits += 1
            _request(policy, [k])
    assert policy.active != "lru" and policy.switches
    assert hits > 0.3 * 30 * 150  # LRU would have none


def _hitdensity_tables(policy):
    return [list(r) for r in policy._reuses], [list(e) for e in policy._ends]


def test_a_cold_switch_restarts_the_scores_and_a_return_resumes_hitdensity():
    # rate 0.25 (a cold switch): the scores and window restart at the switch, and a return to
    # hitdensity with nothing learned since adopts the tables the real hitdensity had when
    # auto left it (not its mini's, scaled up)
    policy = AutoPolicy(400, sample_slots=100)
    assert policy.rate == 0.25 and not policy._shared and policy.active == "hitdensity"
    for rnd in range(6):
        for s in range(150):
            _request(policy, [(s % (40 + rnd * 20), i) for i in range(6)])
    real = policy._real
    tables = _hitdensity_tables(real)
    assert any(any(r) for r in tables[0])  # it has learned reuses
    policy._switch(policy.names.index("s3fifo"))
    assert policy.active == "s3fifo" and policy._window == 0.0 and policy._score == [0.0] * 3
    mini = policy._minis[policy.names.index("hitdensity")]
    mini_tables = _hitdensity_tables(mini)
    policy._switch(policy.names.index("hitdensity"))
    assert policy.active == "hitdensity" and policy._real is not real
    assert _hitdensity_tables(policy._real) == tables  # its own counts, nothing since
    assert _hitdensity_tables(mini) == mini_tables
    resident = {(s, i) for s in range(150) for i in range(6) if (s, i) in policy}
    assert len(resident) == len(policy) == 400  # the tier's keys kept through both switches
    # without RESUME the return adopts the mini's tables, scaled: a different table
    policy.RESUME = False
    policy._switch(policy.names.index("prefix"))
    policy._switch(policy.names.index("hitdensity"))
    assert _hitdensity_tables(policy._real) != tables


def test_switch_keeps_the_resident_keys_and_structure():
    policy = AutoPolicy(50, candidates=("lru", "prefix"), start="lru", sample_slots=50)
    for s in range(10):
        _request(policy, [(s, i) for i in range(5)])
    before = {k for s in range(10) for k in [(s, i) for i in range(5)] if k in policy}
    policy._switch(policy.names.index("prefix"))
    assert policy.active == "prefix" and len(policy) == len(before) == 50
    assert all(k in policy for k in before)
    # prefix evicts leaves first: the deepest block of the oldest sequence, never its head
    assert policy.evict(1, ()) == [(0, 4)]


def test_a_switch_at_rate_1_swaps_in_the_winners_mini():
    # rate 1 (capacity <= sample_slots): the real tier is the active candidate's mini; a switch
    # makes the winner's mini, with its queues and ghosts, the real policy, reconciled with the
    # tier's keys, and the old real policy goes on as its candidate's mini
    policy = AutoPolicy(20, sample_slots=20)
    assert policy._shared and policy.rate == 1.0
    hd, s3 = policy.names.index("hitdensity"), policy.names.index("s3fifo")
    assert policy._minis[hd] is policy._real  # no second hitdensity
    for s in range(30):
        _request(policy, [(s % 12, i) for i in range(3)])
    tier = {k for s in range(12) for k in [(s, i) for i in range(3)] if k in policy}
    mini, old = policy._minis[s3], policy._real
    ghosts = set(mini._ghost)
    assert ghosts  # the s3fifo mini has evicted keys: its ghosts are what a cold switch loses
    policy._switch(s3)
    assert policy._real is mini and policy._minis[hd] is old and policy.active == "s3fifo"
    assert {k for s in range(12) for k in [(s, i) for i in range(3)] if k in policy} == tier
    assert len(policy) == len(tier)
    assert ghosts - tier <= set(mini._ghost)  # what it learned came along
    assert policy.switches[-1][1] == "s3fifo"
    _request(policy, [(99, i) for i in range(3)])  # and it goes on as the tier's policy
    assert len(policy) == 20 and all((99, i) in policy for i in range(3))


def test_a_request_longer_than_the_tier_keeps_its_head():
    # a 10-block tier under lru alone: request a = [0..7] is stored, then it grows to [0..11]
    policy = AutoPolicy(10, candidates=("lru",), start="lru", sample_slots=10)
    _request(policy, list(range(8)))
    # hits 0..7 touched, 8..11 need 2 slots -> lru would evict 0 and 1, the head; the request
    # no longer fits the tier, so its own victims are its deepest blocks instead -> 6 and 7
    _request(policy, list(range(12)))
    assert [k for k in range(12) if k in policy] == [0, 1, 2, 3, 4, 5, 8, 9, 10, 11]
    # the next turn hits its first 6 blocks (lru alone: none)
    assert all(k in policy for k in range(6))


def test_a_demotion_stream_is_not_one_request():
    # a tier below the first gets one demoted block per insert, its parent above (never here):
    # each is its own request, so no key list grows with the stream and evict keeps its order
    # (before: one ever-growing request whose newest blocks were given back first)
    policy = AutoPolicy(100)
    for k in range(1, 2001):
        if len(policy) >= 100:
            assert len(policy.evict(1, ())) == 1
        policy.insert(k, Hints(parent=k + 100_000))
        assert policy._req_len <= 1
    held = [k for k in range(1, 2001) if k in policy]
    assert len(held) == 100 and 2000 in policy
    assert sum(k > 1500 for k in held) >= 50, held


def test_a_request_goes_on_from_its_own_evicted_block():
    # a request longer than the tier, stored run by run: the next run's parent was given back
    # (it was the deepest block) but is the request's own, so the request goes on
    policy = AutoPolicy(10, candidates=("lru",), start="lru", sample_slots=10)
    _request(policy, list(range(8)))
    hints = [Hints(parent=7)] + [Hints(parent=k) for k in range(8, 11)]
    assert policy.evict(4, ()) is not None
    policy.insert_many([8, 9, 10, 11], hints)
    assert 7 not in policy and policy._req_len == 12  # one request: 0..7, then 8..11
    assert policy.evict(2, ()) is not None  # its own victims are its deepest
    assert [k for k in range(12) if k in policy] == [0, 1, 2, 3, 8, 9]


def test_deepest_first_leaves_other_requests_victims_alone():
    # two requests fill the tier; a third that fits takes lru's victims unchanged
    policy = AutoPolicy(6, candidates=("lru",), start="lru", sample_slots=6)
    _request(policy, ["a0", "a1", "a2"])
    _request(policy, ["b0", "b1", "b2"])
    _request(policy, ["c0", "c1"])  # -> evicts a0, a1 (lru order)
    assert sorted(k for k in ["a0", "a1", "a2", "b0", "b1", "b2", "c0", "c1"] if k in policy) == \
        ["a2", "b0", "b1", "b2", "c0", "c1"]


def test_s3fifo_is_fed_deepest_first():
    # one 4-block request into a 4-block tier under s3fifo: its FIFO order is tail first, so
    # a new request evicts the tail of the old one before its head
    policy = AutoPolicy(4, candidates=("s3fifo",), start="s3fifo", sample_slots=4)
    _request(policy, ["a0", "a1", "a2", "a3"])
    _request(policy, ["b0"])
    assert "a3" not in policy and all(k in policy for k in ["a0", "a1", "a2", "b0"])


def test_bad_options():
    with pytest.raises(ValueError, match="choose from"):
        AutoPolicy(10, candidates=("lru", "mru"))
    with pytest.raises(ValueError, match="start="):
        AutoPolicy(10, candidates=("lru", "arc"), start="prefix")
    with pytest.raises(ValueError, match="sample_slots"):
        AutoPolicy(10, sample_slots=0)
