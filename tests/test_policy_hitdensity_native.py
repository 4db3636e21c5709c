"""hitdensity's compiled core (kvbm._native.HitDensityCore, policies/_hitdensity_native.py):
the switch, the fallback, bad keys, and auto's compiled key sample against the Python one.

Decision equality with the Python version and the frozen code is tests/test_policy_auto_equal.py.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from kvbm.policies import _hitdensity_native
from kvbm.policies.hitdensity import HitDensityPolicy

NATIVE = bool(_hitdensity_native._core_class())
needs_native = pytest.mark.skipif(not NATIVE, reason="kvbm._native has no HitDensityCore")


def _run(env_extra: dict) -> str:
    code = ("from kvbm.policies.hitdensity import HitDensityPolicy as H; p = H(4); "
            "p.insert_many([1, 2, 3]); print(type(p._core).__name__, p.evict(1, ()), len(p))")
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True, timeout=120).stdout.strip()


def test_switches_choose_the_version_and_both_decide_alike():
    # KVBM_POLICY_NATIVE=0, or the whole extension off: the Python version, same victim
    python = _run({"KVBM_POLICY_NATIVE": "0"})
    assert python == "NoneType [3] 2"
    assert _run({"KVBM_NATIVE": "0"}) == python
    if NATIVE:
        assert _run({}) == "HitDensityCore [3] 2"


def test_native_true_without_the_core_is_refused(monkeypatch):
    monkeypatch.setattr(_hitdensity_native, "_CLASS", False)
    with pytest.raises(RuntimeError, match="native=True needs kvbm._native"):
        HitDensityPolicy(8, native=True)
    assert HitDensityPolicy(8)._core is None  # the default falls back


@needs_native
def test_an_unhashable_key_raises_as_in_python():
    # the same TypeError at the same point in both versions (insert has advanced the clock)
    native, python = HitDensityPolicy(8, native=True), HitDensityPolicy(8, native=False)
    for policy in (native, python):
        policy.insert_many([1, 2, 3])
        with pytest.raises(TypeError):
            policy.touch([[1]])
        with pytest.raises(TypeError):
            policy.insert([2])
        with pytest.raises(TypeError):
            policy.remove({})
        assert policy.evict(1, {2}) == [3] and len(policy) == 2 and 3 not in policy
    assert native._ghosts == python._ghosts == {3: (0, 1)}  # the run's tail, a ghost of class tail
    assert native._now == python._now == 4 and native.learned() == python.learned()


@needs_native
def test_python_state_views_of_the_core():
    policy = HitDensityPolicy(1000, native=True)
    policy.insert_many(list(range(10)))
    policy.touch([4, 5])
    assert policy.class_of(9) == "tail" and policy.class_of(4) == "once" and policy.class_of(99) is None
    assert policy.class_of(0, detail=True) == "new[8-15]"
    assert policy._class[5] == 14 and policy._now == 10
    assert [len(q) for q in policy._queues][0] == 1 and sum(map(len, policy._queues)) == 10
    assert policy._core.native_bytes() > 0


@pytest.mark.parametrize("seed", range(3))
def test_compiled_key_sample_equals_the_python_one(seed):
    compiled = _hitdensity_native.sampler(native=None)
    if compiled is _hitdensity_native._sample:
        pytest.skip("kvbm._native has no hashed_sample")
    rng = random.Random(seed)
    keys = [rng.randrange(-2**63, 2**63) for _ in range(3000)] + [rng.randrange(2**20) for _ in range(3000)]
    keys += [(rng.random(), "x", i) for i in range(500)] + [os.urandom(8) for _ in range(500)] + [-1, -2, 0]
    for threshold in (0, 1, 1 << 20, int(0.1 * (1 << 32)), 1 << 32):
        want = _hitdensity_native._sample(keys, 2654435761, 0xFFFFFFFF, threshold)
        got = compiled(keys, 2654435761, 0xFFFFFFFF, threshold)
        assert got == want and all(a is b for a, b in zip(got, want))
    assert 0 < len(compiled(keys, 2654435761, 0xFFFFFFFF, 1 << 31)) < len(keys)


@needs_native
def test_a_key_map_written_from_outside_is_refused_not_trusted():
    # `_keys` is the core's own dict (auto asks it `in` at C speed): a value the core did not
    # put there, or a slot in another state, is an error, never an index into its arrays
    policy = HitDensityPolicy(8, native=True)
    policy.insert_many([1, 2, 3])
    assert policy.evict(1, ()) == [3]
    policy._keys[99] = 7  # no slot 7
    with pytest.raises(RuntimeError, match="changed from outside"):
        policy.touch([99])
    policy._keys[98] = 0  # slot 0 holds key 3 (the run's tail, stored first), a ghost now
    with pytest.raises(RuntimeError, match="changed from outside"):
        policy.remove(98)
    del policy._keys[99], policy._keys[98]
    assert policy.evict(2, ()) == [2, 1] and len(policy) == 0
