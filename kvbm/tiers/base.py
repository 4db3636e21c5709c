"""Storage: owns the bytes of one tier (slots, offsets, objects); knows nothing of policy.

    Storage.allocate() -> slot            room for one block, or None when the medium is full
    Storage.free(slot)                    give the room back (the block is gone)
    Storage.write([(key, slot, buf)])     persist blocks; per block True, or False on failure
    Storage.read([(key, slot, buf)])      fill buffers; per block True, or False (missing,
                                          I/O error, checksum mismatch): a miss, never wrong bytes
    Storage.recover() -> [(key, slot)]    persistent media: the blocks that survived a restart
    Storage.meta_of / kept_meta()         media that keeps_meta: an opaque blob per key (meta_of(key)
                                          as the block is written), kept across a restart
    Storage.writable                      False while the medium takes no new blocks (G3 on a full disk)
    Storage.describe(slot)                the block as regions (memory ranges or file extents), for NIXL
    Storage.close()                       flush indexes and release the medium

`instant` storages (metadata only) complete every transfer at once; the manager then frees
a source slot in the same step it moves the key, so replays match the reference semantics.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

log = logging.getLogger(__name__)

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
    foreign_objects: int = 0  # of those, objects with a valid CRC but no valid MAC (G4), and
    #                           names in a listing that no key of ours seals to
    writes_refused: int = 0  # writes refused while the medium is read-only (G3 on a full disk)


class Storage(ABC):
    """One tier's medium. Buffers are numpy uint8 arrays (or buffers) of block_nbytes.

    `namespace` (model, layout fingerprint and salt, as one path-safe string) is part of
    every persistent name, so two namespaces never read each other's blocks.
    """

    medium: ClassVar[str] = ""
    instant: ClassVar[bool] = False  # metadata only: nothing to copy
    persistent: ClassVar[bool] = False  # blocks survive close/reopen (recover())
    keeps_meta: ClassVar[bool] = False  # keeps meta_of(key)'s blob beside each block (kept_meta())
    meta_of: Any = None  # fn(key) -> bytes | None, set by BlockManager.keep_meta

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

    @property
    def writable(self) -> bool:
        """False while the medium takes no new blocks (e.g. G3 on a full disk): the manager
        then admits nothing into this tier and evicts nothing to make room."""
        return True

    def recover(self) -> list[tuple[Any, Any]]:
        return []

    def kept_meta(self) -> dict[Any, bytes]:
        return {}

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


def make_private_dir(path: str | os.PathLike) -> None:
    """Create `path` and any missing parents 0700 (whatever the umask). The leaf is kvbm's
    own folder, so an existing one is set to 0700 too; parents that already existed are the
    user's: left as they are, with a warning when other users may write into them."""
    path = Path(path)
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    if p.exists() and p != path:
        st = p.stat()
        if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
            log.warning("%s is writable by every user: another user could replace kvbm's folder %s "
                        "under it; use a folder only you can write", p, path)
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
        else:
            os.chmod(d, 0o700)
    if not missing and stat.S_IMODE(path.stat().st_mode) != 0o700:
        try:
            os.chmod(path, 0o700)
        except PermissionError:  # another user's folder: what it holds is not served to us anyway
            log.warning("%s belongs to another user (mode %04o); kvbm cannot make it private",
                        path, stat.S_IMODE(path.stat().st_mode))


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def namespace_id(model: str, fingerprint: str, salt: str = "") -> str:
    """Path- and URL-safe namespace string: the model's name made readable (lossy: "a/b" and
    "a_b" read alike), the layout fingerprint, and a hash of all three, length-prefixed, that
    tells every (model, fingerprint, salt) apart."""
    import hashlib

    from ..blocks import check_name, fields

    check_name(model, "namespace.model")
    check_name(salt, "namespace.salt")
    name = _SAFE.sub("_", model).strip("_")[:64] or "model"
    digest = hashlib.blake2b(b"kvbm-storage-ns\0" + fields(model, fingerprint, salt), digest_size=12).hexdigest()
    return f"{name}--{_SAFE.sub('_', fingerprint)[:32]}--{digest}"
