"""An engine's paged KV tensors, and the copies between its pages and kvbm's staging rows.

    PagedKV(tensors, block_dim=None)     one tensor per layer; block id b names one page in each
    gather(block_ids) -> staging         pages -> contiguous rows (one row = one kvbm block)
    scatter(staging, block_ids)          rows -> pages
    gather_async(block_ids) -> (staging, event)   on a GPU: one copy kernel per layer, on
    scatter_async(staging, block_ids) -> event    kvbm's own stream, ordered after the engine's
                                                  work; the event says when the pages are free

A staging row holds the block's bytes layer by layer; within a layer, the block's slice of
the tensor in C order (vLLM's CUDA `[2, num_blocks, ...]` layout: its K page, then its V page).

On a GPU with kvbm's CUDA build, the async copies go page to pinned row directly (no
`index_select` temporary, no synchronous device-to-host copy on the engine's stream), every
layer in one launch (layers of one page size form one address span), with the thread blocks
capped (`copy_ctas`, 8 by default) so the copy does not starve the model. The
synchronous `gather`/`scatter` (torch indexing) are the reference and the CPU path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import ops


@dataclass(eq=False)
class _Layer:
    lead: np.ndarray  # byte offset of each page of a block before the block index (C order)
    block_stride: int  # bytes between block b and b + 1
    page: int  # contiguous bytes per page
    row_offset: int  # where this layer starts in a staging row


@dataclass(eq=False)
class _Span:
    base: int  # lowest address of the group's layers
    nbytes: int  # up to the end of the highest one (the gaps between them are never addressed)
    page: int
    start: np.ndarray  # per page of a block: its offset from base in block 0
    stride: np.ndarray  # per page: bytes from block b to b + 1
    row: np.ndarray  # per page: its offset in a staging row

    def cuda_array(self) -> Any:
        """The span as a CUDA byte array for ops.cuda_copy_blocks."""
        return _CudaBytes(self.base, self.nbytes)


class _CudaBytes:
    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"data": (ptr, False), "shape": (nbytes,), "typestr": "|u1",
                                         "strides": None, "version": 3}


class PagedKV:
    """An engine's paged KV tensors (one per layer); a block id names one page in each.

    The block dimension is found per tensor: dim 1 for vLLM's `[2, num_blocks, ...]` layouts,
    else dim 0 (vLLM's CPU `[num_blocks, heads, block_size, 2*head]`, TRT-LLM's pools).
    """

    def __init__(self, tensors: Sequence[Any], block_dim: int | None = None, copy_ctas: int = 8) -> None:
        import torch

        self.torch = torch
        self.views = []
        self.sizes = []
        dims = []
        for t in tensors:
            dim = block_dim if block_dim is not None else (1 if t.dim() >= 5 and t.shape[0] == 2 else 0)
            v = t.movedim(dim, 0) if dim else t
            self.views.append(v)
            self.sizes.append(v[0].numel() * v.element_size())
            dims.append(dim)
        if not self.views:
            raise ValueError("no KV cache tensors were registered")
        self.num_blocks = self.views[0].shape[0]
        self.block_nbytes = sum(self.sizes)
        self.device = self.views[0].device
        self.copy_ctas = copy_ctas
        self.layers = self._geometry(tensors, dims)
        # async copies run as kvbm's copy kernel on a GPU with the CUDA build
        self.direct = self.layers is not None and self.device.type == "cuda" and ops.cuda_available()
        self.stream = torch.cuda.Stream(device=self.device) if self.direct else None
        self.spans = self._spans(tensors) if self.layers is not None else None

    def _geometry(self, tensors: Sequence[Any], dims: list[int]) -> list[_Layer] | None:
        """Where each block's pages lie in each layer's bytes; None unless every layer is dense."""
        layers, row = [], 0
        for t, dim, size in zip(tensors, dims, self.sizes):
            if not t.is_contiguous():
                return None  # pages are found by strides of a dense tensor only
            el = t.element_size()
            if dim == 0:
                lead = np.zeros(1, dtype=np.int64)
            else:  # every index before the block dim, in C order, as an element offset
                combos = np.indices(tuple(t.shape[:dim])).reshape(dim, -1).T
                lead = combos.astype(np.int64) @ np.array(t.stride()[:dim], dtype=np.int64)
            layers.append(_Layer(lead * el, t.stride(dim) * el,
                                 size // len(lead), row))
            row += size
        return layers

    def _spans(self, tensors: Sequence[Any]) -> list[_Span]:
        """Layers grouped by page size, each group one address span: one kernel launch per group
        (usually one for the whole model) instead of one per layer."""
        groups: dict[int, list] = {}
        for t, layer in zip(tensors, self.layers):
            groups.setdefault(layer.page, []).append((t.data_ptr(), t.numel() * t.element_size(), layer))
        spans = []
        for page, members in groups.items():
            base = min(p for p, _, _ in members)
            end = max(p + n for p, n, _ in members)
            spans.append(_Span(
                base, end - base, page,
                np.concatenate([p - base + layer.lead for p, _, layer in members]),
                np.concatenate([np.full(len(layer.lead), layer.block_stride, np.int64) for _, _, layer in members]),
                np.concatenate([layer.row_offset + np.arange(len(layer.lead), dtype=np.int64) * page
                                for _, _, layer in members])))
        return spans

    def span_offsets(self, block_ids: Sequence[int]):
        """Per span: (span, page byte offsets from span.base, staging row byte offsets)."""
        ids = np.asarray(block_ids, dtype=np.int64)[:, None]
        rows = np.arange(len(ids), dtype=np.int64)[:, None] * self.block_nbytes
        for span in self.spans:
            yield span, (ids * span.stride[None, :] + span.start[None, :]).ravel(), (rows + span.row[None, :]).ravel()

    def staging(self, n: int) -> Any:
        pin = self.device.type == "cuda"
        return self.torch.empty((n, self.block_nbytes), dtype=self.torch.uint8, pin_memory=pin)

    def _parts(self, staging: Any, n: int):
        off = 0
        for v, size in zip(self.views, self.sizes):
            yield v, staging[:n, off:off + size].view(v.dtype).view(n, *v.shape[1:])
            off += size

    def gather(self, block_ids: Sequence[int], staging: Any = None) -> Any:
        """Copy the blocks' pages of every layer into contiguous staging rows (synchronous)."""
        n = len(block_ids)
        staging = self.staging(n) if staging is None else staging
        ids = self.torch.as_tensor(list(block_ids), dtype=self.torch.long, device=self.device)
        for v, part in self._parts(staging, n):
            part.copy_(v.index_select(0, ids))
        return staging

    def scatter(self, staging: Any, block_ids: Sequence[int]) -> None:
        """Copy staging rows back into the blocks' pages of every layer (synchronous)."""
        n = len(block_ids)
        if not n:
            return
        ids = self.torch.as_tensor(list(block_ids), dtype=self.torch.long, device=self.device)
        for v, part in self._parts(staging, n):
            v.index_copy_(0, ids, part.to(v.device))

    # ------------------------------------------------------------ GPU, asynchronous

    def gather_async(self, block_ids: Sequence[int], after: Any = None) -> tuple[Any, Any]:
        """(staging, event): the rows are filled once `event` completes (None: already).
        The copy runs after the work queued on `after` (a CUDA stream; default: the current one)."""
        if not self.direct:
            return self.gather(block_ids), None
        staging = self.staging(len(block_ids))
        return staging, self._copy(block_ids, staging, True, after)

    def scatter_async(self, staging: Any, block_ids: Sequence[int], after: Any = None) -> Any:
        """Rows -> pages; returns an event (None: done already). The engine must not read the
        pages before the event completes (the connector reports the load only then)."""
        if not self.direct:
            self.scatter(staging, block_ids)
            return None
        return self._copy(block_ids, staging, False, after)

    def _copy(self, block_ids: Sequence[int], staging: Any, to_rows: bool, after: Any) -> Any:
        torch = self.torch
        rows = staging.numpy()
        # after everything the engine queued so far (the step that wrote these pages)
        self.stream.wait_stream(after if after is not None else torch.cuda.current_stream(self.device))
        for span, pages, row in self.span_offsets(block_ids):
            dev = span.cuda_array()
            if to_rows:
                ops.cuda_copy_blocks(dev, pages, rows, row, span.page, stream=self.stream, max_ctas=self.copy_ctas)
            else:
                ops.cuda_copy_blocks(rows, row, dev, pages, span.page, stream=self.stream, max_ctas=self.copy_ctas)
        event = torch.cuda.Event()
        event.record(self.stream)
        return event
