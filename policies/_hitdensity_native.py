"""hitdensity's compiled core: whether it runs, and the policy's verbs bound to it.

    core(capacity, native=None) -> core or None   a HitDensityCore (kvbm._native, handed out by
                                                  kvbm.ops) for a new policy; None: the Python
                                                  version runs
    bind(policy, core)                            the policy's verbs become the core's methods
    sampler(native=None) -> f(keys, mix, mask, threshold)
                                                  auto's key sample, [k for k in keys if
                                                  (hash(k) * mix) & mask < threshold]: compiled
                                                  where kvbm._native has it, else C-level maps
    read(core, name)                              the Python version's attributes (_now, _ghosts,
                                                  _class, _queues, tables...) of a bound policy

The core is the same algorithm as policies/hitdensity.py with keys mapped to integer slots
(two dicts: resident and ghost keys), queues and ghosts as linked lists over arrays, and the
table update and evict loop compiled: the same victims and tables, float for float
(tests/test_policy_auto_equal.py replays both against the frozen code). `native`: None = the
core where kvbm._native has it, unless KVBM_POLICY_NATIVE=0 (or USE = False here); True =
require it; False = the Python version. policies/ imports without the extension.
"""

from __future__ import annotations

import os
from itertools import compress, repeat
from operator import and_, lt, mul

USE: bool | None = None  # the default for `native`; tests set it to run auto's minis either way
_CLASS = None  # HitDensityCore once looked up; False: not there (or turned off)
_SAMPLE = None  # the compiled hashed_sample, or False


def _core_class():
    global _CLASS
    if _CLASS is None:
        _CLASS = False
        if os.environ.get("KVBM_POLICY_NATIVE", "1") != "0":
            try:
                from kvbm import ops
            except ImportError:  # policies/ used without the kvbm package around it
                return False
            _CLASS = ops.hitdensity_core() or False
    return _CLASS


def _native_sample():
    global _SAMPLE
    if _SAMPLE is None:
        _SAMPLE = False
        if _core_class():  # the same switch and the same build
            from kvbm import ops

            _SAMPLE = ops.hashed_sample() or False
    return _SAMPLE


def _sample(keys, mix, mask, threshold):
    """hashed_sample in Python, at C speed through maps: hash, times mix, masked, compared."""
    return list(compress(keys, map(lt, map(and_, map(mul, map(hash, keys), repeat(mix)), repeat(mask)),
                                   repeat(threshold))))


def sampler(native=None):
    if native is None:
        native = USE
    return (native is not False and _native_sample()) or _sample


def core(capacity, native=None):
    if native is None:
        native = USE
    if native is False:
        return None
    cls = _core_class()
    if not cls:
        if native:
            raise RuntimeError("hitdensity: native=True needs kvbm._native with HitDensityCore "
                               "(rebuild: pip install -e .), and KVBM_POLICY_NATIVE not 0")
        return None
    return cls(capacity)


def bind(policy, core):
    """The verbs as the core's own methods (instance attributes): one call into C++ each."""
    policy._core = core
    policy._keys = core.resident()  # resident key -> slot: `in` and len() at C speed
    policy.insert = core.insert
    policy.insert_many = core.insert_many
    policy.insert_run = core.insert_run
    policy.batch_stored = core.batch_stored
    policy.touch = core.touch
    policy.remove = core.remove
    policy.evict = core.evict
    policy._score = core.score
    policy._update = core.update


def read(core, name):
    """The Python version's attributes that tests and notebooks read, built on demand."""
    if name == "_now":
        return core.now()
    if name == "_updates":
        return core.updates()
    if name == "_ghosts":  # key -> (class, last access), oldest first
        return {k: (c, last) for k, c, last in core.ghosts()}
    if name == "_class":
        return core.classes()
    if name == "_queues":  # per class: key -> last access, in queue order
        return core.queues()
    if name == "_ghost_epochs":
        return core.epochs()
    if name == "_ongoing":
        return core.ongoing
    if name in ("_max_ghosts", "_shift"):
        return getattr(core, name[1:])()
    if name in ("_reuses", "_ends", "_index", "_rise"):
        return core.table(("_reuses", "_ends", "_index", "_rise").index(name))
    raise AttributeError(name)
