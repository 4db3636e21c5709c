"""The client's staging window and the buffers it copies block bytes between.

    _map_window(path, nbytes) -> (array, mmap)   map this session's window, then unlink its name
    _unmap(mmap)                                 unmap, unless a caller still holds a view
    _rows(bufs, nbytes) -> flat array | None     one contiguous 2-D buffer of whole blocks, as bytes
    _bytes(buf, nbytes) -> array                 one block buffer (numpy, CPU torch, buffer) as bytes
"""

from __future__ import annotations

import mmap
import os
from typing import Any

import numpy as np


def _map_window(path: str, nbytes: int) -> tuple[np.ndarray, mmap.mmap]:
    """Map this session's window and unlink its name: no other process can open it after."""
    fd = os.open(path, os.O_RDWR)
    try:
        m = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED)
    finally:
        os.close(fd)
    try:
        os.unlink(path)
    except OSError:  # the daemon did it already, or runs as another user
        pass
    return np.frombuffer(m, dtype=np.uint8), m


def _unmap(m: mmap.mmap) -> None:
    try:
        m.close()
    except BufferError:  # a caller still holds a view; the GC unmaps it
        pass


def _rows(bufs: Any, nbytes: int) -> np.ndarray | None:
    """bufs as one flat uint8 array when it is a C-contiguous 2-D numpy array or CPU torch
    tensor of whole blocks (one row each); None for anything else (a list of buffers)."""
    if isinstance(bufs, np.ndarray):
        arr = bufs
    elif hasattr(bufs, "numpy") and getattr(getattr(bufs, "device", None), "type", None) == "cpu":
        try:
            if bufs.dim() != 2 or not bufs.is_contiguous():
                return None
            arr = bufs.view(__import__("torch").uint8).numpy()
        except (RuntimeError, TypeError, ValueError):  # grad, an odd dtype: row by row then
            return None
    else:
        return None
    if arr.ndim != 2 or not arr.flags.c_contiguous or arr.shape[1] * arr.itemsize != nbytes:
        return None
    return arr.reshape(-1).view(np.uint8)


def _bytes(buf: Any, nbytes: int) -> np.ndarray:
    if isinstance(buf, np.ndarray):
        arr = buf.reshape(-1).view(np.uint8)
    elif hasattr(buf, "numpy"):  # a CPU torch tensor
        arr = buf.reshape(-1).view(__import__("torch").uint8).numpy()
    else:
        arr = np.frombuffer(memoryview(buf).cast("B"), dtype=np.uint8)
    if arr.nbytes != nbytes:
        raise ValueError(f"a block buffer must be {nbytes} bytes, got {arr.nbytes}")
    return arr
