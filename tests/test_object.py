"""G4 object storage: round trips, checksums, restart, namespaces, capacity, and a real S3
endpoint (moto) that dies mid-run."""

from __future__ import annotations

import os
import socket
import time
import uuid

import fsspec
import numpy as np
import pytest

from kvbm.tiers.object import HEADER_MIN, ObjectStorage

KiB = 1024
SIZES = [4 * KiB, 64 * KiB + 7, 1024 * KiB]  # page-sized, odd, large
BUCKET = "kvbm-test"


def blocks(n: int, nbytes: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, nbytes), dtype=np.uint8)


def keys(n: int, start: int = 0) -> list:
    # chained-hash keys are 16 bytes; trace keys are ints: both name objects
    return [os.urandom(16) if i % 2 else start + i for i in range(n)]


def store(storage: ObjectStorage, ks: list, data: np.ndarray) -> list:
    slots = [storage.allocate() for _ in ks]
    assert storage.write(list(zip(ks, slots, data))) == [True] * len(ks)
    return slots


def load(storage: ObjectStorage, ks: list, slots: list) -> tuple[list[bool], np.ndarray]:
    out = np.zeros((len(ks), storage.block_nbytes), dtype=np.uint8)
    return storage.read(list(zip(ks, slots, out))), out


def flip_byte(storage: ObjectStorage, key, offset: int) -> None:
    """Tamper through fsspec, as a bad disk or a meddling hand would."""
    path = storage.path_of(key)
    data = bytearray(storage.fs.cat_file(path))
    data[offset] ^= 0xFF
    storage.fs.pipe_file(path, bytes(data))


@pytest.fixture(params=["memory", "file"])
def url(request, tmp_path):
    if request.param == "memory":
        return f"memory://kvbm-{uuid.uuid4().hex[:8]}"
    return f"file://{tmp_path}/g4"


@pytest.mark.parametrize("nbytes", SIZES)
def test_round_trip(url, nbytes):
    g4 = ObjectStorage(8, nbytes, namespace="llama--abc", url=url, max_concurrency=4)
    ks, data = keys(8), blocks(8, nbytes, seed=nbytes)
    slots = store(g4, ks, data)
    ok, out = load(g4, ks, slots)
    assert ok == [True] * 8
    assert np.array_equal(out, data)
    assert (g4.errors.io_errors, g4.errors.checksum_errors) == (0, 0)
    g4.close()


def test_flipped_byte_is_a_counted_miss_and_never_served(url):
    g4 = ObjectStorage(4, 64 * KiB, namespace="ns", url=url)
    ks, data = keys(4), blocks(4, 64 * KiB)
    slots = store(g4, ks, data)
    # flip one payload byte of block 1
    flip_byte(g4, ks[1], HEADER_MIN + 1000)
    ok, out = load(g4, ks, slots)
    assert ok == [True, False, True, True]
    assert g4.errors.checksum_errors == 1 and g4.errors.io_errors == 0
    for i in (0, 2, 3):
        assert np.array_equal(out[i], data[i])


def test_header_naming_another_block_is_a_miss(url):
    g4 = ObjectStorage(4, 4 * KiB, namespace="ns", url=url)
    a, b = b"A" * 16, b"B" * 16
    slots = store(g4, [a, b], blocks(2, 4 * KiB))
    # key: b's name now holds a's object, intact but not b
    g4.fs.pipe_file(g4.path_of(b), g4.fs.cat_file(g4.path_of(a)))
    assert load(g4, [a, b], slots)[0] == [True, False]
    # size: a layout with another block size finds a's object under the same name
    other = ObjectStorage(4, 8 * KiB, namespace="ns", url=url)
    assert load(other, [a], [other.allocate()])[0] == [False]
    assert g4.errors.checksum_errors == 1 and other.errors.checksum_errors == 1


def test_a_missing_object_is_a_counted_io_miss(url):
    g4 = ObjectStorage(4, 4 * KiB, namespace="ns", url=url)
    assert load(g4, [12345], [g4.allocate()])[0] == [False]
    assert (g4.errors.io_errors, g4.errors.checksum_errors) == (1, 0)


def test_restart_finds_the_blocks_again(tmp_path):
    url = f"file://{tmp_path}/g4"
    g4 = ObjectStorage(8, 64 * KiB, namespace="ns", url=url)
    ks, data = keys(5), blocks(5, 64 * KiB)
    for k, d in zip(ks, data):  # one at a time, so the objects' ages follow the list
        store(g4, [k], d[None])
        time.sleep(0.01)
    g4.close()

    # restart -> recover gives every key back, oldest first; the bytes are identical
    again = ObjectStorage(8, 64 * KiB, namespace="ns", url=url)
    found = again.recover()
    assert [k for k, _ in found] == ks
    ok, out = load(again, [k for k, _ in found], [s for _, s in found])
    assert ok == [True] * 5 and np.array_equal(out, data)
    assert again.recover() == []  # already indexed

    # a smaller restart keeps the newest blocks only: capacity is a hard bound
    small = ObjectStorage(3, 64 * KiB, namespace="ns", url=url)
    assert [k for k, _ in small.recover()] == ks[2:]
    assert small.allocate() is None


def test_two_namespaces_on_one_url_never_meet(url):
    a = ObjectStorage(4, 4 * KiB, namespace="model-a--f00", url=url)
    b = ObjectStorage(4, 4 * KiB, namespace="model-b--f00", url=url)
    key = b"\x01" * 16
    da, db = blocks(1, 4 * KiB, seed=1), blocks(1, 4 * KiB, seed=2)
    store(a, [key], da)
    # b never saw the key: a miss, and nothing to recover
    assert load(b, [key], [b.allocate()])[0] == [False]
    assert b.recover() == []
    store(b, [key, 7], np.concatenate([db, db]))
    assert np.array_equal(load(a, [key], [0])[1], da)
    assert np.array_equal(load(b, [key], [0])[1], db)
    assert [k for k, _ in ObjectStorage(4, 4 * KiB, namespace="model-a--f00", url=url).recover()] == [key]


def test_capacity_is_a_hard_bound(url):
    g4 = ObjectStorage(3, 4 * KiB, namespace="ns", url=url)
    slots = [g4.allocate() for _ in range(3)]
    assert sorted(slots) == [0, 1, 2]
    assert g4.allocate() is None
    g4.free(slots[1])  # never written: nothing to delete
    assert g4.allocate() == slots[1]
    assert g4.allocate() is None


def test_free_deletes_the_object_and_a_restore_survives_it(url):
    g4 = ObjectStorage(4, 4 * KiB, namespace="ns", url=url)
    k1, k2 = b"\x02" * 16, 99
    d = blocks(2, 4 * KiB)
    (s1, s2) = store(g4, [k1, k2], d)
    g4.free(s1)
    # k2 freed and stored again at once: the background delete lands before the new put
    g4.free(s2)
    s2 = store(g4, [k2], d[1:])[0]
    g4.close()  # waits for the deletes
    assert not g4.fs.exists(g4.path_of(k1))
    assert load(g4, [k2], [s2])[0] == [True]
    assert [k for k, _ in ObjectStorage(4, 4 * KiB, namespace="ns", url=url).recover()] == [k2]


def test_describe_names_the_object(url):
    g4 = ObjectStorage(2, 4 * KiB, namespace="ns", url=url)
    (slot,) = store(g4, [5], blocks(1, 4 * KiB))
    (region,) = g4.describe(slot)
    assert region.kind == "object" and region.length == 4 * KiB
    # the name is the key sealed under the deployment secret (seal.py), inside the namespace
    assert region.address == g4.fs.unstrip_protocol(g4.path_of(5)) and "/ns/" in region.address
    assert region.offset == HEADER_MIN  # the payload follows the header


def test_a_broken_medium_fails_soft(tmp_path):
    g4 = ObjectStorage(4, 4 * KiB, namespace="ns", url=f"file://{tmp_path}/g4")
    os.rmdir(tmp_path / "g4" / "ns")
    (tmp_path / "g4" / "ns").write_bytes(b"not a directory")
    slots = [g4.allocate() for _ in range(2)]
    assert g4.write(list(zip([1, 2], slots, blocks(2, 4 * KiB)))) == [False, False]
    assert load(g4, [1], slots[:1])[0] == [False]
    assert g4.errors.io_errors == 3
    assert g4.recover() == []


def test_a_wrong_buffer_is_a_caller_error(url):
    g4 = ObjectStorage(2, 4 * KiB, namespace="ns", url=url)
    with pytest.raises(ValueError, match="4096-byte"):
        g4.write([(1, g4.allocate(), np.zeros(100, dtype=np.uint8))])


def test_s3_defaults_keep_timeouts_small_and_user_options_win():
    pytest.importorskip("s3fs")
    g4 = ObjectStorage(2, 4 * KiB, namespace="ns", url=f"s3://{BUCKET}/p",
                       storage_options={"config_kwargs": {"read_timeout": 9}, "anon": True})
    assert g4.fs.config_kwargs["connect_timeout"] == 2
    assert g4.fs.config_kwargs["read_timeout"] == 9
    assert g4.fs.config_kwargs["retries"] == {"max_attempts": 1, "mode": "standard"}
    assert g4.fs.config_kwargs["max_pool_connections"] == 16  # one connection per concurrent put
    # botocore's own CRC32 of every body only where required: kvbm's CRC-32C and MAC cover it (issue 17)
    from botocore.config import Config
    if "request_checksum_calculation" in Config.OPTION_DEFAULTS:
        assert g4.fs.config_kwargs["request_checksum_calculation"] == "when_required"
        assert g4.fs.config_kwargs["response_checksum_validation"] == "when_required"
    assert g4.fs.retries == 1
    assert g4.prefix == f"{BUCKET}/p/ns"


# ---------------------------------------------------------------- a real S3 endpoint (moto)


@pytest.fixture
def moto_s3(monkeypatch):
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    from s3server import FAKE_CREDENTIALS, MotoServer

    for name, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    server = MotoServer().start()
    try:
        fs = fsspec.filesystem("s3", endpoint_url=server.endpoint, skip_instance_cache=True)
        fs.mkdir(BUCKET)
        yield server
    finally:
        server.stop()


def test_s3_round_trip_then_the_endpoint_dies(moto_s3):
    opts = {"endpoint_url": moto_s3.endpoint}
    url = f"s3://{BUCKET}/run"
    nbytes = 256 * KiB
    g4 = ObjectStorage(16, nbytes, namespace="llama--abc", url=url, storage_options=opts, max_concurrency=4)
    ks, data = keys(8), blocks(8, nbytes)
    slots = store(g4, ks, data)
    ok, out = load(g4, ks, slots)
    assert ok == [True] * 8 and np.array_equal(out, data)

    # a flipped byte on S3 is a counted miss too
    flip_byte(g4, ks[3], -1)
    assert load(g4, ks, slots)[0] == [True, True, True, False, True, True, True, True]
    assert g4.errors.checksum_errors == 1

    # restart against the same bucket finds the blocks (no namespace mixing)
    again = ObjectStorage(16, nbytes, namespace="llama--abc", url=url, storage_options=opts)
    assert {k for k, _ in again.recover()} == set(ks)
    assert ObjectStorage(16, nbytes, namespace="other", url=url, storage_options=opts).recover() == []

    # stop the endpoint mid-run -> stores and loads fail soft, quickly, and are counted
    moto_s3.stop()
    io_before = g4.errors.io_errors
    more = [g4.allocate() for _ in range(4)]
    t0 = time.monotonic()
    assert g4.write(list(zip(keys(4, start=100), more, blocks(4, nbytes, seed=9)))) == [False] * 4
    assert time.monotonic() - t0 < 15
    t0 = time.monotonic()
    ok, _ = load(g4, ks, slots)
    assert ok == [False] * 8
    assert time.monotonic() - t0 < 15
    assert g4.errors.io_errors == io_before + 12
    t0 = time.monotonic()
    g4.free(slots[0])  # the delete fails in the background, counted, never raised
    g4.close()
    assert time.monotonic() - t0 < 15
    assert g4.errors.io_errors == io_before + 13


def test_s3_endpoint_that_never_answers_times_out(monkeypatch):
    pytest.importorskip("s3fs")
    from s3server import FAKE_CREDENTIALS

    for name, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    with socket.socket() as hole:  # accepts connections (the kernel's backlog), never replies
        hole.bind(("127.0.0.1", 0))
        hole.listen(64)
        opts = {"endpoint_url": f"http://127.0.0.1:{hole.getsockname()[1]}",
                "config_kwargs": {"connect_timeout": 1, "read_timeout": 1}}
        # botocore's read timeout does not end a PUT that is never answered: `timeout` does
        g4 = ObjectStorage(4, 4 * KiB, namespace="ns", url=f"s3://{BUCKET}/p", storage_options=opts,
                           timeout=3)
        slots = [g4.allocate() for _ in range(2)]
        t0 = time.monotonic()
        assert g4.write(list(zip([1, 2], slots, blocks(2, 4 * KiB)))) == [False, False]
        assert load(g4, [1], slots[:1])[0] == [False]  # the endpoint is marked down: at once
        assert time.monotonic() - t0 < 15
        assert g4.errors.io_errors == 3
