"""prefix's and S3-FIFO's compiled cores and auto's compiled mini feed: whether they run.

    core(name, *args, native=None) -> core or None   a PrefixCore or S3FifoCore (kvbm._native,
                                                     handed out by kvbm.ops) for a new policy;
                                                     None: the Python version runs
    bind(policy, core)                               the policy's verbs become the core's methods
    feeder(minis, ...) -> feed or None               auto's sample and per-mini step compiled,
                                                     where every mini runs a compiled core
    feed_core(minis, ...) -> MiniFeed or None        the object whose feed method feeder gives
    plumbing(policy, native=None) -> AutoPlumb/None  auto's insert_many and touch compiled (the
                                                     per-call plumbing around the mini feed)
    parents_ops(native=None) -> (link, forget)       auto's parents map per call: link(parents,
                                                     keys, hints), forget(parents, victims);
                                                     compiled (kvbm._native's auto_link_parents,
                                                     auto_forget_keys) or the Python ones here

The cores are the same algorithms as policies/prefix.py and policies/s3fifo.py with keys mapped
to integer slots (csrc/prefix_core.cpp, csrc/s3fifo_core.cpp); MiniFeed.feed is auto's _feed
over its minis with its key sample (csrc/auto_core.cpp's MiniFeed). Same victims, same keys, same switches:
tests/test_policy_native_equal.py and tests/test_policy_auto_equal.py replay both versions
against the frozen code. `native`: None = compiled where kvbm._native has it, unless
KVBM_POLICY_NATIVE=0 (or USE = False here); True = require it; False = the Python version.
policies/ imports without the extension.
"""

from __future__ import annotations

import os
from collections import deque
from functools import partial
from itertools import repeat
from operator import attrgetter

USE: bool | None = None  # the default for `native`; tests set it to run either version
_FOUND: dict = {}  # name -> the compiled piece, or False


def _lookup(name):
    found = _FOUND.get(name)
    if found is None:
        found = False
        if os.environ.get("KVBM_POLICY_NATIVE", "1") != "0":
            try:
                from kvbm import ops
            except ImportError:  # policies/ used without the kvbm package around it
                return False
            found = ops.policy_core(name) or False
        _FOUND[name] = found
    return found


def core(name, *args, native=None):
    if native is None:
        native = USE
    if native is False:
        return None
    cls = _lookup(name)
    if not cls:
        if native:
            raise RuntimeError(f"{name}: native=True needs kvbm._native with {name} "
                               "(rebuild: pip install -e .), and KVBM_POLICY_NATIVE not 0")
        return None
    return cls(*args)


_VERBS = ("insert", "insert_many", "touch", "batch_stored", "remove", "evict")


def bind(policy, core):
    """The verbs as the core's own methods (instance attributes): one call into C++ each."""
    policy._core = core
    for verb in _VERBS:
        setattr(policy, verb, getattr(core, verb))


def feeder(minis, kinds, reverse, mix, mask, threshold, capacity, alive, score, differ, native=None):
    """auto's sample and per-mini step compiled (a MiniFeed's feed method) where every mini
    runs a compiled core, else None. kinds: per mini 0 (hitdensity: insert_run), 1 (structured:
    insert_linked), 2 (plain), 3 (auto's real tier standing in for a mini: its keys are asked,
    it is never fed). alive, score, differ: auto's lists, updated in place."""
    feed = feed_core(minis, kinds, reverse, mix, mask, threshold, capacity, alive, score, differ, native)
    return feed.feed if feed is not None else None


def plumbing(policy, native=None):
    """auto's per-call plumbing compiled (an AutoPlumb: its insert_many and touch, _feed's
    bookkeeping inside, over the policy's own attributes) where kvbm._native has it, else None."""
    if native is None:
        native = USE
    if native is False:
        return None
    cls = _lookup("AutoPlumb")
    return cls(policy) if cls else None


def feed_core(minis, kinds, reverse, mix, mask, threshold, capacity, alive, score, differ, native=None):
    """The MiniFeed itself (feeder's object), or None."""
    if native is None:
        native = USE
    if native is False:
        return None
    cls = _lookup("MiniFeed")
    if not cls or any(getattr(m, "_core", None) is None for m in minis):
        return None
    specs = []
    for mini, kind, rev in zip(minis, kinds, reverse):
        c = mini._core
        insert = c.insert_run if kind == 0 else c.insert_linked if kind == 1 else c.insert_many if kind == 2 else None
        specs.append((kind, mini._keys, c, c.touch, c.evict, insert, rev))
    return cls(specs, mix, mask, threshold, capacity, alive, score, differ)


_parent_of = attrgetter("parent")
_drain = partial(deque, maxlen=0)  # run an iterator of calls at C speed


def link_parents(parents, keys, hints):
    """parents.update((k, h.parent) for k, h in zip(keys, hints) if h is not None)."""
    try:  # the usual case, a Hints per key: at C speed (`None in hints` would call
        parents.update(zip(keys, map(_parent_of, hints)))  # Hints.__eq__ per key)
    except AttributeError:  # some are None: those keys are left out
        parents.update((k, h.parent) for k, h in zip(keys, hints) if h is not None)


def forget_keys(parents, victims):
    """parents.pop(v, None) for each victim."""
    _drain(map(parents.pop, victims, repeat(None)))


def parents_ops(native=None):
    """(link, forget) for auto's parents map: compiled where kvbm._native has them (and native
    is not False, nor KVBM_POLICY_NATIVE=0), else the Python versions above; the same dict."""
    if native is None:
        native = USE
    if native is not False:
        link, forget = _lookup("auto_link_parents"), _lookup("auto_forget_keys")
        if link and forget:
            return link, forget
        if native:
            raise RuntimeError("auto: native=True needs kvbm._native with auto_link_parents "
                               "(rebuild: pip install -e .), and KVBM_POLICY_NATIVE not 0")
    return link_parents, forget_keys
