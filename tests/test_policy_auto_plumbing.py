"""auto's compiled per-call plumbing (csrc/auto_core.cpp's AutoPlumb) equals its Python methods.

AutoPlumb runs auto's insert_many, touch, evict and _feed's bookkeeping in C++ over the policy's own
attributes. Two autos with the same compiled minis get the same random calls, one with the
plumbing and one with the Python methods (policies/auto.py); after every call the state the
plumbing keeps must be equal, value for value (request key lists, counters, the parents map
in order, scores, switches), and every evict must give the same victims. The frozen-code
replays (tests/test_policy_auto_equal.py) check the decisions against the old code too.
"""

from __future__ import annotations

import gc
import random
import weakref

import pytest

from kvbm.policies import _policy_native
from kvbm.policies.auto import AutoPolicy
from kvbm.policies.base import Hints

STATE = ("_stored_last", "_structured", "_new_request", "_req", "_req_len", "_last", "_window", "_seen",
         "_next_check", "_score", "_differ", "_alive", "switches", "active", "_active_index")


def _plumbed():
    if not _policy_native._lookup("AutoPlumb"):
        pytest.skip("kvbm._native has no AutoPlumb (not built, or KVBM_POLICY_NATIVE=0)")


def _pair(monkeypatch, capacity, **kw):
    """(auto with the compiled plumbing, auto with the Python methods), the same compiled minis."""
    plumbed = AutoPolicy(capacity, **kw)
    for verb in ("insert_many", "touch", "evict"):
        assert type(plumbed.__dict__.get(verb)).__name__ == "nb_bound_method", verb
    with monkeypatch.context() as m:
        m.setattr(_policy_native, "plumbing", lambda policy, native=None: None)
        python = AutoPolicy(capacity, **kw)
    assert "insert_many" not in python.__dict__ and "evict" not in python.__dict__
    assert python._feed_core is not None
    return plumbed, python


def _same(a, b):
    for name in STATE:
        assert getattr(a, name) == getattr(b, name), name
    assert type(a._window) is type(b._window) and type(a._seen) is type(b._seen)
    assert list(a._parents.items()) == list(b._parents.items())
    assert len(a) == len(b)


def _calls(rng, steps, universe):
    """Random calls as the manager and the simulator make them: runs of keys with parents,
    structured or not, tuples, generators, touches, evicts with protected keys, removals."""
    chain_end = None
    for _ in range(steps):
        r = rng.random()
        if r < 0.45:
            n = rng.randint(1, 12)
            if rng.random() < 0.3 or chain_end is None:
                parent = None
            else:
                parent = chain_end if rng.random() < 0.8 else rng.randrange(universe)
            keys = [rng.randrange(universe) for _ in range(n)]
            form = rng.random()
            if form < 0.6:
                hints = [Hints(parent=parent if i == 0 else keys[i - 1]) for i in range(n)]
                if rng.random() < 0.1:
                    hints[rng.randrange(n)] = None
            elif form < 0.8:
                hints = Hints(parent=parent)
            else:
                hints = None
            chain_end = keys[-1]
            shape = rng.random()
            yield ("insert_many", tuple(keys) if shape < 0.2 else keys, hints)
        elif r < 0.7:
            keys = [rng.randrange(universe) for _ in range(rng.randint(0, 8))]
            yield ("touch", tuple(keys) if rng.random() < 0.2 else keys)
        elif r < 0.92:
            protected = {rng.randrange(universe) for _ in range(rng.randint(0, 3))}
            yield ("evict", rng.randint(1, 6), protected)
        elif r < 0.97:
            yield ("remove", rng.randrange(universe))
        else:
            yield ("insert", rng.randrange(universe), None if rng.random() < 0.5 else Hints(parent=None))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("capacity,slots", [(12, 1024), (40, 1024), (40, 8)])
def test_plumbing_equals_the_python_methods(monkeypatch, seed, capacity, slots):
    _plumbed()
    a, b = _pair(monkeypatch, capacity, sample_slots=slots)
    for p in (a, b):  # choose often, so switches (and the swaps at rate 1) happen
        p._check = p._next_check = 16
    rng = random.Random(seed)
    for call in _calls(rng, 1500, universe=capacity * 3):
        verb, *args = call
        if verb == "insert_many" and not isinstance(args[0], list) and rng.random() < 0.5:
            gen_a, gen_b = iter(list(args[0])), iter(list(args[0]))  # any iterable of keys
            a.insert_many(gen_a, args[1])
            b.insert_many(gen_b, args[1])
        elif verb == "evict":
            assert a.evict(*args) == b.evict(*args)
        elif verb == "touch" and rng.random() < 0.2:
            a.touch(iter(args[0]))
            b.touch(iter(args[0]))
        else:
            getattr(a, verb)(*args)
            getattr(b, verb)(*args)
        _same(a, b)
    assert a._seen > 100


def test_empty_hints_list_raises_as_python_does(monkeypatch):
    _plumbed()
    a, b = _pair(monkeypatch, 8)
    for p in (a, b):
        with pytest.raises(IndexError):
            p.insert_many([1, 2], [])
    _same(a, b)


def test_plumbing_does_not_keep_its_policy_alive():
    _plumbed()
    p = AutoPolicy(16)
    ref, insert_many = weakref.ref(p), p.insert_many
    del p
    gc.collect()
    assert ref() is None  # no cycle through the plumbing
    with pytest.raises(ReferenceError):
        insert_many([1, 2, 3], None)


def test_a_subclass_that_overrides_feed_keeps_the_python_methods():
    class Quiet(AutoPolicy):
        def _feed(self, keys, stored):
            pass

    q = Quiet(16)
    assert not {"insert_many", "touch", "evict"} & set(q.__dict__)
    q.insert_many([1, 2, 3], None)
    assert q._seen == 0 and len(q) == 3


class _Plain:  # `parent` a plain attribute: no slot to read at an offset
    def __init__(self, parent):
        self.parent = parent


class _Prop:
    @property
    def parent(self):
        return "p"


class _Sub(Hints):  # a Hints subclass: its own type, the same slot
    pass


def test_compiled_parent_read_equals_getattr():
    """auto_link_parents reads Hints.parent from its slot; other objects through getattr."""
    from kvbm import ops

    link = ops.policy_core("auto_link_parents")
    if not link:
        pytest.skip("kvbm._native has no auto_link_parents")
    hints = [Hints(parent=1), _Plain(2), Hints(parent=None), _Prop(), _Sub(parent=5), Hints(parent=(6, 7)),
             Hints(parent=8)]
    got = {}
    link(got, list(range(len(hints))), hints)
    assert list(got.items()) == [(i, h.parent) for i, h in enumerate(hints)]
