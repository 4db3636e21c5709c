"""G3 and G4 under an unlucky operator, against a real `kvbm serve`: a full disk, an index changed
between runs, an object store that hangs mid-get/put, a bucket deleted under the daemon.

Each case asserts behaviour only: bytes equal where a block is served, misses where it cannot be,
no error reaching the client, the daemon serving its other tenants, and (hangs) no growth in its
threads or descriptors. No clock decides an outcome: waits are on conditions, with generous limits.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import numpy as np
import pytest

from daemonproc import wait_until as _wait_until
from servedaemon import NB, Served, block, make_keys, manager_over_g4

def wait_until(cond, timeout: float = 180.0) -> None:
    assert _wait_until(cond, timeout), "the condition did not come true in time"


G2 = {"name": "g2", "capacity": 16, "eviction": "lru", "storage": "host", "headroom": 4}


def g3(tmp_path: Path, capacity: int = 64) -> dict:
    return {"name": "g3", "capacity": capacity, "eviction": "lru", "storage": {"name": "disk", "path": str(tmp_path / "g3")}}


def store_all(c, keys: list, step: int = 4) -> None:
    """Stores in steps no larger than G2's headroom, each once the offloader made room."""
    for i in range(0, len(keys), step):
        wait_until(lambda: _room(c) >= step, 180)
        assert c.store(keys[i:i + step], [block(k) for k in keys[i:i + step]]) == len(keys[i:i + step])


def _room(c) -> int:
    g2 = c.stats()["tiers"]["g2"]
    return g2["capacity"] - g2["used"]


def in_tier(c, keys: list, tier: str) -> list:
    """The keys whose fastest tier is `tier` (each looked up alone: a lookup answers a prefix)."""
    return [k for k in keys if c.lookup([k], remote=False)[1] == [tier]]


def load_each(c, keys: list) -> dict:
    """key -> True (served, bytes equal) / False (a miss); a wrong byte fails the test."""
    out = {}
    for k in keys:
        dst = [np.zeros(NB, np.uint8)]
        n = c.load([k], dst)
        if n:
            assert np.array_equal(dst[0], block(k)), "a block was served with bytes that are not its own"
        out[k] = bool(n)
    return out


def threads_and_fds(pid: int) -> tuple[int, int]:
    return len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd"))


# ---------------------------------------------------------------- G3: the disk fills up


FULLDISK = textwrap.dedent('''
    """While a flag file exists, G3's disk is full: ENOSPC on every slot write and index write (tests only)."""
    import errno, os
    import numpy as np
    import kvbm.ops

    FLAG = os.environ["FULLDISK_FLAG"]
    _write, _pwrite = os.write, kvbm.ops.pwrite_blocks

    def full(fd, name):
        if not os.path.exists(FLAG):
            return False
        try:
            return os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(name)
        except OSError:
            return False

    def write(fd, data):
        if full(fd, "index.log"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return _write(fd, data)

    def pwrite_blocks(fd, bufs, *args, **kw):
        if full(fd, "slots.bin"):
            return np.full(len(bufs), errno.ENOSPC, dtype=np.int32)
        return _pwrite(fd, bufs, *args, **kw)

    os.write = write
    kvbm.ops.pwrite_blocks = pwrite_blocks
''')


def injected(tmp_path: Path, code: str, flag_var: str) -> tuple[dict, Path]:
    """The environment of a daemon that runs `code` at start (a sitecustomize), and its flag file."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(code)
    flag = tmp_path / "flag"
    path = os.pathsep.join([str(site)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return {"PYTHONPATH": path, flag_var: str(flag)}, flag


def test_g3_disk_full_a_store_is_a_miss_nothing_stored_is_lost_g2_serves(tmp_path):
    env, full = injected(tmp_path, FULLDISK, "FULLDISK_FLAG")
    d = Served(tmp_path, "d", tiers=[G2, g3(tmp_path)], env=env).start()
    try:
        with d.client(salt="a") as a, d.client(salt="b") as b:
            old = make_keys("old", 32)
            store_all(a, old)
            wait_until(lambda: len(in_tier(a, old, "g3")) >= 8)
            on_disk = in_tier(a, old, "g3")
            full.touch()  # the disk is full from now on: slot file and index
            try:
                fresh = make_keys("fresh", 48)  # more than G2 holds: victims must go to the full disk
                store_all(b, fresh)
                g3s = b.stats()["tiers"]["g3"]
                assert g3s["failed"] > 0 and g3s["io_errors"] > 0, g3s
                # G2 keeps serving: B's newest blocks, bytes equal
                assert all(load_each(b, fresh[-8:]).values())
                # nothing G3 held before is lost: each is served, bytes equal
                assert all(load_each(a, on_disk).values())
            finally:
                full.unlink()
            # space again: new victims reach G3 and come back from it
            again = make_keys("again", 32)
            store_all(b, again)
            wait_until(lambda: len(in_tier(b, again, "g3")) >= 4)
            assert all(load_each(b, in_tier(b, again, "g3")).values())
            assert d.proc.poll() is None
    finally:
        d.stop()


# ---------------------------------------------------------------- G3: the index changed between runs


@pytest.mark.parametrize("damage", ["truncated", "garbled"])
def test_g3_index_damaged_between_runs_serves_nothing_wrong(tmp_path, damage):
    tiers = [G2, g3(tmp_path)]
    d = Served(tmp_path, "d", tiers=tiers).start()
    keys = make_keys("k", 40)
    try:
        with d.client(salt="a") as a:
            store_all(a, keys)
            wait_until(lambda: len(in_tier(a, keys, "g3")) >= 16, 180)
    finally:
        d.stop()
    index = next((tmp_path / "g3").glob("*/index.log"))
    data = bytearray(index.read_bytes())
    if damage == "truncated":
        index.write_bytes(data[:len(data) * 2 // 3])
    else:
        data[len(data) // 2] ^= 0xFF
        index.write_bytes(bytes(data))
    d = Served(tmp_path, "d", tiers=tiers).start()
    try:
        with d.client(salt="a") as a:
            served = load_each(a, keys)  # each either its own bytes or a miss
            assert any(served.values()) and not all(served.values()), served
        lines = [ln for ln in d.stderr().splitlines() if "index" in ln and "disk storage" in ln]
        assert len(lines) == 1 and str(index) in lines[0] and "not served" in lines[0], lines
    finally:
        d.stop()


# ---------------------------------------------------------------- G4: an object store that hangs

HANGFS = textwrap.dedent('''
    """A memory filesystem whose gets and puts hang while a flag file exists (tests only)."""
    import os, time
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    FLAG = os.environ["HANGFS_FLAG"]

    def _hang():
        while os.path.exists(FLAG):
            time.sleep(0.05)

    class HangFS(MemoryFileSystem):
        protocol = ("hang",)
        store = {}
        pseudo_dirs = [""]

        @classmethod
        def _strip_protocol(cls, path):
            if isinstance(path, str) and path.startswith("hang://"):
                path = path[len("hang://"):]
            return super()._strip_protocol(path)

        def cat_file(self, path, start=None, end=None, **kw):
            _hang()
            return super().cat_file(path, start=start, end=end, **kw)

        def pipe_file(self, path, value, **kw):
            _hang()
            return super().pipe_file(path, value, **kw)

    fsspec.register_implementation("hang", HangFS, clobber=True)
''')


def test_g4_hung_mid_get_and_put_answers_misses_serves_others_and_leaks_nothing(tmp_path):
    env, flag = injected(tmp_path, HANGFS, "HANGFS_FLAG")
    g4 = {"name": "g4", "capacity": 1024, "eviction": "lru", "storage": {"name": "object", "url": "hang://g4"}}
    d = Served(tmp_path, "d", tiers=[G2, g4], env=env).start()
    try:
        with d.client(salt="a") as a, d.client(salt="b") as b:
            cold = make_keys("cold", 48)
            store_all(a, cold)
            wait_until(lambda: len(in_tier(a, cold[:24], "g4")) == 24, 180)
            hot = make_keys("hot", 4)
            assert b.store(hot, [block(k) for k in hot]) == 4
            before = threads_and_fds(d.proc.pid)
            flag.touch()  # every get and put from now on hangs
            try:
                for r in range(4):  # A asks for hung G4 blocks; B keeps using G2, and storing
                    got = load_each(a, cold[4 * r:4 * r + 4])
                    assert not any(got.values()), got  # hung: misses (nothing can have come)
                    assert all(load_each(b, hot).values())
                    fresh = make_keys(f"fresh{r}", 4)
                    assert b.store(fresh, [block(k) for k in fresh]) == 4  # G2 victims meet the hung store
                after = threads_and_fds(d.proc.pid)
                # hung calls hold the object store's own workers (at most its max_concurrency), nothing more
                assert after[0] <= before[0] + 16 and after[1] <= before[1] + 8, (before, after)
                g4s = a.stats()["tiers"]["g4"]
                assert g4s["io_errors"] > 0, g4s
            finally:
                flag.unlink()
            # the store answers again: G4 blocks nobody asked for meanwhile are served, bytes equal
            untouched = cold[16:20]
            # Once the store answers, new G2 victims land in G4 again (until a put succeeds, calls
            # fail at once for retry_after: the store is taken as down, and a block read then drops).
            after: list = []

            def g4_takes_puts() -> bool:
                batch = make_keys(f"after{len(after)}", 4)
                after.extend(batch)
                store_all(b, batch)
                return bool(in_tier(b, after, "g4"))

            wait_until(g4_takes_puts)
            assert all(load_each(a, untouched).values())
            assert d.proc.poll() is None
    finally:
        if flag.exists():
            flag.unlink()
        d.stop()


# ---------------------------------------------------------------- G4: the bucket goes away


def test_g4_bucket_deleted_under_a_running_daemon(tmp_path):
    import shutil

    g4 = {"name": "g4", "capacity": 128, "eviction": "lru",
          "storage": {"name": "object", "url": f"file://{tmp_path}/bucket/g4"}}
    d = Served(tmp_path, "d", tiers=[G2, g4]).start()
    try:
        with d.client(salt="a") as a, d.client(salt="b") as b:
            cold = make_keys("cold", 40)
            store_all(a, cold)
            wait_until(lambda: len(in_tier(a, cold[:16], "g4")) == 16, 180)
            hot = make_keys("hot", 4)
            assert b.store(hot, [block(k) for k in hot]) == 4
            os.rename(tmp_path / "bucket", tmp_path / "trash")  # an operator's cleanup: gone at once
            shutil.rmtree(tmp_path / "trash")
            # its blocks are misses now, never an error; G2 serves on
            assert not any(load_each(a, cold[:8]).values())
            assert all(load_each(b, hot).values())
            g4s = a.stats()["tiers"]["g4"]
            assert g4s["io_errors"] > 0 and g4s["load_failures"] > 0, g4s
            # new blocks reach G4 again (its folder made again, 0700) and are served from it
            fresh = make_keys("fresh", 40)
            store_all(b, fresh)
            wait_until(lambda: len(in_tier(b, fresh[:8], "g4")) == 8, 180)
            assert all(load_each(b, fresh[:8]).values())
            folder = next((tmp_path / "bucket" / "g4").iterdir())
            assert (folder.stat().st_mode & 0o777) == 0o700
            assert d.proc.poll() is None
    finally:
        d.stop()


def test_g4_s3_bucket_deleted_under_a_running_daemon(tmp_path):
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    import fsspec

    from s3server import FAKE_CREDENTIALS, MotoServer

    bucket = "kvbm-unlucky"
    with MotoServer() as s3:
        fs = fsspec.filesystem("s3", endpoint_url=s3.endpoint, skip_instance_cache=True, **_creds(FAKE_CREDENTIALS))
        fs.mkdir(bucket)
        g4 = {"name": "g4", "capacity": 128, "eviction": "lru",
              "storage": {"name": "object", "url": f"s3://{bucket}/run", "storage_options": {"endpoint_url": s3.endpoint}}}
        d = Served(tmp_path, "d", tiers=[G2, g4], env=FAKE_CREDENTIALS).start()
        try:
            with d.client(salt="a") as a, d.client(salt="b") as b:
                cold = make_keys("cold", 40)
                store_all(a, cold)
                wait_until(lambda: len(in_tier(a, cold[:16], "g4")) == 16)
                hot = make_keys("hot", 4)
                assert b.store(hot, [block(k) for k in hot]) == 4
                wait_until(lambda: _delete_bucket(fs, bucket))  # objects, then the bucket (puts may race it)
                assert not any(load_each(a, cold[:8]).values())  # misses, never an error
                assert all(load_each(b, hot).values())
                fresh = make_keys("fresh", 24)  # G2 victims meet the missing bucket: they drop
                store_all(b, fresh)
                assert all(load_each(b, fresh[-4:]).values())
                g4s = a.stats()["tiers"]["g4"]
                assert g4s["io_errors"] > 0 and g4s["load_failures"] > 0, g4s
                assert d.proc.poll() is None
        finally:
            d.stop()


def _delete_bucket(fs, bucket: str) -> bool:
    try:
        fs.rm(bucket, recursive=True)
    except OSError:  # a put landed between the objects' delete and the bucket's: again
        return False
    fs.invalidate_cache()
    return not fs.exists(bucket)


def _creds(env: dict) -> dict:
    return {"key": env.get("AWS_ACCESS_KEY_ID"), "secret": env.get("AWS_SECRET_ACCESS_KEY")}


def test_an_object_store_that_does_not_answer_loses_no_block(tmp_path):
    """A load whose G4 read fails because the store did not answer (down, timed out, refused) is a
    miss for that load, and the block stays: before, the manager dropped every block asked for
    during an outage and deleted its object (a 2 s blip emptied the bucket of what was read).
    A corrupt object is still dropped, never served."""
    import time

    m, _, cold = manager_over_g4(tmp_path, "outage", 4, 16)
    try:
        assert len(cold) == 4
        g4 = m.tiers[1].storage
        objects = sorted(p.name for p in (tmp_path / "g4").rglob("*") if p.is_file())
        g4._down_until = time.monotonic() + 3600  # the store is down (as after a timeout)
        asked, spare = cold[:3], cold[3]
        out = [np.zeros(NB, np.uint8) for _ in asked]
        assert m.load(asked, destination=out).loaded == 0  # a miss for this load
        assert m.lookup(cold) == (4, ["g4"] * 4)  # kept
        assert sorted(p.name for p in (tmp_path / "g4").rglob("*") if p.is_file()) == objects
        g4._down_until = 0.0  # back
        assert m.load(asked, destination=out).loaded == 3
        assert all(np.array_equal(o, block(k)) for o, k in zip(out, asked))
        # a corrupt object is dropped, as before
        bad = spare
        assert m.lookup([bad]) == (1, ["g4"])
        path = Path(g4.path_of(bad).split("://", 1)[-1])
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 0xFF
        path.write_bytes(bytes(raw))
        assert m.load([bad], destination=[np.zeros(NB, np.uint8)]).loaded == 0
        assert m.lookup([bad])[0] == 0
    finally:
        m.close()
