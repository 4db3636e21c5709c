"""G4 on s3fs (moto): a GET's payload lands straight in G2, never past its block; puts go as a
reused file body below s3fs's multipart size and as a bytearray above it."""

from __future__ import annotations

import numpy as np
import pytest

from kvbm.tiers import object as objmod
from kvbm.tiers.object import HEADER_MIN, ObjectStorage
from test_object import BUCKET, KiB, blocks, keys, load, moto_s3, store  # noqa: F401  (moto_s3: a fixture)

NBYTES = 256 * KiB + 7  # odd: chunk boundaries fall anywhere


def storage(server, n: int = 8) -> ObjectStorage:
    return ObjectStorage(n, NBYTES, namespace="llama--abc", url=f"s3://{BUCKET}/run",
                         storage_options={"endpoint_url": server.endpoint}, max_concurrency=4)


def test_payloads_stream_into_their_blocks_and_verify(moto_s3):
    g4 = storage(moto_s3)
    assert g4._streams  # s3fs: the streaming GET is the path under test
    ks, data = keys(6), blocks(6, NBYTES, seed=3)
    slots = store(g4, ks, data)
    assert all(isinstance(b, objmod.PutBody) for spares in g4._bodies.values() for b in spares)
    ok, out = load(g4, ks, slots)
    assert ok == [True] * 6 and np.array_equal(out, data)
    # stored again over the same bodies (the spares are reused): still the new bytes
    newer = blocks(6, NBYTES, seed=4)
    assert g4.write(list(zip(ks, slots, newer))) == [True] * 6
    ok, out = load(g4, ks, slots)
    assert ok == [True] * 6 and np.array_equal(out, newer)
    assert g4.errors.checksum_errors == 0 and g4.errors.io_errors == 0
    g4.close()


def test_a_longer_object_is_a_miss_and_writes_nothing_past_its_block(moto_s3):
    g4 = storage(moto_s3)
    ks, data = keys(2), blocks(2, NBYTES, seed=5)
    slots = store(g4, ks, data)
    path = g4.path_of(ks[0])
    g4.fs.pipe_file(path, g4.fs.cat_file(path) + b"\xab" * 100_000)  # appended by someone
    # block 0's buffer sits inside a larger array: the bytes after it must stay as they are
    arena = np.zeros(3 * NBYTES, dtype=np.uint8)
    ok = g4.read([(ks[0], slots[0], arena[:NBYTES]), (ks[1], slots[1], arena[NBYTES:2 * NBYTES])])
    assert ok == [False, True]
    assert np.array_equal(arena[NBYTES:2 * NBYTES], data[1]) and not arena[2 * NBYTES:].any()
    assert g4.errors.checksum_errors == 1
    g4.close()


def _flip_middle(obj: bytes) -> bytes:
    raw = bytearray(obj)
    raw[HEADER_MIN + NBYTES // 2] ^= 0x01
    return bytes(raw)


@pytest.mark.parametrize("tamper", [lambda obj: obj[:HEADER_MIN - 1],  # no whole header
                                    lambda obj: obj[:HEADER_MIN + NBYTES - 1],  # one byte short
                                    _flip_middle],  # a payload byte flipped
                         ids=["short-header", "short-payload", "flipped"])
def test_a_damaged_object_is_a_miss_and_its_neighbour_is_served(moto_s3, tamper):
    g4 = storage(moto_s3)
    ks, data = keys(2), blocks(2, NBYTES, seed=7)
    slots = store(g4, ks, data)
    path = g4.path_of(ks[1])
    g4.fs.pipe_file(path, tamper(g4.fs.cat_file(path)))
    ok, out = load(g4, ks, slots)
    assert ok == [True, False] and np.array_equal(out[0], data[0])
    assert g4.errors.checksum_errors == 1
    g4.close()


def test_above_the_single_put_size_bodies_are_bytearrays_and_still_round_trip(moto_s3, monkeypatch):
    monkeypatch.setattr(objmod, "SINGLE_PUT_BYTES", HEADER_MIN + NBYTES)  # this layout's objects: not below it
    g4 = storage(moto_s3)
    ks, data = keys(3), blocks(3, NBYTES, seed=8)
    slots = store(g4, ks, data)
    assert all(isinstance(b, bytearray) for spares in g4._bodies.values() for b in spares)
    ok, out = load(g4, ks, slots)
    assert ok == [True] * 3 and np.array_equal(out, data)
    g4.close()
