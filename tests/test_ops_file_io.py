"""kvbm.ops.pwrite_blocks / pread_blocks: native and fallback give the same file bytes and
the same per-block statuses, on buffered and O_DIRECT descriptors, and refuse bad arguments.

An I/O error is a status for its block (0 or an errno), never an exception: a failed block
is a miss and the other blocks still move.
"""

import errno
import mmap
import os
import subprocess
import sys

import numpy as np
import pytest

from kvbm import ops

native = pytest.mark.skipif(not ops.HAVE_NATIVE, reason="kvbm._native is not built")
PATHS = [pytest.param(False, id="fallback"), pytest.param(True, id="native", marks=native)]
PAGE = 4096


def align_up(n):
    return (n + PAGE - 1) // PAGE * PAGE


def aligned_bytes(rng, n):
    """Random bytes in page-aligned (mmap) memory."""
    buf = np.frombuffer(mmap.mmap(-1, max(n, 1)), dtype=np.uint8)[:n]
    buf[:] = rng.integers(0, 256, n, dtype=np.uint8)
    return buf


def open_file(path, direct, prefill=b""):
    path.write_bytes(prefill)
    flags = os.O_RDWR | (os.O_DIRECT if direct else 0)
    return os.open(path, flags)


@pytest.fixture
def rng():
    return np.random.default_rng(7)


@pytest.fixture
def small_fs(tmp_path):
    """A 256 KiB tmpfs: fills up after a few blocks (root only; skipped elsewhere)."""
    where = tmp_path / "small"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)],
                          capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


# ---- native == fallback, byte for byte ----

SIZES = [1, 4096, 4097, 65536, 100 * 1024 + 7]


def blocks_and_slots(rng, nbytes, form, aligned):
    """Five source blocks (a list of buffers or one buffer with offsets) and their slots,
    three of them neighbours in the file so the native side merges them."""
    stride = align_up(nbytes)
    pool = aligned_bytes(rng, 6 * stride + 3)
    skew = 0 if aligned else 3
    offsets = np.array([4, 0, 2, 5, 1]) * stride + skew
    slots = np.array([3, 4, 5, 0, 7]) * stride
    if form == "list":
        return [pool[o : o + nbytes] for o in offsets], None, slots
    return pool, offsets, slots


@native
@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
@pytest.mark.parametrize("nbytes", SIZES)
@pytest.mark.parametrize("form", ["list", "offsets"])
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
def test_native_writes_and_reads_the_fallback_bytes(tmp_path, rng, direct, nbytes, form, aligned):
    src, src_offsets, slots = blocks_and_slots(rng, nbytes, form, aligned)
    prefill = rng.integers(0, 256, 8 * align_up(nbytes), dtype=np.uint8).tobytes()
    files = {}
    for use_native in (False, True):
        path = tmp_path / f"slots-{use_native}"
        fd = open_file(path, direct, prefill)
        try:
            status = ops.pwrite_blocks(fd, src, slots, nbytes, src_offsets=src_offsets, threads=3,
                                       use_native=use_native)
        finally:
            os.close(fd)
        assert status.dtype == np.int32 and status.tolist() == [0] * 5
        files[use_native] = path.read_bytes()
    assert files[True] == files[False]

    expected = [bytes(src[i]) if src_offsets is None else bytes(src[o : o + nbytes])
                for i, o in enumerate(src_offsets if src_offsets is not None else range(5))]
    fd = open_file(tmp_path / "slots-True", direct, files[True])
    try:
        for use_native in (False, True):
            dst, dst_offsets, _ = blocks_and_slots(rng, nbytes, form, aligned)  # fresh random bytes
            status = ops.pread_blocks(fd, dst, slots, nbytes, dst_offsets=dst_offsets, threads=3,
                                      use_native=use_native)
            assert status.tolist() == [0] * 5
            got = [bytes(dst[i]) if dst_offsets is None else bytes(dst[o : o + nbytes])
                   for i, o in enumerate(dst_offsets if dst_offsets is not None else range(5))]
            assert got == expected
    finally:
        os.close(fd)


@native
def test_direct_padding_is_zeros_and_neighbours_stay(tmp_path, rng):
    # 4097 bytes on O_DIRECT are written as 8192: the 4095 padding bytes become zeros,
    # and nothing outside [offset, offset + 8192) changes.
    block = aligned_bytes(rng, 4097)
    for use_native in (False, True):
        path = tmp_path / f"f{use_native}"
        fd = open_file(path, True, b"\xff" * 4 * PAGE)
        try:
            assert ops.pwrite_blocks(fd, [block], [PAGE], 4097, use_native=use_native).tolist() == [0]
        finally:
            os.close(fd)
        data = path.read_bytes()
        assert data[:PAGE] == b"\xff" * PAGE
        assert data[PAGE : PAGE + 4097] == bytes(block)
        assert data[PAGE + 4097 : 3 * PAGE] == bytes(3 * PAGE - PAGE - 4097)
        assert data[3 * PAGE :] == b"\xff" * PAGE


@native
@pytest.mark.parametrize("threads", [0, 1, 2, 4])
def test_many_blocks_over_threads(tmp_path, rng, threads):
    # 96 x 64 KiB in shuffled slots: merged runs, single blocks and every task split.
    nbytes, n = 64 << 10, 96
    src = aligned_bytes(rng, n * nbytes)
    slots = rng.permutation(100)[:n] * nbytes
    slots[10:40] = (100 + np.arange(30)) * nbytes  # one long neighbour run
    fd = open_file(tmp_path / "f", True, bytes(130 * nbytes))
    try:
        status = ops.pwrite_blocks(fd, src, slots, nbytes, src_offsets=np.arange(n) * nbytes, threads=threads)
        assert not status.any()
        dst = [aligned_bytes(rng, nbytes) for _ in range(n)]
        crcs = np.zeros(n, np.uint32)
        assert not ops.pread_blocks(fd, dst, slots, nbytes, threads=threads, crcs=crcs).any()
    finally:
        os.close(fd)
    assert b"".join(bytes(d) for d in dst) == bytes(src)
    assert crcs.tolist() == [ops.crc32c(d) for d in dst]


@native
@pytest.mark.parametrize("threads", [1, 2])
def test_aligned_and_bounced_blocks_in_one_direct_batch(tmp_path, rng, threads):
    # Aligned blocks go through AIO (merged when neighbours), unaligned ones through a
    # bounce buffer, in the same call; the file and the crcs match the fallback's.
    nbytes, n = 16 * PAGE, 24
    pool = aligned_bytes(rng, (n + 1) * nbytes)
    src = [pool[i * nbytes + (i % 3 == 1) * 8:][:nbytes] for i in range(n)]
    slots = np.arange(n) * nbytes
    files, crcs = {}, {}
    for use_native in (False, True):
        path = tmp_path / f"f{use_native}"
        fd = open_file(path, True, bytes(n * nbytes))
        crcs[use_native] = np.zeros(n, np.uint32)
        try:
            status = ops.pwrite_blocks(fd, src, slots, nbytes, threads=threads, crcs=crcs[use_native],
                                       use_native=use_native)
            assert not status.any()
            dst = [aligned_bytes(rng, nbytes + 8)[(i % 2) * 8:][:nbytes] for i in range(n)]
            read_crcs = np.zeros(n, np.uint32)
            assert not ops.pread_blocks(fd, dst, slots, nbytes, threads=threads, crcs=read_crcs,
                                        use_native=use_native).any()
            assert [bytes(d) for d in dst] == [bytes(b) for b in src]
            np.testing.assert_array_equal(read_crcs, crcs[use_native])
        finally:
            os.close(fd)
        files[use_native] = path.read_bytes()
    assert files[True] == files[False]
    np.testing.assert_array_equal(crcs[True], crcs[False])


@native
@pytest.mark.parametrize("nbytes", [777, 3 * 8192 * 2 + 100], ids=["tail", "stripes"])
@pytest.mark.parametrize("threads", [1, 2])
def test_bounced_blocks_copy_and_checksum_in_one_pass_as_the_fallback_does(tmp_path, rng, nbytes, threads):
    # A size O_DIRECT cannot take as it is (not a multiple of 4 KiB): every block goes
    # through the bounce buffer, its CRC-32C taken in the same pass as that copy, both ways.
    n = 5
    stride = align_up(nbytes)
    src = [aligned_bytes(rng, nbytes) for _ in range(n)]
    slots = np.array([3, 0, 4, 1, 2]) * stride
    files, crcs = {}, {}
    for use_native in (False, True):
        path = tmp_path / f"f{use_native}"
        fd = open_file(path, True, bytes(n * stride))
        crcs[use_native] = np.zeros(n, np.uint32)
        try:
            assert not ops.pwrite_blocks(fd, src, slots, nbytes, threads=threads, crcs=crcs[use_native],
                                         use_native=use_native).any()
            dst = [aligned_bytes(rng, nbytes + 5)[5:] for _ in range(n + 1)]
            read_crcs = np.full(n + 1, 7, np.uint32)
            before = bytes(dst[n])
            status = ops.pread_blocks(fd, dst, np.append(slots, 9 * stride), nbytes, threads=threads,
                                      crcs=read_crcs, use_native=use_native)
        finally:
            os.close(fd)
        assert status.tolist() == [0] * n + [errno.ENODATA]
        assert [bytes(d) for d in dst[:n]] == [bytes(b) for b in src]
        assert bytes(dst[n]) == before  # a failed read leaves its buffer alone
        assert read_crcs.tolist() == crcs[use_native].tolist() + [0]
        files[use_native] = path.read_bytes()
    assert files[True] == files[False]
    assert crcs[True].tolist() == crcs[False].tolist() == [ops.crc32c(b, use_native=False) for b in src]


@native
@pytest.mark.parametrize("threads", [0, 2])
def test_a_checked_read_larger_than_its_window_checksums_every_block(tmp_path, rng, threads):
    # 12 MiB in 1 MiB blocks, more than the bytes a checksummed O_DIRECT read keeps in flight:
    # the checksum task waits for each run to land; a block past the end fails alone, crc 0.
    nbytes, n = 1 << 20, 12
    src = aligned_bytes(rng, n * nbytes)
    slots = np.array([5, 0, 7, 1, 2, 3, 11, 4, 6, 8, 9, 10]) * nbytes
    fd = open_file(tmp_path / "f", True, bytes(n * nbytes))
    try:
        assert not ops.pwrite_blocks(fd, src, slots, nbytes, src_offsets=np.arange(n) * nbytes).any()
        dst = aligned_bytes(rng, (n + 1) * nbytes)
        crcs = np.full(n + 1, 7, np.uint32)
        status = ops.pread_blocks(fd, dst, np.insert(slots, 6, 40 * nbytes), nbytes,
                                  dst_offsets=np.arange(n + 1) * nbytes, threads=threads, crcs=crcs)
    finally:
        os.close(fd)
    assert status.tolist() == [0] * 6 + [errno.ENODATA] + [0] * 6
    got = np.delete(dst.reshape(n + 1, nbytes), 6, axis=0)
    np.testing.assert_array_equal(got, src.reshape(n, nbytes))
    want = [ops.crc32c(b) for b in src.reshape(n, nbytes)]
    assert crcs.tolist() == want[:6] + [0] + want[6:]


@native
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_direct_io_in_a_forked_child(tmp_path):
    # AIO contexts belong to one process: the child must make its own, not hang or fail.
    code = f"""
import os, mmap, numpy as np
from kvbm import ops
buf = np.frombuffer(mmap.mmap(-1, 8 << 20), np.uint8)
buf[:] = np.arange(buf.size) % 251
fd = os.open({str(tmp_path / "f")!r}, os.O_RDWR | os.O_CREAT | os.O_DIRECT)
offs = np.arange(4) * (2 << 20)
assert not ops.pwrite_blocks(fd, buf, offs, 2 << 20, src_offsets=offs, threads=2).any()
pid = os.fork()
if pid == 0:
    out = np.frombuffer(mmap.mmap(-1, 8 << 20), np.uint8)
    ok = not ops.pread_blocks(fd, out, offs[::-1], 2 << 20, dst_offsets=offs, threads=2).any()
    ok = ok and np.array_equal(out.reshape(4, -1), buf.reshape(4, -1)[::-1])
    os._exit(0 if ok else 1)
print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert out.stdout.strip() == "0", out.stderr


@pytest.mark.parametrize("use_native", PATHS)
def test_crcs_of_written_and_read_blocks(tmp_path, rng, use_native):
    blocks = [aligned_bytes(rng, 777) for _ in range(3)]
    fd = open_file(tmp_path / "f", False)
    try:
        wrote = np.zeros(3, np.uint32)
        ops.pwrite_blocks(fd, blocks, [0, 1000, 2000], 777, crcs=wrote, use_native=use_native)
        assert wrote.tolist() == [ops.crc32c(b) for b in blocks]
        read = np.full(4, 9, np.uint32)
        dst = [bytearray(777) for _ in range(4)]
        status = ops.pread_blocks(fd, dst, [2000, 0, 5000, 1000], 777, crcs=read, use_native=use_native)
    finally:
        os.close(fd)
    assert status.tolist() == [0, 0, errno.ENODATA, 0]
    assert read.tolist() == [wrote[2], wrote[0], 0, wrote[1]]


# ---- I/O errors are per block ----

@pytest.mark.parametrize("use_native", PATHS)
def test_bad_fd_fails_every_block_without_raising(tmp_path, use_native):
    fd = open_file(tmp_path / "f", False)
    os.close(fd)  # now a closed descriptor
    status = ops.pwrite_blocks(fd, [bytes(10)] * 2, [0, 10], 10, use_native=use_native)
    assert status.tolist() == [errno.EBADF] * 2
    status = ops.pread_blocks(fd, [bytearray(10)] * 2, [0, 10], 10, use_native=use_native)
    assert status.tolist() == [errno.EBADF] * 2


@pytest.mark.parametrize("use_native", PATHS)
def test_write_to_a_read_only_fd_is_ebadf(tmp_path, use_native):
    path = tmp_path / "f"
    path.write_bytes(bytes(100))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert ops.pwrite_blocks(fd, [b"x" * 10], [0], 10, use_native=use_native).tolist() == [errno.EBADF]
    finally:
        os.close(fd)


# threads=1 keeps native I/O on the calling thread (pread/pwrite); more takes the O_DIRECT
# path through kernel AIO, whose failed requests are redone one block at a time.
IO_PATHS = [pytest.param(False, 1, id="fallback"), pytest.param(True, 1, id="native-sync", marks=native),
            pytest.param(True, 2, id="native-aio", marks=native)]


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
@pytest.mark.parametrize("use_native, threads", IO_PATHS)
def test_reading_past_the_end_is_a_miss_for_that_block_only(tmp_path, rng, direct, use_native, threads):
    data = rng.integers(0, 256, 3 * PAGE + 100, dtype=np.uint8).tobytes()  # last block is short
    fd = open_file(tmp_path / "f", direct, data)
    try:
        dst = aligned_bytes(rng, 4 * PAGE)
        before = dst.copy()
        status = ops.pread_blocks(fd, dst, [PAGE, 9 * PAGE, 0, 3 * PAGE], PAGE, threads=threads,
                                  dst_offsets=np.arange(4) * PAGE, use_native=use_native)
    finally:
        os.close(fd)
    assert status.tolist() == [0, errno.ENODATA, 0, errno.ENODATA]
    assert bytes(dst[:PAGE]) == data[PAGE : 2 * PAGE]
    assert bytes(dst[2 * PAGE : 3 * PAGE]) == data[:PAGE]
    assert bytes(dst[PAGE : 2 * PAGE]) == bytes(before[PAGE : 2 * PAGE])  # nothing read there


@pytest.mark.parametrize("use_native, threads", IO_PATHS)
def test_unaligned_file_offset_on_o_direct_is_einval_for_that_block(tmp_path, rng, use_native, threads):
    src = aligned_bytes(rng, 3 * PAGE)
    fd = open_file(tmp_path / "f", True, bytes(8 * PAGE))
    try:
        status = ops.pwrite_blocks(fd, src, [0, 2 * PAGE + 512 + 1, 5 * PAGE], PAGE, threads=threads,
                                   src_offsets=[0, PAGE, 2 * PAGE], use_native=use_native)
    finally:
        os.close(fd)
    assert status.tolist() == [0, errno.EINVAL, 0]


@native
@pytest.mark.parametrize("direct, threads", [(False, 0), (True, 1), (True, 2)],
                         ids=["buffered", "direct-sync", "direct-aio"])
def test_a_full_filesystem_fails_the_blocks_that_do_not_fit(small_fs, rng, direct, threads):
    # 256 KiB of tmpfs and eight 64 KiB blocks in one merged run: the first ones land, the
    # rest are ENOSPC, and native and fallback agree block by block.
    nbytes = 64 << 10
    src = aligned_bytes(rng, 8 * nbytes)
    results = {}
    for use_native in (False, True):
        path = small_fs / "slots"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0))
        except OSError as exc:
            pytest.skip(f"tmpfs refuses O_DIRECT here: {exc}")
        try:
            status = ops.pwrite_blocks(fd, src, np.arange(8) * nbytes, nbytes, threads=threads,
                                       src_offsets=np.arange(8) * nbytes, use_native=use_native)
            ok = np.flatnonzero(status == 0)
            dst = np.zeros(8 * nbytes, np.uint8)
            read = ops.pread_blocks(fd, dst, ok * nbytes, nbytes, dst_offsets=ok * nbytes)
            assert not read.any()
            np.testing.assert_array_equal(dst.reshape(8, -1)[ok], src.reshape(8, -1)[ok])
        finally:
            os.close(fd)
            path.unlink()
        results[use_native] = status.tolist()
    assert results[True] == results[False]
    status = results[True]
    assert 0 < status.count(0) < 8, status
    assert set(status) == {0, errno.ENOSPC}
    assert status == sorted(status), "the blocks that fit come first"


# ---- bad arguments raise before any byte moves ----

BAD = [
    # (kwargs for pwrite_blocks over a 64-byte source, message)
    ({"file_offsets": [0, -8], "nbytes": 8}, r"file_offsets\[1\] = -8 is negative"),
    ({"file_offsets": [2**63 - 4], "nbytes": 8}, r"file_offsets\[0\] = 9223372036854775804 \+ nbytes overflows"),
    ({"file_offsets": [0], "nbytes": -1}, r"nbytes must be >= 0, got -1"),
    ({"file_offsets": [0, 8], "nbytes": 8, "src_offsets": [0]}, r"len\(src_offsets\) = 1 but len\(file_offsets\) = 2"),
    ({"file_offsets": [0, 8], "nbytes": 8, "src_offsets": [0, 60]},
     r"src_offsets\[1\] = 60 \+ nbytes 8 runs past the end of the 64-byte buffer"),
    ({"file_offsets": [0, 8], "nbytes": 8, "crcs": np.zeros(3, np.uint32)}, r"len\(crcs\) = 3 but len\(file_offsets\) = 2"),
]


@pytest.mark.parametrize("use_native", PATHS)
@pytest.mark.parametrize("kwargs, message", BAD)
def test_bad_arguments_raise_value_error(tmp_path, use_native, kwargs, message):
    path = tmp_path / "f"
    fd = open_file(path, False)
    kwargs = dict(kwargs)
    src = bytes(64) if "src_offsets" in kwargs else [bytes(64)] * len(kwargs["file_offsets"])
    try:
        with pytest.raises(ValueError, match=message):
            ops.pwrite_blocks(fd, src, use_native=use_native, **kwargs)
    finally:
        os.close(fd)
    assert path.stat().st_size == 0


@pytest.mark.parametrize("use_native", PATHS)
def test_bad_buffers_raise(tmp_path, use_native):
    fd = open_file(tmp_path / "f", False)
    try:
        with pytest.raises(ValueError, match=r"pwrite_blocks: src\[1\] holds 4 bytes, fewer than nbytes 8"):
            ops.pwrite_blocks(fd, [bytes(8), bytes(4)], [0, 8], 8, use_native=use_native)
        with pytest.raises(ValueError, match=r"len\(dst\) = 1 but len\(file_offsets\) = 2"):
            ops.pread_blocks(fd, [bytearray(8)], [0, 8], 8, use_native=use_native)
        with pytest.raises(TypeError, match=r"dst\[0\] must be a C-contiguous, writable buffer"):
            ops.pread_blocks(fd, [bytes(8)], [0], 8, use_native=use_native)
        with pytest.raises(TypeError, match="must be a list of buffers when src_offsets is None"):
            ops.pwrite_blocks(fd, np.zeros(16, np.uint8), [0], 8, use_native=use_native)
    finally:
        os.close(fd)


@pytest.mark.parametrize("use_native", PATHS)
def test_empty_batches_and_zero_length_blocks(tmp_path, use_native):
    fd = open_file(tmp_path / "f", False)
    try:
        assert ops.pwrite_blocks(fd, [], [], 4096, use_native=use_native).size == 0
        assert ops.pread_blocks(fd, [bytearray(0)], [123], 0, use_native=use_native).tolist() == [0]
    finally:
        os.close(fd)
