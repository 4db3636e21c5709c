"""The daemon's window copies after session 13 (H50): a mapping under a SIGBUS guard, on a copier
thread with a deadline.

- ops.window_to_blocks / blocks_to_window: the guarded native copy and the pread/pwrite fallback
  give the same bytes and fail the same blocks of a truncated window; a fault fails its block,
  never the process; a SIGBUS that is not the guard's still kills the process through the handler
  that was there before (faulthandler), also when faulthandler was enabled after the guard.
- Window: a copy that outlives its deadline raises WindowStalled and keeps the descriptor and the
  mapping until it ends; then they go.
- The daemon: a client that ftruncates, punches holes in or fallocates its window in every phase
  (store_prepare -> store_commit, one-shot store, load_prepare, one-shot load) harms only its own
  blocks; another session's blocks load byte for byte throughout; a copy the client holds up past
  the deadline ends that session with `window_stalled` while the loop serves the others; after
  all, every map returns to baseline and /dev/shm holds nothing of the daemon.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from kvbm import ops
from kvbm.ops_fallback import fallback

zmq = pytest.importorskip("zmq")

from daemonproc import wait_until  # noqa: E402
from servedaemon import NB, Served, block, make_keys  # noqa: E402
from test_attack_wire import Raw, at_baseline, get, put, shm_files, state  # noqa: E402

DEADLINE_S = 180.0
native = pytest.mark.skipif(not hasattr(getattr(ops, "_native", None), "SharedMap"),
                            reason="kvbm._native without the guarded window copy")
PUNCH = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def _fallocate(fd: int, mode: int, off: int, length: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, mode, off, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _window(n: int):
    path = f"/dev/shm/kvbm-test-guard-{os.getpid()}-{os.urandom(4).hex()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.unlink(path)
    os.ftruncate(fd, n * NB)
    return fd


# ---------------------------------------------------------------- the op, native against fallback


@native
@pytest.mark.parametrize("threads", [1, 2])
def test_guarded_copy_equals_pread_pwrite_byte_for_byte_and_fails_the_same_blocks(threads):
    n = 12
    rng = np.random.default_rng(13)
    src = rng.integers(0, 256, n * NB, dtype=np.uint8)
    woff = np.array(rng.permutation(n), dtype=np.int64) * NB
    boff = np.arange(n, dtype=np.int64) * NB
    fds = [_window(n), _window(n)]
    try:
        maps = [ops.window_map(fds[0], n * NB), ops.window_map(fds[1], n * NB)]
        st_n = ops.blocks_to_window(src, boff, fds[0], maps[0], woff, NB, threads=threads, use_native=True)
        st_f = fallback.blocks_to_window(src, boff, fds[1], maps[1], woff, NB)
        assert st_n.tolist() == st_f.tolist() == [0] * n
        assert os.pread(fds[0], n * NB, 0) == os.pread(fds[1], n * NB, 0)
        outs = [np.zeros(n * NB, np.uint8), np.zeros(n * NB, np.uint8)]
        assert not ops.window_to_blocks(fds[0], maps[0], woff, outs[0], boff, NB, threads=threads,
                                        use_native=True).any()
        assert not fallback.window_to_blocks(fds[1], None, woff, outs[1], boff, NB).any()
        assert outs[0].tobytes() == outs[1].tobytes() == src.tobytes()
        # truncated in the middle of a block: the blocks past the end fail on both paths, the rest are equal
        cut = 5 * NB + 100
        for fd in fds:
            os.ftruncate(fd, cut)
        outs = [np.zeros(n * NB, np.uint8), np.zeros(n * NB, np.uint8)]
        st_n = ops.window_to_blocks(fds[0], maps[0], woff, outs[0], boff, NB, threads=threads, use_native=True)
        st_f = fallback.window_to_blocks(fds[1], maps[1], woff, outs[1], boff, NB)
        assert (st_n != 0).tolist() == (st_f != 0).tolist() == (woff + NB > cut).tolist()
        ok = np.repeat(st_n == 0, NB)
        assert outs[0][ok].tobytes() == outs[1][ok].tobytes() == src[ok].tobytes()
        # writes past the end: the mapping faults (the window then pwrites, as the fallback does)
        st = ops.blocks_to_window(src, boff, fds[0], maps[0], woff, NB, threads=threads, use_native=True)
        assert (st != 0).tolist() == (woff + NB > cut).tolist()
        # bad ranges raise before any byte moves, with the same words on both paths
        for fn in (lambda m: ops.window_to_blocks(fds[0], m, [n * NB], outs[0], [0], NB),
                   lambda m: fallback.window_to_blocks(fds[0], m, [n * NB], outs[0], [0], NB)):
            with pytest.raises(ValueError, match="window_offsets"):
                fn(maps[0])
        maps[0].close()  # closed: every block fails, nothing faults
        assert ops.window_to_blocks(fds[0], maps[0], woff, outs[0], boff, NB, use_native=True).all()
        maps[1].close()
    finally:
        for fd in fds:
            os.close(fd)


CHAIN = textwrap.dedent("""
    import faulthandler, mmap, os, sys
    import numpy as np
    from kvbm import ops
    fd = os.open("/dev/shm/kvbm-test-chain-%d" % os.getpid(), os.O_RDWR | os.O_CREAT, 0o600)
    os.unlink("/dev/shm/kvbm-test-chain-%d" % os.getpid())
    os.ftruncate(fd, 1 << 16)
    m = ops.window_map(fd, 1 << 16)
    z = np.zeros(4096, np.uint8)
    assert not ops.blocks_to_window(z, [0], fd, m, [0], 4096).any()   # the guard's handler is in
    if sys.argv[1] == "after":
        faulthandler.enable()   # replaces it: the next guarded copy puts it back, chaining to this one
    mm = mmap.mmap(fd, 1 << 16)
    os.ftruncate(fd, 0)
    assert ops.window_to_blocks(fd, m, [8192], z, [0], 4096).tolist() == [14]   # EFAULT, alive
    print("guarded fault survived", flush=True)
    mm[100]   # a fault no guard covers: the process must die of it
    print("not reached", flush=True)
""")


@native
@pytest.mark.parametrize("when", ["before", "after"])
def test_a_sigbus_outside_a_guarded_copy_still_kills_through_faulthandler(when):
    args = [sys.executable] + (["-X", "faulthandler"] if when == "before" else []) + ["-c", CHAIN, when]
    p = subprocess.run(args, capture_output=True, text=True, timeout=120, env={**os.environ, "KVBM_NATIVE": "1"})
    assert "guarded fault survived" in p.stdout and "not reached" not in p.stdout, p.stderr
    assert p.returncode == -7, (p.returncode, p.stderr)  # SIGBUS, as without the guard
    assert "Bus error" in p.stderr  # faulthandler ran (it was chained to)


def test_a_copy_past_its_deadline_keeps_the_window_until_it_ends(monkeypatch, tmp_path):
    from kvbm.daemon import windows

    w = windows.Window.create(f"kvbm-test-{os.getpid()}-{tmp_path.name[-8:]}", 4, NB, NB)
    release = threading.Event()
    real = ops.blocks_to_window

    def held(*a, **kw):
        release.wait(60)
        return real(*a, **kw)

    monkeypatch.setattr(windows, "DEADLINE_BASE_S", 0.05)
    monkeypatch.setattr(windows.ops, "blocks_to_window", held)
    src = block(b"k")
    opened = windows._open
    with pytest.raises(windows.WindowStalled) as exc:
        w.write_from(src, [0], [1])
    fd = w.fd
    w.close()
    assert not os.path.exists(w.path) and w.fd == -1
    os.fstat(fd)  # still open: the copy may still write through it
    assert windows._open == opened
    done = threading.Event()
    exc.value.task.then(done.set)
    release.set()
    assert done.wait(60)
    assert wait_until(lambda: windows._open == opened - 1, 60)
    with pytest.raises(OSError):
        os.fstat(fd)


# ---------------------------------------------------------------- the daemon under a hostile window


def _attack(fd: int, how: str, size: int, slot_off: int) -> None:
    if how == "truncate":
        os.ftruncate(fd, slot_off + NB // 2)
    elif how == "punch":
        _fallocate(fd, PUNCH, 0, size)
    else:  # fallocate past the end (the file grows), then back
        _fallocate(fd, 0, 0, size + (64 << 20))


def _restore(fd: int, size: int) -> None:
    os.ftruncate(fd, size)


@pytest.mark.parametrize("how", ["truncate", "punch", "fallocate"])
def test_a_window_truncated_punched_or_fallocated_in_every_phase_harms_only_its_own_blocks(tmp_path, how):
    d = Served(tmp_path, "d").start()
    victim = d.client(model="victim")
    a = Raw(d)
    try:
        vkeys = make_keys("victim-" + how, 8)
        assert victim.store(vkeys, [block(k) for k in vkeys]) == 8
        sid, hello, fd = a.hello(model="victim", salt="evil")
        stride, size, first = hello["stride"], hello["window_bytes"], hello["scratch"][0]
        keys = make_keys("attack-" + how, 4)

        def victim_right() -> None:
            out = [np.zeros(NB, np.uint8) for _ in vkeys]
            assert victim.load(vkeys, out) == 8
            assert all(np.array_equal(o, block(k)) for o, k in zip(out, vkeys))

        # store_prepare -> (write, attack) -> store_commit
        r = a.ok("store_prepare", sid, keys=keys)
        for k, w in zip(keys, r["slots"]):
            put(fd, stride, w, block(k))
        _attack(fd, how, size, r["slots"][2] * stride)
        stored = a.ok("store_commit", sid, handle=r["handle"])["stored"]
        assert stored == {"truncate": 2, "punch": 4, "fallocate": 4}[how]
        _restore(fd, size)
        victim_right()
        # what was stored holds the window's bytes at the commit: the client's own (zeros where punched)
        r = a.ok("load_prepare", sid, keys=keys[:stored])
        want = [np.zeros(NB, np.uint8) if how == "punch" else block(k) for k in keys[:stored]]
        assert [get(fd, stride, w).tobytes() for w in r["slots"]] == [x.tobytes() for x in want]
        a.ok("load_release", sid, handle=r["handle"])
        # one-shot store after an attack on its scratch slots
        more = make_keys("attack-more-" + how, 2)
        for j, k in enumerate(more):
            put(fd, stride, first + j, block(k))
        _attack(fd, how, size, first * stride)
        got = a.ok("store", sid, keys=more, slots=[first, first + 1])["stored"]
        assert got == {"truncate": 0, "punch": 2, "fallocate": 2}[how]
        victim_right()
        # load_prepare and a one-shot load into an attacked window: the right bytes or a miss
        _attack(fd, how, size, 0)
        r = a.ok("load_prepare", sid, keys=keys[:2])
        assert [get(fd, stride, w).tobytes() for w in r["slots"]] == [x.tobytes() for x in want[:2]]
        a.ok("load_release", sid, handle=r["handle"])
        _attack(fd, how, size, 0)
        n = a.ok("load", sid, keys=keys[:2], slots=[first, first + 1])["n"]
        assert n == 2 and get(fd, stride, first + 1).tobytes() == want[1].tobytes()
        victim_right()
        assert d.proc.poll() is None
        a.ok("bye", sid)
        os.close(fd)
        assert wait_until(lambda: at_baseline(victim, sessions=1), DEADLINE_S), state(victim)
    finally:
        a.close()
        victim.close()
        d.stop()
    assert not shm_files(d)


@pytest.mark.parametrize("native_ops,address", [("1", "ipc"), ("0", "ipc"), ("1", "tcp")])
def test_a_client_holding_its_window_busy_ends_its_own_session_not_the_loop(tmp_path, native_ops, address):
    """The client fallocates and drops 1 GiB past its window's end in a loop (each fallocate holds
    the tmpfs inode lock that pwrite takes, ~0.5 s) while it loads through the window; another
    session stores and loads throughout. Without the extension (pwrite), a load soon waits past
    the deadline: that request fails `window_stalled` and the session ends (`no_session` after);
    with the guarded mapping the loads may all go through. Either way the other session's bytes
    are right, and after the attack everything is back at baseline with no /dev/shm file left.
    On ipc:// the clients run as the daemon's uid: with the extension their copies are inline
    (dataplane._inline); on tcp:// (uid unknown) every copy goes through the copier."""
    env = {"KVBM_NATIVE": native_ops, "KVBM_DAEMON__WINDOW_COPY_DEADLINE_S": "0.2"}
    d = Served(tmp_path, "d", env=env, daemon={"address": "tcp://127.0.0.1:0"} if address == "tcp" else None).start()
    victim = d.client(model="victim")
    a = Raw(d)
    stop = threading.Event()
    try:
        sid, hello, fd = a.hello(model="evil")
        size, first = hello["window_bytes"], hello["scratch"][0]
        keys = make_keys("busy", 4)
        assert a.ok("store", sid, keys=keys, slots=list(range(first, first + 4)))["stored"] == 4

        def hold() -> None:
            while not stop.is_set():
                try:
                    _fallocate(fd, 0, size, 1 << 30)
                except OSError:  # /dev/shm short of a GiB: a smaller hold
                    _fallocate(fd, 0, size, 64 << 20)
                os.ftruncate(fd, size)

        t = threading.Thread(target=hold, daemon=True)
        t.start()
        ended = None
        vkeys = make_keys("victim-busy", 64)
        for rnd in range(400 if native_ops == "0" else 40):
            r = a.call("load", sid, keys=keys, slots=list(range(first, first + 4)))
            if not r["ok"]:
                assert r["error"] == "window_stalled", r
                assert "ended" in r["message"]
                ended = r
                break
            assert r["n"] in range(5)
            batch = vkeys[(rnd * 4) % 64:(rnd * 4) % 64 + 4]
            assert victim.store(batch, [block(k) for k in batch]) >= 0
            out = [np.zeros(NB, np.uint8) for _ in batch]
            n = victim.load(batch, out)
            assert all(np.array_equal(o, block(k)) for o, k in zip(out[:n], batch))
        stop.set()
        t.join()
        if native_ops == "0":
            assert ended is not None, "no load waited past the deadline behind a GiB fallocate"
        if ended is not None:
            assert a.call("lookup", sid, keys=keys)["error"] == "no_session"
            assert a.ok("stats")["stats"]["daemon"]["window_stalls"] >= 1
        else:
            a.ok("bye", sid)
        os.close(fd)
        # the other session: every block it stores now loads byte for byte
        after = make_keys("victim-after", 8)
        assert victim.store(after, [block(k) for k in after]) == 8
        out = [np.zeros(NB, np.uint8) for _ in range(8)]
        assert victim.load(after, out) == 8
        assert all(np.array_equal(o, block(k)) for o, k in zip(out, after))
        assert d.proc.poll() is None
        assert wait_until(lambda: at_baseline(victim, sessions=1), DEADLINE_S), state(victim)
    finally:
        stop.set()
        a.close()
        victim.close()
        d.stop()
    assert not shm_files(d)


@native
def test_guarded_copies_on_many_threads_while_the_file_is_truncated_in_a_loop():
    """Eight Python threads (each copy split over the pool too) copy into and out of one mapping
    while another thread truncates the file to nothing and back: the process lives, every block
    is 0 or EFAULT, and every block that reports 0 on a read holds the bytes last written there
    or zeros (a truncation drops pages), never another thread's block."""
    n = 16
    fd = _window(n)
    m = ops.window_map(fd, n * NB)
    stop = threading.Event()
    errors: list = []

    def truncate() -> None:
        while not stop.is_set():
            os.ftruncate(fd, 0)
            os.ftruncate(fd, n * NB)

    def copy(t: int) -> None:
        try:
            mine = np.full(NB, t + 1, np.uint8)  # thread t owns window block t (of 8)
            out = np.zeros(NB, np.uint8)
            for _ in range(300):
                st = ops.blocks_to_window(mine, [0], fd, m, [t * NB], NB, threads=2, use_native=True)
                assert st.tolist()[0] in (0, 14)
                st = ops.window_to_blocks(fd, m, [t * NB], out, [0], NB, threads=2, use_native=True)
                assert st.tolist()[0] in (0, 14)
                if st[0] == 0:
                    assert set(np.unique(out).tolist()) <= {0, t + 1}
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)

    tr = threading.Thread(target=truncate, daemon=True)
    tr.start()
    threads = [threading.Thread(target=copy, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    stop.set()
    tr.join(60)
    m.close()
    os.close(fd)
    assert not errors, errors[0]
