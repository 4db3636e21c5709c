"""kvbm.ops copies of issue 17: streaming stores, the fused copy + CRC-32C, the limit's copy.

Each native path is compared byte for byte with the fallback, which defines the bytes.
Batches of 8 MiB or more (ops' stream threshold) take the streaming-store path, so the
large cases here run it with odd alignments and chunk splits; small ones run memmove.
"""

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kvbm import ops

native = pytest.mark.skipif(not ops.HAVE_NATIVE, reason="kvbm._native is not built")
PATHS = [pytest.param(False, id="fallback"), pytest.param(True, id="native", marks=native)]
STREAM_ABOVE = int(ops._native.stream_above) if ops.HAVE_NATIVE else 8 << 20


@pytest.fixture
def rng():
    return np.random.default_rng(1717)


def random_bytes(rng, n):
    return rng.integers(0, 256, n, dtype=np.uint8)


def both(rng, fn_name, src, src_offsets, dst_size, dst_offsets, nbytes, threads=0):
    """((fallback dst, result), (native dst, result)) of the same call on the same random dst."""
    dst = random_bytes(rng, dst_size)
    out = []
    for native_path in (False, True):
        d = dst.copy()
        r = getattr(ops, fn_name)(src, src_offsets, d, dst_offsets, nbytes, threads=threads,
                                  use_native=native_path)
        out.append((d, r))
    return out


@native
def test_streaming_copy_is_what_this_cpu_has():
    assert ops.COPY_STREAM_IMPL in ("avx2", "sse2", "memcpy")
    assert STREAM_ABOVE == 8 << 20


# ---- copy_blocks: the streaming path (a batch >= 8 MiB) ----

@native
@pytest.mark.parametrize("threads", [0, 1, 3])
@pytest.mark.parametrize("nbytes", [(256 << 10) + 13, 3 << 20, 4099])
def test_large_batches_stream_and_equal_the_fallback(rng, threads, nbytes):
    n = -(-STREAM_ABOVE // nbytes) + 1  # just over the threshold
    src = random_bytes(rng, n * nbytes + 64)
    src_offsets = rng.permutation(n) * nbytes + rng.integers(0, 64)  # unaligned starts
    dst_offsets = np.arange(n) * (nbytes + 5) + 3  # gaps that must stay untouched
    (expected, _), (got, _) = both(rng, "copy_blocks", src, src_offsets, n * (nbytes + 5) + 9,
                                   dst_offsets, nbytes, threads)
    np.testing.assert_array_equal(got, expected)


@native
def test_a_large_chunk_that_overlaps_itself_is_a_memmove(rng):
    # One 9 MiB chunk moved 1 byte up inside the same buffer: streaming stores would
    # read bytes they already overwrote, so an overlapping chunk must take memmove.
    nbytes = 9 << 20
    buf = random_bytes(rng, nbytes + 1)
    expected = buf.copy()
    expected[1:] = buf[:-1]
    ops.copy_blocks(buf, [0], buf, [1], nbytes, threads=1)
    np.testing.assert_array_equal(buf, expected)


# ---- copy_blocks_crc32c ----

@pytest.mark.parametrize("use_native", PATHS)
def test_fused_copy_returns_the_crc32c_of_each_block(rng, use_native):
    src = random_bytes(rng, 10 * 1000)
    dst = np.zeros(4 * 1000, np.uint8)
    crcs = ops.copy_blocks_crc32c(src, [7000, 0, 3001, 9000], dst, [0, 1000, 2000, 3000], 1000,
                                  use_native=use_native)
    assert crcs.dtype == np.uint32 and crcs.shape == (4,)
    for i, o in enumerate([7000, 0, 3001, 9000]):
        np.testing.assert_array_equal(dst[i * 1000:(i + 1) * 1000], src[o:o + 1000])
        assert crcs[i] == ops.crc32c(src[o:o + 1000], use_native=False)


@native
@settings(max_examples=60, deadline=None)
@given(nbytes=st.integers(0, 70_000), n=st.integers(0, 9), threads=st.integers(0, 3),
       shift=st.integers(0, 63), seed=st.integers(0, 2**32 - 1))
@example(nbytes=65536, n=3, threads=2, shift=1, seed=0)   # exactly one 64 KiB piece per block
@example(nbytes=65537, n=2, threads=0, shift=0, seed=0)   # a 1-byte second piece
@example(nbytes=0, n=4, threads=1, shift=0, seed=0)
@example(nbytes=3 * 8192, n=2, threads=1, shift=3, seed=0)  # exactly one set of three 8 KiB stripes
@example(nbytes=3 * 8192 + 3 * 256 + 7, n=2, threads=0, shift=5, seed=0)  # long, short stripes, tail
@example(nbytes=767, n=3, threads=1, shift=1, seed=0)  # under one short stripe set: tail only
def test_fused_copy_equals_the_fallback(nbytes, n, threads, shift, seed):
    rng = np.random.default_rng(seed)
    src = random_bytes(rng, max(1, n) * nbytes + 64)
    src_offsets = rng.permutation(max(1, n))[:n] * nbytes + shift
    dst_offsets = np.arange(n) * (nbytes + 1)
    (expected, want), (got, crcs) = both(rng, "copy_blocks_crc32c", src, src_offsets, n * (nbytes + 1) + 1,
                                         dst_offsets, nbytes, threads)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(crcs, want)


@native
@pytest.mark.parametrize("threads", [0, 1, 2])
def test_fused_copy_streams_large_batches(rng, threads):
    nbytes = (1 << 20) + 4097
    n = STREAM_ABOVE // nbytes + 2
    src = random_bytes(rng, n * nbytes + 100)
    src_offsets = rng.permutation(n) * nbytes + 37
    dst = np.zeros(n * nbytes + 11, np.uint8)
    crcs = ops.copy_blocks_crc32c(src, src_offsets, dst, np.arange(n) * nbytes + 11 // 2, nbytes,
                                  threads=threads)
    expected = np.zeros_like(dst)
    ops.copy_blocks(src, src_offsets, expected, np.arange(n) * nbytes + 11 // 2, nbytes, use_native=False)
    np.testing.assert_array_equal(dst, expected)
    # crc32c_blocks is itself checked against the pure-Python CRC in test_ops.py
    np.testing.assert_array_equal(crcs, ops.crc32c_blocks(src, src_offsets, nbytes))


@pytest.mark.parametrize("use_native", PATHS)
def test_fused_copy_of_a_block_onto_itself_shifted_checksums_the_source(rng, use_native):
    buf = random_bytes(rng, 3000)
    before = buf.copy()
    crcs = ops.copy_blocks_crc32c(buf, [0], buf, [100], 2000, use_native=use_native)
    assert crcs[0] == ops.crc32c(before[:2000], use_native=False)
    np.testing.assert_array_equal(buf[100:2100], before[:2000])


BAD = [
    ([0, 4, 96], [0, 4, 8], 4, r"copy_blocks_crc32c: src_offsets\[2\] = 96 \+ nbytes 4 runs past the end of the 99-byte buffer"),
    ([0, -1], [0, 4], 4, r"src_offsets\[1\] = -1 is negative"),
    ([0, 4], [0, 61], 4, r"dst_offsets\[1\] = 61 \+ nbytes 4 runs past the end of the 64-byte buffer"),
    ([0, 4], [0], 4, r"len\(src_offsets\) = 2 but len\(dst_offsets\) = 1"),
    ([0], [0], -1, r"nbytes must be >= 0, got -1"),
    ([2**62], [0], 2**62, r"src_offsets\[0\] = 4611686018427387904 \+ nbytes"),
]


@pytest.mark.parametrize("use_native", PATHS)
@pytest.mark.parametrize("src_offsets, dst_offsets, nbytes, message", BAD)
def test_fused_copy_rejects_bad_ranges_before_copying(use_native, src_offsets, dst_offsets, nbytes, message):
    src, dst = np.ones(99, dtype=np.uint8), np.zeros(64, dtype=np.uint8)
    with pytest.raises(ValueError, match=message):
        ops.copy_blocks_crc32c(src, src_offsets, dst, dst_offsets, nbytes, use_native=use_native)
    assert not dst.any(), "a rejected batch must not copy its valid blocks either"


@pytest.mark.parametrize("use_native", PATHS)
def test_fused_copy_needs_a_writable_destination(use_native):
    with pytest.raises(TypeError, match="dst must be a C-contiguous, writable buffer"):
        ops.copy_blocks_crc32c(bytes(8), [0], bytes(8), [0], 4, use_native=use_native)


# ---- copy_buffer: the benches' one-thread limit ----

@pytest.mark.parametrize("use_native", PATHS)
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("size", [0, 1, 31, 127, 4099, STREAM_ABOVE + 77])
def test_copy_buffer_copies_every_byte(rng, use_native, stream, size):
    src = random_bytes(rng, size + 1)[1:]  # an unaligned start
    dst = np.zeros(size + 3, np.uint8)[3:]
    ops.copy_buffer(dst, src, stream=stream, use_native=use_native)
    np.testing.assert_array_equal(dst, src)


@pytest.mark.parametrize("use_native", PATHS)
def test_copy_buffer_needs_equal_sizes(use_native):
    with pytest.raises(ValueError, match="copy_buffer: src holds 8 bytes but dst 9"):
        ops.copy_buffer(bytearray(9), bytes(8), use_native=use_native)
