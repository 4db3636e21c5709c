"""The one door to the compiled extension `kvbm._native`, with a numpy fallback per op.

    crc32c(data, crc=0)                                       CRC-32C of a buffer, extendable
    crc32c_blocks(data, offsets, nbytes)                      one CRC-32C per block -> uint32 array
    copy_blocks(src, src_offsets, dst, dst_offsets, nbytes)   batched host gather/scatter
    copy_blocks_crc32c(src, src_offsets, dst, dst_offsets, nbytes)  the same + a CRC-32C per block, one pass
    copy_buffer(dst, src, stream=False)                       one sequential copy (the benches' limit)
    gather_blocks(paged, staging, block_ids, block_nbytes)    paged pool -> staging (offload)
    scatter_blocks(paged, staging, block_ids, block_nbytes)   staging -> paged pool (onboard)
    pwrite_blocks(fd, src, file_offsets, nbytes)              batched block writes -> errno per block
    pread_blocks(fd, dst, file_offsets, nbytes)               batched block reads -> errno per block
    window_map(fd, nbytes)                                    a mapping of a file another process controls, or None
    window_to_blocks(fd, wmap, window_offsets, dst, dst_offsets, nbytes)   window -> buffer -> errno per block
    blocks_to_window(src, src_offsets, fd, wmap, window_offsets, nbytes)   buffer -> window -> errno per block
    cuda_copy_blocks(src, src_offsets, dst, dst_offsets, nbytes)  the same on a GPU: device or pinned host
    cuda_available()                                          kernels built, a driver and a device
    hitdensity_core()                                         hitdensity's compiled per-key state (a class) or None
    hashed_sample()                                           auto's compiled key sample (a function) or None
    policy_core(name)                                         PrefixCore / S3FifoCore / MiniFeed / AutoPlumb /
                                                              auto_link_parents / auto_forget_keys, or None

Buffers are anything with the C-contiguous buffer protocol (bytes, bytearray, mmap,
memoryview, numpy arrays of any dtype; a CPU torch tensor via `.numpy()`). gather/scatter
also take CUDA arrays (`__cuda_array_interface__`: torch, cupy), which need the CUDA build.

Each op takes `use_native`: None uses the extension when it is built, True requires it,
False runs the fallback. `fallback` holds the pure versions, which define the expected
bytes (ops_fallback.py). `KVBM_NATIVE=0` in the environment turns the extension off.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from .ops_fallback import (  # noqa: F401 (DIRECT_ALIGN: this module's name for it before the split)
    DIRECT_ALIGN, _bytes_view, _check_nbytes, _copy_blocks_crc32c_py, _copy_blocks_py, _copy_buffer_py,
    _crc32c_blocks_py, _crc32c_py, _file_io_py, _offsets, _window_copy_py, fallback)

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
# streaming (non-temporal) stores in large copies: "avx2", "sse2", "memcpy" or "numpy"
COPY_STREAM_IMPL: str = getattr(_native, "copy_stream_impl", "memcpy") if HAVE_NATIVE else "numpy"

__all__ = [
    "COPY_STREAM_IMPL",
    "CRC32C_IMPL",
    "CUDA_BUILT",
    "HAVE_NATIVE",
    "copy_blocks",
    "copy_blocks_crc32c",
    "copy_buffer",
    "crc32c",
    "crc32c_blocks",
    "cuda_available",
    "cuda_copy_blocks",
    "fallback",
    "gather_blocks",
    "pread_blocks",
    "pwrite_blocks",
    "scatter_blocks",
    "blocks_to_window",
    "window_map",
    "window_to_blocks",
]


def _native_or_none(use_native: bool | None):
    if use_native is False:
        return None
    if use_native and not HAVE_NATIVE:
        raise RuntimeError("kvbm._native is not built; install kvbm-tiered from source")
    return _native


def _native_with(op: str, use_native: bool | None):
    """_native_or_none for an op newer than some builds: an extension built before it
    (an editable install not yet rebuilt) runs the fallback, or refuses when use_native=True."""
    native = _native_or_none(use_native)
    if native is not None and not hasattr(native, op):
        if use_native:
            raise RuntimeError(f"kvbm._native predates {op}; rebuild it (pip install -e .)")
        return None
    return native


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
    Destination ranges must not overlap each other. A batch of 8 MiB or more is copied
    with streaming stores (COPY_STREAM_IMPL): the destination is left out of the cache.
    """
    native = _native_or_none(use_native)
    if not native:
        return _copy_blocks_py(src, src_offsets, dst, dst_offsets, nbytes)
    native.copy_blocks(src, _offsets(src_offsets, "src_offsets"), dst,
                       _offsets(dst_offsets, "dst_offsets"), _check_nbytes("copy_blocks", nbytes), threads)


def copy_blocks_crc32c(src, src_offsets, dst, dst_offsets, nbytes: int, *, threads: int = 0,
                       use_native: bool | None = None) -> np.ndarray:
    """copy_blocks, returning each block's CRC-32C (of the bytes copied) as a uint32 array.

    One pass over memory: each 64 KiB piece is checksummed and then copied while in cache,
    where copy_blocks followed by crc32c_blocks reads every byte from memory twice.
    """
    native = _native_with("copy_blocks_crc32c", use_native)
    if not native:
        return _copy_blocks_crc32c_py(src, src_offsets, dst, dst_offsets, nbytes)
    return native.copy_blocks_crc32c(src, _offsets(src_offsets, "src_offsets"), dst,
                                     _offsets(dst_offsets, "dst_offsets"),
                                     _check_nbytes("copy_blocks_crc32c", nbytes), threads)


def copy_buffer(dst, src, *, stream: bool = False, use_native: bool | None = None) -> None:
    """dst[:] = src, one sequential copy on the calling thread (GIL released): the C library's
    memcpy, or kvbm's streaming-store copy with stream=True. The benches' copy limit."""
    native = _native_with("copy_buffer", use_native)
    if not native:
        return _copy_buffer_py(dst, src)
    native.copy_buffer(dst, src, bool(stream))


# ---- batched block I/O on one file (G3) ----

def _block_list(op: str, name: str, bufs, buf_offsets):
    if buf_offsets is not None or isinstance(bufs, list):
        return bufs
    if isinstance(bufs, tuple):
        return list(bufs)
    raise TypeError(f"{op}: {name} must be a list of buffers when {name}_offsets is None")


def pwrite_blocks(fd: int, src, file_offsets, nbytes: int, *, src_offsets=None, threads: int = 0,
                  crcs: np.ndarray | None = None, use_native: bool | None = None) -> np.ndarray:
    """Write block i to the file at file_offsets[i]; int32 status per block, 0 or an errno.

    Block i is src[i] (a list of buffers, each of at least nbytes) or, with src_offsets,
    src[src_offsets[i]:][:nbytes]. An I/O error (ENOSPC, EIO, EBADF) fails only its block;
    bad arguments raise ValueError before any byte moves. On an O_DIRECT fd the length is
    padded up to 4 KiB with zeros (the file must leave room: slot files do) and unaligned
    buffers go through an aligned bounce buffer. `crcs`, a uint32 array of len(file_offsets),
    receives each block's CRC-32C. The GIL is released. threads=1 keeps the I/O on the calling
    thread; otherwise an O_DIRECT fd uses Linux AIO (a deep queue from one thread) and a
    buffered one the thread pool (threads=0 picks: one thread under 1 MiB in total).
    """
    src = _block_list("pwrite_blocks", "src", src, src_offsets)
    native = _native_or_none(use_native)
    if not native:
        return _file_io_py(True, fd, src, src_offsets, file_offsets, nbytes, crcs)
    return native.pwrite_blocks(fd, src, None if src_offsets is None else _offsets(src_offsets, "src_offsets"),
                                _offsets(file_offsets, "file_offsets"), _check_nbytes("pwrite_blocks", nbytes),
                                threads, crcs)


def pread_blocks(fd: int, dst, file_offsets, nbytes: int, *, dst_offsets=None, threads: int = 0,
                 crcs: np.ndarray | None = None, use_native: bool | None = None) -> np.ndarray:
    """Read block i from the file at file_offsets[i] into dst (see pwrite_blocks).

    Status ENODATA: the file ended before nbytes. A failed block's buffer may hold part of
    the data; only status 0 means the bytes are there. `crcs` gets the CRC-32C of each block
    read (0 for failed ones), so a caller verifies without a second pass over memory.
    """
    dst = _block_list("pread_blocks", "dst", dst, dst_offsets)
    native = _native_or_none(use_native)
    if not native:
        return _file_io_py(False, fd, dst, dst_offsets, file_offsets, nbytes, crcs)
    return native.pread_blocks(fd, dst, None if dst_offsets is None else _offsets(dst_offsets, "dst_offsets"),
                               _offsets(file_offsets, "file_offsets"), _check_nbytes("pread_blocks", nbytes),
                               threads, crcs)


# ---- the daemon's staging windows: a file its client may truncate at any moment ----

def window_map(fd: int, nbytes: int, *, use_native: bool | None = None):
    """A MAP_SHARED mapping of fd's first nbytes that only window_to_blocks / blocks_to_window
    touch (a native copy under a SIGBUS guard: a fault fails its block, never the process), or
    None where the extension is off or not built: those ops then use pread/pwrite on fd. Python
    never gets a buffer over it. .close() unmaps it (once a copy in flight ends)."""
    native = _native_with("SharedMap", use_native)
    return native.SharedMap(fd, int(nbytes)) if native else None


def _window_copy(to_window: bool, fd: int, wmap, window_offsets, buf, buf_offsets, nbytes: int, threads: int,
                 use_native: bool | None) -> np.ndarray:
    op = "blocks_to_window" if to_window else "window_to_blocks"
    native = _native_with("shared_map_copy", use_native)
    if native is None or wmap is None:
        if use_native and wmap is None:
            raise RuntimeError(f"{op}: use_native=True needs a window_map")
        return _window_copy_py(to_window, fd, wmap, window_offsets, buf, buf_offsets, nbytes)
    return native.shared_map_copy(to_window, wmap, _offsets(window_offsets, "window_offsets"), buf,
                                  _offsets(buf_offsets, "buf_offsets"), _check_nbytes(op, nbytes), threads)


def window_to_blocks(fd: int, wmap, window_offsets, dst, dst_offsets, nbytes: int, *, threads: int = 0,
                     use_native: bool | None = None) -> np.ndarray:
    """dst[dst_offsets[i]:][:nbytes] = the window's bytes at window_offsets[i]; int32 status per
    block, 0 or an errno (a fault of the mapping: EFAULT; pread's: ENODATA past the end). A failed
    block's destination may hold part of the data. Ranges are checked before any byte moves.
    wmap None (or the fallback): pread on fd, the reference the guarded copy is tested against."""
    return _window_copy(False, fd, wmap, window_offsets, dst, dst_offsets, nbytes, threads, use_native)


def blocks_to_window(src, src_offsets, fd: int, wmap, window_offsets, nbytes: int, *, threads: int = 0,
                     use_native: bool | None = None) -> np.ndarray:
    """The window at window_offsets[i] = src[src_offsets[i]:][:nbytes]; status as window_to_blocks
    (the mapping faults past a truncated end, where pwrite, the fallback, extends the file)."""
    return _window_copy(True, fd, wmap, window_offsets, src, src_offsets, nbytes, threads, use_native)


def hitdensity_core():
    """The compiled HitDensityCore class (policies/hitdensity.py's state and verbs), or None
    where the extension is off, not built, or built before it: the policy's Python version runs
    then, with the same decisions (tests/test_policy_auto_equal.py compares both)."""
    return getattr(_native, "HitDensityCore", None) if HAVE_NATIVE else None


def hashed_sample():
    """The compiled hashed_sample(keys, mix, mask, threshold) -> [k for k in keys if
    (hash(k) * mix) & mask < threshold] (auto's key sample), or None: auto filters in Python."""
    return getattr(_native, "hashed_sample", None) if HAVE_NATIVE else None


def policy_core(name: str):
    """A compiled policy piece by name: "PrefixCore", "S3FifoCore" (policies/prefix.py's and
    s3fifo.py's state and verbs), "MiniFeed" (auto's sample and per-mini step), "AutoPlumb"
    (auto's insert_many / touch / _feed bookkeeping over the policy's own attributes) or
    "auto_link_parents" / "auto_forget_keys" (auto's parents map per call), or None where the
    extension is off, not built, or built before it: the Python versions run then."""
    if name not in ("PrefixCore", "S3FifoCore", "MiniFeed", "AutoPlumb", "auto_link_parents", "auto_forget_keys"):
        raise ValueError(f"policy_core: unknown name {name!r}")
    return getattr(_native, name, None) if HAVE_NATIVE else None


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


def _any_region(arr, name: str) -> tuple[int, int]:
    """(pointer, nbytes) of a CUDA array or a C-contiguous host buffer."""
    dev = _cuda_region(arr, name)
    if dev is not None:
        return dev
    view = _bytes_view(arr, name)
    return view.ctypes.data, view.size


def cuda_copy_blocks(src, src_offsets, dst, dst_offsets, nbytes: int, *, stream=None, max_ctas: int = 0,
                     sync: bool = False) -> None:
    """copy_blocks on the GPU: one kernel moves every block, slot to slot.

    src and dst are CUDA arrays or page-locked host buffers (a pinned G2 pool), in any mix, so
    G1 <-> G2 needs no staging hop. Offsets are checked before anything is launched; pageable
    host memory is refused (ValueError). stream=None runs on the calling thread's own
    non-blocking stream, never serialized with an engine's default stream; sync=True waits.
    The byte-for-byte reference is copy_blocks on host copies of the same buffers.
    """
    if not CUDA_BUILT:
        raise RuntimeError("cuda_copy_blocks needs kvbm._native built with CUDA (CUDA_BUILT is False)")
    nbytes = _check_nbytes("cuda_copy_blocks", nbytes)
    (sp, sn), (dp, dn) = _any_region(src, "src"), _any_region(dst, "dst")
    _native.cuda_copy_blocks(sp, sn, _offsets(src_offsets, "src_offsets"), dp, dn,
                             _offsets(dst_offsets, "dst_offsets"), nbytes, _stream_handle(stream), max_ctas,
                             sync, stream is None)


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
