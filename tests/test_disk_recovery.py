"""G3 on a full disk: the store opens read-only, serves what it holds, refuses new blocks,
and takes them again once space returns. On a real 1 MiB tmpfs (root only; skipped with the
reason elsewhere), and by an injected ENOSPC (any user)."""

from __future__ import annotations

import errno
import logging
import os
import subprocess

import numpy as np
import pytest

from kvbm.tiers import disk as disk_mod
from kvbm.tiers.disk import DiskStorage

KIB = 1024
NBYTES = 64 * KIB


def content(key: int) -> np.ndarray:
    return np.random.default_rng(key).integers(0, 256, NBYTES, dtype=np.uint8)


def write_keys(store, keys) -> dict:
    slots = {k: store.allocate() for k in keys}
    assert store.write([(k, s, content(k)) for k, s in slots.items()]) == [True] * len(keys)
    return slots


def served(store, pairs) -> list[bool]:
    bufs = [np.zeros(NBYTES, np.uint8) for _ in pairs]
    ok = store.read([(k, s, b) for (k, s), b in zip(pairs, bufs)])
    for (k, _), good, buf in zip(pairs, ok, bufs):
        if good:
            np.testing.assert_array_equal(buf, content(k))
    return ok


@pytest.fixture
def small_fs(tmp_path):
    where = tmp_path / "small"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)],
                          capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def fill(folder) -> None:
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            try:
                os.write(fd, bytes(4 * KIB))
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                return
    finally:
        os.close(fd)


def test_a_full_disk_opens_read_only_serves_what_it_holds_and_recovers(small_fs, caplog):
    with DiskStorage(8, NBYTES, namespace="ns", path=small_fs) as store:  # 512 KiB preallocated
        slots = write_keys(store, [1, 2, 3])
    fill(small_fs)

    # restart on the full disk: the index rewrite at open fails, the store opens anyway
    caplog.set_level(logging.WARNING, logger="kvbm.tiers.disk")
    store = DiskStorage(8, NBYTES, namespace="ns", path=small_fs, readonly_retry_s=0)
    assert store.read_only and not store.writable
    warnings = [r.getMessage() for r in caplog.records if "read-only" in r.getMessage()]
    assert len(warnings) == 1 and "serves the 3 blocks" in warnings[0]
    recovered = store.recover()
    assert recovered == [(1, slots[1]), (2, slots[2]), (3, slots[3])]
    assert served(store, recovered) == [True, True, True]

    # new blocks are refused and counted; nothing it holds is touched
    slot = store.allocate()
    assert store.write([(50, slot, content(50))]) == [False]
    assert store.errors.writes_refused == 1 and store.errors.io_errors == 0
    store.free(slots[3])  # an eviction meanwhile: gone now, no record can be written
    assert served(store, recovered[:2]) == [True, True]

    # space comes back: the next write (or `writable`) rewrites the index and writes again
    os.unlink(small_fs / "filler")
    assert store.write([(50, slot, content(50))]) == [True]
    assert not store.read_only and store.writable
    assert served(store, [(50, slot)]) == [True]
    store.close()
    with DiskStorage(8, NBYTES, namespace="ns", path=small_fs) as again:
        assert sorted(again.recover()) == sorted([(1, slots[1]), (2, slots[2]), (50, slot)])


def test_an_injected_enospc_at_open_is_read_only_too(tmp_path, monkeypatch):
    """Without root: the index rewrite's os.write fails with ENOSPC (monkeypatched)."""
    with DiskStorage(4, NBYTES, namespace="ns", path=tmp_path, direct=False) as store:
        slots = write_keys(store, [7, 8])
    real_write = os.write

    def no_space(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(disk_mod.os, "write", no_space)
    store = DiskStorage(4, NBYTES, namespace="ns", path=tmp_path, direct=False, readonly_retry_s=0)
    assert store.read_only and not (tmp_path / "ns" / "index.log.tmp").exists()
    assert served(store, store.recover()) == [True, True]
    assert store.write([(9, store.allocate(), content(9))]) == [False]
    assert store.errors.writes_refused == 1
    monkeypatch.setattr(disk_mod.os, "write", real_write)
    assert store.writable
    s9 = store.allocate()
    assert store.write([(9, s9, content(9))]) == [True]
    store.close()
    with DiskStorage(4, NBYTES, namespace="ns", path=tmp_path, direct=False) as again:
        assert sorted(again.recover()) == sorted([(7, slots[7]), (8, slots[8]), (9, s9)])


def test_other_errors_at_open_still_fail_with_the_path(tmp_path, monkeypatch):
    with DiskStorage(4, NBYTES, namespace="ns", path=tmp_path, direct=False):
        pass
    monkeypatch.setattr(disk_mod, "_fsync_folder", lambda folder: (_ for _ in ()).throw(
        OSError(errno.EIO, os.strerror(errno.EIO))))
    with pytest.raises(OSError, match="cannot write the index .*index.log"):
        DiskStorage(4, NBYTES, namespace="ns", path=tmp_path, direct=False)


def test_a_manager_restarted_on_a_full_disk_serves_g2_and_what_g3_holds(small_fs):
    """The daemon's case: G2 + G3, restarted with G3's disk full. It starts; G3's blocks load
    with their bytes; new stores keep G2 working and never push G3's blocks out (G3 admits
    nothing while read-only, so it evicts nothing to make room)."""
    from kvbm import BlockManager, KVBMConfig, KVLayout
    from kvbm.demo import block_content

    def manager():
        cfg = KVBMConfig.from_dict({"tiers": [
            {"name": "g2", "capacity": 2, "storage": {"name": "host", "pin": "never"}},
            {"name": "g3", "capacity": 6, "storage": {"name": "disk", "path": str(small_fs),
                                                     "readonly_retry_s": 3600}}]})
        cfg.layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=32, block_size=128)  # 64 KiB
        return BlockManager.from_config(cfg)

    def check(m, keys):
        out = [np.zeros(NBYTES, np.uint8) for _ in keys]
        assert m.load(keys, destination=out).loaded == len(keys)
        for k, buf in zip(keys, out):
            np.testing.assert_array_equal(buf, block_content(k, NBYTES))

    m = manager()
    for k in range(1, 9):  # 8 blocks through a 2-block G2: 6 land in G3 and fill it
        m.store([k], source=[block_content(k, NBYTES)])
    in_g3 = [k for k in range(1, 9) if k in m.tiers[1].ready]
    assert len(in_g3) == 6
    m.close()
    fill(small_fs)

    m = manager()  # before: OSError ENOSPC from the index rewrite, the daemon did not start
    g3 = m.tiers[1]
    assert g3.storage.read_only and g3.stats.recovered == 6
    for k in range(100, 120):  # G2 keeps taking blocks; its victims are not offered to G3
        assert not m.store([k], source=[block_content(k, NBYTES)]).rejected
    assert sorted(g3.ready) == sorted(in_g3) and g3.stats.evictions == 0
    assert g3.stats.rejected >= 18 and g3.stats.failed == 0 and g3.storage.errors.io_errors == 0
    check(m, [118, 119])  # G2 serves
    check(m, in_g3[:2])  # and so does G3, with the bytes it held
    m.close()


def test_an_older_kvbm_s_g3_folder_for_the_same_model_is_named_in_a_warning(tmp_path, caplog):
    """Namespace ids changed (length-prefixed fields): the old folder's blocks are misses, and
    its preallocated slot file would keep its space; kvbm names it once, deletes nothing."""
    from kvbm.tiers.base import namespace_id

    new = namespace_id("meta-llama/Llama-3.1-8B", "0123456789abcdef", "")
    old, old_salted = tmp_path / "meta-llama_Llama-3.1-8B--0123456789abcdef", \
        tmp_path / "meta-llama_Llama-3.1-8B--0123456789abcdef--a1b2c3d4e5f6"
    other = tmp_path / "mistral--0123456789abcdef"
    for d in (old, old_salted, other):
        d.mkdir()
        (d / "slots.bin").write_bytes(bytes(8192))
    caplog.set_level(logging.WARNING, logger="kvbm.tiers.disk")
    DiskStorage(2, NBYTES, namespace=new, path=tmp_path, direct=False).close()
    named = [r.getMessage() for r in caplog.records if "older kvbm" in r.getMessage()]
    assert len(named) == 2 and any(str(old) + " " in m for m in named)
    assert any(str(old_salted) in m for m in named) and not any(str(other) in m for m in named)
    assert all("8192-byte slot file" in m for m in named) and old.exists()
    caplog.clear()
    DiskStorage(2, NBYTES, namespace=new, path=tmp_path, direct=False).close()  # once: at creation
    assert not [r for r in caplog.records if "older kvbm" in r.getMessage()]


def test_kvbm_serve_restarted_on_a_full_disk_serves_g2_and_what_g3_holds(small_fs, tmp_path):
    """The issue's case end to end: before, the daemon did not start (ENOSPC at the index rewrite)."""
    pytest.importorskip("zmq")
    import sys
    import time
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from servedaemon import NB, Served, block, make_keys

    tiers = [{"name": "g2", "capacity": 16, "eviction": "lru", "storage": "host", "headroom": 4},
             {"name": "g3", "capacity": 32, "eviction": "lru",
              "storage": {"name": "disk", "path": str(small_fs), "readonly_retry_s": 3600}}]

    def wait_for(what, check, timeout=60.0):
        deadline = time.monotonic() + timeout
        while not (got := check()):
            assert time.monotonic() < deadline, what
            time.sleep(0.05)
        return got

    keys = make_keys("full-disk", 24)
    d = Served(tmp_path, "d", tiers=tiers).start()
    try:
        with d.client() as c:
            for i in range(0, len(keys), 4):
                wait_for("no room in G2", lambda: (lambda g2: g2["capacity"] - g2["used"] >= 4)(
                    c.stats()["tiers"]["g2"]))
                assert c.store(keys[i:i + 4], [block(k) for k in keys[i:i + 4]]) == 4
            wait_for("nothing reached G3", lambda: c.lookup(keys, remote=False)[1].count("g3") >= 8)
    finally:
        d.stop()
    fill(small_fs)

    d = Served(tmp_path, "d", tiers=tiers).start()  # starts although the index cannot be rewritten
    try:
        assert "G3 opens read-only" in d.stderr()
        with d.client() as c:
            where = c.lookup(keys, remote=False)[1]
            in_g3 = [k for k, w in zip(keys, where) if w == "g3"]
            assert len(in_g3) >= 8
            out = [np.zeros(NB, np.uint8) for _ in range(4)]
            assert c.load(in_g3[:4], out) == 4  # G3 serves what it holds, byte for byte
            assert all(np.array_equal(o, block(k)) for o, k in zip(out, in_g3[:4]))
            fresh = make_keys("fresh", 4)
            assert c.store(fresh, [block(k) for k in fresh]) == 4  # and G2 takes new blocks
            assert c.load(fresh, out) == 4 and all(np.array_equal(o, block(k)) for o, k in zip(out, fresh))
            left = c.lookup(in_g3[4:], remote=False)[1]
            assert left == ["g3"] * len(in_g3[4:])  # nothing in G3 was pushed out meanwhile
    finally:
        d.stop()
