"""The one door to the compiled extension `kvbm._native`, with a numpy fallback per op.

    crc32c(data, crc=0)                                       CRC-32C of a buffer, extendable
    crc32c_blocks(data, offsets, nbytes)                      one CRC-32C per block -> uint32 array
    copy_blocks(src, src_offsets, dst, dst_offsets, nbytes)   batched host gather/scatter
    gather_blocks(paged, staging, block_ids, block_nbytes)    paged pool -> staging (offload)
    scatter_blocks(paged, staging, block_ids, block_nbytes)   staging -> paged pool (onboard)
    cuda_available()                                          kernels built, a driver and a device

Buffers are anything with the C-contiguous buffer protocol (bytes, bytearray, mmap,
memoryview, numpy arrays of any dtype; a CPU torch tensor via `.numpy()`). gather/scatter
also take CUDA arrays (`__cuda_array_interface__`: torch, cupy), which need the CUDA build.

Each op takes `use_native`: None uses the extension when it is built, True requires it,
False runs the fallback. `fallback` holds the pure versions, which define the expected
bytes. `KVBM_NATIVE=0` in the environment turns the extension off.
"""

from __future__ import annotations

import os
import warnings
from types import SimpleNamespace

import numpy as np

_native = None
if os.environ.get("KVBM_NATIVE", "1") != "0":
    try:
        from kvbm import _native
    except ImportError as exc:  # a source checkout without a build, or a foreign platform
        warnings.warn(
            f"kvbm._native is not available ({exc}); using the slow numpy fallbacks. "
            "Reinstall kvbm-tiered with a C++ compiler to build it.",
            RuntimeWarning,
            stacklevel=2,
        )

HAVE_NATIVE: bool = _native is not None
CUDA_BUILT: bool = HAVE_NATIVE and bool(_native.built_with_cuda)
CRC32C_IMPL: str = _native.crc32c_impl if HAVE_NATIVE else "python"

__all__ = [
    "CRC32C_IMPL",
    "CUDA_BUILT",
    "HAVE_NATIVE",
    "copy_blocks",
    "crc32c",
    "crc32c_blocks",
    "cuda_available",
    "fallback",
    "gather_blocks",
    "scatter_blocks",
]


def _native_or_none(use_native: bool | None):
    if use_native is False:
        return None
    if use_native and not HAVE_NATIVE:
        raise RuntimeError("kvbm._native is not built; install kvbm-tiered from source")
    return _native


def _offsets(values, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be a 1-D integer array, got {arr.dtype} of shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _bytes_view(buf, name: str, writable: bool = False) -> np.ndarray:
    try:
        view = memoryview(buf).cast("B")
    except TypeError as exc:
        raise TypeError(f"{name} must be a C-contiguous buffer") from exc
    if writable and view.readonly:
        raise TypeError(f"{name} must be a C-contiguous, writable buffer")
    return np.frombuffer(view, dtype=np.uint8)


def _check_ranges(op: str, name: str, offsets: np.ndarray, nbytes: int, size: int) -> None:
    # Same wording as csrc/copy_blocks.cpp, so callers see one message whichever path ran.
    bad = np.flatnonzero((offsets < 0) | (offsets > size - nbytes))
    if bad.size:
        i = bad[0]
        end = f"+ nbytes {nbytes} runs past the end of the {size}-byte buffer"
        why = "is negative" if offsets[i] < 0 else end
        raise ValueError(f"{op}: {name}[{i}] = {offsets[i]} {why}")


def _check_nbytes(op: str, nbytes: int) -> int:
    nbytes = int(nbytes)
    if nbytes < 0:
        raise ValueError(f"{op}: nbytes must be >= 0, got {nbytes}")
    return nbytes


# ---- fallbacks: the reference semantics ----

def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def _crc32c_py(data, crc: int = 0) -> int:
    table = _CRC_TABLE
    c = crc ^ 0xFFFFFFFF
    for b in _bytes_view(data, "data").tobytes():
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _crc32c_blocks_py(data, offsets, nbytes: int, threads: int = 0) -> np.ndarray:
    nbytes = _check_nbytes("crc32c_blocks", nbytes)
    offsets = _offsets(offsets, "offsets")
    view = _bytes_view(data, "data")
    _check_ranges("crc32c_blocks", "offsets", offsets, nbytes, view.size)
    return np.array([_crc32c_py(view[o : o + nbytes]) for o in offsets], dtype=np.uint32)


def _copy_blocks_py(src, src_offsets, dst, dst_offsets, nbytes: int, threads: int = 0) -> None:
    op = "copy_blocks"
    nbytes = _check_nbytes(op, nbytes)
    src_offsets = _offsets(src_offsets, "src_offsets")
    dst_offsets = _offsets(dst_offsets, "dst_offsets")
    if len(src_offsets) != len(dst_offsets):
        raise ValueError(
            f"{op}: len(src_offsets) = {len(src_offsets)} but len(dst_offsets) = {len(dst_offsets)}"
        )
    s, d = _bytes_view(src, "src"), _bytes_view(dst, "dst", writable=True)
    _check_ranges(op, "src_offsets", src_offsets, nbytes, s.size)
    _check_ranges(op, "dst_offsets", dst_offsets, nbytes, d.size)
    for so, do in zip(src_offsets.tolist(), dst_offsets.tolist()):
        d[do : do + nbytes] = s[so : so + nbytes]


fallback = SimpleNamespace(
    crc32c=_crc32c_py, crc32c_blocks=_crc32c_blocks_py, copy_blocks=_copy_blocks_py
)


# ---- host ops ----

def crc32c(data, crc: int = 0, *, use_native: bool | None = None) -> int:
    """CRC-32C of `data`, extending `crc`: crc32c(b, crc32c(a)) == crc32c(a + b)."""
    native = _native_or_none(use_native)
    return native.crc32c(data, crc) if native else _crc32c_py(data, crc)


def crc32c_blocks(data, offsets, nbytes: int, *, threads: int = 0,
                  use_native: bool | None = None) -> np.ndarray:
    """uint32 array: CRC-32C of data[offsets[i] : offsets[i] + nbytes] for each i."""
    native = _native_or_none(use_native)
    if not native:
        return _crc32c_blocks_py(data, offsets, nbytes)
    nbytes = _check_nbytes("crc32c_blocks", nbytes)
    return native.crc32c_blocks(data, _offsets(offsets, "offsets"), nbytes, threads)


def copy_blocks(src, src_offsets, dst, dst_offsets, nbytes: int, *, threads: int = 0,
                use_native: bool | None = None) -> None:
    """dst[dst_offsets[i]:][:nbytes] = src[src_offsets[i]:][:nbytes] for each i.

    Every range is checked before any byte moves (ValueError naming the bad index).
    threads=0 picks: one thread under 1 MiB in total, else up to min(cpus, 8).
    Destination ranges must not overlap each other.
    """
    native = _native_or_none(use_native)
    if not native:
        return _copy_blocks_py(src, src_offsets, dst, dst_offsets, nbytes)
    native.copy_blocks(src, _offsets(src_offsets, "src_offsets"), dst,
                       _offsets(dst_offsets, "dst_offsets"), _check_nbytes("copy_blocks", nbytes), threads)


# ---- paged pool <-> staging, on the host or a CUDA device ----

def cuda_available() -> bool:
    """True when the CUDA kernels are built and a driver and a device are present."""
    return CUDA_BUILT and _native.cuda_available()


def _cuda_region(arr, name: str) -> tuple[int, int] | None:
    """(pointer, nbytes) of a C-contiguous CUDA array, or None for a host buffer."""
    iface = getattr(arr, "__cuda_array_interface__", None)
    if iface is None:
        return None
    shape, itemsize = iface["shape"], np.dtype(iface["typestr"]).itemsize
    strides = iface.get("strides")
    if strides is not None and tuple(strides) != tuple(np.empty(shape, dtype=f"V{itemsize}").strides):
        raise TypeError(f"{name} must be C-contiguous")
    return iface["data"][0], int(np.prod(shape, dtype=np.int64)) * itemsize


def _stream_handle(stream) -> int:
    if stream is None:
        return 0
    for attr in ("cuda_stream", "ptr"):  # torch.cuda.Stream, cupy.cuda.Stream
        if hasattr(stream, attr):
            return int(getattr(stream, attr))
    return int(stream)


def _paged_copy(op: str, gather: bool, paged, staging, block_ids, block_nbytes: int, stream, max_ctas: int,
                use_native: bool | None) -> None:
    ids = _offsets(block_ids, "block_ids")
    block_nbytes = _check_nbytes(op, block_nbytes)
    dev_paged, dev_staging = _cuda_region(paged, "paged"), _cuda_region(staging, "staging")
    if (dev_paged is None) != (dev_staging is None):
        raise TypeError(f"{op}: paged and staging must both be CUDA arrays or both host buffers")
    if dev_paged is not None:
        if use_native is False or not CUDA_BUILT:
            raise RuntimeError(f"{op}: CUDA arrays need kvbm._native built with CUDA (CUDA_BUILT is False)")
        fn = _native.cuda_gather_blocks if gather else _native.cuda_scatter_blocks
        fn(dev_paged[0], dev_paged[1], dev_staging[0], dev_staging[1], ids, block_nbytes,
           _stream_handle(stream), max_ctas)
        return
    # Host: the same copy expressed as offsets; the CUDA kernel is tested against this.
    paged_nbytes = _bytes_view(paged, "paged").size
    num_blocks = paged_nbytes // block_nbytes if block_nbytes else 0
    bad = np.flatnonzero((ids < 0) | (ids >= num_blocks))
    if bad.size:
        i = bad[0]
        raise ValueError(f"{op}: block_ids[{i}] = {ids[i]} is outside the paged pool of {num_blocks} blocks")
    paged_offsets = ids * block_nbytes
    staging_offsets = np.arange(len(ids), dtype=np.int64) * block_nbytes
    if gather:
        copy_blocks(paged, paged_offsets, staging, staging_offsets, block_nbytes, use_native=use_native)
    else:
        copy_blocks(staging, staging_offsets, paged, paged_offsets, block_nbytes, use_native=use_native)


def gather_blocks(paged, staging, block_ids, block_nbytes: int, *, stream=None, max_ctas: int = 0,
                  use_native: bool | None = None) -> None:
    """Offload: staging block i = paged block block_ids[i] (block b at byte b * block_nbytes).

    On CUDA arrays the copy is asynchronous on `stream` (None: the default stream);
    max_ctas > 0 caps the kernel's thread blocks to leave SMs to the model.
    """
    _paged_copy("gather_blocks", True, paged, staging, block_ids, block_nbytes, stream, max_ctas, use_native)


def scatter_blocks(paged, staging, block_ids, block_nbytes: int, *, stream=None, max_ctas: int = 0,
                   use_native: bool | None = None) -> None:
    """Onboard: paged block block_ids[i] = staging block i (see gather_blocks)."""
    _paged_copy("scatter_blocks", False, paged, staging, block_ids, block_nbytes, stream, max_ctas, use_native)
