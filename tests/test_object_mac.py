"""G4 payload MACs: v3 objects (Poly1305 under a one-time key derived from the secret, the
header and a random nonce) and v2 objects (HMAC-SHA256, still read). Every forged, moved,
truncated, tampered or foreign object is a miss, never served; served blocks are the bytes
stored. (Two secrets on one prefix, names and secret files: test_object_security.py.)"""

from __future__ import annotations

import subprocess
import sys
import uuid

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kvbm.ops import crc32c
from kvbm.tiers import object as objmod
from kvbm.tiers import seal as sealmod
from kvbm.tiers.object import HEADER, HEADER_MIN, HMAC_VERSION, MAGIC, VERSION, ObjectStorage
from kvbm.tiers.seal import NONCE_BYTES, POLY_TAG_BYTES, Seal

pytest.importorskip("cryptography")

KiB = 1024
N = 4 * KiB
A, B = b"a" * 32, b"b" * 32


@pytest.fixture(params=["memory", "file"])
def url(request, tmp_path):
    if request.param == "memory":
        return f"memory://kvbm-{uuid.uuid4().hex[:8]}"
    return f"file://{tmp_path}/g4"


def blocks(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, N), dtype=np.uint8)


def store(g4, keys, data):
    slots = [g4.allocate() for _ in keys]
    assert g4.write(list(zip(keys, slots, data))) == [True] * len(keys)
    return slots


def load(g4, keys, slots):
    out = np.zeros((len(keys), N), dtype=np.uint8)
    return g4.read(list(zip(keys, slots, out))), out


def raw(g4, key) -> bytes:
    return g4.fs.cat_file(g4.path_of(key))


def put(g4, key, data: bytes) -> None:
    g4.fs.pipe_file(g4.path_of(key), data)


def counts(g4):
    e = g4.errors
    return e.checksum_errors, e.foreign_objects, e.io_errors


def test_v3_is_written_and_round_trips_byte_for_byte(url):
    g4 = ObjectStorage(8, N, namespace="ns", url=url, secret=A)
    assert g4.write_version == VERSION == 3
    keys, data = [b"\x01" * 16, 7, 2**70], blocks(3, 1)
    slots = store(g4, keys, data)
    head = raw(g4, keys[0])[:HEADER_MIN]
    assert HEADER.unpack_from(head) == (MAGIC, 3, POLY_TAG_BYTES, crc32c(data[0]), N)
    assert head[HEADER.size + NONCE_BYTES:HEADER_MIN - POLY_TAG_BYTES] == bytes(12)
    ok, out = load(g4, keys, slots)
    assert ok == [True] * 3 and np.array_equal(out, data) and counts(g4) == (0, 0, 0)
    # the same block stored again gets a fresh nonce, so a new one-time key
    store(g4, keys[:1], data[:1])
    again = raw(g4, keys[0])[:HEADER_MIN]
    assert again[HEADER.size:HEADER.size + NONCE_BYTES] != head[HEADER.size:HEADER.size + NONCE_BYTES]
    assert again[-POLY_TAG_BYTES:] != head[-POLY_TAG_BYTES:]


def test_v2_objects_of_the_previous_version_are_still_served(url):
    old = ObjectStorage(8, N, namespace="ns", url=url, secret=A)
    old.write_version = HMAC_VERSION  # what kvbm wrote before v3 (and writes without cryptography)
    keys, data = [b"\x02" * 16, 11], blocks(2, 2)
    store(old, keys, data)
    assert HEADER.unpack_from(raw(old, keys[0]))[1:3] == (2, 32)
    new = ObjectStorage(8, N, namespace="ns", url=url, secret=A)
    recovered = dict(new.recover())
    assert sorted(map(repr, recovered)) == sorted(map(repr, keys))
    ok, out = load(new, keys, [recovered[k] for k in keys])
    assert ok == [True, True] and np.array_equal(out, data) and counts(new) == (0, 0, 0)
    # a v2 object under another secret, or moved to another key's name, is foreign as before
    put(new, 12, raw(new, 11))
    other = ObjectStorage(8, N, namespace="ns", url=url, secret=B)
    put(other, 11, raw(new, 11))
    assert load(new, [12], [new.allocate()])[0] == [False]
    assert load(other, [11], [other.allocate()])[0] == [False]
    assert counts(new) == (1, 1, 0) and counts(other) == (1, 1, 0)


def test_moved_and_foreign_secret_v3_objects_are_counted_misses(url):
    g4 = ObjectStorage(8, N, namespace="ns", url=url, secret=A)
    data = blocks(2, 3)
    s1, s2 = store(g4, [1, 2], data)
    put(g4, 2, raw(g4, 1))  # 1's object under 2's name: its one-time key is 1's
    assert load(g4, [1, 2], [s1, s2])[0] == [True, False]
    assert counts(g4) == (1, 1, 0)
    # another namespace of the same secret: its keys differ
    other_ns = ObjectStorage(8, N, namespace="ns2", url=url, secret=A)
    put(other_ns, 1, raw(g4, 1))
    # another deployment writes its own valid v3 object under our name for key 1
    foreign = ObjectStorage(8, N, namespace="ns", url=url.replace("g4", "g4b"), secret=B)
    store(foreign, [1], blocks(1, 4))
    put(g4, 1, raw(foreign, 1))
    assert load(g4, [1], [s1])[0] == [False] and load(other_ns, [1], [other_ns.allocate()])[0] == [False]
    assert counts(g4) == (2, 2, 0) and counts(other_ns) == (1, 1, 0)


def test_every_tampered_header_byte_is_a_miss(url):
    g4 = ObjectStorage(4, N, namespace="ns", url=url, secret=A)
    (slot,) = store(g4, [5], blocks(1, 5))
    good = raw(g4, 5)
    foreign = corrupt = 0
    for i in range(HEADER_MIN):
        bad = bytearray(good)
        bad[i] ^= 0x01
        put(g4, 5, bytes(bad))
        assert load(g4, [5], [slot])[0] == [False], f"header byte {i} flipped and still served"
        if i >= HEADER.size:  # nonce, zero bytes, tag: the CRC holds, the tag does not
            foreign += 1
        else:  # magic, version, MAC length, CRC, length: refused before any MAC
            corrupt += 1
        assert counts(g4) == (foreign + corrupt, foreign, 0)
    # a downgrade: the same object relabelled v2 (its tag and nonce read as an HMAC)
    bad = bytearray(good)
    bad[:HEADER.size] = HEADER.pack(MAGIC, HMAC_VERSION, 32, *HEADER.unpack_from(good)[3:])
    put(g4, 5, bytes(bad))
    assert load(g4, [5], [slot])[0] == [False] and g4.errors.foreign_objects == foreign + 1
    put(g4, 5, good)
    ok, out = load(g4, [5], [slot])
    assert ok == [True] and np.array_equal(out[0], blocks(1, 5)[0])


def test_truncated_or_extended_objects_are_misses(url):
    g4 = ObjectStorage(4, N, namespace="ns", url=url, secret=A)
    payload = blocks(1, 6)[0]
    (slot,) = store(g4, [6], [payload])
    good = raw(g4, 6)
    for cut in (0, 10, HEADER_MIN, HEADER_MIN + 1, len(good) - 1):
        put(g4, 6, good[:cut])
        assert load(g4, [6], [slot])[0] == [False], f"cut at {cut} served"
    put(g4, 6, good + b"\0")
    assert load(g4, [6], [slot])[0] == [False]
    assert counts(g4) == (6, 0, 0)  # torn or padded: corrupt, not authenticated as anyone's
    # truncated, then made whole again with the CRC recomputed (as an attacker would): foreign
    short = np.concatenate([payload[:N // 2], np.zeros(N - N // 2, np.uint8)])
    head = bytearray(good[:HEADER_MIN])
    head[:HEADER.size] = HEADER.pack(MAGIC, VERSION, POLY_TAG_BYTES, crc32c(short), N)
    put(g4, 6, bytes(head) + short.tobytes())
    assert load(g4, [6], [slot])[0] == [False] and counts(g4) == (7, 1, 0)


def test_a_repeated_nonce_still_keys_different_payloads_apart(url, monkeypatch):
    """A writer whose nonces repeated (the CSPRNG is the only source, but say it did): two
    payloads of one key have different CRCs, so different one-time keys; both still verify."""
    monkeypatch.setattr(sealmod, "_nonce", lambda: b"\x42" * NONCE_BYTES)
    g4 = ObjectStorage(4, N, namespace="ns", url=url, secret=A)
    d1, d2 = blocks(2, 7)
    (slot,) = store(g4, [8], [d1])
    h1 = raw(g4, 8)[:HEADER_MIN]
    store(g4, [8], [d2])
    h2 = raw(g4, 8)[:HEADER_MIN]
    assert h1[HEADER.size:HEADER.size + NONCE_BYTES] == h2[HEADER.size:HEADER.size + NONCE_BYTES]
    seal, nonce = Seal(A, "ns"), b"\x42" * NONCE_BYTES
    k1 = seal.one_time_key(8, h1[:HEADER.size], nonce)
    assert k1 != seal.one_time_key(8, h2[:HEADER.size], nonce)
    assert k1 != seal.one_time_key(9, h1[:HEADER.size], nonce)  # and another block's key differs
    assert k1 != Seal(A, "ns2").one_time_key(8, h1[:HEADER.size], nonce)
    ok, out = load(g4, [8], [slot])
    assert ok == [True] and np.array_equal(out[0], d2)


def test_without_cryptography_puts_are_v2_and_v3_objects_are_plain_misses(url, monkeypatch):
    v3 = ObjectStorage(4, N, namespace="ns", url=url, secret=A)
    store(v3, [1], blocks(1, 8))
    monkeypatch.setattr(objmod, "poly1305_available", lambda: False)
    g4 = ObjectStorage(4, N, namespace="ns", url=url, secret=A)
    assert g4.write_version == HMAC_VERSION
    (slot,) = store(g4, [2], blocks(1, 9))
    assert HEADER.unpack_from(raw(g4, 2))[1] == HMAC_VERSION
    ok, out = load(g4, [2, 1], [slot, g4.allocate()])
    assert ok == [True, False] and np.array_equal(out[0], blocks(1, 9)[0])
    assert counts(g4) == (1, 0, 0)  # not verifiable here, not proven foreign
    assert load(v3, [2], [v3.allocate()])[0] == [True]  # v2 written here, read there


def test_import_kvbm_and_g4_work_without_cryptography(tmp_path):
    code = ("import sys; sys.modules['cryptography'] = None\n"
            "import numpy as np, kvbm\n"
            "from kvbm.tiers.object import ObjectStorage\n"
            f"g4 = ObjectStorage(2, 4096, namespace='ns', url='file://{tmp_path}/g4', secret=b'a' * 32)\n"
            "s = g4.allocate(); d = np.arange(4096, dtype=np.uint8) % 251; o = np.zeros_like(d)\n"
            "assert g4.write([(1, s, d)]) == [True] and g4.read([(1, s, o)]) == [True]\n"
            "assert (o == d).all(); print('version', g4.write_version)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "version 2"


@settings(max_examples=150, deadline=None)
@given(st.integers(min_value=0, max_value=HEADER_MIN + N - 1), st.integers(min_value=1, max_value=255),
       st.sampled_from([VERSION, HMAC_VERSION]))
@example(HEADER.size, 1, VERSION)  # first nonce byte
@example(HEADER_MIN - 1, 0x80, VERSION)  # last tag byte
@example(HEADER_MIN, 1, HMAC_VERSION)  # first payload byte of a v2 object
def test_any_flipped_byte_is_never_served(at, xor, version):
    g4 = ObjectStorage(2, N, namespace="ns", url=f"memory://kvbm-{uuid.uuid4().hex[:8]}", secret=A)
    g4.write_version = version
    (slot,) = store(g4, [3], blocks(1, 10))
    bad = bytearray(raw(g4, 3))
    bad[at] ^= xor
    if version == HMAC_VERSION and HEADER.size + 32 <= at < HEADER_MIN:
        return  # v2's zero padding after the MAC is not read (v3 tags every header byte)
    put(g4, 3, bytes(bad))
    assert load(g4, [3], [slot])[0] == [False]
    assert g4.errors.checksum_errors == 1


def test_a_damaged_v3_payload_is_counted_corrupt_not_foreign(url):
    """v3 gets check only the tag; when it fails, the CRC tells damage from a foreign object."""
    g4 = ObjectStorage(4, N, namespace="ns", url=url, secret=A)
    payload = blocks(1, 11)[0]
    (slot,) = store(g4, [4], [payload])
    bad = bytearray(raw(g4, 4))
    bad[HEADER_MIN + N // 2] ^= 0x10  # a bit flipped in storage
    put(g4, 4, bytes(bad))
    assert load(g4, [4], [slot])[0] == [False] and counts(g4) == (1, 0, 0)
    store(g4, [4], [payload])
    ok, out = load(g4, [4], [slot])
    assert ok == [True] and np.array_equal(out[0], payload)
