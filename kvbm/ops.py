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
    cuda_copy_blocks(src, src_offsets, dst, dst_offsets, nbytes)  the same on a GPU: device or pinned host
    cuda_available()                                          kernels built, a driver and a device

Buffers are anything with the C-contiguous buffer protocol (bytes, bytearray, mmap,
memoryview, numpy arrays of any dtype; a CPU torch tensor via `.numpy()`). gather/scatter
also take CUDA arrays (`__cuda_array_interface__`: torch, cupy), which need the CUDA build.

Each op takes `use_native`: None uses the extension when it is built, True requires it,
False runs the fallback. `fallback` holds the pure versions, which define the expected
bytes. `KVBM_NATIVE=0` in the environment turns the extension off.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
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


def _copy_args(op: str, src, src_offsets, dst, dst_offsets, nbytes: int):
    """Checks a batched copy's arguments (same order and words as csrc/module.cpp)."""
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
    return s, src_offsets.tolist(), d, dst_offsets.tolist(), nbytes


def _copy_blocks_py(src, src_offsets, dst, dst_offsets, nbytes: int, threads: int = 0) -> None:
    s, so, d, do, nbytes = _copy_args("copy_blocks", src, src_offsets, dst, dst_offsets, nbytes)
    for a, b in zip(so, do):
        d[b : b + nbytes] = s[a : a + nbytes]


def _copy_blocks_crc32c_py(src, src_offsets, dst, dst_offsets, nbytes: int, threads: int = 0) -> np.ndarray:
    s, so, d, do, nbytes = _copy_args("copy_blocks_crc32c", src, src_offsets, dst, dst_offsets, nbytes)
    crcs = np.zeros(len(so), dtype=np.uint32)
    for i, (a, b) in enumerate(zip(so, do)):
        crcs[i] = _crc32c_py(s[a : a + nbytes])  # of the bytes before the copy (a block may overlap itself)
        d[b : b + nbytes] = s[a : a + nbytes]
    return crcs


def _copy_buffer_py(dst, src, stream: bool = False) -> None:
    d, s = _bytes_view(dst, "dst", writable=True), _bytes_view(src, "src")
    if d.size != s.size:
        raise ValueError(f"copy_buffer: src holds {s.size} bytes but dst {d.size}")
    np.copyto(d, s)


# File I/O: the semantics of csrc/file_io.hpp, one os.pwrite/os.preadv per block.

DIRECT_ALIGN = 4096  # O_DIRECT alignment of buffer address, file offset and length


def _align_up(n: int, a: int = DIRECT_ALIGN) -> int:
    return (n + a - 1) // a * a


def _fd_is_direct(fd: int) -> bool:
    try:
        return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0))
    except OSError:  # a bad fd: the I/O itself reports EBADF
        return False


def _file_io_args(op: str, bufs, buf_offsets, file_offsets, nbytes: int, crcs, writable: bool):
    """Checks everything before any byte moves (same order and words as csrc/module.cpp);
    returns (per-block byte views, file offsets as a list, nbytes)."""
    name = "dst" if writable else "src"
    nbytes = _check_nbytes(op, nbytes)
    file_offsets = _offsets(file_offsets, "file_offsets")
    n = len(file_offsets)
    limit = 2**63 - 1 - _align_up(nbytes)
    bad = np.flatnonzero((file_offsets < 0) | (file_offsets > limit))
    if bad.size:
        i, off = bad[0], file_offsets[bad[0]]
        why = "is negative" if off < 0 else "+ nbytes overflows a file offset"
        raise ValueError(f"{op}: file_offsets[{i}] = {off} {why}")

    def mismatch(what: str, length: int) -> ValueError:
        return ValueError(f"{op}: len({what}) = {length} but len(file_offsets) = {n}")

    if crcs is not None:
        if not isinstance(crcs, np.ndarray) or crcs.dtype != np.uint32 or crcs.ndim != 1:
            raise TypeError(f"{op}: crcs must be a 1-D uint32 numpy array")
        if len(crcs) != n:
            raise mismatch("crcs", len(crcs))
    if buf_offsets is not None:
        buf_offsets = _offsets(buf_offsets, f"{name}_offsets")
        if len(buf_offsets) != n:
            raise mismatch(f"{name}_offsets", len(buf_offsets))
        base = _bytes_view(bufs, name, writable)
        _check_ranges(op, f"{name}_offsets", buf_offsets, nbytes, base.size)
        return [base[o : o + nbytes] for o in buf_offsets.tolist()], file_offsets.tolist(), nbytes
    if len(bufs) != n:
        raise mismatch(name, len(bufs))
    views = []
    for i, buf in enumerate(bufs):
        view = _bytes_view(buf, f"{name}[{i}]", writable)
        if view.size < nbytes:
            raise ValueError(f"{op}: {name}[{i}] holds {view.size} bytes, fewer than nbytes {nbytes}")
        views.append(view[:nbytes])
    return views, file_offsets.tolist(), nbytes


def _write_all(fd: int, data, off: int) -> int:
    data, done = memoryview(data).cast("B"), 0
    while done < len(data):
        try:
            wrote = os.pwrite(fd, data[done:], off + done)
        except OSError as exc:
            return exc.errno or errno.EIO
        if wrote == 0:
            return errno.EIO
        done += wrote
    return 0


def _read_all(fd: int, into, need: int, off: int) -> int:
    into, got = memoryview(into).cast("B"), 0
    while got < need:
        try:
            n = os.preadv(fd, [into[got:]], off + got)
        except OSError as exc:
            return exc.errno or errno.EIO
        if n == 0:
            return errno.ENODATA
        got += n
    return 0


def _file_io_py(write: bool, fd: int, bufs, buf_offsets, file_offsets, nbytes: int, crcs) -> np.ndarray:
    op = "pwrite_blocks" if write else "pread_blocks"
    views, offsets, nbytes = _file_io_args(op, bufs, buf_offsets, file_offsets, nbytes, crcs, not write)
    status = np.zeros(len(views), dtype=np.int32)
    if nbytes == 0:
        if crcs is not None:
            crcs[:] = 0
        return status
    direct, padded = _fd_is_direct(fd), _align_up(nbytes)
    bounce = None
    for i, (view, off) in enumerate(zip(views, offsets)):
        if write and crcs is not None:
            crcs[i] = _crc32c_py(view)
        if not direct or (nbytes % DIRECT_ALIGN == 0 and view.ctypes.data % DIRECT_ALIGN == 0):
            status[i] = _write_all(fd, view, off) if write else _read_all(fd, view, nbytes, off)
        else:  # an aligned bounce, zero padded to 4 KiB (mmap memory is page aligned)
            if bounce is None:
                bounce = np.frombuffer(mmap.mmap(-1, padded), dtype=np.uint8)
            if write:
                bounce[:nbytes], bounce[nbytes:] = view, 0
                status[i] = _write_all(fd, bounce, off)
            else:
                status[i] = _read_all(fd, bounce, nbytes, off)
                if status[i] == 0:
                    view[:] = bounce[:nbytes]
        if not write and crcs is not None:
            crcs[i] = _crc32c_py(view) if status[i] == 0 else 0
    return status


def _pwrite_blocks_py(fd, src, file_offsets, nbytes, *, src_offsets=None, threads=0, crcs=None):
    return _file_io_py(True, fd, src, src_offsets, file_offsets, nbytes, crcs)


def _pread_blocks_py(fd, dst, file_offsets, nbytes, *, dst_offsets=None, threads=0, crcs=None):
    return _file_io_py(False, fd, dst, dst_offsets, file_offsets, nbytes, crcs)


fallback = SimpleNamespace(
    crc32c=_crc32c_py, crc32c_blocks=_crc32c_blocks_py, copy_blocks=_copy_blocks_py,
    copy_blocks_crc32c=_copy_blocks_crc32c_py, copy_buffer=_copy_buffer_py,
    pwrite_blocks=_pwrite_blocks_py, pread_blocks=_pread_blocks_py,
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
