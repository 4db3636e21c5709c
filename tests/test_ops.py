"""kvbm.ops: the native ops must give the fallback's bytes, and refuse bad ranges.

The fallbacks are the reference; each native op is compared with them byte for byte
on random buffers whose sizes straddle the SIMD strides (8 bytes, 768 B and 24 KiB
crc stripes) and the 1 MiB threading threshold.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from kvbm import ops

native = pytest.mark.skipif(not ops.HAVE_NATIVE, reason="kvbm._native is not built")
PATHS = [pytest.param(False, id="fallback"), pytest.param(True, id="native", marks=native)]

CRC_SIZES = [0, 1, 7, 8, 9, 255, 767, 768, 769, 4099, 24575, 24576, 24577, 49157, 100_003]


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def random_bytes(rng, n):
    return rng.integers(0, 256, n, dtype=np.uint8)


def run_python(code, timeout=None, **env):
    """(stdout, stderr) of `code` in a fresh interpreter; KVBM_NATIVE only if given."""
    base = {k: v for k, v in os.environ.items() if k != "KVBM_NATIVE"}
    out = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True,
                         env={**base, **env}, check=True, timeout=timeout)
    return out.stdout.strip(), out.stderr


# ---- crc32c ----

@pytest.mark.parametrize("use_native", PATHS)
def test_crc32c_check_value(use_native):
    assert ops.crc32c(b"123456789", use_native=use_native) == 0xE3069283
    assert ops.crc32c(b"", use_native=use_native) == 0


@native
def test_crc32c_software_path_check_value():
    # The slicing-by-8 path runs only on CPUs without SSE4.2; test it everywhere.
    assert ops._native._crc32c_software(b"123456789") == 0xE3069283


@native
@pytest.mark.parametrize("size", CRC_SIZES)
def test_crc32c_native_equals_fallback(rng, size):
    data = random_bytes(rng, size + 7)
    for start in (0, 3):  # unaligned starts too
        view = data[start : start + size]
        expected = ops.fallback.crc32c(view)
        assert ops.crc32c(view, use_native=True) == expected
        assert ops._native._crc32c_software(view) == expected


@pytest.mark.parametrize("use_native", PATHS)
def test_crc32c_extends_a_running_checksum(rng, use_native):
    a, b = random_bytes(rng, 1001).tobytes(), random_bytes(rng, 30_000).tobytes()
    running = ops.crc32c(b, ops.crc32c(a, use_native=use_native), use_native=use_native)
    assert running == ops.crc32c(a + b, use_native=use_native)


@pytest.mark.parametrize("use_native", PATHS)
def test_crc32c_reads_any_contiguous_buffer(rng, use_native):
    kv = rng.standard_normal((4, 33)).astype(np.float16)
    raw = kv.tobytes()
    expected = ops.crc32c(raw, use_native=use_native)
    for buf in (kv, bytearray(raw), memoryview(raw)):
        assert ops.crc32c(buf, use_native=use_native) == expected
    with pytest.raises(TypeError, match="C-contiguous"):
        ops.crc32c(kv[:, ::2], use_native=use_native)


@native
@pytest.mark.parametrize("nbytes", [0, 1, 13, 4096, 24577])
@pytest.mark.parametrize("threads", [1, 3])
def test_crc32c_blocks_native_equals_fallback(rng, nbytes, threads):
    data = random_bytes(rng, 100_000)
    offsets = rng.integers(0, data.size - nbytes + 1, 9)
    expected = ops.fallback.crc32c_blocks(data, offsets, nbytes)
    got = ops.crc32c_blocks(data, offsets, nbytes, threads=threads, use_native=True)
    assert got.dtype == np.uint32 and got.shape == (9,)
    np.testing.assert_array_equal(got, expected)


@native
def test_crc32c_blocks_threaded_equals_serial(rng):
    data = random_bytes(rng, 8 << 20)  # over the 1 MiB threshold: threads=0 fans out
    offsets = np.arange(0, data.size, 256 << 10)
    serial = ops.crc32c_blocks(data, offsets, 256 << 10, threads=1)
    np.testing.assert_array_equal(ops.crc32c_blocks(data, offsets, 256 << 10), serial)
    assert [ops.crc32c(data[o : o + (256 << 10)]) for o in offsets] == serial.tolist()


@pytest.mark.parametrize("use_native", PATHS)
def test_crc32c_blocks_empty(use_native):
    got = ops.crc32c_blocks(b"abc", [], 3, use_native=use_native)
    assert got.dtype == np.uint32 and got.size == 0


@pytest.mark.parametrize("use_native", PATHS)
def test_crc32c_blocks_out_of_bounds(use_native):
    message = r"crc32c_blocks: offsets\[1\] = 8 \+ nbytes 4 runs past the end of the 10-byte buffer"
    with pytest.raises(ValueError, match=message):
        ops.crc32c_blocks(bytes(10), [0, 8], 4, use_native=use_native)


# ---- copy_blocks ----

def copy_both_ways(rng, src, src_offsets, dst_size, dst_offsets, nbytes, threads=0):
    """(fallback result, native result) of the same copy into the same random dst."""
    dst = random_bytes(rng, dst_size)
    expected, got = dst.copy(), dst.copy()
    ops.copy_blocks(src, src_offsets, expected, dst_offsets, nbytes, use_native=False)
    ops.copy_blocks(src, src_offsets, got, dst_offsets, nbytes, threads=threads, use_native=True)
    return expected, got


@native
@pytest.mark.parametrize("nbytes", [0, 1, 3, 8, 4101])
@pytest.mark.parametrize("n", [0, 1, 17])
@pytest.mark.parametrize("threads", [0, 1, 3])
def test_copy_blocks_native_equals_fallback(rng, nbytes, n, threads):
    src = random_bytes(rng, 32 * 4101 + 5)
    src_offsets = rng.permutation(32)[:n] * nbytes + rng.integers(0, 5, n)  # gather, odd starts
    dst_offsets = np.arange(n) * (nbytes + 3) + 1  # gaps between chunks must stay untouched
    expected, got = copy_both_ways(rng, src, src_offsets, n * (nbytes + 3) + 2, dst_offsets, nbytes, threads)
    np.testing.assert_array_equal(got, expected)


@native
@pytest.mark.parametrize("threads", [0, 4, 7])
def test_copy_blocks_splits_large_chunks_across_threads(rng, threads):
    # Three 1.5 MiB chunks over several threads: tasks begin and end mid-chunk.
    nbytes = 3 << 19
    src = random_bytes(rng, 4 * nbytes)
    expected, got = copy_both_ways(rng, src, [2 * nbytes, 7, nbytes + 1], 3 * nbytes + 9,
                                   [nbytes + 9, 0, 2 * nbytes + 9], nbytes, threads)
    np.testing.assert_array_equal(got, expected)


@native
def test_copy_blocks_from_many_python_threads(rng):
    # Callers share one worker pool; each must get exactly its own batch back.
    from concurrent.futures import ThreadPoolExecutor

    n, nbytes = 48, 64 << 10  # 3 MiB a call, so every call fans out as well
    src = random_bytes(rng, n * nbytes)
    orders = [rng.permutation(n) for _ in range(24)]

    def gather(order):
        dst = np.empty_like(src)
        ops.copy_blocks(src, order * nbytes, dst, np.arange(n) * nbytes, nbytes, threads=4)
        return np.array_equal(dst.reshape(n, nbytes), src.reshape(n, nbytes)[order])

    with ThreadPoolExecutor(6) as pool:
        assert all(pool.map(gather, orders))


@native
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_copy_blocks_in_a_forked_child():
    # The child inherits the pool object but none of its threads; it must not hang.
    code = """
import os, numpy as np
from kvbm import ops
src, dst = np.arange(4 << 20, dtype=np.uint8), np.zeros(4 << 20, np.uint8)
ops.copy_blocks(src, [0], dst, [0], src.size, threads=4)
pid = os.fork()
if pid == 0:
    dst[:] = 0
    ops.copy_blocks(src, [0], dst, [0], src.size, threads=4)
    os._exit(0 if np.array_equal(src, dst) else 1)
print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""
    assert run_python(code, timeout=60)[0] == "0"


@pytest.mark.parametrize("use_native", PATHS)
def test_copy_blocks_between_typed_arrays(rng, use_native):
    # KV pages are float16/bfloat16 arrays; offsets are always in bytes.
    pool = rng.standard_normal((8, 2, 16)).astype(np.float16)
    staging = np.zeros((3, 2, 16), dtype=np.float16)
    page = pool[0].nbytes
    ops.copy_blocks(pool, [5 * page, 0, 2 * page], staging, [0, page, 2 * page], page, use_native=use_native)
    np.testing.assert_array_equal(staging, pool[[5, 0, 2]])


BAD_RANGES = [
    # (src_offsets, dst_offsets, nbytes, message)
    ([0, 4, 96], [0, 4, 8], 4, r"src_offsets\[2\] = 96 \+ nbytes 4 runs past the end of the 99-byte buffer"),
    ([0, -1], [0, 4], 4, r"src_offsets\[1\] = -1 is negative"),
    ([0, 4], [0, 61], 4, r"dst_offsets\[1\] = 61 \+ nbytes 4 runs past the end of the 64-byte buffer"),
    ([0], [0], 100, r"src_offsets\[0\] = 0 \+ nbytes 100 runs past the end of the 99-byte buffer"),
    ([0, 4], [0], 4, r"len\(src_offsets\) = 2 but len\(dst_offsets\) = 1"),
    ([0], [0], -1, r"nbytes must be >= 0, got -1"),
    ([2**62], [0], 2**62, r"src_offsets\[0\] = 4611686018427387904 \+ nbytes"),  # no overflow
]


@pytest.mark.parametrize("use_native", PATHS)
@pytest.mark.parametrize("src_offsets, dst_offsets, nbytes, message", BAD_RANGES)
def test_copy_blocks_rejects_bad_ranges_before_copying(use_native, src_offsets, dst_offsets, nbytes,
                                                        message):
    src, dst = np.ones(99, dtype=np.uint8), np.zeros(64, dtype=np.uint8)
    with pytest.raises(ValueError, match=message):
        ops.copy_blocks(src, src_offsets, dst, dst_offsets, nbytes, use_native=use_native)
    assert not dst.any(), "a rejected batch must not copy its valid chunks either"


@pytest.mark.parametrize("use_native", PATHS)
def test_copy_blocks_needs_writable_contiguous_buffers(use_native):
    with pytest.raises(TypeError, match="dst must be a C-contiguous, writable buffer"):
        ops.copy_blocks(bytes(8), [0], bytes(8), [0], 4, use_native=use_native)
    with pytest.raises(TypeError, match="dst must be a C-contiguous"):
        ops.copy_blocks(bytes(8), [0], np.zeros(16, np.uint8)[::2], [0], 4, use_native=use_native)
    with pytest.raises(TypeError, match="src_offsets must be a 1-D integer array"):
        ops.copy_blocks(bytes(8), [0.5], bytearray(8), [0], 4, use_native=use_native)


# ---- gather / scatter between a paged pool and staging (host reference) ----

@pytest.mark.parametrize("use_native", PATHS)
def test_gather_then_scatter_round_trips(rng, use_native):
    pool = random_bytes(rng, 10 * 48)
    staging = np.zeros(4 * 48, dtype=np.uint8)
    ids = [7, 2, 9, 0]
    ops.gather_blocks(pool, staging, ids, 48, use_native=use_native)
    np.testing.assert_array_equal(staging.reshape(4, 48), pool.reshape(10, 48)[ids])
    fresh = np.zeros_like(pool)
    ops.scatter_blocks(fresh, staging, ids, 48, use_native=use_native)
    np.testing.assert_array_equal(fresh.reshape(10, 48)[ids], pool.reshape(10, 48)[ids])


@pytest.mark.parametrize("use_native", PATHS)
def test_gather_rejects_block_ids_outside_the_pool(use_native):
    with pytest.raises(ValueError, match=r"block_ids\[1\] = 10 is outside the paged pool of 10 blocks"):
        ops.gather_blocks(bytes(480), bytearray(96), [3, 10], 48, use_native=use_native)


# ---- the extension is optional ----

def test_ops_import_without_the_extension_warns_and_falls_back():
    code = ("import sys; sys.modules['kvbm._native'] = None\n"  # as if it were never built
            "from kvbm import ops; print(ops.HAVE_NATIVE, ops.cuda_available(), hex(ops.crc32c(b'123456789')))")
    stdout, stderr = run_python(code)
    assert stdout == "False False 0xe3069283"
    assert stderr.count("kvbm._native is not available") == 1


def test_kvbm_native_0_turns_the_extension_off_quietly():
    stdout, stderr = run_python("from kvbm import ops; print(ops.HAVE_NATIVE)", KVBM_NATIVE="0")
    assert stdout == "False" and "RuntimeWarning" not in stderr


def test_use_native_true_without_the_extension_is_an_error(monkeypatch):
    monkeypatch.setattr(ops, "HAVE_NATIVE", False)
    with pytest.raises(RuntimeError, match="not built"):
        ops.crc32c(b"x", use_native=True)


# ---- CUDA ----

@native
def test_cuda_build_flag():
    """built_with_cuda follows the toolkit; CI states what it expects in KVBM_EXPECT_CUDA."""
    assert isinstance(ops.CUDA_BUILT, bool)
    expect = os.environ.get("KVBM_EXPECT_CUDA")
    if expect is not None:
        assert ops.CUDA_BUILT == (expect == "1")
    # Must answer, not crash, on a host without a driver or a device.
    assert ops.cuda_available() in (True, False)
    if not ops.CUDA_BUILT:
        assert ops.cuda_available() is False


@pytest.mark.skipif(not ops.CUDA_BUILT, reason="kvbm._native was built without CUDA")
def test_cuda_ops_check_bounds_before_touching_the_device():
    # Validation runs on the host, so it works (and protects) even without a driver.
    with pytest.raises(ValueError, match=r"block_ids\[0\] = 10 is outside the paged pool of 10 blocks"):
        ops._native.cuda_gather_blocks(0, 480, 0, 480, np.array([10]), 48)
    with pytest.raises(ValueError, match="do not fit the 95-byte staging buffer"):
        ops._native.cuda_scatter_blocks(0, 480, 0, 95, np.array([0, 1]), 48)


@pytest.mark.skipif(not ops.CUDA_BUILT, reason="kvbm._native was built without CUDA")
def test_cuda_copy_blocks_checks_offsets_before_touching_the_device():
    src, dst = np.zeros(8192, np.uint8), np.zeros(4096, np.uint8)
    with pytest.raises(ValueError, match=r"dst_offsets\[1\] = 2048: 4096 bytes there do not fit the 4096-byte"):
        ops.cuda_copy_blocks(src, [0, 4096], dst, [0, 2048], 4096)
    with pytest.raises(ValueError, match="2 src_offsets but 1 dst_offsets"):
        ops.cuda_copy_blocks(src, [0, 4096], dst, [0], 4096)
    with pytest.raises(ValueError, match=r"src_offsets\[0\] = -1"):
        ops.cuda_copy_blocks(src, [-1], dst, [0], 4096)


@pytest.mark.gpu
@pytest.mark.skipif(not ops.cuda_available(), reason="no CUDA driver or device")
@pytest.mark.parametrize("block_nbytes", [4096, 4095])  # 16-byte vector path and byte path
@pytest.mark.parametrize("max_ctas", [0, 2])
def test_cuda_gather_scatter_equals_host(rng, block_nbytes, max_ctas):
    torch = pytest.importorskip("torch")
    pool = random_bytes(rng, 64 * block_nbytes)
    ids = rng.permutation(64)[:23]
    expected = np.zeros(23 * block_nbytes, dtype=np.uint8)
    ops.gather_blocks(pool, expected, ids, block_nbytes, use_native=False)

    dev_pool = torch.from_numpy(pool).cuda()
    dev_staging = torch.zeros(23 * block_nbytes, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.current_stream()
    ops.gather_blocks(dev_pool, dev_staging, ids, block_nbytes, stream=stream, max_ctas=max_ctas)
    stream.synchronize()
    np.testing.assert_array_equal(dev_staging.cpu().numpy(), expected)

    dev_pool.zero_()
    ops.scatter_blocks(dev_pool, dev_staging, ids, block_nbytes, stream=stream, max_ctas=max_ctas)
    stream.synchronize()
    back = dev_pool.cpu().numpy().reshape(64, block_nbytes)
    np.testing.assert_array_equal(back[ids], pool.reshape(64, block_nbytes)[ids])
    untouched = np.setdiff1d(np.arange(64), ids)
    assert not back[untouched].any()


def test_native_is_built_when_required():
    """CI sets KVBM_REQUIRE_NATIVE=1 so a failed C++ build fails instead of skipping tests."""
    if os.environ.get("KVBM_REQUIRE_NATIVE") == "1":
        assert ops.HAVE_NATIVE, "kvbm._native did not build or import"
