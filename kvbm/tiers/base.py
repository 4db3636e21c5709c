"""Storage: owns the bytes of one tier (slots, offsets, objects); knows nothing of policy.

    Storage.allocate() -> slot      room for one block, or None when the medium is full
    Storage.free(slot)              give the room back
    Storage.describe(slot)          the block as regions (memory ranges or file extents), for NIXL
    Storage.close()                 flush indexes and release the medium

`instant` storages (metadata only) complete every transfer at once; the manager then frees
a source slot in the same step it moves the key, so replays match the reference semantics.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

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


class Storage(ABC):
    medium: ClassVar[str] = ""
    instant: ClassVar[bool] = False

    def __init__(self, capacity_blocks: int, block_nbytes: int = 0, **options: Any) -> None:
        self.capacity_blocks = capacity_blocks
        self.block_nbytes = block_nbytes

    @abstractmethod
    def allocate(self) -> Any: ...

    @abstractmethod
    def free(self, slot: Any) -> None: ...

    @abstractmethod
    def describe(self, slot: Any) -> list[Region]: ...

    def close(self) -> None:
        pass
