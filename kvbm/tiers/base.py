"""Storage: owns the bytes of one tier (slots, offsets, objects); knows nothing of policy.

    Storage.allocate() -> slot            room for one block, or None when the medium is full
    Storage.free(slot)                    give the room back (the block is gone)
    Storage.write([(key, slot, buf)])     persist blocks; per block True, or False on failure
    Storage.read([(key, slot, buf)])      fill buffers; per block True, or False (missing,
                                          I/O error, checksum mismatch): a miss, never wrong bytes
    Storage.recover() -> [(key, slot)]    persistent media: the blocks that survived a restart
    Storage.describe(slot)                the block as regions (memory ranges or file extents), for NIXL
    Storage.close()                       flush indexes and release the medium

`instant` storages (metadata only) complete every transfer at once; the manager then frees
a source slot in the same step it moves the key, so replays match the reference semantics.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

TIER_NAMES = ("g1", "g2", "g3", "g4")
MEDIUM_OF_TIER = {"g1": "device", "g2": "host", "g3": "disk", "g4": "object"}


@dataclass(frozen=True, slots=True)
class Region:
    """One contiguous piece of a block: a memory range or a file/object extent."""

    kind: str  # "memory" | "file" | "object" | "none"
    address: int | str  # pointer, file path or object URL
    offset: int
    length: int
    device_id: int = 0


@dataclass(slots=True)
class StorageErrors:
    io_errors: int = 0  # reads or writes that failed at the medium (fail soft: a miss)
    checksum_errors: int = 0  # blocks whose bytes did not match their checksum (never served)


class Storage(ABC):
    """One tier's medium. Buffers are numpy uint8 arrays (or buffers) of block_nbytes.

    `namespace` (model, layout fingerprint and salt, as one path-safe string) is part of
    every persistent name, so two namespaces never read each other's blocks.
    """

    medium: ClassVar[str] = ""
    instant: ClassVar[bool] = False  # metadata only: nothing to copy
    persistent: ClassVar[bool] = False  # blocks survive close/reopen (recover())

    def __init__(self, capacity_blocks: int, block_nbytes: int = 0, *, namespace: str = "default",
                 **options: Any) -> None:
        if options:
            raise TypeError(f"{type(self).__name__} got unknown option(s) {sorted(options)}")
        self.capacity_blocks = capacity_blocks
        self.block_nbytes = block_nbytes
        self.namespace = namespace
        self.errors = StorageErrors()

    @abstractmethod
    def allocate(self) -> Any: ...

    @abstractmethod
    def free(self, slot: Any) -> None: ...

    @abstractmethod
    def describe(self, slot: Any) -> list[Region]: ...

    def write(self, items: Sequence[tuple[Any, Any, Any]]) -> list[bool]:
        raise NotImplementedError(f"{self.medium} storage holds no bytes")

    def read(self, items: Sequence[tuple[Any, Any, Any]]) -> list[bool]:
        raise NotImplementedError(f"{self.medium} storage holds no bytes")

    def recover(self) -> list[tuple[Any, Any]]:
        return []

    def close(self) -> None:
        pass


def encode_key(key: Any) -> str:
    """A block key as a file/object name: 16-byte keys as hex, integers (traces) as 'i<n>'."""
    if isinstance(key, bytes):
        return key.hex()
    if isinstance(key, int) and not isinstance(key, bool):
        return f"i{key}"
    raise TypeError(f"persistent storages need bytes or int block keys, got {type(key).__name__}")


def decode_key(name: str) -> Any:
    if name.startswith("i"):
        return int(name[1:])
    return bytes.fromhex(name)


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def namespace_id(model: str, fingerprint: str, salt: str = "") -> str:
    """Path- and URL-safe namespace string: readable model name plus layout fingerprint."""
    import hashlib

    name = _SAFE.sub("_", model).strip("_")[:64] or "model"
    ns = f"{name}--{fingerprint}"
    if salt:
        ns += "--" + hashlib.blake2b(salt.encode(), digest_size=6).hexdigest()
    return ns
