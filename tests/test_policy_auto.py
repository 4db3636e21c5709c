"""auto: miniature simulations choose the policy that orders the tier.

The reduced grid below is the issue's criterion on small workloads of kvbm.sim.synth: at every
cell auto's prefix hit ratio is within 0.002 of the best of lru, arc, s3fifo and prefix. It
replays through the real BlockManager (kvbm.sim.replay), as `kvbm simulate` does.
"""

from __future__ import annotations

import pytest

from kvbm.policies.auto import AutoPolicy
from kvbm.policies.base import Hints
from kvbm.sim.replay import simulate, single_tier
from kvbm.sim.synth import generate

REFERENCE = ("lru", "arc", "s3fifo", "prefix")
# small members of the family: chat, agent tool loops, document QA, fan-out, a tenant blend
REDUCED = {
    "chat": dict(n_sessions=400, seed=21, mode="chat"),
    "agent": dict(n_sessions=12, seed=22, mode="agent"),
    "docqa": dict(n_sessions=250, seed=23, mode="doc", n_documents=40, doc_tokens=6000, turns_mean=3.0),
    "fanout": dict(n_sessions=10, seed=24, mode="agent", fanout_prob=0.25, fanout=4),
    "tenants": dict(n_sessions=120, seed=25, mode="blend", kind_weights=(0.5, 0.25, 0.25), n_tenants=4,
                    n_documents=20, doc_tokens=5000),
}
FRACTIONS = (0.02, 0.10)


def _ratio(trace, policy, capacity):
    return simulate(trace, single_tier(capacity, policy), progress=False).prefix_hit_ratio


@pytest.mark.parametrize("name", list(REDUCED))
def test_auto_is_within_0002_of_the_best_reference_policy(name):
    trace = generate(**REDUCED[name])
    distinct = len({k for r in trace.requests for k in r.hash_ids})
    for fraction in FRACTIONS:
        capacity = max(1, round(fraction * distinct))
        best = max(_ratio(trace, p, capacity) for p in REFERENCE)
        auto = _ratio(trace, "auto", capacity)
        assert auto >= best - 0.002, (name, fraction, capacity, auto, best)


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
    policy = AutoPolicy(100, start="lru", sample_slots=100)
    assert policy.rate == 1.0 and policy.active == "lru"
    hits = 0
    for rnd in range(80):
        for k in range(150):
            if rnd >= 50 and k in policy:
                hits += 1
            _request(policy, [k])
    assert policy.active != "lru" and policy.switches
    assert hits > 0.3 * 30 * 150  # LRU would have none


def test_switch_keeps_the_resident_keys_and_structure():
    policy = AutoPolicy(50, start="lru", sample_slots=50)
    for s in range(10):
        _request(policy, [(s, i) for i in range(5)])
    before = {k for s in range(10) for k in [(s, i) for i in range(5)] if k in policy}
    policy._switch(policy.names.index("prefix"))
    assert policy.active == "prefix" and len(policy) == len(before) == 50
    assert all(k in policy for k in before)
    # prefix evicts leaves first: the deepest block of the oldest sequence, never its head
    assert policy.evict(1, ()) == [(0, 4)]


def test_bad_options():
    with pytest.raises(ValueError, match="choose from"):
        AutoPolicy(10, candidates=("lru", "mru"))
    with pytest.raises(ValueError, match="start="):
        AutoPolicy(10, candidates=("lru", "arc"), start="prefix")
    with pytest.raises(ValueError, match="sample_slots"):
        AutoPolicy(10, sample_slots=0)
