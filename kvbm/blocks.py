"""Block identity and KV layout.

    KVLayout            the shape of one block's KV; gives block_nbytes and a fingerprint
    Namespace           model id + layout fingerprint + tenant salt; roots every key chain
    Namespace.chain     token ids -> chained 128-bit BlockKeys
    Namespace.adopt     an engine's own block hashes -> BlockKeys in this namespace
    Namespace.derive    a child namespace (a request's cache salt, a new generation)
    check_name(v, what) model names and salts: printable text (ValueError names the field)
    fields(*parts)      the unambiguous (length-prefixed) encoding every namespace id hashes

A BlockKey is 16 bytes (blake2b-128). Each key hashes its parent key, so equal keys mean
an equal prefix in the same namespace; two namespaces never share a key. Every namespace id
(this root, the storages' namespace_id, the daemon's namespace_of) hashes its fields
length-prefixed, so no two different (model, layout, salt) triples give the same bytes;
model and salt also refuse control characters, so what a log shows is what was hashed.
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


def check_name(value: object, what: str) -> str:
    """`value` if it is a string without control characters (NUL, newline, ESC, ...)."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {value!r}")
    bad = next((c for c in value if ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0), None)
    if bad is not None:
        raise ValueError(f"{what} {value!r} contains the control character U+{ord(bad):04X}; "
                         f"use printable text")
    return value


def fields(*parts: str | bytes) -> bytes:
    """Each part as its length (8 bytes) and its bytes: distinct tuples, distinct encodings."""
    out = []
    for part in parts:
        raw = part.encode() if isinstance(part, str) else bytes(part)
        out.append(len(raw).to_bytes(8, "little") + raw)
    return b"".join(out)


class Namespace:
    """Roots the key chain: blocks of different models, layouts or tenants never collide."""

    def __init__(self, model: str, layout: KVLayout | None = None, salt: str = "", *,
                 _root: BlockKey | None = None) -> None:
        if not model:
            raise ValueError("namespace.model must name the model (e.g. 'meta-llama/Llama-3.1-8B')")
        self.model = check_name(model, "namespace.model")
        self.layout = layout
        self.salt = salt if _root is not None else check_name(salt, "namespace.salt")
        fp = layout.fingerprint if layout is not None else "-"
        self.root: BlockKey = _root or _digest(b"kvbm-ns\1" + fields(model, fp, salt))

    def __repr__(self) -> str:
        return f"Namespace(model={self.model!r}, layout={self.layout!r}, salt={self.salt!r})"

    def derive(self, label: str, value: str) -> "Namespace":
        """A namespace inside this one, for `label` = `value` (e.g. "cache_salt", a request's
        salt): any text, control characters included, and never equal to another pair's."""
        root = _digest(b"kvbm-ns-derive\0" + self.root + fields(label, value))
        return Namespace(self.model, self.layout, f"{self.salt}[{label}={value!r}]", _root=root)

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
