"""A compiled fast path for large single-tier LRU/FIFO sweeps (numba), same results as the manager.

    available() -> bool                     numba importable
    replay_counts(trace, policy, capacity)  (block_hits, prefix_hits) under the replay semantics

The replay semantics are those of kvbm.sim.replay (and ../shared/traces/README.md): look every
block of a request up, then bring them in request order, touching hits and inserting misses
(a request with more new blocks than the tier holds stores none of them, as the manager's
all-or-nothing store does).
For LRU and FIFO the manager's "make room for a run, then insert it" evicts exactly the blocks
"insert, then evict one" does, so the counts are equal (tests/test_sim_fast.py checks it).
Keys become dense integers once per trace; the cache is a doubly linked list in arrays.
"""

from __future__ import annotations

import numpy as np

from .traces import Trace

POLICIES = ("lru", "fifo")
_KERNEL = None


def available() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def _dense(trace: Trace) -> tuple[np.ndarray, np.ndarray, int]:
    cached = getattr(trace, "_kvbm_dense", None)
    if cached is not None:
        return cached
    lengths = np.fromiter((len(r.hash_ids) for r in trace.requests), dtype=np.int64, count=len(trace.requests))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((k for r in trace.requests for k in r.hash_ids), dtype=object, count=int(offsets[-1]))
    _, ids = np.unique(flat.astype(np.int64) if _all_int(trace) else flat.astype(str), return_inverse=True)
    out = (ids.astype(np.int64), offsets, int(ids.max()) + 1 if len(ids) else 0)
    try:
        object.__setattr__(trace, "_kvbm_dense", out)
    except (AttributeError, TypeError):  # slotted or frozen traces: just recompute next time
        pass
    return out


def _all_int(trace: Trace) -> bool:
    return all(isinstance(k, (int, np.integer)) for r in trace.requests[:100] for k in r.hash_ids)


def _kernel():
    global _KERNEL
    if _KERNEL is None:
        import numba

        @numba.njit(cache=False, nogil=True)
        def replay(ids, offsets, n_ids, capacity, touch_moves):
            prev = np.full(n_ids, -1, np.int64)
            nxt = np.full(n_ids, -1, np.int64)
            present = np.zeros(n_ids, np.bool_)
            head = -1  # next victim
            tail = -1  # most recently inserted (or touched, for LRU)
            size = 0
            block_hits = 0
            prefix_hits = 0
            for r in range(len(offsets) - 1):
                s, e = offsets[r], offsets[r + 1]
                n = 0  # this request's prefix hits
                hits = 0
                for i in range(s, e):
                    if present[ids[i]]:
                        hits += 1
                        if n == i - s:
                            n += 1
                block_hits += hits
                prefix_hits += n
                # The manager loads the prefix (touches), then stores the rest all or nothing:
                # a store needing more new slots than the tier has is refused whole.
                stop = s + n if (e - s) - hits > capacity else e
                for i in range(s, stop):
                    k = ids[i]
                    if present[k]:
                        if touch_moves and k != tail:  # unlink, append at the tail
                            p, q = prev[k], nxt[k]
                            if p >= 0:
                                nxt[p] = q
                            else:
                                head = q
                            prev[q] = p  # q exists: k is not the tail
                            prev[k] = tail
                            nxt[k] = -1
                            nxt[tail] = k
                            tail = k
                        continue
                    present[k] = True
                    prev[k] = tail
                    nxt[k] = -1
                    if tail >= 0:
                        nxt[tail] = k
                    else:
                        head = k
                    tail = k
                    size += 1
                    if size > capacity:
                        v = head
                        head = nxt[v]
                        prev[head] = -1
                        present[v] = False
                        size -= 1
            return block_hits, prefix_hits

        _KERNEL = replay
    return _KERNEL


def replay_counts(trace: Trace, policy: str, capacity: int) -> tuple[int, int]:
    if policy not in POLICIES:
        raise ValueError(f"the fast path covers {', '.join(POLICIES)}, not {policy!r}")
    if capacity <= 0:
        raise ValueError(f"capacity must be at least one block, got {capacity}")
    ids, offsets, n_ids = _dense(trace)
    bh, ph = _kernel()(ids, offsets, n_ids, capacity, policy == "lru")
    return int(bh), int(ph)
