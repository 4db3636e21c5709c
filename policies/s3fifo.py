"""S3-FIFO: a small probationary FIFO, a main FIFO with reinsertion, and a ghost FIFO.

Yang, Zhang, Qiu, Yue and Vinayak, "FIFO queues are all you need for cache eviction", SOSP'23.
Most keys are one-hit wonders; the small queue lets them go quickly without disturbing the
main queue, where keys with a history stay.

    S        small FIFO, ~10% of capacity (small_ratio); new keys enter here
    M        main FIFO, the rest; keys enter from S (accessed while in S) or from G
    G        ghost FIFO of keys evicted from S, as many as M holds (ghost_ratio of capacity)
    freq     2 bits per resident key: a hit adds 1, capped at 3
    insert   into M if the key is a ghost in G, else into S
    evict    while |S| >= its target (or M is empty) take S's oldest: freq >= move_to_main_threshold
             moves it to M with freq 0, else it is the victim and its key joins G; otherwise
             take M's oldest: freq > 0 reinserts it with freq - 1, else it is the victim

Protected keys (being read or written) met while searching are parked beside the queues (still
tracked, touched and counted) and return to the new end of their queue, as a reinsertion would,
once a later evict() finds them unprotected; the parked keys are looked at again only after as
many victims as there are parked keys (or when the queues run dry), so the check is O(1) per
victim. Putting them back at the old end made every evict() of a long store, whose earlier
blocks stay protected until it completes, walk past all of them again: quadratic, 10-30x LRU's
replay time on agent sessions of 10,000+-block requests.
evict() first checks that enough unprotected keys exist; after that it cannot fail, so a
None leaves everything as it was.

Where kvbm._native is built, the per-key state and every verb run compiled
(policies/_policy_native.py, csrc/s3fifo_core.hpp: keys -> slots through two dicts, the four
queues as linked lists over arrays); native=False or KVBM_POLICY_NATIVE=0 runs the Python code
below, with the same victims (tests/test_policy_native_equal.py). Cost (bench/RESULTS.md,
"Policy cost per operation", CPU time of recorded Mooncake calls at 10,000 blocks): 0.8-1.1x LRU
per block access compiled; 5.4x in Python.
"""

from __future__ import annotations

from collections import OrderedDict

from . import _policy_native
from .base import EvictionPolicy


class S3FIFOPolicy(EvictionPolicy):
    name = "s3fifo"

    def __init__(self, capacity, *, small_ratio=0.1, ghost_ratio=0.9, move_to_main_threshold=1, native=None,
                 **kw):
        super().__init__(capacity, **kw)
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"s3fifo policy: capacity={capacity!r} must be an int >= 0 (it sizes the queues)")
        if not 0 < small_ratio < 1:
            raise ValueError(f"s3fifo policy: small_ratio={small_ratio!r} must be in (0, 1); the paper uses 0.1")
        if not 0 <= ghost_ratio <= 4:
            raise ValueError(f"s3fifo policy: ghost_ratio={ghost_ratio!r} must be in [0, 4]; the paper uses 0.9")
        if move_to_main_threshold not in (1, 2, 3):
            raise ValueError(f"s3fifo policy: move_to_main_threshold={move_to_main_threshold!r} must be 1, 2 or 3")
        self.small_target = max(1, round(capacity * small_ratio))
        self.ghost_size = round(capacity * ghost_ratio)
        self.threshold = move_to_main_threshold
        # native: the compiled core (policies/_policy_native.py, csrc/s3fifo_core.cpp), the
        # same decisions; native=False, or KVBM_POLICY_NATIVE=0, runs the code below
        core = _policy_native.core("S3FifoCore", self.small_target, self.ghost_size, self.threshold,
                                   native=native)
        if core is not None:
            _policy_native.bind(self, core)
            self._keys = core.resident()  # resident key -> slot: `in` and len() at C speed
            return
        self._core = None
        self._small: OrderedDict = OrderedDict()  # key -> freq, oldest first
        self._main: OrderedDict = OrderedDict()
        self._ghost: OrderedDict = OrderedDict()
        # protected keys met by evict, set aside: key -> [in small, freq]; still tracked
        self._parked: dict = {}
        self._since_check = 0  # victims since the parked keys were last looked at

    def insert(self, key, hints=None):
        if key in self._small or key in self._main or key in self._parked:
            self.touch((key,))
        elif self._ghost.pop(key, _NONE) is not _NONE:
            self._main[key] = 0
        else:
            self._small[key] = 0

    def touch(self, keys):
        small, main = self._small, self._main
        for key in keys:
            queue = small if key in small else main if key in main else None
            if queue is not None:
                if queue[key] < 3:
                    queue[key] += 1
            elif self._parked:
                entry = self._parked.get(key)
                if entry is not None and entry[1] < 3:
                    entry[1] += 1

    def remove(self, key):
        self._small.pop(key, None)
        self._main.pop(key, None)
        self._ghost.pop(key, None)
        self._parked.pop(key, None)

    def evict(self, n, protected=()):
        if n <= 0:
            return []
        if protected and not isinstance(protected, (set, frozenset, dict)):
            protected = set(protected)
        if len(self) - len(protected) < n:  # rarely: count only the protected keys held here
            if len(self) - sum(1 for key in protected if key in self) < n:
                return None
        small, main, ghost, parked = self._small, self._main, self._ghost, self._parked
        if parked and self._since_check >= len(parked):
            self._unpark(protected)
        victims = []
        while len(victims) < n:
            if not small and not main:  # the rest are parked: some must be free by now
                self._unpark(protected)
            if small and (len(small) >= self.small_target or not main):
                key, freq = small.popitem(last=False)
                if key in protected:
                    parked[key] = [True, freq]
                elif freq >= self.threshold:
                    main[key] = 0
                else:
                    victims.append(key)
                    ghost[key] = None
                    if len(ghost) > self.ghost_size:
                        ghost.popitem(last=False)
            else:
                key, freq = main.popitem(last=False)
                if key in protected:
                    parked[key] = [False, freq]
                elif freq > 0:
                    main[key] = freq - 1
                else:
                    victims.append(key)
        self._since_check += n
        return victims

    def _unpark(self, protected):
        """Parked keys no longer protected go back to the new end of their queue."""
        self._since_check = 0
        back = [(k, e) for k, e in self._parked.items() if k not in protected]
        for key, (in_small, freq) in back:
            del self._parked[key]
            (self._small if in_small else self._main)[key] = freq

    def __len__(self):
        if self._core is not None:
            return len(self._keys)
        return len(self._small) + len(self._main) + len(self._parked)

    def __contains__(self, key):
        if self._core is not None:
            return key in self._keys
        return key in self._small or key in self._main or key in self._parked

    def __getattr__(self, name):  # only names not set: the compiled core's state, on demand
        core = self.__dict__.get("_core")
        if core is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        queues = ("_small", "_main", "_ghost", "_parked")
        if name in queues:  # copies, in queue order (parked: key -> [came from small, freq])
            return core.queue(queues.index(name))
        if name == "_since_check":
            return core.since_check()
        raise AttributeError(name)


_NONE = object()
