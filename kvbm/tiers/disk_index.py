"""G3's index log: the records that say which block each slot of the slot file holds.

    put_record(seq, [(slot, crc, name, meta)])  one frame for a write call's blocks, sequences seq, seq + 1, ...
    delete_record(seq, slot)               the slot's block is gone
    replay(data, path, nbytes, capacity)   (kind, seq, body) per intact record of an index written
                                           for this layout; stops at the first torn or garbled one
    compacted(nbytes, capacity, index)     header + one put per live block, oldest first

Every record: payload length and its checksum (zlib's crc32: framing, not block data), then
the payload: its kind and sequence number, then a body. A put record holds one entry per
block of a write call (entry j has sequence seq + j), so a batch costs one frame. The file
itself (append, atomic rewrite, fsync) is DiskStorage's (disk.py).

Versions (the header's): 1 put entries are (slot, crc32c, key length) + the key's name; 2 adds,
per entry, an opaque metadata blob of at most MAX_META bytes (its length after the key's, the
blob after the name; empty for a block stored without one). The storage never reads the blob:
whoever wrote the block (the daemon's KV-event publisher, kvbm/held.py) gets it back after a
restart. This version writes 2 and replays 1 and 2 (a version 1 index recovers its blocks, each
with an empty blob); an older kvbm finds no header it knows in a version 2 index and starts
empty, so a block is never read under a layout it was not written with.
"""

from __future__ import annotations

import logging
import struct
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .base import decode_key, encode_key

log = logging.getLogger("kvbm.tiers.disk")  # one logger for G3, as before this file was split off

MAGIC = b"KVBM-G3\0"
VERSION = 2  # what this version writes
VERSIONS = (1, 2)  # what it replays
FRAME = struct.Struct("<II")
HEAD = struct.Struct("<BQ")
HEADER, PUT, DELETE = 0, 1, 2
HEADER_BODY = struct.Struct("<8sIQQ")  # magic, version, block_nbytes, capacity_blocks
PUT_ENTRY_V1 = struct.Struct("<IIH")  # slot, crc32c of the block, key length; the key's name follows
PUT_ENTRY = struct.Struct("<IIHH")  # v2: ... and the blob's length; the name, then the blob follow
MAX_META = 4096  # bytes of one block's blob (a longer one is not kept: disk.py)
DELETE_BODY = struct.Struct("<I")  # slot
MAX_RECORD = 1 << 30  # a garbled length beyond this ends the replay
COMPACT_ENTRIES = 65536  # put entries per frame when the index is rewritten


@dataclass(slots=True)
class Entry:
    key: Any
    crc: int
    seq: int
    meta: bytes = b""  # the block's opaque blob (version 2), b"" for none


def frame(kind: int, seq: int, body: bytes) -> bytes:
    payload = HEAD.pack(kind, seq) + body
    return FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def put_record(seq: int, entries: Sequence[tuple[int, int, bytes, bytes]]) -> bytes:
    """One frame for [(slot, crc, key name, blob)], sequences seq, seq + 1, ..."""
    pack = PUT_ENTRY.pack
    return frame(PUT, seq, b"".join([pack(slot, crc, len(name), len(meta)) + name + meta
                                     for slot, crc, name, meta in entries]))


def delete_record(seq: int, slot: int) -> bytes:
    return frame(DELETE, seq, DELETE_BODY.pack(slot))


def _put_entries(body: bytes, version: int):
    """(slot, crc, name, blob) per entry; ValueError for an entry that overruns the body."""
    pos, v1 = 0, version == 1
    while pos < len(body):
        if v1:
            (slot, crc, n), m = PUT_ENTRY_V1.unpack_from(body, pos), 0
            pos += PUT_ENTRY_V1.size
        else:
            slot, crc, n, m = PUT_ENTRY.unpack_from(body, pos)
            pos += PUT_ENTRY.size
        if pos + n + m > len(body) or m > MAX_META:
            raise ValueError("a put entry overruns its record")
        yield slot, crc, body[pos : pos + n], body[pos + n : pos + n + m]
        pos += n + m


def _records(data: bytes, path: Any = "the index"):
    """(kind, seq, body) for each intact record; returns at the first torn or garbled one (one
    warning naming the file; none when not even the first record is intact: replay says that)."""
    pos = 0
    while pos + FRAME.size <= len(data):
        length, crc = FRAME.unpack_from(data, pos)
        end = pos + FRAME.size + length
        if not HEAD.size <= length <= MAX_RECORD or end > len(data):
            break
        payload = data[pos + FRAME.size : end]
        if zlib.crc32(payload) != crc:
            break
        kind, seq = HEAD.unpack_from(payload)
        yield kind, seq, payload[HEAD.size :]
        pos = end
    if 0 < pos < len(data):
        log.warning("disk storage: %s ends in %d bytes of torn or garbled index records (a crash, or a "
                    "change by something else); the blocks they name are not served (misses)",
                    path, len(data) - pos)


def replay(data: bytes, path: Any, block_nbytes: int, capacity_blocks: int) -> Iterator[tuple[int, int, Any]]:
    """(PUT, seq, [(slot, crc, key, blob)]) or (DELETE, seq, slot) (other kinds: body None) per intact
    record. Nothing for an index without a readable header (of a version in VERSIONS) or written
    for another layout (one warning): old slots are never read with the wrong layout."""
    records = _records(data, path)
    first = next(records, None)
    head = HEADER_BODY.unpack_from(first[2]) if first is not None and len(first[2]) >= HEADER_BODY.size else None
    if head is None or first[0] != HEADER or head[0] != MAGIC or head[1] not in VERSIONS:
        log.warning("disk storage: %s has no readable header; starting empty", path)
        return
    version, nbytes, capacity = head[1:]
    if (nbytes, capacity) != (block_nbytes, capacity_blocks):
        log.warning("disk storage: %s was written for block_nbytes=%d, capacity_blocks=%d, but this "
                    "store has block_nbytes=%d, capacity_blocks=%d; starting empty (the old blocks are "
                    "dropped, never read with the wrong layout)", path, nbytes, capacity,
                    block_nbytes, capacity_blocks)
        return
    for kind, seq, body in records:
        try:  # the frame's checksum held, so this only fails for bytes we did not write
            if kind == PUT:
                decoded = [(slot, crc, decode_key(name.decode()), meta)
                           for slot, crc, name, meta in _put_entries(body, version)]
            elif kind == DELETE:
                decoded = DELETE_BODY.unpack(body)[0]
            else:  # a kind this version does not know: its sequence still counts
                decoded = None
        except (struct.error, ValueError) as exc:
            log.warning("disk storage: %s has a malformed record (%s); ignoring it and all after it", path, exc)
            return
        yield kind, seq, decoded


def compacted(block_nbytes: int, capacity_blocks: int, index: Mapping[int, Entry]) -> bytes:
    """The index as header + one put per live block. Sequences stay as they were (gaps and
    all); a frame holds consecutive ones only."""
    header = frame(HEADER, 0, HEADER_BODY.pack(MAGIC, VERSION, block_nbytes, capacity_blocks))
    live = sorted(index.items(), key=lambda item: item[1].seq)
    frames, run, run_seq = [header], [], 0
    for slot, e in live:
        if run and (len(run) == COMPACT_ENTRIES or e.seq != run_seq + len(run)):
            frames.append(put_record(run_seq, run))
            run = []
        if not run:
            run_seq = e.seq
        run.append((slot, e.crc, encode_key(e.key).encode(), e.meta))
    if run:
        frames.append(put_record(run_seq, run))
    return b"".join(frames)
