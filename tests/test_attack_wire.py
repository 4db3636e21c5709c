"""A hostile client speaking the daemon's wire protocol directly (session 12 red team, H46).

Each test is one attack class the earlier attack files did not try, and asserts the daemon's
promise (SECURITY.md): a block is served with the bytes stored under its key, only to its
namespace, or not at all; the other tenants' work goes on; every per-client map, window file
and descriptor of the daemon returns to its baseline.

- The window file under the daemon's copy: the client holds its window open read-write, so it
  can ftruncate it between store_prepare and store_commit (or before a one-shot op, or in a
  loop from another thread). Before, the daemon copied through its own mapping of that file and
  died of SIGBUS at the commit (one client took every tenant's cache down; a /dev/shm filled by
  any local user did the same at the daemon's first write into a sparse window page). Now the
  daemon maps the window but touches it only through the guarded native copy (a fault fails
  that block, then pread/pwrite on the descriptor tries it once; windows.py, csrc/guarded_copy),
  so a truncated block is not stored, a failed write is not loaded.
- SIGKILL of a client in every phase of a two-phase store or load, and rapid hello/bye cycles
  (some abandoned, some under many namespaces): the maps, the /dev/shm files and the daemon's
  descriptors (windows now hold one each) return to baseline.
- Cancels and request ids: a client cancelling ids it never issued, replaying another session's
  request ids and handles on one connection, naming slots or handles of another session.
- Two sessions of one namespace racing two-phase ops on the same keys, out of order: a block
  being stored is a miss for everyone until its commit, never its partial bytes.
- One key repeated max_keys times in a pin: released whole at bye, evictable after.
- An honest client whose idle session is evicted by a hello flood between two one-shot stores.
- Every op of a session after its bye; loads waiting on G3 with a bye pipelined behind them.
- A session flood under a 256-descriptor limit: windows hold a descriptor each now, so they are
  capped at a quarter of RLIMIT_NOFILE (hello `busy` past it) and the daemon keeps descriptors to
  accept connections (libzmq aborts the process at EMFILE on an ipc:// listener).

Broke before this file: the truncation (SIGBUS) and, with its first fix, the descriptor flood.
Everything else held when tried and is kept as a test.
"""

from __future__ import annotations

import mmap
import os
from collections import Counter
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

zmq = pytest.importorskip("zmq")

from daemonproc import wait_until  # noqa: E402
from kvbm.daemon import protocol as P  # noqa: E402
from servedaemon import LAYOUT_DICT, NB, Served, block, make_keys  # noqa: E402

DEADLINE_S = 180.0
BASELINE = ("reservations", "loads", "pins", "busy_blocks", "window_slots_used", "g2_pinned", "g2_pending",
            "busy_namespaces", "busy_uids")


@pytest.fixture
def served(tmp_path):
    ds: list[Served] = []

    def start(name: str = "d", tiers: list | None = None, **daemon) -> Served:
        ds.append(Served(tmp_path, name, tiers=tiers, daemon=daemon).start())
        return ds[-1]

    yield start
    for d in ds:
        d.stop()


class Raw:
    """A hand-rolled client: one DEALER, msgpack requests, no heartbeat, no retries."""

    def __init__(self, d: Served) -> None:
        self.d = d
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, int(DEADLINE_S * 1000))
        self.sock.connect(d.address)
        self.rid = 0

    def send(self, op: str, session: bytes | None = None, rid: int | None = None, **fields) -> int:
        if rid is None:
            self.rid += 1
            rid = self.rid
        self.sock.send(P.request(op, rid, self.d.token, session, **fields))
        return rid

    def recv(self) -> dict:
        return P.unpack(self.sock.recv(), 1 << 20)

    def call(self, op: str, session: bytes | None = None, rid: int | None = None, **fields) -> dict:
        want = self.send(op, session, rid, **fields)
        while True:
            r = self.recv()
            if r["id"] == want:
                return r

    def ok(self, op: str, session: bytes | None = None, **fields) -> dict:
        r = self.call(op, session, **fields)
        assert r["ok"], r
        return r

    def hello(self, model: str = "tiny", salt: str = "") -> tuple[bytes, dict, int]:
        """(session, hello reply, fd of its window opened read-write, as a client opens it)."""
        r = self.ok("hello", model=model, layout=LAYOUT_DICT, salt=salt)
        fd = os.open(r["window_path"], os.O_RDWR)
        os.unlink(r["window_path"])
        return r["session"], r, fd

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def put(fd: int, stride: int, slot: int, data: np.ndarray) -> None:
    """Write a window slot with pwrite (a mapping would SIGBUS this test once truncated)."""
    os.pwrite(fd, data.tobytes(), slot * stride)


def get(fd: int, stride: int, slot: int) -> np.ndarray:
    got = os.pread(fd, NB, slot * stride)
    out = np.zeros(NB, np.uint8)
    out[:len(got)] = np.frombuffer(got, np.uint8)
    return out


def state(c) -> dict:
    """The daemon's map sizes, through a Client or a Raw connection (stats needs no session)."""
    st = c.ok("stats")["stats"] if isinstance(c, Raw) else c.stats()
    return st["daemon"]["state"]


def at_baseline(c, sessions: int | None = None) -> bool:
    st = state(c)
    return all(st[k] == 0 for k in BASELINE) and (sessions is None or st["sessions"] == sessions)


def shm_files(d: Served) -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(d.shm + ".")}


def fds(d: Served) -> int:
    return len(os.listdir(f"/proc/{d.proc.pid}/fd"))


def fd_names(d: Served) -> list[str]:
    out = []
    for n in os.listdir(f"/proc/{d.proc.pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{d.proc.pid}/fd/{n}"))
        except OSError:
            pass
    return sorted(out)


def loads_exact(c, keys: list[bytes]) -> bool:
    out = [np.zeros(NB, np.uint8) for _ in keys]
    return c.load(keys, out) == len(keys) and all(np.array_equal(o, block(k)) for o, k in zip(out, keys))


def loads_prefix_right(c, keys: list[bytes]) -> int:
    """Blocks loaded; every one of them must hold its key's bytes (a miss is allowed, a wrong byte never)."""
    out = [np.zeros(NB, np.uint8) for _ in keys]
    n = c.load(keys, out)
    assert all(np.array_equal(o, block(k)) for o, k in zip(out[:n], keys)), "a wrong byte was served"
    return n


# ---------------------------------------------------------------- the window under the daemon's copy


def test_a_window_truncated_before_the_commit_fails_those_blocks_not_the_daemon(served):
    """store_prepare 4 blocks, write them, ftruncate the window to the middle of the third,
    commit: blocks 0 and 1 are stored with their bytes, 2 and 3 are misses; the daemon lives
    (before: SIGBUS, rc -7) and another tenant's blocks load byte for byte."""
    d = served()
    victim = d.client(model="victim")
    vkeys = make_keys("victim", 8)
    assert victim.store(vkeys, [block(k) for k in vkeys]) == 8
    a = Raw(d)
    try:
        sid, hello, fd = a.hello(model="tiny", salt="evil")
        stride = hello["stride"]
        keys = make_keys("torn", 4)
        r = a.ok("store_prepare", sid, keys=keys)
        assert r["handle"] > 0 and min(r["slots"]) >= 0
        for k, w in zip(keys, r["slots"]):
            put(fd, stride, w, block(k))
        os.ftruncate(fd, r["slots"][2] * stride + NB // 2)
        assert a.ok("store_commit", sid, handle=r["handle"])["stored"] == 2
        assert d.proc.poll() is None
        assert a.ok("lookup", sid, keys=keys)["n"] == 2
        # the two stored blocks hold exactly what was written (read back through the window)
        os.ftruncate(fd, hello["window_bytes"])
        r = a.ok("load_prepare", sid, keys=keys[:2])
        assert [get(fd, stride, w).tobytes() for w in r["slots"]] == [block(k).tobytes() for k in keys[:2]]
        a.ok("load_release", sid, handle=r["handle"])

        # a one-shot store from scratch slots past the end of a truncated file: nothing stored
        os.ftruncate(fd, 0)
        first = hello["scratch"][0]
        assert a.ok("store", sid, keys=keys[2:], slots=[first, first + 1])["stored"] == 0
        assert a.ok("lookup", sid, keys=keys)["n"] == 2
        # loads into a truncated window: the daemon's writes extend the file, the bytes are right
        r = a.ok("load_prepare", sid, keys=keys[:2])
        assert [get(fd, stride, w).tobytes() for w in r["slots"]] == [block(k).tobytes() for k in keys[:2]]
        a.ok("load_release", sid, handle=r["handle"])
        os.ftruncate(fd, 0)
        assert a.ok("load", sid, keys=keys[:2], slots=[first, first + 1])["n"] == 2
        assert get(fd, stride, first + 1).tobytes() == block(keys[1]).tobytes()
        assert d.proc.poll() is None
        assert loads_exact(victim, vkeys)
        a.ok("bye", sid)
        os.close(fd)
        assert wait_until(lambda: at_baseline(victim, sessions=1), DEADLINE_S), state(victim)
    finally:
        a.close()
        victim.close()


def test_a_thread_truncating_the_window_in_a_loop_never_kills_the_daemon(served):
    """One thread ftruncates the window to 0 and back as fast as it can while the other runs
    two-phase and one-shot stores and loads through it: the daemon lives, answers every
    request, every block it says it stored is in that namespace only, and another tenant's
    blocks load byte for byte; everything returns to baseline after bye."""
    d = served()
    victim = d.client(model="victim")
    vkeys = make_keys("victim-loop", 8)
    assert victim.store(vkeys, [block(k) for k in vkeys]) == 8
    a = Raw(d)
    stop = threading.Event()
    try:
        sid, hello, fd = a.hello(model="victim", salt="evil")  # the victim's model, its own salt
        stride, size, first = hello["stride"], hello["window_bytes"], hello["scratch"][0]

        def truncate() -> None:
            while not stop.is_set():
                os.ftruncate(fd, 0)
                os.ftruncate(fd, size)

        t = threading.Thread(target=truncate, daemon=True)
        t.start()
        keys = make_keys("race", 32)
        for i in range(0, 32, 4):
            batch = keys[i:i + 4]
            r = a.ok("store_prepare", sid, keys=batch)
            for k, w in zip(batch, r["slots"]):
                if w >= 0:
                    put(fd, stride, w, block(k))
            if r["handle"]:
                assert 0 <= a.ok("store_commit", sid, handle=r["handle"])["stored"] <= 4
            for j, k in enumerate(batch):
                put(fd, stride, first + j, block(k))
            assert a.ok("store", sid, keys=batch, slots=list(range(first, first + 4)))["stored"] >= 0
            r = a.ok("load_prepare", sid, keys=batch)
            if r["handle"]:
                a.ok("load_release", sid, handle=r["handle"])
            assert a.ok("load", sid, keys=batch, slots=list(range(first, first + 4)))["n"] >= 0
            assert d.proc.poll() is None
        stop.set()
        t.join()
        # whatever the evil session stored is its namespace's alone: the victim sees none of it
        assert victim.lookup(keys) == (0, [])
        assert loads_exact(victim, vkeys)
        a.ok("bye", sid)
        os.close(fd)
        assert wait_until(lambda: at_baseline(victim, sessions=1), DEADLINE_S), state(victim)
    finally:
        stop.set()
        a.close()
        victim.close()


def test_a_window_write_that_fails_is_a_miss_not_a_crash(tmp_path):
    """Window.read_into / write_from report the blocks that did not move (a truncated file; a
    write refused, as on a full tmpfs): the daemon then stores or loads fewer, never crashes.
    Python never holds a buffer over the window: only the guarded native copy touches its mapping
    (`Window._guarded`, a kvbm._native.SharedMap, or None without the extension)."""
    from kvbm.daemon.windows import Window

    w = Window.create(f"kvbm-test-{os.getpid()}-{tmp_path.name[-8:]}", 4, NB, NB, scratch=2)
    try:
        assert not hasattr(w, "_map") and not hasattr(w, "buf")
        assert not isinstance(getattr(w, "_guarded", None), (memoryview, mmap.mmap, np.ndarray))
        src = np.concatenate([block(k) for k in make_keys("win", 4)])
        assert w.write_from(src, [i * NB for i in range(4)], [0, 1, 2, 3]) == 4
        assert w.view(2).tobytes() == src[2 * NB:3 * NB].tobytes()
        os.truncate(w.path, NB + 10)
        dst = np.zeros(4 * NB, np.uint8)
        assert w.read_into([0, 1, 2], dst, [0, NB, 2 * NB]) == {1, 2}
        assert dst[:NB].tobytes() == src[:NB].tobytes()
        ro = os.open(w.path, os.O_RDONLY)  # a write the kernel refuses (ENOSPC on a full tmpfs)
        rw, w.fd = w.fd, ro
        try:
            assert w.write_from(src, [0, NB], [4, 5]) == 0
        finally:
            w.fd = rw
            os.close(ro)
    finally:
        w.close()
    assert w.fd == -1 and not os.path.exists(w.path)
    assert w.read_into([0], np.zeros(NB, np.uint8), [0]) == {0} and w.write_from(src, [0], [0]) == 0


# ---------------------------------------------------------------- crashes and cycles


KILLED = textwrap.dedent("""
    import os, sys, time, hashlib, numpy as np
    from kvbm.client import Client
    from kvbm.blocks import KVLayout
    LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, block_size=16)
    NB = LAYOUT.block_nbytes
    def block(key): return np.frombuffer(hashlib.shake_128(key).digest(NB), dtype=np.uint8)
    def make_keys(tag, n): return [hashlib.blake2b(f"{tag}/{i}".encode(), digest_size=16).digest() for i in range(n)]
    address, phase = sys.argv[1], sys.argv[2]
    c = Client(address, model="killed", layout=LAYOUT, timeout=120, heartbeat=True)
    keys = make_keys("killed", 8)
    stored = make_keys("killed-stored", 8)
    c.store(stored, [block(k) for k in stored])
    if phase in ("prepared", "half-written", "written"):
        res = c.prepare_store(keys)
        views = [v for v in res.views if v is not None]
        upto = {"prepared": 0, "half-written": 4, "written": 8}[phase]
        for v, k in zip(views[:upto], keys):
            v[:] = block(k)
        if phase == "half-written":
            views[4][:NB // 2] = 0xEE  # half of one block
    elif phase == "load-held":
        pins = c.prepare_load(stored)
        assert len(pins.views) == 8
    elif phase == "pinned":
        assert c.pin(stored) == 8
    elif phase == "lookup-pinned":
        assert c.lookup_pin(stored, 2)[2] == 6
    print("ready", flush=True)
    time.sleep(3600)
""")


@pytest.mark.parametrize("phase", ["prepared", "half-written", "written", "load-held", "pinned", "lookup-pinned"])
def test_sigkill_in_every_phase_of_a_two_phase_op_returns_everything_to_baseline(served, phase):
    """A client SIGKILLed while it holds a reservation (nothing, half, all written; no commit),
    a load's window slots, or pins: its pid is gone, so the daemon releases everything at the
    next sweep (not the lease: lease_s is 600 here); maps, window files and descriptors are back
    at baseline; the keys it never committed are misses and storable by its namespace again,
    with the bytes then stored; another tenant's blocks never change."""
    d = served(lease_s=600.0)
    victim = d.client(model="victim", heartbeat=False)  # (a heartbeat opens a connection of its own)
    vkeys = make_keys("victim-kill", 8)
    assert victim.store(vkeys, [block(k) for k in vkeys]) == 8
    assert wait_until(lambda: at_baseline(victim, sessions=1), DEADLINE_S)
    files, nfd = shm_files(d), fds(d)
    p = subprocess.Popen([sys.executable, "-c", KILLED, d.address, phase], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
        assert state(victim)["sessions"] == 2
        p.send_signal(signal.SIGKILL)
        p.wait(60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(60)
    try:
        assert wait_until(lambda: at_baseline(victim, sessions=1), DEADLINE_S), state(victim)
        assert wait_until(lambda: shm_files(d) == files and fds(d) == nfd, DEADLINE_S), (shm_files(d), files, fds(d), nfd)
        assert victim.stats()["daemon"]["dead_clients"] == 1
        with d.client(model="killed") as again:
            keys = make_keys("killed", 8)
            assert again.lookup(keys) == (0, [])  # never committed: a miss, never half-written bytes
            assert again.store(keys, [block(k) for k in keys]) == 8
            assert loads_exact(again, keys)
            assert loads_exact(again, make_keys("killed-stored", 8))
        assert loads_exact(victim, vkeys)
    finally:
        victim.close()


def test_hello_bye_cycles_abandoned_sessions_and_many_namespaces_leave_nothing(served):
    """300 hello/bye cycles, 100 hellos abandoned without a word (their connection closed), 100
    hellos under 100 salts each holding a reservation then dropped with bye: the session table,
    every per-namespace map, the window files in /dev/shm and the daemon's descriptors return to
    baseline (lease_s 2: the abandoned ones go at their lease)."""
    d = served(lease_s=2.0)
    watch = Raw(d)  # no session (a Client's heartbeat would open a connection of its own meanwhile)
    try:
        assert wait_until(lambda: at_baseline(watch, sessions=0), DEADLINE_S)
        files, nfd = shm_files(d), fds(d)
        a = Raw(d)
        try:
            for _ in range(300):
                sid, _, fd = a.hello(salt="cycle")
                os.close(fd)
                a.ok("bye", sid)
            for i in range(100):
                sid, _, fd = a.hello(salt=f"ns-{i}")
                os.close(fd)
                a.ok("store_prepare", sid, keys=make_keys(f"ns-{i}", 2))
                a.ok("bye", sid)
        finally:
            a.close()
        for _ in range(100):  # hello, then the client vanishes: the window stays linked until its lease
            b = Raw(d)
            b.call("hello", model="tiny", layout=LAYOUT_DICT, salt="abandoned")
            b.close()
        assert wait_until(lambda: at_baseline(watch, sessions=0) and shm_files(d) == files and fds(d) <= nfd,
                          DEADLINE_S), (state(watch), len(shm_files(d)), fds(d), nfd)
        assert state(watch)["uids"] == 0
        assert d.proc.poll() is None
    finally:
        watch.close()


# ---------------------------------------------------------------- ids, handles, slots of others


def test_cancels_replays_and_handles_of_other_sessions_touch_nothing_of_theirs(served):
    """An attacker cancels request ids 1..2,000 it never issued (the honest clients' ids are
    small integers too), replays a sibling session's request ids and handles on one connection,
    commits and releases handles it never got, names slots of its window it does not own and
    negative or huge ones: every such request is refused or touches only its own session; the
    honest client's two-phase store and load in flight complete byte for byte."""
    d = served()
    honest = d.client(model="victim")
    a = Raw(d)
    try:
        keys = make_keys("honest", 8)
        res = honest.prepare_store(keys)  # in flight while the attack runs
        sid, hello, fd = a.hello(model="victim")  # the same namespace even: ids are per session
        sid2, _, fd2 = a.hello(model="victim", salt="other")
        for rid in range(1, 2001):
            a.send("cancel", sid, cancels=rid)
        for _ in range(2000):
            r = a.recv()
            assert r["ok"] and r["undone"] is False, r
        assert state(honest)["cancelled"] <= 256  # bounded per session (MAX_CANCELLED)
        # ids it cancelled before sending them are refused; nothing reserved
        r = a.call("store_prepare", sid, rid=2000, keys=make_keys("x", 1))
        assert not r["ok"] and r["error"] == "cancelled"
        # a sibling session's id and handle on the same connection: not its reply, not its handle
        own = a.ok("store_prepare", sid2, keys=make_keys("sib", 2))
        other = a.call("store_prepare", sid, rid=a.rid, keys=make_keys("mine", 3))
        assert other["ok"] and len(other["slots"]) == 3
        assert a.call("store_commit", sid, handle=own["handle"] + 1000)["error"] == "bad_handle"
        assert a.call("load_release", sid, handle=1)["error"] == "bad_handle"
        assert a.call("load_release", sid2, handle=own["handle"])["error"] == "bad_handle"
        for bad in ([-1], [2**63], [hello["scratch"][0] - 1], [hello["scratch"][0] + hello["scratch"][1]], [True],
                    [hello["scratch"][0]] * 2):
            r = a.call("store", sid, keys=make_keys("bad", len(bad)), slots=bad)
            assert not r["ok"] and r["error"] == "bad_field", (bad, r)
        for bad in ([-1], [9], [True], "x", [0, 0, 0, 0]):
            r = a.call("store_commit", sid2, handle=own["handle"], failed=bad)
            assert not r["ok"] and r["error"] in ("bad_field", "too_many"), (bad, r)
        for bad in (-1, 2**64 - 1, True, "1", None):
            r = a.call("cancel", sid, cancels=bad)
            assert not r["ok"] and r["error"] == "bad_field", (bad, r)
        r = a.call("cancel", os.urandom(16), cancels=1)
        assert not r["ok"] and r["error"] == "no_session"
        # the honest store, prepared before all this, commits; its bytes load back
        for v, k in zip(res.views, keys):
            v[:] = block(k)
        assert honest.commit_store(res) == 8
        assert loads_exact(honest, keys)
        a.ok("bye", sid)
        a.ok("bye", sid2)
        # every op of a session after its bye: no_session, nothing done (a second bye is a no-op)
        first = hello["scratch"][0]
        k = make_keys("after-bye", 1)
        for op, fields in (("lookup", {"keys": k}), ("store_prepare", {"keys": k}), ("store_commit", {"handle": 1}),
                           ("load_prepare", {"keys": keys}), ("load_release", {"handle": 1}),
                           ("store", {"keys": k, "slots": [first]}), ("load", {"keys": keys[:1], "slots": [first]}),
                           ("pin", {"keys": keys}), ("unpin", {"keys": keys}), ("lookup_pin", {"keys": keys}),
                           ("cancel", {"cancels": 1}), ("heartbeat", {})):
            r = a.call(op, sid2, **fields)
            assert not r["ok"] and r["error"] == "no_session", (op, r)
        assert a.ok("bye", sid2) == {"id": a.rid, "ok": True}
        os.close(fd)
        os.close(fd2)
        assert wait_until(lambda: at_baseline(honest, sessions=1), DEADLINE_S), state(honest)
        assert state(honest)["cancelled"] == 0 and d.proc.poll() is None
    finally:
        a.close()
        honest.close()


def test_two_sessions_of_one_namespace_racing_on_the_same_keys_never_see_partial_bytes(served):
    """S1 reserves K and writes half of it; S2 (same namespace) asks for K every way it can
    before the commit: lookup, load_prepare and one-shot load miss, store_prepare gets no slot,
    a one-shot store stores nothing (it never overwrites a block in flight). S1 then fails K
    (failed=[0]): a miss for both, storable again, and S2's bytes are then served. S1 stores
    once more and commits: S2 loads S1's bytes, whole."""
    d = served()
    a = Raw(d)
    try:
        s1, h1, fd1 = a.hello(model="shared")
        s2, h2, fd2 = a.hello(model="shared")
        stride, first2 = h2["stride"], h2["scratch"][0]
        k = make_keys("raced", 1)
        mine, theirs = block(k[0]), np.full(NB, 0x5A, np.uint8)
        r1 = a.ok("store_prepare", s1, keys=k)
        put(fd1, h1["stride"], r1["slots"][0], np.concatenate([mine[:NB // 2], np.zeros(NB - NB // 2, np.uint8)]))
        assert a.ok("lookup", s2, keys=k)["n"] == 0
        assert a.ok("load_prepare", s2, keys=k) == {"id": a.rid, "ok": True, "handle": 0, "slots": []}
        assert a.ok("load", s2, keys=k, slots=[first2])["n"] == 0
        r2 = a.ok("store_prepare", s2, keys=k)
        assert r2["slots"] == [-1] and r2["handle"] == 0
        put(fd2, stride, first2, theirs)
        assert a.ok("store", s2, keys=k, slots=[first2])["stored"] == 0
        assert a.ok("store_commit", s1, handle=r1["handle"], failed=[0])["stored"] == 0
        assert a.ok("lookup", s2, keys=k)["n"] == 0 and a.ok("lookup", s1, keys=k)["n"] == 0
        assert a.ok("store", s2, keys=k, slots=[first2])["stored"] == 1
        os.pwrite(fd2, b"\0" * NB, first2 * stride)
        assert a.ok("load", s2, keys=k, slots=[first2])["n"] == 1
        assert get(fd2, stride, first2).tobytes() == theirs.tobytes()
        # the commit of a handle already committed (a retry under a new id) changes nothing
        assert a.call("store_commit", s1, handle=r1["handle"])["error"] == "bad_handle"
        # S2 "fails" a key it got no slot for (S1's, in flight) in a commit of its own: S1's
        # reservation is untouched and commits its whole bytes
        k3, j3 = make_keys("raced-2", 2)
        r1 = a.ok("store_prepare", s1, keys=[k3])
        r2 = a.ok("store_prepare", s2, keys=[k3, j3])
        assert r2["slots"][0] == -1 and r2["slots"][1] >= 0
        put(fd2, stride, r2["slots"][1], block(j3))
        assert a.ok("store_commit", s2, handle=r2["handle"], failed=[0])["stored"] == 1
        put(fd1, h1["stride"], r1["slots"][0], block(k3))
        assert a.ok("store_commit", s1, handle=r1["handle"])["stored"] == 1
        r = a.ok("load_prepare", s2, keys=[k3, j3])
        assert [get(fd2, stride, w).tobytes() for w in r["slots"]] == [block(k3).tobytes(), block(j3).tobytes()]
        a.ok("load_release", s2, handle=r["handle"])
        with d.client(model="other") as other:  # another namespace: the same key is not there
            assert other.lookup(k) == (0, [])
        a.ok("bye", s1)
        a.ok("bye", s2)
        os.close(fd1)
        os.close(fd2)
        with d.client(model="shared") as c:
            out = [np.zeros(NB, np.uint8)]
            assert c.load(k, out) == 1 and out[0].tobytes() == theirs.tobytes()
            assert wait_until(lambda: at_baseline(c, sessions=1), DEADLINE_S), state(c)
    finally:
        a.close()


def test_one_key_pinned_max_keys_times_is_released_whole_and_evictable(served):
    """pin [K] * max_keys and lookup_pin of the same repeated key: one distinct busy block for
    the quota, every pin counted; one unpin leaves it pinned; bye releases them all: nothing
    pinned or busy, and K is evicted like any block once G2 fills (it was not pinned forever)."""
    d = served()
    a = Raw(d)
    try:
        sid, hello, fd = a.hello(model="pinner")
        n = hello["max_keys"]
        k = make_keys("pinned-many", 1)
        put(fd, hello["stride"], hello["scratch"][0], block(k[0]))
        assert a.ok("store", sid, keys=k, slots=[hello["scratch"][0]])["stored"] == 1
        assert a.ok("pin", sid, keys=k * n)["n"] == n
        assert a.ok("lookup_pin", sid, keys=k * n, pin_from=1)["pinned"] == n - 1
        with d.client(model="watch") as w:
            assert state(w)["busy_blocks"] == 1 and state(w)["g2_pinned"] == 1
            assert a.ok("unpin", sid, keys=k)["n"] == 1
            assert state(w)["g2_pinned"] == 1
            a.ok("bye", sid)
            os.close(fd)
            assert wait_until(lambda: at_baseline(w, sessions=1), DEADLINE_S), state(w)
            cap = hello["capacity"]
            fill = make_keys("fill", cap)
            for i in range(0, cap, 16):
                assert w.store(fill[i:i + 16], [block(x) for x in fill[i:i + 16]]) == 16
        with d.client(model="pinner") as c:
            assert c.lookup(k) == (0, [])  # evicted: its pins were all gone
    finally:
        a.close()


def test_an_honest_client_evicted_between_two_one_shot_stores_stores_the_right_bytes(served):
    """A hello flood (max_sessions_per_uid 4) evicts an honest client's idle session between its
    one-shot stores; its next store says hello again, writes its bytes into the new window's
    scratch slots and stores them: both blocks load byte for byte (never the new window's zeros),
    and the flood's sessions are all gone after bye."""
    d = served(max_sessions_per_uid=4)
    c = d.client(model="honest", heartbeat=False)
    try:
        k1, k2 = make_keys("evicted", 2)
        assert c.store([k1], [block(k1)]) == 1
        a = Raw(d)
        try:
            flood = []
            for i in range(4):  # each used once: an idle honest session goes before them
                flood.append(a.hello(salt=f"flood-{i}"))
                a.ok("lookup", flood[-1][0], keys=[k1])
            assert c.store([k2], [block(k2)]) == 1
            assert c.rehellos == 1
            assert loads_exact(c, [k1, k2])
            for sid, _, fd in flood:
                a.call("bye", sid)
                os.close(fd)
        finally:
            a.close()
        assert wait_until(lambda: at_baseline(c, sessions=1), DEADLINE_S), state(c)
    finally:
        c.close()


def test_a_session_flood_under_a_small_descriptor_limit_leaves_the_daemon_descriptors(tmp_path):
    """A window holds a descriptor of the daemon (it copies with pread/pwrite). Under a 256-file
    limit, one client opens 300 sessions, each holding a reservation (none can be evicted): the
    windows take at most a quarter of the limit, later hellos are refused `busy`, and the daemon
    keeps descriptors for new connections (libzmq aborts at EMFILE on an ipc listener): it lives,
    40 new connections are answered, a client connected before goes on storing and loading, and
    after the flood's bye a new client stores and loads byte for byte and every descriptor and
    file is back."""
    import resource

    from daemonproc import wait_ready

    limit = 256
    d = Served(tmp_path, "d", tiers=[{"name": "g2", "capacity": 1024, "eviction": "lru", "storage": "host"}],
               daemon={"lease_s": 600.0})
    out = d.dir / "stdout.txt"
    out.write_text("")
    d.proc = subprocess.Popen([sys.executable, "-m", "kvbm.cli", "serve", "--config", str(d.config)],
                              stdout=out.open("w"), stderr=(d.dir / "stderr.txt").open("w"), env=d.env,
                              preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)))
    try:
        d.info = wait_ready(d.proc, out, DEADLINE_S)
        assert d.info is not None, d.stderr()[-2000:]
        watch = d.client(model="watch", heartbeat=False)  # (a heartbeat opens a connection of its own)
        files, nfd, names = shm_files(d), fds(d), fd_names(d)
        a = Raw(d)
        held, busy = [], 0
        try:
            for i in range(300):
                r = a.call("hello", model="tiny", layout=LAYOUT_DICT, salt="flood")
                if not r["ok"]:
                    assert r["error"] == "busy", r
                    busy += 1
                    continue
                held.append(r["session"])
                assert a.ok("store_prepare", r["session"], keys=make_keys(f"flood-{i}", 1))["handle"] > 0
            assert d.proc.poll() is None, d.stderr()[-2000:]
            assert busy > 0 and len(held) <= limit // 4
            assert fds(d) <= nfd + limit // 4 + 8
            more = [Raw(d) for _ in range(40)]  # new connections: each takes a descriptor to accept
            try:
                assert all(m.ok("stats")["stats"]["daemon"]["state"]["sessions"] == len(held) + 1 for m in more)
            finally:
                for m in more:
                    m.close()
            keys = make_keys("during-the-flood", 4)
            assert watch.store(keys, [block(k) for k in keys]) == 4 and loads_exact(watch, keys)
            for sid in held:
                a.ok("bye", sid)
        finally:
            a.close()
        with d.client(model="after") as c:  # a new session and window once the flood is gone
            keys = make_keys("after-the-flood", 4)
            assert c.store(keys, [block(k) for k in keys]) == 4
            assert loads_exact(c, keys)
        assert wait_until(lambda: at_baseline(watch, sessions=1) and shm_files(d) == files and fds(d) <= nfd,
                          DEADLINE_S), (state(watch), shm_files(d) ^ files, Counter(fd_names(d)) - Counter(names))
        watch.close()
    finally:
        d.stop()


@pytest.mark.parametrize("op", ["load", "load_prepare"])
def test_a_session_gone_while_its_load_waits_on_g3_leaves_nothing(served, tmp_path, op):
    """Loads of blocks that sit in G3 wait (deferred) while the blocks come up; the client
    pipelines a bye (or its window is truncated and it says bye) right behind: the waiting
    request is answered no_session or with what it got, never a window slot of a closed session;
    nothing stays held, the onboarding map empties, the daemon lives and the blocks load byte for
    byte for a new client of that namespace."""
    d = served(tiers=[{"name": "g2", "capacity": 16, "eviction": "lru", "storage": "host"},
                      {"name": "g3", "capacity": 256, "eviction": "lru",
                       "storage": {"name": "disk", "path": str(tmp_path / "g3")}}])
    keys = make_keys("deep", 64)
    with d.client(model="deep", heartbeat=False) as c:
        for i in range(0, 64, 8):
            assert c.store(keys[i:i + 8], [block(k) for k in keys[i:i + 8]]) == 8
        assert wait_until(lambda: c.lookup(keys)[0] == 64, DEADLINE_S)  # (the offloader's moves landed)
    a = Raw(d)
    try:
        for rnd in range(8):
            sid, hello, fd = a.hello(model="deep")
            first = hello["scratch"][0]
            batch = keys[rnd * 8:rnd * 8 + 8]
            fields = {"keys": batch, "slots": list(range(first, first + 8))} if op == "load" else {"keys": batch}
            if rnd % 2:
                os.ftruncate(fd, 0)
            rid = a.send(op, sid, **fields)
            bye = a.send("bye", sid)
            got = {}
            while len(got) < 2:
                r = a.recv()
                got[r["id"]] = r
            assert got[bye]["ok"]
            r = got[rid]
            assert r["ok"] or r["error"] == "no_session", r
            os.close(fd)
        assert d.proc.poll() is None
        assert wait_until(lambda: at_baseline(a, sessions=0) and a.ok("stats")["stats"]["daemon"]["onboarding_keys"] == 0,
                          DEADLINE_S), state(a)
    finally:
        a.close()
    with d.client(model="deep", heartbeat=False) as c:
        for i in range(0, 64, 8):  # (a load of G3 blocks may get a prefix while G2 is full: retried)
            assert wait_until(lambda: loads_prefix_right(c, keys[i:i + 8]) == 8, DEADLINE_S)


def test_another_uid_or_a_tenant_holds_at_most_half_of_the_sessions_that_can_have_a_window():
    """Each session's window holds one of the daemon's descriptors, and at most a quarter of
    RLIMIT_NOFILE windows are open (past it a hello is busy). Under a small limit, a user let in on
    the socket (or a named tenant) holding every window would lock the others out of hello: it
    holds at most half of them. The daemon's own uid is the operator's and keeps its own bound."""
    import os

    from kvbm.daemon.leases import Sessions

    s = Sessions(1024, 512, windows=64)
    assert s.bound(os.getuid() + 1) == 32 and s.bound("alice") == 32
    assert s.bound(os.getuid()) == 512 and s.bound(-1) == 512
    opened = 0
    for _ in range(40):
        x = s.open(b"ns", "x", 60.0, 0.0, uid=os.getuid() + 1)[0]
        if x is not None:
            s.charge(x, 1)  # busy: no hello may close it
            opened += 1
    assert opened == 32 and len(s) == 32
    assert s.open(b"ns", "x", 60.0, 0.0, uid=os.getuid() + 1) == (None, None)  # at its bound, all busy
    assert s.open(b"ns2", "y", 60.0, 0.0, uid=os.getuid() + 2)[0] is not None  # another user gets in
