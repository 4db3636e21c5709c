"""The policy contract, checked against every registered eviction and admission policy.

Registering a policy (built-in, entry point or register_policy) puts it under these tests.
Unit checks first, then hypothesis drives random insert/touch/remove/evict/tick sequences
against a model and against a twin policy that never saw the failed evict() calls.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kvbm.policies.base import AdmissionPolicy, EvictionPolicy, Hints  # noqa: E402
from kvbm.registry import ADMISSION, EVICTION  # noqa: E402

UNIVERSE = list(range(12))
_rng = random.Random(7)
# for simulation-only policies; keys 10 and 11 never occur in it
FUTURE = [_rng.sample(UNIVERSE[:10], _rng.randint(1, 6)) for _ in range(40)]


class FakeClock:
    """Seconds and request index, advanced by the test."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.request = 0

    def __call__(self) -> float:
        return self.t

    def now(self) -> int:
        return self.request

    def tick(self, dt: float) -> None:
        self.t += dt
        self.request += 1


def make(name: str, capacity: int, clock: FakeClock, **options) -> EvictionPolicy:
    cls = EVICTION.get(name)
    if cls.simulation_only:
        options = {"future": FUTURE, "now": clock.now, **options}
    return cls(capacity, clock=clock, **options)


def filled(name, keys, capacity=8):
    policy = make(name, capacity, FakeClock())
    for key in keys:
        policy.insert(key, Hints())
    return policy


def members(policy):
    return {key for key in UNIVERSE if key in policy}


# -------------------------------------------------------------------- eviction: unit checks

@pytest.fixture(params=EVICTION.names())
def name(request):
    return request.param


def test_class_shape(name):
    cls = EVICTION.get(name)
    assert issubclass(cls, EvictionPolicy)
    assert isinstance(cls.simulation_only, bool) and isinstance(cls.wants_structure, bool)
    if cls.__module__.startswith("kvbm.policies."):  # built-ins are named after their registry entry
        assert cls.name == name
        assert sys.modules[cls.__module__].__doc__, "a policy module explains its algorithm"


def test_empty(name):
    policy = filled(name, [])
    assert len(policy) == 0 and 0 not in policy
    assert policy.evict(0) == []
    assert policy.evict(1) is None


def test_insert_remove_touch(name):
    # insert [0..4], remove 2, remove unknown 99, touch [99, 0] -> {0, 1, 3, 4}
    policy = filled(name, range(5))
    assert len(policy) == 5 and members(policy) == {0, 1, 2, 3, 4}
    policy.remove(2)
    policy.remove(99)
    policy.touch([99, 0])
    policy.touch([])
    assert len(policy) == 4 and members(policy) == {0, 1, 3, 4}


def test_reinsert_does_not_duplicate(name):
    policy = filled(name, [0, 1, 0])
    assert len(policy) == 2
    assert sorted(policy.evict(2)) == [0, 1]
    assert len(policy) == 0


def test_evicted_keys_are_gone(name):
    policy = filled(name, range(6))
    victims = policy.evict(4)
    assert len(victims) == 4 and len(set(victims)) == 4 and set(victims) <= set(range(6))
    assert len(policy) == 2 and not members(policy) & set(victims)
    assert policy.evict(0) == [] and len(policy) == 2


def test_batch_stored_keeps_what_is_tracked(name):
    # insert [0..5] one by one, then say [1, 2, 3, 99] were one stored run (99 unknown):
    # still the same six keys, and evicting all of them still works
    policy = filled(name, range(6))
    policy.batch_stored([1, 2, 3, 99])
    assert len(policy) == 6 and members(policy) == set(range(6))
    assert sorted(policy.evict(6)) == list(range(6))


def test_evict_more_than_held_is_none(name):
    policy = filled(name, range(3))
    assert policy.evict(4) is None
    assert len(policy) == 3 and members(policy) == {0, 1, 2}


@pytest.mark.parametrize("as_type", [set, list, frozenset, tuple])
def test_protected(name, as_type):
    # insert [0..4]; evict 3 with [0, 1, 2] protected -> None; evict 2 -> {3, 4}
    policy = filled(name, range(5))
    assert policy.evict(3, as_type([0, 1, 2])) is None
    assert len(policy) == 5 and members(policy) == {0, 1, 2, 3, 4}
    assert policy.evict(0, as_type([0, 1, 2])) == []
    assert sorted(policy.evict(2, as_type([0, 1, 2]))) == [3, 4]
    assert members(policy) == {0, 1, 2}
    assert policy.evict(1, as_type([0, 1, 2])) is None


def test_unknown_option_is_named(name):
    with pytest.raises(TypeError, match="bogus_option"):
        make(name, 4, FakeClock(), bogus_option=1)


# -------------------------------------------------------------------- eviction: properties

def _hints():
    return st.builds(
        Hints,
        priority=st.sampled_from([0, 10, 35, 80, 100]),
        duration=st.sampled_from([None, 0.0, 3.0, 50.0]),
        parent=st.sampled_from([None, *UNIVERSE]),
        position=st.integers(0, 8),
        owner=st.sampled_from([None, "a", "b"]),  # partition keeps one policy per owner
    )


_key = st.sampled_from(UNIVERSE)
_protected = st.frozensets(_key, max_size=6)
_insert = st.tuples(st.just("insert"), _key, st.one_of(st.none(), _hints()), _protected)
_op = st.one_of(  # inserts weigh most so the policy is usually full and evicting
    _insert,
    _insert,
    _insert,
    st.tuples(st.just("touch"), st.lists(st.integers(-2, 13), max_size=4)),
    st.tuples(st.just("touch"), st.lists(st.integers(-2, 13), max_size=4)),
    st.tuples(st.just("remove"), st.integers(-1, 12)),
    st.tuples(st.just("evict"), st.integers(0, 5), _protected),
    st.tuples(st.just("tick"), st.sampled_from([0.5, 2.0, 10.0])),
)


def _check_same(a, b, model):
    assert len(a) == len(b) == len(model)
    assert members(a) == members(b) == model


def _evict_both(a, b, model, n, protected):
    """Evict on `a`; on success replay on twin `b`, which never sees failed calls."""
    before = members(a), len(a)
    victims = a.evict(n, protected)
    if victims is None:
        assert (members(a), len(a)) == before, "a failed evict changed the policy"
        if not type(a).wants_structure:
            assert len(model - protected) < n, "evict failed although enough unprotected keys exist"
        return None
    assert len(victims) == n == len(set(victims))
    assert set(victims) <= model and not set(victims) & protected
    assert b.evict(n, protected) == victims, "a failed evict changed the later victim order"
    model.difference_update(victims)
    return victims


@pytest.mark.parametrize("policy_name", EVICTION.names())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_op, min_size=20, max_size=100), capacity=st.integers(1, 8))
def test_random_operations_keep_the_contract(policy_name, ops, capacity):
    clock = FakeClock()
    a, b = make(policy_name, capacity, clock), make(policy_name, capacity, clock)
    model: set = set()
    for op in ops:
        kind = op[0]
        if kind == "insert":
            _, key, hints, protected = op
            if key not in model and len(model) >= capacity:
                if _evict_both(a, b, model, 1, protected) is None:
                    continue  # the driver cannot make room: the key is not stored
            a.insert(key, hints)
            b.insert(key, hints)
            model.add(key)
        elif kind == "touch":
            a.touch(op[1])
            b.touch(iter(op[1]))
        elif kind == "remove":
            a.remove(op[1])
            b.remove(op[1])
            model.discard(op[1])
        elif kind == "evict":
            _evict_both(a, b, model, op[1], op[2])
        else:
            clock.tick(op[1])
        assert len(a) <= capacity
        _check_same(a, b, model)
    while True:  # both drain in the same order
        victims = _evict_both(a, b, model, 1, frozenset())
        if victims is None:
            break
        _check_same(a, b, model)
    if not a.wants_structure:
        assert len(a) == 0


# -------------------------------------------------------------------- admission

@pytest.fixture(params=ADMISSION.names())
def admission_name(request):
    return request.param


def test_admission_shape(admission_name):
    cls = ADMISSION.get(admission_name)
    assert issubclass(cls, AdmissionPolicy) and isinstance(cls.observes, bool)
    policy = cls(clock=FakeClock())
    for hints in (None, Hints(), Hints(priority=0), Hints(priority=100)):
        assert isinstance(policy.admit(1, hints), bool)
    policy.observe([1, 2, 1])
    policy.observe(iter([]))
    policy.forget(1)
    policy.forget("never seen")
    assert isinstance(policy.admit(1), bool)


def test_admission_unknown_option_is_named(admission_name):
    with pytest.raises(TypeError, match="bogus_option"):
        ADMISSION.get(admission_name)(clock=FakeClock(), bogus_option=1)


def test_admission_is_pure_for_unobserved_keys(admission_name):
    policy = ADMISSION.get(admission_name)(clock=FakeClock())
    if getattr(policy, "remembers_offers", False):
        # declared: an offer is itself a sighting, so not pure; but deterministic from fresh state
        other = ADMISSION.get(admission_name)(clock=FakeClock())
        assert [policy.admit(k) for k in range(5)] == [other.admit(k) for k in range(5)]
        return
    assert [policy.admit(k) for k in range(5)] == [policy.admit(k) for k in range(5)]
