"""hitdensity's table update: per class and age bucket, the Gittins index of keeping a block.

    update(reuses, ends, live, index, rise, widths, decay)
                                               recompute `index` in place (and rise[b] =
                                               index[b + 1] - index[b]); halve the counts if decay
    compiled() -> bool                         the numba kernel runs (the `numba` extra is installed)

Per class c, with lives leaving at bucket b = ends + live (ended, or going on and censored there)
and exposure[b] = (lives reaching b - half of those leaving there) x the bucket's width:
index[b] = max over horizons h >= b of sum(reuses[b..h]) / sum(exposure[b..h]), each sum
accumulated from b in order; 0.0 where that is not > 0 and above the oldest life. O(buckets^2)
per class: at small tiers (an update every 256 inserts) this was half of hitdensity's time in
Python, each term a float object. The numba kernel does the same float64 operations in the
same order (no fast-math, so no reassociation or fused multiply-add), so the tables are equal
to the last bit and no decision changes; tests/test_policy_auto_equal.py compares both paths.
The kernel works on the policy's small count tables (classes x buckets), never on KV data;
it is built on the first update in a background thread (numba's import and the kernel's load
take seconds, which no tier may stall for) and the Python loop runs until it is there; without
numba, or with KVBM_POLICY_NUMBA=0 in the environment, the Python loop runs throughout.
This is the Python version's update: hitdensity's compiled core (csrc/hitdensity_core.cpp,
the default where kvbm._native is built) does the same operations in C++ on its own tables,
so a process running it never imports numba.
"""

from __future__ import annotations

import os
import threading
import warnings
from itertools import accumulate
from operator import sub, truediv

_KERNEL = None  # the compiled function once built; False: numba is not there (or turned off)
_LOCK = threading.Lock()
_STARTED = False  # a background build was started


def _python(reuses, ends, live, index, rise, widths, decay):
    for r, e, ongoing, idx, up in zip(reuses, ends, live, index, rise):
        top = max((b for b in range(len(idx)) if e[b] or ongoing[b]), default=-1)
        exposure = [0.0] * (top + 1)
        alive = 0.0
        for b in range(top, -1, -1):  # lives reaching bucket b spend its width there
            leaving = e[b] + ongoing[b]
            alive += leaving
            exposure[b] = (alive - leaving / 2) * widths[b]
        for b in range(top + 1):  # exposure > 0 up to top: a life reaches every bucket there
            best = max(map(truediv, accumulate(r[b:top + 1]), accumulate(exposure[b:])))
            idx[b] = best if best > 0.0 else 0.0
        for b in range(top + 1, len(idx)):
            idx[b] = 0.0  # older than any life observed: nothing says it will return
        up[:len(idx) - 1] = map(sub, idx[1:], idx)
        up[-1] = 0.0
        if decay:
            for b in range(top + 1):
                r[b] *= 0.5
                e[b] *= 0.5


def _kernel(reuses, ends, live, widths, decay, index, rise, exposure):
    """_python over 2-D float64 tables (live: int64), compiled by numba: the same operations."""
    classes, buckets = reuses.shape
    for c in range(classes):
        top = -1
        for b in range(buckets - 1, -1, -1):
            if ends[c, b] != 0.0 or live[c, b] != 0:
                top = b
                break
        alive = 0.0
        for b in range(top, -1, -1):
            leaving = ends[c, b] + float(live[c, b])
            alive += leaving
            exposure[b] = (alive - leaving / 2.0) * float(widths[b])
        for b in range(top + 1):
            ar = reuses[c, b]
            ae = exposure[b]
            best = ar / ae
            for h in range(b + 1, top + 1):
                ar += reuses[c, h]
                ae += exposure[h]
                ratio = ar / ae
                if ratio > best:  # max(): the first of equal values, and they are equal
                    best = ratio
            index[c, b] = best if best > 0.0 else 0.0
        for b in range(top + 1, buckets):
            index[c, b] = 0.0
        for b in range(buckets - 1):
            rise[c, b] = index[c, b + 1] - index[c, b]
        rise[c, buckets - 1] = 0.0
        if decay:
            for b in range(top + 1):
                reuses[c, b] *= 0.5
                ends[c, b] *= 0.5


def _build():
    """The compiled update, or False. Built once per process: numba's disk cache where it can
    write one, else compiled in memory; any failure (no numba, a numba that cannot compile it)
    leaves the Python loop, which gives the same tables."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    _KERNEL = False
    if os.environ.get("KVBM_POLICY_NUMBA", "1") == "0":
        return False
    try:
        import numba
        import numpy as np
    except ImportError:
        return False
    kernel = None
    for options in ({"cache": True}, {}):
        try:
            jit = numba.njit(nogil=True, **options)(_kernel)
            r = np.zeros((1, 4))
            jit(r, r.copy(), np.zeros((1, 4), np.int64), np.ones(4, np.int64), True, r.copy(), r.copy(), np.zeros(4))
            kernel = jit
            break
        except Exception:  # e.g. no writable cache directory: try without the cache, then give up
            continue
    if kernel is None:
        warnings.warn("hitdensity: numba could not compile the table update; using the Python loop", RuntimeWarning)
        return False

    def run(reuses, ends, live, index, rise, widths, decay):
        r, e = np.array(reuses, dtype=np.float64), np.array(ends, dtype=np.float64)
        out, up = np.empty_like(r), np.empty_like(r)
        kernel(r, e, np.array(live, dtype=np.int64), np.array(widths, dtype=np.int64), decay, out, up,
               np.empty(r.shape[1]))
        for row, new in zip(index, out.tolist()):  # in place: callers hold the rows
            row[:] = new
        for row, new in zip(rise, up.tolist()):
            row[:] = new
        if decay:
            for row, new in zip(reuses, r.tolist()):
                row[:] = new
            for row, new in zip(ends, e.tolist()):
                row[:] = new

    _KERNEL = run
    return run


def compiled() -> bool:
    """Build the kernel now if it is not built yet (blocking); True if it runs."""
    with _LOCK:
        return bool(_build())


def _build_behind():
    with _LOCK:
        _build()


def update(reuses, ends, live, index, rise, widths, decay, use_compiled=None):
    """Recompute `index` (rows of floats, in place) from the counts; halve the counts if decay.
    use_compiled: None = the kernel once built (the first call starts building it in a
    background thread and runs the Python loop meanwhile: importing numba and loading the
    kernel take seconds, which a tier must not stall for; both give the same tables), True =
    build it now and require it, False = the Python loop."""
    global _STARTED
    if use_compiled is None:
        kernel = _KERNEL
        if kernel is None and not _STARTED:
            _STARTED = True
            threading.Thread(target=_build_behind, name="kvbm-hitdensity-jit", daemon=True).start()
    else:
        kernel = compiled() and _KERNEL if use_compiled else False
    if use_compiled and not kernel:
        raise RuntimeError("hitdensity: the compiled table update needs numba (pip install 'kvbm-tiered[numba]')")
    if kernel:
        kernel(reuses, ends, live, index, rise, widths, decay)
    else:
        _python(reuses, ends, live, index, rise, widths, decay)
