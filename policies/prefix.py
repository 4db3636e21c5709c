"""Prefix-aware, leaf first: evict only blocks with no cached children, least recently used first.

A block's KV is usable only behind its whole prefix, so a parent evicted before its children
strands them: every child becomes a dead block. Radix-tree caches therefore evict leaves
only, LRU among leaves (SGLang's RadixAttention: Zheng et al., "SGLang: Efficient Execution of
Structured Language Model Programs", NeurIPS'24; TensorRT-LLM: "only leaf blocks can be
evicted"). Evicting a leaf may turn its parent into a leaf, evictable in the same call.

    structure  Hints.parent links each block to the previous block of its sequence; a child
               counts while it is in this tier, whether or not its parent is
    leaf       a tracked block with no tracked children; leaves live in a min-heap on their
               last access (lazy deletion), so a parent that becomes a leaf keeps its own age
    remove     of an inner block leaves its children as orphans: still tracked, evictable as
               leaves; if the parent comes back it is an inner block again
    evict      leaves oldest first; when no unprotected leaf is left, the oldest unprotected
               inner blocks (as a remove would: their children stay, orphans). Without that,
               parents linked in a cycle (A's parent B, B's parent A: a client names parents)
               or the ancestors of pinned leaves could never be evicted, and a tenant could
               fill a tier that every other store then finds without room. None only when
               fewer than n keys are unprotected; atomic (a failed search undoes its evictions)

Where kvbm._native is built, the per-key state and every verb run compiled
(policies/_policy_native.py, csrc/prefix_core.hpp: keys -> slots through two dicts, the same
(seq, slot) heap); native=False or KVBM_POLICY_NATIVE=0 runs the Python code below, with the
same victims (tests/test_policy_native_equal.py). Cost (bench/RESULTS.md, "Policy cost per
operation", CPU time of recorded Mooncake calls at 10,000 blocks): 1.4x LRU per block access
compiled; 17x in Python.
"""

from __future__ import annotations

from heapq import heapify, heappop, heappush

from . import _policy_native
from .base import EvictionPolicy


class PrefixPolicy(EvictionPolicy):
    name = "prefix"
    wants_structure = True

    def __init__(self, capacity, *, native=None, **kw):
        super().__init__(capacity, **kw)
        # native: the compiled core (policies/_policy_native.py, csrc/prefix_core.cpp), the
        # same decisions; native=False, or KVBM_POLICY_NATIVE=0, runs the code below
        core = _policy_native.core("PrefixCore", native=native)
        if core is not None:
            _policy_native.bind(self, core)
            self.insert_linked = core.insert_linked
            self._keys = core.tracked()  # tracked key -> slot: `in` and len() at C speed
            return
        self._core = None
        self._parent: dict = {}  # tracked key -> its parent key (or None)
        self._seq: dict = {}  # tracked key -> last access seq
        self._children: dict = {}  # parent key (tracked or not) -> set of tracked children
        self._heap: list = []  # (seq, key); a candidate iff key is a tracked leaf with this seq
        self._clock_seq = 0
        self._keys = self._seq  # the tracked keys (auto asks them `in` at C speed)

    def _push(self, key) -> None:
        heappush(self._heap, (self._seq[key], key))
        if len(self._heap) > 2 * len(self._seq) + 1024:
            self._heap = [(s, k) for k, s in self._seq.items() if k not in self._children]
            heapify(self._heap)

    def _link(self, key, parent) -> None:
        self._parent[key] = parent
        if parent is not None:
            self._children.setdefault(parent, set()).add(key)

    def _unlink(self, key) -> object:
        """Forget key's edge to its parent; return the parent if it just became a tracked leaf."""
        parent = self._parent.pop(key)
        if parent is None:
            return None
        siblings = self._children[parent]
        siblings.discard(key)
        if siblings:
            return None
        del self._children[parent]
        return parent if parent in self._seq else None

    def insert(self, key, hints=None):
        parent = hints.parent if hints is not None and hints.parent != key else None
        if key in self._seq:
            leaf = self._unlink(key)
            if leaf is not None:
                self._push(leaf)
        self._link(key, parent)
        self._clock_seq += 1
        self._seq[key] = self._clock_seq
        if key not in self._children:
            self._push(key)

    def touch(self, keys):
        seqs, children = self._seq, self._children
        for key in keys:
            if key in seqs:
                self._clock_seq += 1
                seqs[key] = self._clock_seq
                if key not in children:
                    self._push(key)

    def remove(self, key):
        if key in self._seq:
            del self._seq[key]
            leaf = self._unlink(key)
            if leaf is not None:
                self._push(leaf)

    def evict(self, n, protected=()):
        if n <= 0:
            return []
        if protected and not isinstance(protected, (set, frozenset, dict)):
            protected = set(protected)
        heap, seqs, children = self._heap, self._seq, self._children
        victims, skipped, undo = [], [], []
        while heap and len(victims) < n:
            item = heappop(heap)
            seq, key = item
            if seqs.get(key) != seq or key in children:
                continue  # stale: touched, evicted, removed, or it has children again
            if key in protected:
                skipped.append(item)
                continue
            victims.append(key)
            undo.append((key, self._parent[key], seq))
            del seqs[key]
            leaf = self._unlink(key)
            if leaf is not None:
                heappush(heap, (seqs[leaf], leaf))
        if len(victims) < n:  # no unprotected leaf left: the oldest unprotected inner blocks
            inner = [(seq, key) for key, seq in seqs.items() if key not in protected]
            if len(victims) + len(inner) >= n:
                inner.sort()
                for seq, key in inner[:n - len(victims)]:
                    victims.append(key)
                    undo.append((key, self._parent[key], seq))
                    del seqs[key]
                    leaf = self._unlink(key)
                    if leaf is not None:
                        heappush(heap, (seqs[leaf], leaf))
        if len(victims) < n:
            for key, parent, seq in reversed(undo):
                self._link(key, parent)
                seqs[key] = seq
                skipped.append((seq, key))
        for item in skipped:
            heappush(heap, item)
        return victims if len(victims) == n else None

    def insert_linked(self, keys, parents):
        """keys with their parents as keys (auto's structured mini): insert(k, Hints(parent=p))."""
        for key, parent in zip(keys, parents):
            self.insert(key, _Link(parent))

    def __len__(self):
        return len(self._keys)

    def __contains__(self, key):
        return key in self._keys

    def __getattr__(self, name):  # only names not set: the compiled core's state, on demand
        core = self.__dict__.get("_core")
        if core is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        if name == "_seq":
            return core.seqs()
        if name == "_children":  # parent -> how many tracked children (the Python version: a set)
            return core.children()
        if name == "_clock_seq":
            return core.clock()
        raise AttributeError(name)


class _Link:
    __slots__ = ("parent",)

    def __init__(self, parent):
        self.parent = parent
