"""G3 under an unlucky operator, against a real `kvbm serve` (beyond test_tiers_unlucky.py's full disk and
damaged index between runs): the disk fills in the middle of an index write (the daemon crashes there,
or runs on with the torn bytes it could not cut back), G3's files replaced or truncated under a running
daemon, and a read-only remount (EROFS), at runtime and across a restart.

Each must give misses, never wrong bytes, and never crash the daemon; after a restart the state is
consistent: every block G3 held when the daemon stopped cleanly comes back with its own bytes. No clock
decides an outcome: waits are on conditions, with generous limits.
"""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest

from servedaemon import NB, Served, block, make_keys
from test_disk_recovery import small_fs  # noqa: F401  (a fixture: a small tmpfs, skipped without mount)
from test_tiers_unlucky import G2, in_tier, injected, load_each, store_all, wait_until


def g3(where: Path, capacity: int = 64) -> dict:
    return {"name": "g3", "capacity": capacity, "eviction": "lru",
            "storage": {"name": "disk", "path": str(where), "readonly_retry_s": 0.5}}


def in_g3(c, keys: list) -> list:
    return in_tier(c, keys, "g3")


def g3_files(where: Path) -> tuple[Path, Path]:
    index = next(where.glob("*/index.log"))
    return index.with_name("slots.bin"), index


# ---------------------------------------------------------------- the disk fills mid index write

TORN = textwrap.dedent('''
    """While a flag file exists, G3's disk is full in the middle of an index append: half the record
    lands; then the daemon dies (crash), or the cut back fails too (run) (tests only)."""
    import errno, os, signal

    FLAG, MODE = os.environ["TORN_FLAG"], os.environ["TORN_MODE"]
    _write, _ftruncate = os.write, os.ftruncate

    def _index(fd):
        try:
            return os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) == "index.log"
        except OSError:
            return False

    def write(fd, data):
        if os.path.exists(FLAG) and _index(fd):
            n = _write(fd, bytes(memoryview(data)[:max(1, len(data) // 2)]))
            if MODE == "crash":
                os.kill(os.getpid(), signal.SIGKILL)
            return n
        return _write(fd, data)

    def ftruncate(fd, length):
        if os.path.exists(FLAG) and _index(fd):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return _ftruncate(fd, length)

    os.write, os.ftruncate = write, ftruncate
''')


@pytest.mark.parametrize("mode", ["crash", "run"])
def test_g3_disk_full_mid_index_write_restart_is_consistent(tmp_path, mode):
    env, flag = injected(tmp_path, TORN, "TORN_FLAG")
    env["TORN_MODE"] = mode
    tiers = [G2, g3(tmp_path / "g3")]
    d = Served(tmp_path, "d", tiers=tiers, env=env).start()
    old, fresh, after = make_keys("old", 32), make_keys("fresh", 24), []
    try:
        with d.client(salt="a") as a:
            store_all(a, old)
            wait_until(lambda: len(in_g3(a, old)) >= 8)
            before = in_g3(a, old)
        flag.touch()
        if mode == "crash":
            with d.client(salt="b", timeout=10.0) as b:
                for i in range(0, len(fresh), 4):  # G2 victims go to G3: the index write tears, the daemon dies
                    try:
                        b.store(fresh[i:i + 4], [block(k) for k in fresh[i:i + 4]])
                    except Exception:  # (the daemon is gone: no answer)
                        break
            wait_until(lambda: d.proc.poll() is not None)
            flag.unlink()
            held = before
        else:
            with d.client(salt="a") as a, d.client(salt="b") as b:
                store_all(b, fresh)
                wait_until(lambda: b.stats()["tiers"]["g3"]["io_errors"] > 0)
                flag.unlink()  # room again: later records must not sit behind the torn one

                def g3_takes_blocks() -> bool:  # (G2's victims drop until G3 retries its index: a store on)
                    batch = make_keys(f"after{len(after)}", 4)
                    after.extend(batch)
                    store_all(b, batch)
                    return len(in_g3(b, after)) >= 4

                wait_until(g3_takes_blocks)
                load_each(b, fresh + after)  # each its own bytes or a miss
                load_each(a, before)
                assert d.proc.poll() is None
                # (a load moves a block up to G2: what G3 holds is taken after the last one)
                held = in_g3(b, fresh + after) + in_g3(a, old)
        d.stop()
        d.start()
        with d.client(salt="a") as a, d.client(salt="b") as b:
            # what G3 held when the daemon went is served: every block (the torn record is a miss)
            assert all(load_each(a, [k for k in held if k in old]).values())
            assert all(load_each(b, [k for k in held if k not in old]).values())
            for c in (a, b):  # nothing wrong, ever
                load_each(c, old + fresh + after)
            # and the index takes new records that survive another restart
            again = make_keys("again", 32)
            store_all(b, again)
            wait_until(lambda: len(in_g3(b, again)) >= 4)
            kept = in_g3(b, again)
        d.stop()
        d.start()
        with d.client(salt="b") as b:
            assert all(load_each(b, kept).values())
        assert d.proc.poll() is None
    finally:
        if flag.exists():
            flag.unlink()
        d.stop()


# ---------------------------------------------------------------- G3's files changed under the daemon


def _damage(slots: Path, index: Path, what: str) -> None:
    if what == "slots_truncated":
        os.truncate(slots, 0)
    elif what == "slots_replaced":  # another file of the same size renamed over it
        size = slots.stat().st_size
        new = slots.with_name("new.bin")
        new.write_bytes(os.urandom(size))
        os.replace(new, slots)
    elif what == "slots_overwritten":  # in place, through the daemon's own descriptor's file
        size = slots.stat().st_size
        with open(slots, "r+b") as f:
            f.write(os.urandom(size))
    elif what == "index_truncated":
        os.truncate(index, index.stat().st_size // 3)
    elif what == "index_replaced":
        new = index.with_name("new.log")
        new.write_bytes(os.urandom(4096))
        os.replace(new, index)


@pytest.mark.parametrize("what", ["slots_truncated", "slots_replaced", "slots_overwritten", "index_truncated",
                                  "index_replaced"])
def test_g3_files_changed_under_a_running_daemon_are_misses_never_wrong_bytes(tmp_path, what):
    tiers = [G2, g3(tmp_path / "g3")]
    d = Served(tmp_path, "d", tiers=tiers).start()
    old, more = make_keys("old", 40), make_keys("more", 40)
    try:
        with d.client(salt="a") as a, d.client(salt="b") as b:
            store_all(a, old)
            wait_until(lambda: len(in_g3(a, old)) >= 16)
            _damage(*g3_files(tmp_path / "g3"), what)
            load_each(a, old)  # each its own bytes or a miss
            store_all(b, more)  # G2 victims go to the changed files
            wait_until(lambda: len(in_g3(b, more)) >= 4)
            load_each(a, old)
            load_each(b, more)
            assert all(load_each(b, more[-4:]).values())  # G2 serves on
            assert d.proc.poll() is None
        d.stop()
        d.start()
        with d.client(salt="a") as a, d.client(salt="b") as b:
            load_each(a, old)
            load_each(b, more)
            fresh = make_keys("fresh", 32)  # G3 works after the restart: new blocks come back from it
            store_all(b, fresh)
            wait_until(lambda: len(in_g3(b, fresh)) >= 4)
            assert all(load_each(b, in_g3(b, fresh)).values())
            assert d.proc.poll() is None
    finally:
        d.stop()


# ---------------------------------------------------------------- a read-only remount

EROFS = textwrap.dedent('''
    """While a flag file exists, G3's filesystem is read-only: every write under it is EROFS, through
    descriptors opened before too (a remount after an error: errors=remount-ro) (tests only)."""
    import errno, os
    import numpy as np
    import kvbm.ops

    FLAG, ROOT = os.environ["EROFS_FLAG"], os.environ["EROFS_ROOT"]
    WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    real = {n: getattr(os, n) for n in ("open", "write", "ftruncate", "fsync", "replace", "rename", "fchmod",
                                        "chmod", "unlink", "posix_fallocate", "mkdir")}
    _pwrite = kvbm.ops.pwrite_blocks

    def _ro():
        return os.path.exists(FLAG)

    def _under(path):
        try:
            return isinstance(path, int) and os.readlink(f"/proc/self/fd/{path}").startswith(ROOT) or \\
                not isinstance(path, int) and os.path.abspath(os.fspath(path)).startswith(ROOT)
        except (OSError, TypeError):
            return False

    def _fail():
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    def wrap(name, test):
        def f(*a, **kw):
            if _ro() and test(*a):
                _fail()
            return real[name](*a, **kw)
        setattr(os, name, f)

    wrap("open", lambda path, flags=0, *r: flags & WRITES and _under(path))
    for name in ("write", "ftruncate", "fchmod", "chmod", "unlink", "posix_fallocate", "mkdir"):
        wrap(name, lambda p, *r: _under(p))
    for name in ("replace", "rename"):
        wrap(name, lambda a, b, *r: _under(a) or _under(b))
    wrap("fsync", lambda fd: _under(fd))

    def pwrite_blocks(fd, bufs, *a, **kw):
        if _ro() and _under(fd):
            return np.full(len(bufs), errno.EROFS, dtype=np.int32)
        return _pwrite(fd, bufs, *a, **kw)

    kvbm.ops.pwrite_blocks = pwrite_blocks
''')


def test_g3_read_only_at_runtime_then_writable_and_restarted(tmp_path):
    root = tmp_path / "g3"
    env, flag = injected(tmp_path, EROFS, "EROFS_FLAG")
    env["EROFS_ROOT"] = str(root)
    d = Served(tmp_path, "d", tiers=[G2, g3(root)], env=env).start()
    old, fresh, again = make_keys("old", 32), make_keys("fresh", 32), []
    try:
        with d.client(salt="a") as a, d.client(salt="b") as b:
            store_all(a, old)
            wait_until(lambda: len(in_g3(a, old)) >= 8)
            flag.touch()  # remounted read-only under the daemon
            held = in_g3(a, old)
            assert all(load_each(a, held[:4]).values())  # reads still work
            store_all(b, fresh)  # G2 victims meet the read-only G3: misses, never an error
            assert all(load_each(b, fresh[-4:]).values())
            load_each(a, old)
            load_each(b, fresh)
            g3s = b.stats()["tiers"]["g3"]
            assert g3s["io_errors"] + g3s["writes_refused"] + g3s["failed"] > 0, g3s
            assert d.proc.poll() is None
            flag.unlink()  # writable again: G3 takes new blocks again

            def g3_takes_blocks() -> bool:
                batch = make_keys(f"again{len(again)}", 4)
                again.extend(batch)
                store_all(b, batch)
                return len(in_g3(b, again)) >= 4

            wait_until(g3_takes_blocks)
            kept, held = in_g3(b, again), in_g3(a, old)  # (a load would move them up to G2: none here)
        d.stop()
        assert d.proc.returncode == 0
        d.start()
        with d.client(salt="a") as a, d.client(salt="b") as b:
            assert all(load_each(b, kept).values())
            assert all(load_each(a, held).values())
            load_each(b, fresh + again)
    finally:
        if flag.exists():
            flag.unlink()
        d.stop()


def remount(where: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(where)], check=True, capture_output=True)


def test_g3_opened_on_a_read_only_mount_serves_what_it_holds(small_fs):
    """A real read-only remount (tmpfs; skipped where mount is not allowed), made while G3 is closed
    (a mount with files open for writing cannot be remounted read-only): G3 opens read-only and
    serves its blocks, refuses new ones, and takes them again once the mount is writable. (`kvbm
    serve` itself refuses a read-only G3 path at its config check: kvbm/build.py.)"""
    from kvbm.tiers.disk import DiskStorage

    def write(store, keys):
        out = {}
        for k in keys:
            slot = store.allocate()
            assert store.write([(k, slot, block(k))]) == [True]
            out[k] = slot
        return out

    def served(store, items) -> list:
        out = []
        for k, slot in items:
            dst = np.zeros(NB, np.uint8)
            ok = store.read([(k, slot, dst)])[0]
            assert not ok or np.array_equal(dst, block(k))
            out.append(ok)
        return out

    keys = make_keys("ro", 6)
    with DiskStorage(16, NB, namespace="ns", path=small_fs) as store:
        slots = write(store, keys)
    remount(small_fs, "ro")
    try:
        store = DiskStorage(16, NB, namespace="ns", path=small_fs, readonly_retry_s=0)
        assert store.read_only and not store.writable
        recovered = store.recover()
        assert sorted(recovered) == sorted(slots.items())
        assert all(served(store, recovered))
        slot = store.allocate()
        extra = make_keys("extra", 1)[0]
        assert store.write([(extra, slot, block(extra))]) == [False]
        store.free(slots[keys[0]])  # an eviction meanwhile: no record can be written
        remount(small_fs, "rw")
        assert store.write([(extra, slot, block(extra))]) == [True]  # the retry reopens and rewrites
        assert not store.read_only and served(store, [(extra, slot)]) == [True]
        store.close()
        with DiskStorage(16, NB, namespace="ns", path=small_fs) as again:
            assert sorted(again.recover()) == sorted([(k, s) for k, s in slots.items() if k != keys[0]]
                                                     + [(extra, slot)])
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], check=False, capture_output=True)
