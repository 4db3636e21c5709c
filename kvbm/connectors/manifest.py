"""Page manifest: what one cached prefix position (a page) holds across an engine's KV cache groups.

    Buffer(name, shape, dtype)          one layer's bytes of one engine block (a state tensor for SSM)
    Piece(kind, buffers, window)        one group's part of a page: kind "full" | "sliding" | "mamba"
    PageManifest(block_size, pieces)    a page: its pieces side by side, each at a byte offset
      .page_nbytes / .offsets           bytes per page; where each piece starts in it
      .page_stride                      bytes a kvbm block holds: page_nbytes rounded up to a
                                        multiple of block_size (zero padding)
      .ranges()                         (piece, buffer, start, end) for every buffer, in page order
      .fingerprint                      versioned hash of all of the above
      .namespace(ns)                    ns with the fingerprint folded into its root: a page written
                                        for one group layout is never keyed like one for another
      .layout()                         the KVLayout the manager sees: page_nbytes opaque bytes
      .needed(n)                        per piece, the pages a hit of n blocks must bring
      .to_dict() / from_dict()          plain data (configs, the daemon, tests)

Hybrid models (vLLM's hybrid memory allocator) keep one block table per KV cache group: a
full-attention group, sliding-window groups, SSM (Mamba) groups. kvbm stores, per prefix
position, one page holding every group's piece for that position, so a page is moved,
demoted and evicted whole: no tier can hold half of one. What a hit of n blocks
(n * block_size tokens) needs from each kind, as vLLM's own prefix cache decides it
(vllm/v1/core/single_type_kv_cache_manager.py):

    full      every page 0 .. n-1
    sliding   the last ceil((window - 1) / block_size) pages (SlidingWindowManager)
    mamba     page n-1 only: the state after n * block_size tokens (MambaManager: in "align"
              mode the state is kept at block boundaries, a hit ends on one)

A mamba piece exists only for pages that end where the engine's state was captured, so a page
holding it is keyed apart (`state_key`): a plain page's state region is zero and never read.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Sequence

from ..blocks import DTYPE_BYTES, KVLayout, Namespace

MANIFEST_VERSION = 1
KINDS = ("full", "sliding", "mamba")
# beyond blocks.DTYPE_BYTES: SSM states are often float32 and int tensors show up as buffers
_ITEMSIZE = {**DTYPE_BYTES, "int32": 4, "int64": 8, "float64": 8}


@dataclass(frozen=True)
class Buffer:
    """One layer's (or state tensor's) bytes of one engine block, in the engine's byte order."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if self.dtype not in _ITEMSIZE:
            raise ValueError(f"manifest buffer {self.name!r}: dtype {self.dtype!r} is unknown; "
                             f"use one of {', '.join(_ITEMSIZE)}")
        if not self.shape or any(d <= 0 for d in self.shape):
            raise ValueError(f"manifest buffer {self.name!r}: shape {self.shape} must be positive dims")

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class Piece:
    """One KV cache group's part of a page."""

    kind: str
    buffers: tuple[Buffer, ...]
    window: int = 0  # sliding: the window in tokens

    def __post_init__(self) -> None:
        object.__setattr__(self, "buffers", tuple(self.buffers))
        if self.kind not in KINDS:
            raise ValueError(f"manifest piece kind {self.kind!r} is unknown; use one of {', '.join(KINDS)}")
        if self.kind == "sliding" and self.window <= 0:
            raise ValueError(f"a sliding piece needs its window in tokens (> 0), got {self.window!r}")
        if self.kind != "sliding" and self.window:
            raise ValueError(f"only a sliding piece has a window (got {self.window} for {self.kind})")
        if not self.buffers:
            raise ValueError(f"a {self.kind} piece needs at least one buffer")

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)


class PageManifest:
    """What a page holds, piece by piece; equal manifests, equal fingerprints."""

    def __init__(self, block_size: int, pieces: Sequence[Piece], version: int = MANIFEST_VERSION) -> None:
        if version != MANIFEST_VERSION:
            raise ValueError(f"page manifest version {version} is not supported (this kvbm reads "
                             f"{MANIFEST_VERSION}); the pages were written by another kvbm")
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"manifest block_size must be a positive integer, got {block_size!r}")
        if not pieces:
            raise ValueError("a page manifest needs at least one piece")
        self.version = version
        self.block_size = block_size
        self.pieces = tuple(pieces)
        self.offsets = []
        off = 0
        for p in self.pieces:
            self.offsets.append(off)
            off += p.nbytes
        self.page_nbytes = off
        self.page_stride = -(-off // block_size) * block_size

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PageManifest) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __repr__(self) -> str:
        kinds = ",".join(p.kind + (f"({p.window})" if p.window else "") for p in self.pieces)
        return f"PageManifest(v{self.version}, block_size={self.block_size}, [{kinds}], {self.page_nbytes} B)"

    # ------------------------------------------------------------ identity

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "block_size": self.block_size,
                "pieces": [{"kind": p.kind, "window": p.window,
                            "buffers": [[b.name, list(b.shape), b.dtype] for b in p.buffers]}
                           for p in self.pieces]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PageManifest":
        pieces = [Piece(p["kind"], tuple(Buffer(n, tuple(s), d) for n, s, d in p["buffers"]), int(p.get("window", 0)))
                  for p in data["pieces"]]
        return cls(int(data["block_size"]), pieces, int(data.get("version", MANIFEST_VERSION)))

    @property
    def fingerprint(self) -> str:
        raw = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.blake2b(b"kvbm-page-manifest\0" + raw, digest_size=16).hexdigest()

    def namespace(self, base: Namespace) -> Namespace:
        """`base` with this manifest folded into its root (every key chains from the root)."""
        return base.derive("page_manifest", self.fingerprint)

    def layout(self, tp_rank: int = 0, tp_size: int = 1) -> KVLayout:
        """The manager's view of a page: page_stride opaque bytes (its identity is the manifest)."""
        return KVLayout(num_layers=1, num_kv_heads=1, head_dim=self.page_stride // self.block_size,
                        block_size=self.block_size,
                        dtype="uint8", kv_factor=1, tp_rank=tp_rank, tp_size=tp_size)

    # ------------------------------------------------------------ bytes

    def ranges(self) -> list[tuple[int, int, int, int]]:
        """(piece index, buffer index, start, end) byte ranges in a page, in page order."""
        out = []
        for i, (p, off) in enumerate(zip(self.pieces, self.offsets)):
            for j, b in enumerate(p.buffers):
                out.append((i, j, off, off + b.nbytes))
                off += b.nbytes
        return out

    def piece_range(self, i: int) -> tuple[int, int]:
        return self.offsets[i], self.offsets[i] + self.pieces[i].nbytes

    # ------------------------------------------------------------ hits

    @property
    def has_state(self) -> bool:
        """Whether a hit must end on a page that holds an SSM state."""
        return any(p.kind == "mamba" for p in self.pieces)

    def tail_pages(self, piece: Piece) -> int | None:
        """Pages at the end of a hit this piece needs (None: all of them)."""
        if piece.kind == "full":
            return None
        if piece.kind == "sliding":
            return max(1, -(-(piece.window - 1) // self.block_size))
        return 1

    def needed(self, n: int, start: int = 0) -> list[range]:
        """Per piece: the pages in [start, n) a hit of n blocks must restore (loaded from kvbm)."""
        out = []
        for p in self.pieces:
            tail = self.tail_pages(p)
            first = 0 if tail is None else max(0, n - tail)
            out.append(range(max(first, start), n))
        return out

    def needed_nbytes(self, n: int) -> int:
        """Bytes of a hit of n blocks that reach the engine (what the windows and states save)."""
        return sum(len(r) * p.nbytes for r, p in zip(self.needed(n), self.pieces))


def state_key(key: bytes) -> bytes:
    """The key of the page at `key`'s position that also holds the SSM state there."""
    return hashlib.blake2b(b"kvbm-state\0" + bytes(key), digest_size=len(key)).digest()
