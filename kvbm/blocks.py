"""Block identity and KV layout.

    KVLayout            the shape of one block's KV; gives block_nbytes and a fingerprint
    Namespace           model id + layout fingerprint + tenant salt; roots every key chain
    Namespace.chain     token ids -> chained 128-bit BlockKeys
    Namespace.adopt     an engine's own block hashes -> BlockKeys in this namespace

A BlockKey is 16 bytes (blake2b-128). Each key hashes its parent key, so equal keys mean
an equal prefix in the same namespace; two namespaces never share a key.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

BlockKey = bytes
KEY_BYTES = 16

DTYPE_BYTES = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "fp8": 1,
    "int8": 1,
    "uint8": 1,
}


@dataclass(frozen=True)
class KVLayout:
    """The KV of one block on one tensor-parallel rank.

    num_kv_heads is the count held by this rank (total heads / tp_size for sharded heads).
    kv_factor is 2 (K and V) or 1 (MLA's joint latent).
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str = "bfloat16"
    kv_factor: int = 2
    tp_rank: int = 0
    tp_size: int = 1

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size", "tp_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"layout.{name} must be a positive integer, got {value!r}")
        if self.kv_factor not in (1, 2):
            raise ValueError(f"layout.kv_factor must be 2 (K and V) or 1 (MLA), got {self.kv_factor!r}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"layout.dtype {self.dtype!r} is unknown; use one of {', '.join(DTYPE_BYTES)}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"layout.tp_rank must be in 0..tp_size-1 ({self.tp_size - 1}), got {self.tp_rank!r}")

    @property
    def itemsize(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def block_nbytes(self) -> int:
        return (
            self.num_layers * self.kv_factor * self.num_kv_heads * self.head_dim
            * self.block_size * self.itemsize
        )

    @property
    def fingerprint(self) -> str:
        """Stable across runs and machines: equal layouts, equal fingerprints."""
        fields = ",".join(f"{k}={v}" for k, v in sorted(asdict(self).items()))
        return hashlib.blake2b(fields.encode(), digest_size=8).hexdigest()


class Namespace:
    """Roots the key chain: blocks of different models, layouts or tenants never collide."""

    def __init__(self, model: str, layout: KVLayout | None = None, salt: str = "") -> None:
        if not model:
            raise ValueError("namespace.model must name the model (e.g. 'meta-llama/Llama-3.1-8B')")
        self.model = model
        self.layout = layout
        self.salt = salt
        fp = layout.fingerprint if layout is not None else "-"
        self.root: BlockKey = _digest(b"kvbm-ns\0" + f"{model}\0{fp}\0{salt}".encode())

    def __repr__(self) -> str:
        return f"Namespace(model={self.model!r}, layout={self.layout!r}, salt={self.salt!r})"

    def chain(
        self,
        token_ids: Sequence[int],
        block_size: int | None = None,
        extra_keys: Sequence[object] | None = None,
        parent: BlockKey | None = None,
    ) -> list[BlockKey]:
        """Keys of each full block of `token_ids` (a trailing partial block has no key).

        extra_keys: per-block extras (LoRA id, multimodal hashes...), one entry per full block,
        each a str/int/bytes/tuple of those, or None.
        """
        bs = block_size or (self.layout.block_size if self.layout else None)
        if not bs:
            raise ValueError("chain() needs block_size (or a namespace with a layout)")
        n = len(token_ids) // bs
        if extra_keys is not None and len(extra_keys) < n:
            raise ValueError(f"extra_keys has {len(extra_keys)} entries for {n} full blocks")
        keys: list[BlockKey] = []
        prev = parent if parent is not None else self.root
        for i in range(n):
            toks = token_ids[i * bs:(i + 1) * bs]
            payload = prev + struct.pack(f"<{bs}q", *toks)
            if extra_keys is not None and extra_keys[i] is not None:
                payload += b"\0x" + repr(extra_keys[i]).encode()
            prev = _digest(payload)
            keys.append(prev)
        return keys

    def adopt(self, engine_hashes: Iterable[int | bytes]) -> list[BlockKey]:
        """Map an engine's own chained block hashes (vLLM, TRT-LLM) into this namespace.

        The engine already chains its hashes, so each is mixed with the root only.
        """
        root = self.root
        out = []
        for h in engine_hashes:
            raw = h if isinstance(h, bytes) else int(h).to_bytes(32, "little", signed=True)
            out.append(_digest(root + b"\0e" + raw))
        return out


def _digest(data: bytes) -> BlockKey:
    return hashlib.blake2b(data, digest_size=KEY_BYTES).digest()
