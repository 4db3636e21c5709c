"""G1 device storage: a pool of blocks in GPU memory (torch or cupy), or an engine's tensors.

Standalone, kvbm allocates `capacity_blocks * block_nbytes` bytes on `device` with torch
(cupy when torch is absent). With `device="cpu"` a host tensor stands in for HBM, so the
G1 paths are tested on machines without a GPU. An engine connector passes its own KV tensor
(`tensor=`, any contiguous tensor whose bytes are whole blocks) instead.

`copy_ctas` caps the thread blocks of kvbm's copy kernel between this pool and a pinned host
pool (G1 <-> G2): the kernel runs on the SMs, so an uncapped grid starves a model running
beside it. Measured on an H200 (bench/RESULTS.md): beside a bf16 matmul loop, an uncapped copy
slowed the matmuls 7x, 32 thread blocks 2x, 8 not measurably, while 8 still moved ~0.9x of
the copy-engine limit device -> host. 0 means uncapped (a pool no model shares).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Region, Storage


class DeviceStorage(Storage):
    medium = "device"
    instant = False

    def __init__(self, capacity_blocks: int, block_nbytes: int, *, device: str = "cuda",
                 tensor: Any = None, copy_ctas: int = 8, **options: Any) -> None:
        super().__init__(capacity_blocks, block_nbytes, **options)
        if block_nbytes <= 0:
            raise ValueError("device storage needs a layout: block_nbytes must be > 0")
        if isinstance(copy_ctas, bool) or not isinstance(copy_ctas, int) or copy_ctas < 0:
            raise ValueError(f"device storage option copy_ctas must be an int >= 0 (0: uncapped), got {copy_ctas!r}")
        self.device = device
        self.copy_ctas = copy_ctas
        self.pool, self.device_id = self._allocate(tensor)
        self._free = list(range(capacity_blocks - 1, -1, -1))

    def _allocate(self, tensor: Any) -> tuple[Any, int]:
        nbytes = self.capacity_blocks * self.block_nbytes
        if tensor is not None:
            flat = tensor.reshape(-1)
            import torch

            raw = flat.view(torch.uint8)
            if raw.numel() < nbytes:
                raise ValueError(f"device tensor holds {raw.numel()} bytes, fewer than {nbytes} for "
                                 f"{self.capacity_blocks} blocks of {self.block_nbytes}")
            return _as_pool(raw[:nbytes]), _device_index(raw)
        if self.device == "cpu":
            try:
                import torch
            except ImportError:  # numpy stands in when torch is absent
                return np.zeros(nbytes, dtype=np.uint8), 0
            return _as_pool(torch.zeros(nbytes, dtype=torch.uint8)), 0
        try:
            import torch
        except ImportError:
            torch = None
        if torch is not None:
            t = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            return t, _device_index(t)
        try:
            import cupy
        except ImportError as exc:
            raise RuntimeError("a CUDA device pool needs torch or cupy: pip install 'kvbm-tiered[torch]'") from exc
        return cupy.empty(nbytes, dtype=cupy.uint8), int(cupy.cuda.Device().id)

    def allocate(self) -> int | None:
        return self._free.pop() if self._free else None

    def free(self, slot: int) -> None:
        self._free.append(slot)

    def offset(self, slot: int) -> int:
        return slot * self.block_nbytes

    def offsets(self, slots) -> np.ndarray:
        return np.asarray(slots, dtype=np.int64) * self.block_nbytes

    def view(self, slot: int) -> Any:
        off = slot * self.block_nbytes
        return self.pool[off:off + self.block_nbytes]

    def describe(self, slot: int) -> list[Region]:
        base = self.pool.ctypes.data if isinstance(self.pool, np.ndarray) else self.pool.data_ptr()
        return [Region("memory", base + slot * self.block_nbytes, 0, self.block_nbytes, self.device_id)]



def _device_index(t: Any) -> int:
    dev = getattr(t, "device", None)
    return int(getattr(dev, "index", 0) or 0)


def _as_pool(t: Any) -> Any:
    """CPU tensors become numpy views (so native batched copies apply); CUDA stays torch."""
    if getattr(t, "device", None) is not None and t.device.type == "cpu":
        return t.numpy()
    return t
