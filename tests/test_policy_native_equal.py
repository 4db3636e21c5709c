"""prefix's and S3-FIFO's compiled cores decide exactly as their Python versions: victim for victim.

Each test drives a twin (tests/test_policy_auto_equal.py's _Twin): the frozen Python code
(tests/frozen_policies/prefix.py and s3fifo.py, the code before the cores) and the current
policy, which runs its compiled core (csrc/prefix_core.cpp, csrc/s3fifo_core.cpp, via
policies/_policy_native.py) or its Python version (the `impl` fixture). Every evict() must
return the same victims in the same order (or None in both), and both must hold the same keys.

- fuzz: random calls at tiny capacities: runs stored with parents (also a key's own parent,
  parents never tracked, a hint of None among them), touches, removals of inner blocks,
  evicts that fail (None), protected keys as sets and as lists, evict(0), batch_stored.
- Mooncake: the bundled trace at the policy level at 1,000 blocks, as the cost bench records it.
- auto with its default minis (prefix, s3fifo, hitdensity all compiled: its mini feed runs in
  csrc/auto_core.cpp) against the frozen auto, with checks every 32 sampled accesses.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from kvbm.policies import _hitdensity_native, _policy_native
from kvbm.policies.base import Hints
from kvbm.policies.prefix import PrefixPolicy
from kvbm.policies.s3fifo import S3FIFOPolicy
from kvbm.registry import EVICTION

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from frozen_policies.prefix import PrefixPolicy as FrozenPrefix  # noqa: E402
from frozen_policies.s3fifo import S3FIFOPolicy as FrozenS3FIFO  # noqa: E402
from test_policy_auto_equal import TwinAuto, _fuzz, _Twin  # noqa: E402


class TwinPrefix(_Twin):
    name = "twin-prefix"
    wants_structure = True
    OLD, NEW = FrozenPrefix, PrefixPolicy


class TwinS3FIFO(_Twin):
    name = "twin-s3fifo"
    OLD, NEW = FrozenS3FIFO, S3FIFOPolicy


@pytest.fixture(params=["native", "python"])
def impl(request, monkeypatch):
    """prefix and s3fifo (and auto's minis) as compiled cores or in Python."""
    native = request.param == "native"
    if native and not (_policy_native._lookup("PrefixCore") and _policy_native._lookup("S3FifoCore")):
        pytest.skip("kvbm._native has no PrefixCore/S3FifoCore (not built, or KVBM_POLICY_NATIVE=0)")
    monkeypatch.setattr(_policy_native, "USE", native)
    monkeypatch.setattr(_hitdensity_native, "USE", native if _hitdensity_native._core_class() else False)
    assert (PrefixPolicy(8)._core is not None) == native
    assert (S3FIFOPolicy(8)._core is not None) == native
    return request.param


def _same_keys(twin, universe):
    assert [k for k in range(universe) if k in twin.old] == [k for k in range(universe) if k in twin.new]
    assert len(twin.old) == len(twin.new)


def _fuzz_structured(cls, seed, capacity, steps=2500):
    """Random calls with rich hints; every answer compared by the twin."""
    rng = random.Random(seed)
    twin = cls(capacity)
    universe = 3 * capacity + 6
    failed = 0
    for step in range(steps):
        op = rng.random()
        resident = [k for k in range(universe) if k in twin.new]
        if op < 0.4:  # a request: hits touched, misses stored as a run with parents
            start = rng.randrange(universe)
            keys = [(start + i) % universe for i in range(rng.randint(1, capacity + 2))]
            hit = [k for k in keys if k in twin]
            if hit:
                twin.touch(hit)
            new = [k for k in keys if k not in twin]
            if not new:
                continue
            room = len(twin) + len(new) - capacity
            protected = rng.sample(hit, rng.randint(0, len(hit))) if hit and rng.random() < 0.5 else ()
            if rng.random() < 0.5:
                protected = set(protected)
            if room > 0 and twin.evict(room, protected) is None:
                failed += 1
                continue
            hints, parent = [], (keys[keys.index(new[0]) - 1] if keys.index(new[0]) else None)
            for k in new:
                r = rng.random()
                if r < 0.05:
                    hints.append(None)
                elif r < 0.1:
                    hints.append(Hints(parent=k))  # its own parent: a root
                elif r < 0.15:
                    hints.append(Hints(parent=10 * universe + rng.randrange(4)))  # never tracked
                else:
                    hints.append(Hints(parent=parent))
                parent = k
            if rng.random() < 0.2:
                twin.insert_many(new, Hints(parent=rng.choice([None, rng.randrange(universe)])))
            elif rng.random() < 0.2:
                for k, h in zip(new, hints):
                    twin.insert(k, h)
                twin.batch_stored(new)
            else:
                twin.insert_many(new, hints)
        elif op < 0.55 and resident:
            twin.touch(rng.sample(resident, rng.randint(1, min(6, len(resident)))) + [universe * 7])
        elif op < 0.68 and resident:
            twin.remove(rng.choice(resident))
        elif op < 0.72:
            twin.remove(rng.randrange(universe, 2 * universe))  # never tracked
        elif op < 0.92:  # an evict that may fail (None: nothing changes)
            protected = rng.sample(resident, rng.randint(0, len(resident))) if resident else []
            if rng.random() < 0.5:
                protected = set(protected)
            if twin.evict(rng.randint(0, capacity // 2 + 2), protected) is None:
                failed += 1
        else:
            twin.insert(rng.randrange(universe, 2 * universe), rng.choice([None, Hints()]))
        if step % 50 == 0:
            _same_keys(twin, 2 * universe)
    _same_keys(twin, 2 * universe)
    return twin, failed


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("capacity", [2, 9, 40])
@pytest.mark.parametrize("cls", [TwinPrefix, TwinS3FIFO])
def test_fuzzed_calls_give_the_same_victims(impl, cls, seed, capacity):
    twin, failed = _fuzz_structured(cls, seed, capacity)
    assert twin.victims > 0 and failed > 0  # victims compared, and evicts that returned None


def test_prefix_state_reads_match_the_python_version(impl):
    """The compiled core's state, read as the Python version's attributes (tests, notebooks)."""
    p = PrefixPolicy(8)
    p.insert_many(["a", "b", "c"], [Hints(parent=None), Hints(parent="a"), Hints(parent="b")])
    p.remove("b")  # an inner block: its child stays, orphaned but counted
    assert dict(p._seq) == {"a": 1, "c": 3} and "b" not in p and len(p) == 2
    assert {k: len(v) if isinstance(v, set) else v for k, v in p._children.items()} == {"b": 1}
    assert p.evict(2, ()) == ["a", "c"] and len(p) == 0


def test_s3fifo_state_reads_match_the_python_version(impl):
    p = S3FIFOPolicy(10)
    for k in range(4):
        p.insert(k)
    p.touch([1, 1, 2])
    # 0 protected: parked; 1 and 2 (accessed) to main; 3 evicted into the ghosts; then main's 1
    assert p.evict(2, {0}) == [3, 1]
    assert dict(p._small) == {} and dict(p._main) == {2: 0} and dict(p._parked) == {0: [True, 0]}
    assert list(p._ghost) == [3] and len(p) == 2 and 0 in p and 3 not in p


@pytest.fixture
def twins(impl):
    _Twin.made = []
    for cls in (TwinPrefix, TwinS3FIFO):
        EVICTION.register(cls.name, cls, clobber=True)
    yield _Twin.made
    _Twin.made = None
    for cls in (TwinPrefix, TwinS3FIFO):
        EVICTION._loaded.pop(cls.name, None)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["prefix", "s3fifo"])
def test_mooncake_calls_give_the_same_victims(twins, policy):
    from bench_policy_cost import record
    from kvbm.cli import BUNDLED
    from kvbm.sim.traces import load_trace

    trace = [r.hash_ids for r in load_trace(BUNDLED["mooncake"]).requests]
    calls, accesses, ratio = record(f"twin-{policy}", trace, 1000)
    assert accesses == 288_500 and twins[0].victims > 200_000


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("capacity", [5, 40])
def test_fuzzed_calls_give_the_same_victims_auto_default_minis(impl, seed, capacity):
    twin = _fuzz(TwinAuto, seed, capacity, sample_slots=capacity // 2 + 1, check=32)
    assert twin.victims > 0
    assert (twin.new._feeder is not None) == (impl == "native" and bool(_hitdensity_native._core_class()))


# ---------------------------------------------------------------- auto's parents map per call


class _NoParent:
    pass


@pytest.mark.parametrize("seed", range(5))
def test_compiled_parents_map_upkeep_equals_the_python_one(seed):
    """auto_link_parents / auto_forget_keys (kvbm._native) against policies/_policy_native.py's
    Python versions: the same dict (order included), None hints skipped, zip's shorter length,
    victims not in the map left alone, a hint without `parent` raising after the keys before it."""
    from kvbm import ops

    link, forget = ops.policy_core("auto_link_parents"), ops.policy_core("auto_forget_keys")
    if not (link and forget):
        pytest.skip("kvbm._native has no auto_link_parents (not built, or KVBM_POLICY_NATIVE=0)")
    rng = random.Random(seed)
    compiled, python = {}, {}
    for _ in range(300):
        keys = [rng.randrange(200) for _ in range(rng.randint(0, 30))]
        if rng.random() < 0.3:
            keys = tuple(keys)
        hints = [None if rng.random() < 0.2 else Hints(parent=rng.choice([None, rng.randrange(200)]))
                 for _ in range(len(keys) + rng.randint(-3, 3))]
        link(compiled, keys, hints)
        _policy_native.link_parents(python, keys, hints)
        assert list(compiled.items()) == list(python.items())
        victims = rng.sample(range(250), rng.randint(0, 40))
        forget(compiled, victims)
        _policy_native.forget_keys(python, victims)
        assert list(compiled.items()) == list(python.items())
    bad = [Hints(parent=1), _NoParent(), Hints(parent=2)]
    for f, d in ((link, compiled), (_policy_native.link_parents, python)):
        with pytest.raises(AttributeError):
            f(d, [1001, 1002, 1003], bad)
    assert list(compiled.items()) == list(python.items()) and compiled[1001] == 1
