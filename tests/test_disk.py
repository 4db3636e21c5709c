"""G3 DiskStorage: round trips, restart, crashes, corruption and a full disk.

The promise under test: a block read back as True has exactly the bytes that were written
for its key; anything torn, flipped, or lost to a full disk or an I/O error is a miss
(False) and a counted error, never an exception in the data path.
"""

import errno
import logging
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from kvbm import ops
from kvbm.tiers import disk as disk_module
from kvbm.tiers.disk import DiskStorage
from kvbm.tiers.host import HostStorage

KIB, MIB = 1 << 10, 1 << 20
SIZES = [4 * KIB, 64 * KIB, 100 * KIB + 7, 2 * MIB]


def content(key, nbytes):
    """The bytes every test writes for `key`: recomputable after a crash."""
    seed = key if isinstance(key, int) else int.from_bytes(key[:8], "little")
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def unaligned(nbytes):
    """A writable buffer that starts 3 bytes past a 4 KiB boundary."""
    raw = np.empty(nbytes + 4096 + 3, dtype=np.uint8)
    start = (-raw.ctypes.data) % 4096 + 3
    return raw[start : start + nbytes]


def open_store(tmp_path, capacity=8, nbytes=64 * KIB, **kw):
    return DiskStorage(capacity, nbytes, namespace="llama--abc", path=tmp_path / "g3", **kw)


def write_keys(store, keys):
    """Allocate a slot per key, write content(key); returns {key: slot}."""
    slots = {k: store.allocate() for k in keys}
    assert store.write([(k, s, content(k, store.block_nbytes)) for k, s in slots.items()]) == [True] * len(keys)
    return slots


def read_back(store, pairs):
    """(ok per block, buffers) reading [(key, slot)] into fresh buffers."""
    bufs = [np.zeros(store.block_nbytes, np.uint8) for _ in pairs]
    return store.read([(k, s, b) for (k, s), b in zip(pairs, bufs)]), bufs


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs (root only; skipped where mount is not allowed)."""
    where = tmp_path / "small"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def fill(folder, leave=0):
    """Fill the filesystem under folder, then give back `leave` bytes."""
    path = folder / "filler"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        chunk = bytes(4 * KIB)
        while True:
            try:
                os.write(fd, chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
        os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave))
    finally:
        os.close(fd)


# ---- round trips ----

@pytest.mark.parametrize("nbytes", SIZES, ids=["4K", "64K", "100K+7", "2M"])
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
def test_round_trip(tmp_path, nbytes, aligned):
    host = HostStorage(6, nbytes, pin="never")
    with open_store(tmp_path, capacity=6, nbytes=nbytes) as store:
        keys = [bytes([i]) * 16 for i in range(5)]
        sources = []
        for i, k in enumerate(keys):
            buf = host.view(i) if aligned else unaligned(nbytes)
            buf[:] = content(k, nbytes)
            sources.append(buf)
        slots = [store.allocate() for _ in keys]
        assert store.write(list(zip(keys, slots, sources))) == [True] * 5
        dst = [host.view(5 - i) if aligned else unaligned(nbytes) for i in range(5)]  # other slots
        for d in dst:
            d[:] = 0
        # read in another order than written
        order = [3, 0, 4, 1, 2]
        assert store.read([(keys[i], slots[i], dst[i]) for i in order]) == [True] * 5
        for k, d in zip(keys, dst):
            np.testing.assert_array_equal(d, content(k, nbytes))
        assert store.errors.io_errors == store.errors.checksum_errors == 0


def test_o_direct_is_used_on_this_filesystem(tmp_path):
    try:
        os.close(os.open(tmp_path / "probe", os.O_RDWR | os.O_CREAT | os.O_DIRECT))
    except OSError as exc:
        pytest.skip(f"{tmp_path} refuses O_DIRECT: {exc}")
    import fcntl

    with open_store(tmp_path) as store:
        assert store.direct
        assert fcntl.fcntl(store.fd, fcntl.F_GETFL) & os.O_DIRECT
        # preallocated: the whole slot file is there from the start
        assert store.slots_path.stat().st_size == 8 * 64 * KIB
        assert store.slots_path.stat().st_blocks * 512 >= 8 * 64 * KIB


def test_falls_back_to_buffered_io_when_o_direct_is_refused(tmp_path, monkeypatch, caplog):
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(disk_module.os, "open", no_direct)
    with caplog.at_level(logging.WARNING, logger="kvbm.tiers.disk"):
        store = open_store(tmp_path, nbytes=100 * KIB + 7)
    assert "refuses O_DIRECT" in caplog.text and "buffered I/O" in caplog.text
    assert not store.direct
    slots = write_keys(store, [1, 2])
    ok, bufs = read_back(store, list(slots.items()))
    assert ok == [True, True]
    np.testing.assert_array_equal(bufs[1], content(2, 100 * KIB + 7))
    store.close()


def test_slots_capacity_and_extents(tmp_path):
    with open_store(tmp_path, capacity=3, nbytes=100 * KIB + 7) as store:
        assert store.stride == 104 * KIB
        slots = [store.allocate() for _ in range(3)]
        assert slots == [0, 1, 2] and store.allocate() is None  # a hard bound
        region = store.describe(2)[0]
        assert (region.kind, region.address, region.offset, region.length) == (
            "file", str(tmp_path / "g3" / "llama--abc" / "slots.bin"), 2 * 104 * KIB, 100 * KIB + 7)
        store.free(1)
        assert store.allocate() == 1
        store.free(1)
        with pytest.raises(ValueError, match="slot 1 is not allocated"):
            store.free(1)


def test_bad_arguments_raise(tmp_path):
    with pytest.raises(ValueError, match="needs `path`"):
        DiskStorage(4, 4096)
    with open_store(tmp_path) as store:
        with pytest.raises(ValueError, match="a 100-byte buffer for a 65536-byte block"):
            store.write([(1, 0, bytes(100))])
        with pytest.raises(ValueError, match=r"slot 8 is outside \[0, 8\)"):
            store.write([(1, 8, bytes(64 * KIB))])
        with pytest.raises(TypeError, match="bytes or int block keys"):
            store.write([("name", 0, bytes(64 * KIB))])
        with pytest.raises(TypeError, match="writable"):
            store.read([(1, 0, bytes(64 * KIB))])


def test_a_slot_read_under_another_key_is_a_plain_miss(tmp_path):
    with open_store(tmp_path) as store:
        slots = write_keys(store, [10, 11])
        ok, _ = read_back(store, [(11, slots[10]), (12, 5), (10, slots[10])])
        assert ok == [False, False, True]
        assert store.errors.io_errors == store.errors.checksum_errors == 0


# ---- restart ----

def test_restart_recovers_written_blocks_but_not_freed_ones(tmp_path):
    keys = [bytes([i]) * 16 for i in range(5)] + [7, 2**70]  # hashes and trace ids
    with open_store(tmp_path) as store:
        slots = write_keys(store, keys)
        store.free(slots[keys[1]])
        store.free(slots[7])
    with open_store(tmp_path) as store:
        recovered = store.recover()
        assert recovered == [(k, slots[k]) for k in keys if k not in (keys[1], 7)]  # write order
        ok, bufs = read_back(store, recovered)
        assert all(ok)
        for (k, _), b in zip(recovered, bufs):
            np.testing.assert_array_equal(b, content(k, 64 * KIB))
        # recovered slots are taken; freeing one gives it back
        taken = {s for _, s in recovered}
        fresh = [store.allocate() for _ in range(8 - len(taken))]
        assert not taken & set(fresh) and store.allocate() is None
        store.free(slots[keys[0]])
        assert store.allocate() == slots[keys[0]]


def test_latest_record_per_slot_and_per_key_wins(tmp_path):
    n = 64 * KIB
    with open_store(tmp_path) as store:
        a, b = store.allocate(), store.allocate()  # 0, 1
        c = store.allocate()  # 2
        store.write([(100, a, content(100, n)), (101, b, content(101, n))])
        store.write([(100, c, content(100, n))])  # key 100 moves to slot c: slot a is empty
        store.write([(102, b, content(102, n))])  # slot b is overwritten: key 101 is gone
        assert read_back(store, [(100, a), (101, b)])[0] == [False, False]
    with open_store(tmp_path) as store:
        assert store.recover() == [(100, c), (102, b)]
        ok, bufs = read_back(store, [(100, c), (102, b)])
        assert ok == [True, True]
        np.testing.assert_array_equal(bufs[1], content(102, n))


@pytest.mark.parametrize("change", [{"nbytes": 32 * KIB}, {"capacity": 16}], ids=["block size", "capacity"])
def test_a_layout_change_starts_empty_with_a_warning(tmp_path, caplog, change):
    with open_store(tmp_path) as store:
        write_keys(store, [1, 2, 3])
    with caplog.at_level(logging.WARNING, logger="kvbm.tiers.disk"):
        store = open_store(tmp_path, **change)
    assert "starting empty" in caplog.text and "block_nbytes=65536, capacity_blocks=8" in caplog.text
    assert store.recover() == []
    assert read_back(store, [(1, 0)])[0] == [False]
    store.close()
    with open_store(tmp_path, **change) as store:  # the new layout is what is on disk now
        assert store.recover() == []


def test_a_torn_index_tail_is_ignored_and_the_index_compacted(tmp_path, caplog):
    with open_store(tmp_path) as store:
        slots = write_keys(store, [1, 2, 3])
        for _ in range(20):  # churn: deletes and rewrites grow the log
            store.free(slots[3])
            slots[3] = store.allocate()
            store.write([(3, slots[3], content(3, 64 * KIB))])
        index = store.index_path
    grown = index.stat().st_size
    with open(index, "r+b") as f:  # the last record (key 3's final put) loses its end
        f.truncate(grown - 5)
    with caplog.at_level(logging.WARNING, logger="kvbm.tiers.disk"):
        store = open_store(tmp_path)
    assert "torn or garbled" in caplog.text
    assert [k for k, _ in store.recover()] == [1, 2]
    store.close()
    assert index.stat().st_size < grown / 10  # rewritten: header and two puts
    assert not (index.parent / "index.log.tmp").exists()


def test_the_index_is_compacted_while_running(tmp_path):
    with open_store(tmp_path, capacity=2) as store:
        store._compact_after = 10
        slot = store.allocate()
        for key in range(50):
            store.write([(key, slot, content(key, 64 * KIB))])
        assert store.index_path.stat().st_size < 20 * 60
    with open_store(tmp_path, capacity=2) as store:
        assert store.recover() == [(49, slot)]


# ---- corruption and crashes ----

def test_a_flipped_byte_is_a_counted_miss(tmp_path):
    with open_store(tmp_path) as store:
        slots = write_keys(store, [1, 2, 3])
        with open(store.slots_path, "r+b") as f:  # buffered; O_DIRECT reads flush it first
            f.seek(store.offset(slots[2]) + 1234)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x01]))
        ok, bufs = read_back(store, [(1, slots[1]), (2, slots[2]), (3, slots[3])])
        assert ok == [True, False, True]
        assert store.errors.checksum_errors == 1 and store.errors.io_errors == 0
        np.testing.assert_array_equal(bufs[2], content(3, 64 * KIB))


def test_a_torn_write_is_a_miss_before_and_after_restart(tmp_path):
    # Simulated deterministically: the put record is in the index, but the slot holds
    # only the first half of the new bytes (the rest is the old block's).
    n = 100 * KIB + 7
    with open_store(tmp_path, nbytes=n) as store:
        slots = write_keys(store, [1, 2])
        with open(store.slots_path, "r+b") as f:
            f.seek(store.offset(slots[2]) + n // 2)
            f.write(content(99, n)[: n // 2].tobytes())
        assert read_back(store, list(slots.items()))[0] == [True, False]
        assert store.errors.checksum_errors == 1
    with open_store(tmp_path, nbytes=n) as store:
        recovered = store.recover()
        assert recovered == list(slots.items())  # recovery does not read the slots
        ok, bufs = read_back(store, recovered)
        assert ok == [True, False] and store.errors.checksum_errors == 1
        np.testing.assert_array_equal(bufs[0], content(1, n))


def test_bytes_that_landed_without_their_record_are_not_served(tmp_path, monkeypatch):
    # A crash between the data and the index record: slot 0 held key 1, key 5's bytes
    # overwrote it, and no record says so. Key 1 must not be served from those bytes.
    with open_store(tmp_path) as store:
        slots = write_keys(store, [1, 2])
        monkeypatch.setattr(store, "_append", lambda data, records=1: False)
        assert store.write([(5, slots[1], content(5, 64 * KIB))]) == [False]
        assert store.errors.io_errors == 1
        assert read_back(store, [(1, slots[1]), (5, slots[1]), (2, slots[2])])[0] == [False, False, True]
        monkeypatch.undo()
    with open_store(tmp_path) as store:
        assert store.recover() == list(slots.items())  # the index still names key 1 ...
        assert read_back(store, list(slots.items()))[0] == [False, True]  # ... its crc does not match
        assert store.errors.checksum_errors == 1


def test_io_errors_are_per_block_misses(tmp_path, monkeypatch):
    with open_store(tmp_path) as store:
        slots = write_keys(store, [1, 2, 3])
        real_pread, real_pwrite = ops.pread_blocks, ops.pwrite_blocks

        def eio_on_second(real):
            def io(fd, bufs, offsets, nbytes, **kw):
                status = real(fd, bufs, offsets, nbytes, **kw)
                status[1] = errno.EIO
                return status
            return io

        monkeypatch.setattr(ops, "pread_blocks", eio_on_second(real_pread))
        assert read_back(store, list(slots.items()))[0] == [True, False, True]
        assert store.errors.io_errors == 1
        monkeypatch.setattr(ops, "pread_blocks", real_pread)
        monkeypatch.setattr(ops, "pwrite_blocks", eio_on_second(real_pwrite))
        extra = [store.allocate() for _ in range(3)]
        assert store.write([(k, s, content(k, 64 * KIB)) for k, s in zip([7, 8, 9], extra)]) == [True, False, True]
        assert store.errors.io_errors == 2
        monkeypatch.setattr(ops, "pwrite_blocks", real_pwrite)
    with open_store(tmp_path) as store:
        assert [k for k, _ in store.recover()] == [1, 2, 3, 7, 9]


WRITER = textwrap.dedent("""
    import os, signal, sys
    from collections import deque
    import numpy as np
    from kvbm.tiers.disk import DiskStorage

    path, first_key, kill_at_append = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    NBYTES = 64 * 1024 + 100

    def content(key):
        return np.random.default_rng(key).integers(0, 256, NBYTES, dtype=np.uint8)

    store = DiskStorage(24, NBYTES, namespace="ns", path=path)
    live = deque(store.recover())
    if kill_at_append:  # die after the bytes landed and before their records did
        real, calls = store._append, [0]
        def append(data, records=1):
            calls[0] += records > 1  # count put batches, not single delete records
            if calls[0] == kill_at_append:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(data, records)
        store._append = append
    key = first_key
    while True:
        batch = []
        for _ in range(3):
            slot = store.allocate()
            if slot is None:
                old_key, slot = live.popleft()
                if key % 2:  # half the time: overwrite in place, without a delete record
                    pass
                else:
                    store.free(slot)
                    slot = store.allocate()
            batch.append((key, slot, content(key)))
            key += 1
        ok = store.write(batch)
        live.extend((k, s) for (k, s, _), good in zip(batch, ok) if good)
        print(key, flush=True)
""")


def check_after_crash(path):
    """Reopen, read every recovered block: True ones must be exact. (served, missed, checksum errors)."""
    nbytes = 64 * KIB + 100
    store = DiskStorage(24, nbytes, namespace="ns", path=path)
    recovered = store.recover()
    assert len(recovered) <= 24 and len({s for _, s in recovered}) == len(recovered)
    ok, bufs = read_back(store, recovered)
    for (key, _), good, buf in zip(recovered, ok, bufs):
        if good:
            expected = np.random.default_rng(key).integers(0, 256, nbytes, dtype=np.uint8)
            np.testing.assert_array_equal(buf, expected, err_msg=f"key {key} served wrong bytes")
    errors = store.errors.checksum_errors
    store.close()
    return sum(ok), len(ok) - sum(ok), errors


def run_writer(path, first_key, kill_at_append=0, kill_after_keys=None):
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(first_key), str(kill_at_append)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if kill_after_keys is not None:
            for line in child.stdout:
                if int(line) >= first_key + kill_after_keys:
                    break
            child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL, child.stderr.read()


def test_sigkill_mid_store_never_serves_wrong_bytes(tmp_path):
    rng = np.random.default_rng(5)
    served = 0
    for round_ in range(3):  # each round recovers what the last one left, then is killed
        run_writer(tmp_path, first_key=1000 * (round_ + 1), kill_after_keys=int(rng.integers(40, 200)))
        good, _, _ = check_after_crash(tmp_path)
        served += good
    assert served > 0


def test_sigkill_between_bytes_and_records_is_a_miss(tmp_path):
    # Deterministic: the writer dies as it appends the records of its 10th batch, after that
    # batch's bytes overwrote a slot still indexed under an older key (in place, no delete).
    run_writer(tmp_path, first_key=1, kill_at_append=10)
    good, missed, checksum_errors = check_after_crash(tmp_path)
    assert good > 0
    assert missed >= 1 and checksum_errors == missed  # the torn ones: counted, not served


# ---- a full disk ----

def test_preallocation_failure_names_the_path_and_the_bytes(small_fs):
    with pytest.raises(OSError, match=r"cannot preallocate 4194304 bytes \(64 slots x 65536 bytes\) for "
                                      + str(small_fs / "ns" / "slots.bin")) as info:
        DiskStorage(64, 64 * KIB, namespace="ns", path=small_fs)
    assert info.value.errno == errno.ENOSPC
    assert not (small_fs / "ns" / "slots.bin").exists()  # no half-made file left taking the space


def test_a_full_disk_fails_soft_when_the_index_cannot_grow(small_fs):
    store = DiskStorage(8, 64 * KIB, namespace="ns", path=small_fs)  # 512 KiB, preallocated
    slots = write_keys(store, [1, 2])
    fill(small_fs)
    slot = store.allocate()
    key = 99
    for key in range(100, 300):  # one slot rewritten; each write appends a record until none fits
        if not store.write([(key, slot, content(key, 64 * KIB))])[0]:
            break
    assert key < 299 and store.errors.io_errors == 1
    # The failed write's bytes landed over key - 1's, but no record says so: neither is served.
    assert read_back(store, [(key, slot), (key - 1, slot)])[0] == [False, False]
    assert read_back(store, list(slots.items()))[0] == [True, True]  # earlier blocks still served
    store.close()
    os.unlink(small_fs / "filler")
    with DiskStorage(8, 64 * KIB, namespace="ns", path=small_fs) as store:
        recovered = store.recover()  # the failed append left no garbled record behind
        assert recovered == [(1, slots[1]), (2, slots[2]), (key - 1, slot)]
        assert read_back(store, recovered)[0] == [True, True, False]
        assert store.errors.checksum_errors == 1


def test_a_full_disk_fails_soft_when_slot_writes_hit_enospc(small_fs):
    # Preallocation makes slot writes immune to ENOSPC on ext4/xfs/tmpfs. A copy-on-write
    # filesystem, or a slot file that lost its allocation (made sparse here), can still
    # run out: those blocks are misses, counted, and the rest carry on.
    store = DiskStorage(8, 64 * KIB, namespace="ns", path=small_fs)
    slots = write_keys(store, [1, 2])
    os.truncate(store.slots_path, 2 * store.stride)  # slots 2..7 become holes
    os.truncate(store.slots_path, 8 * store.stride)
    fill(small_fs, leave=3 * 64 * KIB + 8 * KIB)
    keys = list(range(10, 16))
    new = {k: store.allocate() for k in keys}
    ok = store.write([(k, s, content(k, 64 * KIB)) for k, s in new.items()])
    assert 0 < sum(ok) < len(keys), ok
    assert store.errors.io_errors == ok.count(False)
    served, bufs = read_back(store, list(slots.items()) + list(new.items()))
    assert served == [True, True] + ok
    for k, good, buf in zip([1, 2] + keys, served, bufs):
        if good:
            np.testing.assert_array_equal(buf, content(k, 64 * KIB))
    store.close()


def test_concurrent_writers_and_readers(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    with open_store(tmp_path, capacity=64) as store:
        def worker(w):
            keys = [w * 1000 + i for i in range(8)]
            slots = write_keys(store, keys)
            ok, bufs = read_back(store, list(slots.items()))
            return all(ok) and all(np.array_equal(b, content(k, 64 * KIB)) for k, b in zip(keys, bufs))

        with ThreadPoolExecutor(4) as pool:
            assert all(pool.map(worker, range(8)))
    with open_store(tmp_path, capacity=64) as store:
        assert len(store.recover()) == 64
