"""serve(keys) is locate + load(ready prefix) + store(rest): the same results, state and policy order.

Each test drives two managers built from one config: one with serve(), one with the three verbs
as the simulator used to call them, and compares everything observable after every request.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypothesis_budget import examples
from kvbm import BlockManager, KVBMConfig
from kvbm.config import PolicySpec, TierConfig
from kvbm.registry import EVICTION


def three_verbs(m, keys):
    """The reference: what simulate() did before serve() existed."""
    where = m.locate(keys)
    n = where.index(-1) if -1 in where else len(where)
    if n:
        m.load(keys[:n])
    if n < len(keys):
        m.store(keys[n:], parent=keys[n - 1] if n else None, position=n)
    return where


def pair(tiers, *, events=False, mode="exclusive", promote=True, future=None):
    def build():
        clock = [0]
        cfg = KVBMConfig(tiers=[TierConfig(name, cap, PolicySpec(pol), PolicySpec(adm))
                                for name, cap, pol, adm in tiers],
                         mode=mode, promote_on_hit=promote, events=events)
        sim = {"future": future or [], "now": lambda: clock[0]}
        m = BlockManager.from_config(cfg, clock=lambda: float(clock[0]), simulation=sim)
        return m, clock
    return build(), build()


def state(m):
    return (
        [list(t.ready) for t in m.tiers],
        [list(t.pending) for t in m.tiers],
        [sorted(t.busy) for t in m.tiers],
        [dict(t.pins) for t in m.tiers],
        m.stats(),
        m.take_events(),
        [len(t.policy) for t in m.tiers],
    )


def drain(m):
    """Every tier's policy order, read by evicting one victim at a time (ends the manager)."""
    out = []
    for t in m.tiers:
        victims = []
        while (v := t.policy.evict(1, t.busy)):
            victims += v
        out.append(victims)
    return out


def replay_both(requests, tiers, **kw):
    (a, clock_a), (b, clock_b) = pair(tiers, future=list(requests), **kw)
    for i, keys in enumerate(requests):
        clock_a[0] = clock_b[0] = i
        assert a.serve(keys) == three_verbs(b, keys), f"request {i}"
        assert state(a) == state(b), f"request {i}"
    assert drain(a) == drain(b)
    return a


ONLINE = [p for p in EVICTION.names()]


@pytest.mark.parametrize("policy", ONLINE)
@pytest.mark.parametrize("capacity", [7, 300])
def test_one_tier_on_the_trace(mooncake, policy, capacity):
    requests = [r.hash_ids for r in mooncake.requests[:600]]
    replay_both(requests, [("g2", capacity, policy, "always")])


@pytest.mark.parametrize("tiers", [
    [("g2", 40, "lru", "always"), ("g3", 200, "lru", "always")],
    [("g2", 40, "lru", "n_hit"), ("g3", 200, "fifo", "n_hit")],
    [("g2", 300, "lru", "n_hit")],
])
@pytest.mark.parametrize("mode", ["exclusive", "inclusive"])
def test_tiers_admission_and_modes_on_the_trace(mooncake, tiers, mode):
    requests = [r.hash_ids for r in mooncake.requests[:600]]
    replay_both(requests, tiers, mode=mode)


def test_events_on_take_the_general_path_and_agree(mooncake):
    requests = [r.hash_ids for r in mooncake.requests[:300]]
    m = replay_both(requests, [("g2", 100, "lru", "always")], events=True)
    assert not m._plain_serve


def test_the_fast_path_is_taken_for_one_plain_tier():
    (m, _), _ = pair([("g2", 4, "lru", "always")])
    assert m._plain_serve
    # serve [1, 2, 3] -> all miss, stored
    assert m.serve((1, 2, 3)) == [-1, -1, -1]
    # serve [1, 2, 5, 6] -> prefix [1, 2] loaded; [5, 6] stored, evicting 3 (the oldest)
    assert m.serve((1, 2, 5, 6)) == [0, 0, -1, -1]
    assert list(m.tiers[0].ready) == [1, 2, 5, 6] and 3 not in m
    # serve [9, 1, 9] -> a repeated key is refused before anything changes
    with pytest.raises(ValueError, match=r"block 9 appears twice in one request \(positions 0 and 2\)"):
        m.serve((9, 1, 9))
    assert list(m.tiers[0].ready) == [1, 2, 5, 6]
    st_ = m.tiers[0].stats
    assert (st_.hits, st_.stores, st_.evictions) == (2, 5, 1)


@pytest.mark.parametrize("verb", ["serve", "store"])
def test_a_repeated_key_is_refused_and_changes_nothing(verb):
    """Issue 13: one LRU tier of 3, (0, 2, 3) then (1, 0, 0) raised KeyError in complete_store
    after its evictions had already happened."""
    (m, _), _ = pair([("g2", 3, "lru", "always")], events=True)
    getattr(m, verb)((0, 2, 3))
    m.take_events()
    before = state(m)
    with pytest.raises(ValueError, match=r"block 0 appears twice .*positions 1 and 2.*prefix chain"):
        getattr(m, verb)((1, 0, 0))
    assert state(m) == before
    # the same request without the repeat: 1 is new, 0 is touched, 2 (now the oldest) evicted
    assert m.serve((1, 0)) == [-1, 0]
    assert sorted(m.tiers[0].ready) == [0, 1, 3]


# Random requests interleaved with pins and in-flight stores, which the fast path must respect.
ops = st.lists(st.one_of(
    st.tuples(st.just("serve"), st.lists(st.integers(0, 12), min_size=1, max_size=6, unique=True)),
    st.tuples(st.just("pin"), st.lists(st.integers(0, 12), min_size=1, max_size=3)),
    st.tuples(st.just("unpin"), st.just(None)),
    st.tuples(st.just("begin"), st.lists(st.integers(0, 12), min_size=1, max_size=3, unique=True)),
    st.tuples(st.just("finish"), st.just(None)),
), max_size=40)


@settings(max_examples=examples(150), deadline=None)
@given(ops=ops, capacity=st.integers(1, 6), policy=st.sampled_from(["lru", "fifo", "arc", "prefix", "auto"]),
       admission=st.sampled_from(["always", "n_hit", "second_chance", "priority_floor"]), lower=st.booleans())
def test_random_requests_with_pins_and_inflight_stores(ops, capacity, policy, admission, lower):
    # one tier under `admission`, or a G2 over a G3 that `admission` guards
    top = ("g2", capacity, policy, "always" if lower else admission)
    (a, _), (b, _) = pair([top, ("g3", capacity + 2, policy, admission)] if lower else [top])
    pins_a, pins_b, jobs_a, jobs_b = [], [], [], []
    for op, arg in ops:
        if op == "serve":
            keys = tuple(arg)
            assert a.serve(keys) == three_verbs(b, keys)
        elif op == "pin":
            assert a.pin(arg) == b.pin(arg)
            pins_a.append(arg)
            pins_b.append(arg)
        elif op == "unpin" and pins_a:
            a.unpin(pins_a.pop())
            b.unpin(pins_b.pop())
        elif op == "begin":
            ja, jb = a.prepare_store(arg), b.prepare_store(arg)
            assert (ja.rejected is None) == (jb.rejected is None)
            jobs_a.append(ja)
            jobs_b.append(jb)
        elif op == "finish" and jobs_a:
            a.complete_store(jobs_a.pop(0))
            b.complete_store(jobs_b.pop(0))
        assert state(a) == state(b)
        assert all(t.used <= t.capacity for t in a.tiers)
    assert drain(a) == drain(b)
