"""Transfers: move block bytes between two storages; one handler per (source, destination) medium.

    route(src, dst) -> handler             the registered handler for the pair, or the generic one
    register_handler(src_medium, dst_medium, fn)
    BufferSet(buffers)                     an engine's (or caller's) blocks as a pseudo-storage
    TransferEngine.submit(fn, *args)       run a transfer on a worker thread -> Future

A handler is fn(src, src_slots, dst, dst_slots, keys) -> list[bool] (per block: landed intact).
It never raises for a medium failure: a False block is a miss, and storages count the error.

Generic handlers by capability: storages with `view(slot)` (host, device, buffers) are
*addressable*; the others (disk, object) move bytes with `read`/`write`:
    addressable -> addressable    memcpy (batched native gather when both are single host pools;
                                  one CUDA kernel, slot to slot, between a GPU pool and a GPU or
                                  pinned host pool)
    addressable -> persistent     dst.write from the source views
    persistent  -> addressable    src.read into the destination views (checksums verified there)
    persistent  -> persistent     through a bounce buffer
"""

from __future__ import annotations

import functools
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any, Callable, Sequence

import numpy as np

from .. import ops

Handler = Callable[[Any, Sequence[Any], Any, Sequence[Any], Sequence[Any]], list]
_HANDLERS: dict[tuple[str, str], Handler] = {}


class BufferSet:
    """Caller-owned blocks (one writable buffer per key) seen as an addressable storage."""

    medium = "buffer"
    instant = False

    def __init__(self, buffers: Sequence[Any], block_nbytes: int) -> None:
        self.buffers = buffers
        self.block_nbytes = block_nbytes
        self.lock = threading.RLock()

    def view(self, i: int) -> Any:
        buf = self.buffers[i]
        if isinstance(buf, np.ndarray):
            arr = buf.reshape(-1).view(np.uint8) if buf.flags.c_contiguous else None
        elif hasattr(buf, "__cuda_array_interface__") or _is_torch(buf):
            return _torch_bytes(buf)
        else:
            arr = np.frombuffer(memoryview(buf).cast("B"), dtype=np.uint8)
        if arr is None or arr.nbytes != self.block_nbytes:
            raise ValueError(
                f"buffer {i} must be a contiguous block of {self.block_nbytes} bytes, "
                f"got {getattr(buf, 'nbytes', '?')} bytes"
            )
        return arr


def register_handler(src_medium: str, dst_medium: str, fn: Handler, clobber: bool = False) -> None:
    key = (src_medium, dst_medium)
    if key in _HANDLERS and not clobber:
        raise ValueError(f"a transfer handler for {src_medium} -> {dst_medium} exists; pass clobber=True")
    _HANDLERS[key] = fn


def route(src: Any, dst: Any) -> Handler:
    fn = _HANDLERS.get((src.medium, dst.medium))
    if fn is not None:
        return fn
    a, b = hasattr(src, "view"), hasattr(dst, "view")
    if a and b:
        return copy_views
    if a:
        return write_from_views
    if b:
        return read_into_views
    return via_bounce


class PathStats:
    """Blocks, bytes and seconds moved per (source medium, destination medium)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.paths: dict[tuple[str, str], list] = {}  # -> [blocks, bytes, seconds, failed]

    def add(self, src: str, dst: str, blocks: int, nbytes: int, seconds: float, failed: int) -> None:
        with self._lock:
            row = self.paths.setdefault((src, dst), [0, 0, 0.0, 0])
            row[0] += blocks
            row[1] += nbytes
            row[2] += seconds
            row[3] += failed

    def report(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {
                f"{s}->{d}": {"blocks": b, "bytes": n, "seconds": round(t, 6), "failed": f,
                              "gb_per_s": round(n / t / 1e9, 3) if t > 0 else None}
                for (s, d), (b, n, t, f) in sorted(self.paths.items())
            }


def transfer(src: Any, src_slots: Sequence[Any], dst: Any, dst_slots: Sequence[Any],
             keys: Sequence[Any], stats: PathStats | None = None) -> list[bool]:
    """Move blocks with the pair's handler, holding both storages' locks."""
    if not keys:
        return []
    with ExitStack() as stack:
        for s in sorted({id(src): src, id(dst): dst}.values(), key=id):
            lock = getattr(s, "lock", None)
            if lock is not None:
                stack.enter_context(lock)
        t0 = time.perf_counter()
        ok = route(src, dst)(src, src_slots, dst, dst_slots, keys)
        if stats is not None:
            good = sum(ok)
            stats.add(src.medium, dst.medium, good, good * src.block_nbytes, time.perf_counter() - t0,
                      len(ok) - good)
        return ok


# ---------------------------------------------------------------- generic handlers


def copy_views(src, src_slots, dst, dst_slots, keys) -> list[bool]:
    n = len(keys)
    if _pooled(src) and _pooled(dst):
        ops.copy_blocks(src.pool, _offsets(src, src_slots), dst.pool, _offsets(dst, dst_slots), src.block_nbytes)
        return [True] * n
    if _cuda_pools(src, dst):
        ctas = getattr(src, "copy_ctas", None) or getattr(dst, "copy_ctas", 0)
        ops.cuda_copy_blocks(src.pool, _offsets(src, src_slots), dst.pool, _offsets(dst, dst_slots),
                             src.block_nbytes, max_ctas=ctas, sync=True)
        return [True] * n
    for s, d in zip(src_slots, dst_slots):
        _assign(dst.view(d), src.view(s))
    return [True] * n


def write_from_views(src, src_slots, dst, dst_slots, keys) -> list[bool]:
    return dst.write([(k, d, _host(src.view(s))) for k, s, d in zip(keys, src_slots, dst_slots)])


def read_into_views(src, src_slots, dst, dst_slots, keys) -> list[bool]:
    views = [dst.view(d) for d in dst_slots]
    host = [_host_target(v, src.block_nbytes) for v in views]
    ok = src.read([(k, s, h) for k, s, h in zip(keys, src_slots, host)])
    for v, h, good in zip(views, host, ok):
        if good and h is not v:
            _assign(v, h)
    return ok


def via_bounce(src, src_slots, dst, dst_slots, keys) -> list[bool]:
    n = len(keys)
    bounce = _aligned_empty(n, src.block_nbytes)
    ok = src.read([(k, s, bounce[i]) for i, (k, s) in enumerate(zip(keys, src_slots))])
    idx = [i for i in range(n) if ok[i]]
    wrote = dst.write([(keys[i], dst_slots[i], bounce[i]) for i in idx])
    for i, w in zip(idx, wrote):
        ok[i] = w
    return ok


# ---------------------------------------------------------------- engine


class TransferEngine:
    """Runs transfers on worker threads so an engine step never waits on a lower tier."""

    def __init__(self, threads: int = 2) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kvbm-xfer")

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


# ---------------------------------------------------------------- helpers


def _pooled(s: Any) -> bool:
    return isinstance(getattr(s, "pool", None), np.ndarray) and hasattr(s, "offset")


def _offsets(s: Any, slots: Sequence[Any]) -> Any:
    batch = getattr(s, "offsets", None)
    return batch(slots) if batch is not None else [s.offset(x) for x in slots]


def _cuda_pools(src: Any, dst: Any) -> bool:
    """Single pools, one on a GPU, the other on a GPU or pinned: a kernel reaches both."""
    if not (hasattr(src, "offset") and hasattr(dst, "offset")):
        return False
    a, b = _on_gpu(getattr(src, "pool", None)), _on_gpu(getattr(dst, "pool", None))
    if not (a or b) or not _cuda_ready():
        return False
    return (a or getattr(src, "pinned", False)) and (b or getattr(dst, "pinned", False))


def _on_gpu(x: Any) -> bool:
    try:
        return x is not None and hasattr(x, "__cuda_array_interface__")
    except Exception:  # torch raises (not AttributeError) for CPU tensors in some versions
        return False


@functools.cache
def _cuda_ready() -> bool:
    return ops.cuda_available()  # a driver and a device do not come and go within a process


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _torch_bytes(t: Any) -> Any:
    return t.reshape(-1).view(__import__("torch").uint8)


def _host(v: Any) -> Any:
    """A host (numpy) view of v, copying device memory to host if needed."""
    if isinstance(v, np.ndarray):
        return v
    if _is_torch(v):
        return v.cpu().numpy() if v.device.type != "cpu" else v.numpy()
    return np.frombuffer(memoryview(v).cast("B"), dtype=np.uint8)


def _host_target(v: Any, nbytes: int) -> Any:
    if isinstance(v, np.ndarray):
        return v
    if _is_torch(v) and v.device.type == "cpu":
        return v.numpy()
    return _aligned_empty(1, nbytes)[0]


def _assign(dst: Any, src: Any) -> None:
    if isinstance(dst, np.ndarray) and isinstance(src, np.ndarray):
        np.copyto(dst, src)
        return
    import torch

    d = dst if _is_torch(dst) else torch.from_numpy(dst)
    s = src if _is_torch(src) else torch.from_numpy(np.ascontiguousarray(src))
    d.copy_(s, non_blocking=False)


def _aligned_empty(n: int, nbytes: int, align: int = 4096) -> np.ndarray:
    """n rows of nbytes, each starting 4 KiB-aligned (O_DIRECT wants aligned buffers)."""
    stride = (nbytes + align - 1) // align * align
    raw = np.empty(n * stride + align, dtype=np.uint8)
    start = (-raw.ctypes.data) % align
    rows = raw[start:start + n * stride].reshape(n, stride)
    return rows[:, :nbytes]
