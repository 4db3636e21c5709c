"""G4 on `file://` whose calls hang (an NFS mount that stops answering, a FIFO where an object was):
every call is bounded by the store's `timeout`, as on the other synchronous filesystems.

- A get that hangs is a miss for that load and the block is kept (unavailable()); its object takes no
  second call while the first is hung (one thread, however often it is asked); when the hung read
  returns, it never writes into the buffer its caller gave up.
- A put that hangs is a failed store; when it returns, its object is never renamed into place (no
  orphan, no temporary file left).
- The other blocks keep being served with their own bytes, the worker pool stays capped, and
  shutdown does not wait on a hung call. Against the manager and against `kvbm serve`.

No clock decides an outcome: waits are on conditions, with generous limits.
"""

from __future__ import annotations

import os
import signal
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from servedaemon import NB, Served, block, make_keys, manager_over_g4
from test_tiers_unlucky import G2, in_tier, injected, load_each, store_all, threads_and_fds, wait_until

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")


def served_in_the_end(m, keys: list) -> None:
    """Loads each key until it is served (the store is taken as down for retry_after after a
    timeout: misses meanwhile); every block served must carry its own bytes."""
    left = list(keys)

    def step() -> bool:
        for k in list(left):
            out = np.zeros(NB, np.uint8)
            if m.load([k], destination=[out]).loaded:
                assert np.array_equal(out, block(k)), "a block was served with bytes that are not its own"
                left.remove(k)
        return not left

    wait_until(step)


def objects(folder: Path) -> set:
    return {p.name for p in folder.rglob("*") if p.is_file() or p.is_fifo()}


def test_a_hung_get_is_a_kept_miss_costs_one_thread_and_never_writes_late(tmp_path):
    m, _, cold = manager_over_g4(tmp_path, "fifo", 8, 64)
    g4 = m.tiers[1].storage
    g4.timeout, g4.retry_after = 1.0, 0.5
    try:
        assert len(cold) >= 4
        victim, others = cold[0], cold[1:]
        path = Path(g4.path_of(victim))
        saved = path.read_bytes()
        path.unlink()
        os.mkfifo(path, 0o600)  # open() for reading blocks until a writer comes: a hung call
        gave_up = np.zeros(NB, np.uint8)
        assert m.load([victim], destination=[gave_up]).loaded == 0  # given up: a miss
        assert m.lookup([victim]) == (1, ["g4"])  # kept: the store did not answer, nothing says it is bad
        assert g4.errors.io_errors >= 1
        # asked again and again (more often than there are workers): each fails at once, no second
        # thread hangs on it, so the pool still serves every other block
        for _ in range(2 * g4.max_concurrency):
            assert m.load([victim], destination=[np.zeros(NB, np.uint8)]).loaded == 0
        served_in_the_end(m, others)
        assert g4._pool.alive <= g4.max_concurrency
        assert m.lookup([victim]) == (1, ["g4"])
        # the hung read returns (a writer comes, with the object's own bytes): what it read is
        # dropped, the buffer its caller gave up is untouched
        with open(path, "wb") as w:
            w.write(saved)
        wait_until(lambda: not g4._hung)
        assert not gave_up.any(), "a read given up wrote into its caller's buffer"
        path.unlink()
        path.write_bytes(saved)
        served_in_the_end(m, [victim])
    finally:
        m.close()


def test_a_hung_put_fails_and_never_lands_later(tmp_path, monkeypatch):
    m, _, cold = manager_over_g4(tmp_path, "puts", 8, 64)
    g4 = m.tiers[1].storage
    # (a healthy put given up after it committed would still land: a timeout no put takes on a loaded box)
    g4.timeout, g4.retry_after = 3.0, 0.5
    folder = Path(g4.prefix)
    hang = threading.Event()
    hung = []
    real_open = os.open

    def hanging_open(path, flags, *a, **kw):  # the mount stops answering for new files
        if hang.is_set() and flags & os.O_CREAT and str(path).startswith(str(folder)):
            hung.append(path)
            while hang.is_set():
                threading.Event().wait(0.05)
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", hanging_open)
    try:
        hang.set()
        fresh = make_keys("fresh", 12)
        for k in fresh:  # each store pushes a G2 victim down to the hung store
            m.store([k], source=[block(k)])
        assert hung, "no put met the hung mount"
        assert m.tiers[1].storage.errors.io_errors >= 1
        # G2 serves its blocks, and G4's reads (not hung) serve the blocks it holds
        g2_now = [k for k in fresh if m.lookup([k])[1] == ["g2"]]  # (each alone: a lookup is a prefix)
        assert g2_now
        served_in_the_end(m, g2_now[-2:])
        served_in_the_end(m, [k for k in cold if m.lookup([k])[0]][:3])
        assert g4._pool.alive <= g4.max_concurrency
        hang.clear()  # the mount answers again: the puts given up go on, and must not land
        wait_until(lambda: not g4._hung and (g4._pool is None or g4._pool._pending == 0))
        wait_until(lambda: not any(n.startswith(".tmp-") for n in objects(folder)))
        # every object in the folder is one a handle names: nothing landed after its put failed
        wait_until(lambda: objects(folder) == {Path(p).name for p in g4._names.values()})
        held = [k for k in cold + fresh if m.lookup([k])[1] == ["g4"]]
        served_in_the_end(m, held)
    finally:
        hang.clear()
        m.close()


def test_close_does_not_wait_on_a_hung_call(tmp_path):
    m, _, cold = manager_over_g4(tmp_path, "close", 4, 16)
    g4 = m.tiers[1].storage
    g4.timeout, g4.retry_after = 1.0, 0.5
    path = Path(g4.path_of(cold[0]))
    path.unlink()
    os.mkfifo(path, 0o600)
    try:
        assert m.load([cold[0]], destination=[np.zeros(NB, np.uint8)]).loaded == 0
        assert g4._hung
        closer = threading.Thread(target=m.close, daemon=True)
        closer.start()
        closer.join(120)
        assert not closer.is_alive(), "close() waited on a hung call"
    finally:
        try:  # let the hung reader go
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
        except OSError:
            pass


# ---------------------------------------------------------------- against `kvbm serve`

HANGOPEN = textwrap.dedent('''
    """While a flag file exists, every open() under one folder hangs: a dead NFS mount (tests only)."""
    import builtins, io, os, time

    FLAG, ROOT = os.environ["HANGOPEN_FLAG"], os.environ["HANGOPEN_ROOT"]
    _os_open, _open = os.open, builtins.open

    def _hang(path):
        if isinstance(path, int):
            return
        try:
            p = os.fspath(path)
        except TypeError:
            return
        if isinstance(p, str) and p.startswith(ROOT):
            while os.path.exists(FLAG):
                time.sleep(0.05)

    def os_open(path, *a, **kw):
        _hang(path)
        return _os_open(path, *a, **kw)

    def b_open(file, *a, **kw):
        _hang(file)
        return _open(file, *a, **kw)

    os.open = os_open
    builtins.open = io.open = b_open
''')

def hung_mount_daemon(tmp_path: Path) -> tuple[Served, Path]:
    env, flag = injected(tmp_path, HANGOPEN, "HANGOPEN_FLAG")
    bucket = tmp_path / "bucket"
    env["HANGOPEN_ROOT"] = str(bucket)
    g4 = {"name": "g4", "capacity": 256, "eviction": "lru",
          "storage": {"name": "object", "url": f"file://{bucket}/g4", "timeout": 1.0}}
    return Served(tmp_path, "d", tiers=[G2, g4], env=env), flag


def in_g4(c, keys: list) -> list:
    return in_tier(c, keys, "g4")


def cold_in_g4(c, n: int, first: int) -> list:
    """n blocks stored through G2, once the first `first` of them sit in G4."""
    cold = make_keys("cold", n)
    store_all(c, cold)
    wait_until(lambda: len(in_g4(c, cold[:first])) == first)
    return cold


def test_daemon_over_a_hung_file_mount_serves_on_and_recovers(tmp_path):
    d, flag = hung_mount_daemon(tmp_path)
    d.start()
    try:
        with d.client(salt="a") as a, d.client(salt="b") as b:
            cold = cold_in_g4(a, 40, 16)
            hot = make_keys("hot", 4)
            assert b.store(hot, [block(k) for k in hot]) == 4
            before = threads_and_fds(d.proc.pid)
            flag.touch()  # the mount hangs: every open under it from now on
            try:
                for r in range(3):
                    got = load_each(a, cold[4 * r:4 * r + 4])
                    assert not any(got.values()), got  # hung: misses
                    assert all(load_each(b, hot).values())  # another tenant's G2 blocks: served
                    assert all(load_each(a, cold[-2:]).values())  # and the victim's own G2 blocks
                    fresh = make_keys(f"fresh{r}", 4)
                    assert b.store(fresh, [block(k) for k in fresh]) == 4  # victims meet the hung mount
                after = threads_and_fds(d.proc.pid)
                assert after[0] <= before[0] + 16 and after[1] <= before[1] + 16, (before, after)
                g4s = a.stats()["tiers"]["g4"]
                assert g4s["io_errors"] > 0, g4s
                assert d.proc.poll() is None
            finally:
                flag.unlink()
            # the mount answers again: every G4 block asked for during the hang was kept, and is
            # served with its own bytes
            left = set(cold[:12])
            wait_until(lambda: not left.difference_update(k for k, ok in load_each(a, sorted(left)).items() if ok)
                       and not left)
            assert d.proc.poll() is None
    finally:
        if flag.exists():
            flag.unlink()
        d.stop()


def test_daemon_stops_while_its_file_mount_hangs(tmp_path):
    d, flag = hung_mount_daemon(tmp_path)
    d.start()
    try:
        with d.client(salt="a") as a:
            cold = cold_in_g4(a, 32, 8)
            flag.touch()
            assert not any(load_each(a, cold[:4]).values())
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(120) == 0  # shut down on its own, hung calls left behind
    finally:
        if flag.exists():
            flag.unlink()
        d.stop()


def test_a_restart_over_a_hung_listing_starts_and_closes(tmp_path, monkeypatch):
    """recover() lists file:// in a helper thread, waited for until LIST_BUDGET_S: a folder read that
    hangs (a dead mount) delays the start by at most that; the background listing is abandoned at
    close(). A stale temporary file is removed on a worker once the listing answers."""
    import time

    from kvbm.tiers import object_meta, object_resume
    from kvbm.tiers.object import ObjectStorage

    url = f"file://{tmp_path}/g4"
    st = ObjectStorage(8, NB, url=url)
    stale = Path(st.prefix) / f"{object_meta.TMP_PREFIX}0123456789ab-x"
    stale.write_bytes(b"x")
    old = time.time() - 2 * object_meta.STALE_TMP_S
    os.utime(stale, (old, old))
    st.close()

    gate = threading.Event()
    real = object_resume.local_entries

    def hung(prefix, stop=None):
        gate.wait()  # the folder read does not answer until the gate opens
        yield from real(prefix, stop)

    monkeypatch.setattr(object_resume, "local_entries", hung)
    monkeypatch.setattr(object_meta, "LIST_BUDGET_S", 0.5)
    st = ObjectStorage(8, NB, url=url, timeout=1.0)
    try:
        assert st.recover() == [] and not st.listing_complete  # cut short, not hung
        assert stale.exists()
    finally:
        closer = threading.Thread(target=st.close, daemon=True)
        closer.start()
        closer.join(120)
        assert not closer.is_alive(), "close() waited on a hung listing"
        gate.set()
    monkeypatch.setattr(object_resume, "local_entries", real)
    st = ObjectStorage(8, NB, url=url, timeout=1.0)
    try:
        assert st.recover() == [] and st.listing_complete
        wait_until(lambda: not stale.exists())
    finally:
        st.close()


def test_daemon_one_hung_object_costs_one_miss_the_others_are_served(tmp_path):
    """One object of a tenant's turns into a FIFO (a read of it hangs for good): that block is a miss
    each time it is asked for (one worker hangs on it, not one per ask), every other G4 block of the
    same tenant is served with its own bytes meanwhile, and once the read returns and the object is
    back, it is served too."""
    d, _ = hung_mount_daemon(tmp_path)  # (no flag: only the FIFO hangs)
    d.start()
    try:
        with d.client(salt="a") as a:
            cold = cold_in_g4(a, 40, 16)
            down = in_g4(a, cold)
            files = sorted(p for p in (tmp_path / "bucket" / "g4").rglob("*")
                           if p.is_file() and not p.name.startswith("."))
            assert len(files) >= len(down)
            path = files[0]
            saved = path.read_bytes()
            path.unlink()
            os.mkfifo(path, 0o600)
            before = threads_and_fds(d.proc.pid)
            served: set = set()

            def all_but_one_served() -> bool:
                for _ in range(2):  # each ask of the hung one fails at once after the first
                    served.update(k for k, ok in load_each(a, [k for k in down if k not in served]).items() if ok)
                return len(served) >= len(down) - 1

            wait_until(all_but_one_served)
            victim = [k for k in down if k not in served]
            assert len(victim) == 1, len(victim)  # the FIFO's block, and only it
            for _ in range(20):  # asked again and again: a miss each time, no thread more per ask
                assert not any(load_each(a, victim).values())
            after = threads_and_fds(d.proc.pid)
            assert after[0] <= before[0] + 16 and after[1] <= before[1] + 16, (before, after)
            try:  # the hung read returns (a writer comes; none waiting: nothing hangs on it)
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                fd = -1
            if fd >= 0:
                os.write(fd, saved)
                os.close(fd)
            path.unlink()
            path.write_bytes(saved)
            wait_until(lambda: all(load_each(a, victim).values()))
            assert d.proc.poll() is None
    finally:
        d.stop()
