"""The reference semantics of kvbm.ops: a pure numpy/Python version of every host op.

    fallback.crc32c(data, crc=0)                                  table-driven CRC-32C
    fallback.crc32c_blocks(data, offsets, nbytes)                 one CRC-32C per block
    fallback.copy_blocks(src, src_offsets, dst, dst_offsets, nbytes)         numpy slice copies
    fallback.copy_blocks_crc32c(src, src_offsets, dst, dst_offsets, nbytes)  the same + CRCs
    fallback.copy_buffer(dst, src)                                one numpy copy
    fallback.pwrite_blocks / pread_blocks(fd, bufs, file_offsets, nbytes)   os.pwrite / os.preadv,
                                                                  O_DIRECT through aligned bounce buffers
    fallback.window_to_blocks / blocks_to_window(...)             pread / pwrite on the window's fd (no mapping)
    _offsets, _bytes_view, _check_ranges, _check_nbytes           argument checks both paths share

These define the bytes the compiled kvbm._native must produce (tests compare the two byte for
byte); kvbm.ops runs them when the extension is not built, is turned off (KVBM_NATIVE=0) or an
op is called with use_native=False. This module never imports the extension: kvbm.ops is the
one door to it, and re-exports `fallback`.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from types import SimpleNamespace

import numpy as np


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


def _window_copy_py(to_window: bool, fd: int, wmap, window_offsets, buf, buf_offsets, nbytes: int) -> np.ndarray:
    """The window ops without a mapping: pread/pwrite on the window's descriptor (a truncated
    window fails a read, a write extends the file; nothing here can fault). Ranges inside the
    mapping, when one is given, are checked as the native op checks them."""
    op = "blocks_to_window" if to_window else "window_to_blocks"
    nbytes = _check_nbytes(op, nbytes)
    window_offsets = _offsets(window_offsets, "window_offsets")
    buf_offsets = _offsets(buf_offsets, "buf_offsets")
    if len(buf_offsets) != len(window_offsets):
        raise ValueError(f"{op}: len(window_offsets) = {len(window_offsets)} but len(buf_offsets) = {len(buf_offsets)}")
    if wmap is not None:
        _check_ranges(op, "window_offsets", window_offsets, nbytes, wmap.nbytes)
    _check_ranges(op, "buf_offsets", buf_offsets, nbytes, _bytes_view(buf, "src" if to_window else "dst").size)
    return _file_io_py(to_window, fd, buf, buf_offsets, window_offsets, nbytes, None)


def _window_to_blocks_py(fd, wmap, window_offsets, dst, dst_offsets, nbytes, *, threads=0):
    return _window_copy_py(False, fd, wmap, window_offsets, dst, dst_offsets, nbytes)


def _blocks_to_window_py(src, src_offsets, fd, wmap, window_offsets, nbytes, *, threads=0):
    return _window_copy_py(True, fd, wmap, window_offsets, src, src_offsets, nbytes)


fallback = SimpleNamespace(
    crc32c=_crc32c_py, crc32c_blocks=_crc32c_blocks_py, copy_blocks=_copy_blocks_py,
    copy_blocks_crc32c=_copy_blocks_crc32c_py, copy_buffer=_copy_buffer_py,
    pwrite_blocks=_pwrite_blocks_py, pread_blocks=_pread_blocks_py,
    window_to_blocks=_window_to_blocks_py, blocks_to_window=_blocks_to_window_py,
)
