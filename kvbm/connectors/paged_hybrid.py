"""A hybrid engine's paged KV: one PagedKV per KV cache group, a page = one block id per group.

    HybridPagedKV(manifest, kv_caches)  kv_caches: layer name -> tensor (attention) or list of
                                        tensors (an SSM layer's states); checked against the manifest
    gather(pages) -> staging            pages: per position a tuple of block ids (None: no piece)
    scatter(staging, pages)             rows -> each group's pages; None pieces are never written

Engine-independent (torch only): the vLLM connector (vllm_hma.py) and bench/bench_hybrid.py use it.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..config import ConfigError
from .manifest import PageManifest
from .paged import PagedKV


class HybridPagedKV:
    """Every group's paged tensors; a page is one block id per group (None: no piece there).

    A staging row is one page: each group's piece at its manifest offset, its layers in order.
    Pieces marked None are left zero on gather and never written on scatter."""

    def __init__(self, manifest: PageManifest, kv_caches: dict[str, Any], block_dim: int | None = None) -> None:
        import torch

        self.torch = torch
        self.manifest = manifest
        self.groups: list[PagedKV] = []
        for i, piece in enumerate(manifest.pieces):
            tensors = []
            for name in dict.fromkeys(b.name.split("[")[0] for b in piece.buffers):
                if name not in kv_caches:
                    raise ConfigError(f"kvbm connector: vLLM registered no KV cache for layer {name!r}")
                t = kv_caches[name]
                tensors += list(t) if isinstance(t, (list, tuple)) else [t]
            kv = PagedKV(tensors, 0 if piece.kind == "mamba" else block_dim)
            if kv.block_nbytes != piece.nbytes:
                raise ConfigError(f"kvbm connector: group {i} ({piece.kind}) holds {kv.block_nbytes} bytes per "
                                  f"block in vLLM's tensors but its manifest says {piece.nbytes}")
            self.groups.append(kv)
        self.block_nbytes = manifest.page_stride
        self.device = self.groups[0].device
        self.direct = False

    def staging(self, n: int) -> Any:
        """Rows for n pages (uninitialised: gather zeroes what it does not fill)."""
        return self.torch.empty((n, self.block_nbytes), dtype=self.torch.uint8)

    def _piece(self, staging: Any, pages: Sequence[Sequence[int | None]], i: int):
        """(rows of `staging` for piece i as a view when they are consecutive, else None; their row
        indices; the piece's block ids)."""
        rows = [r for r, page in enumerate(pages) if page[i] is not None]
        ids = [pages[r][i] for r in rows]
        lo, hi = self.manifest.piece_range(i)
        view = None
        if rows and rows[-1] - rows[0] == len(rows) - 1:  # the usual case: a tail of the hit
            view = staging[rows[0]:rows[-1] + 1, lo:hi]  # rows are strided: PagedKV copies in place
        return view, rows, ids

    def gather(self, pages: Sequence[Sequence[int | None]], staging: Any = None) -> Any:
        staging = self.staging(len(pages)) if staging is None else staging
        for i, kv in enumerate(self.groups):
            view, rows, ids = self._piece(staging, pages, i)
            lo, hi = self.manifest.piece_range(i)
            if len(rows) < len(pages):  # a piece a page does not hold is zero, never stale bytes
                staging[:, lo:hi] = 0
            if view is not None:
                kv.gather(ids, staging=view)
            elif rows:
                staging[rows, lo:hi] = kv.gather(ids)
        staging[:, self.manifest.page_nbytes:] = 0  # the padding
        return staging

    def scatter(self, staging: Any, pages: Sequence[Sequence[int | None]]) -> None:
        for i, kv in enumerate(self.groups):
            view, rows, ids = self._piece(staging, pages, i)
            if view is not None:
                kv.scatter(view, ids)
            elif rows:
                lo, hi = self.manifest.piece_range(i)
                kv.scatter(staging[rows, lo:hi].contiguous(), ids)

    def gather_async(self, pages: Sequence[Sequence[int | None]], after: Any = None) -> tuple[Any, Any]:
        return self.gather(pages), None

    def scatter_async(self, staging: Any, pages: Sequence[Sequence[int | None]], after: Any = None) -> Any:
        self.scatter(staging, pages)
        return None
