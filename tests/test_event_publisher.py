"""The event publisher (kvbm/daemon/publisher.py): the public event sockets in a child process.

- A killed publisher is restarted (with backoff) while the daemon goes on serving lookups and
  loads; subscribers reconnect by themselves, and a kv_events subscriber sees the gap in the
  sequence numbers and replays what it missed.
- The publisher never outlives the daemon: a SIGKILLed daemon leaves no publisher process, no
  event socket file and no private link folder behind; neither does a clean stop.

Every wait is on a condition with a generous deadline (a loaded box starts Python slowly).
"""

from __future__ import annotations

import os
import signal
import shutil
import time
import uuid
from pathlib import Path

import msgpack
import numpy as np
import pytest

zmq = pytest.importorskip("zmq")

from daemonproc import wait_until  # noqa: E402
from servedaemon import NB, Served, block, make_keys  # noqa: E402

DEADLINE_S = 120.0


def publishers(parent: int) -> set[int]:
    """Live (not zombie) processes whose parent is `parent` and that run the event publisher."""
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if int(fields[1]) == parent and fields[0] != "Z" and b"kvbm.daemon.publisher" in cmd:
            out.add(int(entry))
    return out


def alive(pid: int) -> bool:
    """Whether pid is a live process (a zombie waiting for init counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def streams(folder: Path) -> dict:
    return {"events": f"ipc://{folder}/ev.sock", "kv_events": f"ipc://{folder}/kv.sock",
            "kv_events_replay": f"ipc://{folder}/kvr.sock"}


def served(tmp_path: Path, name: str) -> tuple[Served, Path]:
    """A daemon with the three event streams on ipc:// and its own runtime folder (where the
    publisher's private link folder goes), so the test sees exactly what it leaves."""
    runtime = Path(f"/tmp/kvbm-rt-{uuid.uuid4().hex[:8]}")  # (short: ipc paths hold 107 bytes)
    runtime.mkdir(mode=0o700)
    return Served(tmp_path, name, daemon=streams(tmp_path / name), env={"XDG_RUNTIME_DIR": str(runtime)}), runtime


def one_publisher(d: Served) -> int:
    found: set = set()
    assert wait_until(lambda: len(found.update(publishers(d.proc.pid)) or found) == 1 and
                      len(publishers(d.proc.pid)) == 1, DEADLINE_S), found
    (pid,) = publishers(d.proc.pid)
    return pid


def _seq(frames: list) -> int:
    return int.from_bytes(frames[1], "big")


def test_a_killed_publisher_is_restarted_and_the_daemon_serves_meanwhile(tmp_path):
    from test_kv_events import replay

    d, runtime = served(tmp_path, "d")
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    c = None
    try:
        d.start()
        c = d.client()
        first = one_publisher(d)
        sub.setsockopt(zmq.SUBSCRIBE, c.topic)
        sub.connect(f"ipc://{tmp_path}/d/kv.sock")
        held = make_keys("held", 8)
        assert c.store(held, [block(k) for k in held], hashes=list(range(1, 9))) == 8
        # PUB/SUB joins late: store with hashes until the subscriber hears a batch
        n, deadline = 0, time.monotonic() + DEADLINE_S
        while not sub.poll(100):
            assert time.monotonic() < deadline, "the kv_events subscriber never joined"
            k = make_keys(f"join-{n}", 1)
            c.store(k, [block(k[0])], hashes=[1000 + n])
            n += 1
        last = _seq(sub.recv_multipart())
        while sub.poll(300):  # what else was published before the kill
            last = _seq(sub.recv_multipart())

        os.kill(first, signal.SIGKILL)
        assert wait_until(lambda: not alive(first), DEADLINE_S)
        # a batch published while no publisher runs is lost: the subscriber will see a gap
        lost = make_keys("while-down", 1)
        assert c.store(lost, [block(lost[0])], hashes=[5000]) == 1
        gap = not publishers(d.proc.pid)  # (no new child yet: that batch surely went nowhere)

        # the daemon serves lookups and loads all along, until a new publisher runs
        out = [np.empty(NB, dtype=np.uint8) for _ in held]
        served_meanwhile = 0

        def restarted() -> bool:
            nonlocal served_meanwhile
            assert c.lookup(held)[0] == 8
            assert c.load(held, out) == 8 and all(np.array_equal(o, block(k)) for o, k in zip(out, held))
            served_meanwhile += 1
            return bool(publishers(d.proc.pid) - {first})

        assert wait_until(restarted, DEADLINE_S), "no new event publisher"
        assert served_meanwhile >= 1
        assert d.proc.poll() is None
        assert wait_until(lambda: c.stats()["daemon"].get("event_publisher_restarts", 0) >= 1, DEADLINE_S)

        # the subscriber reconnects by itself; the next batch it hears is past the gap
        n, deadline = 0, time.monotonic() + DEADLINE_S
        while not sub.poll(100):
            assert time.monotonic() < deadline, "no batch reached the subscriber after the restart"
            k = make_keys(f"after-{n}", 1)
            c.store(k, [block(k[0])], hashes=[6000 + n])
            n += 1
        now = _seq(sub.recv_multipart())
        assert now > last + 1 or not gap, (last, now)
        # ... which the replay socket fills: every batch from last + 1 on, in order
        got = replay(ctx, f"ipc://{tmp_path}/d/kvr.sock", c.topic, last + 1)
        seqs = [s for s, _ in got]
        assert seqs and seqs[0] <= last + 1 and seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        assert seqs[-1] >= now
        hashes = {h for _, p in got for ev in msgpack.unpackb(p, raw=False)[1]
                  if ev["type"] == "BlockStored" for h in ev["block_hashes"]}
        assert 5000 in hashes  # the batch published while the stream was down
    finally:
        if c is not None:
            c.close()
        sub.close(0)
        ctx.term()
        d.stop()
        shutil.rmtree(runtime, ignore_errors=True)


def test_killing_the_daemon_leaves_no_publisher_and_no_socket(tmp_path):
    for how in ("SIGKILL", "SIGTERM"):
        d, runtime = served(tmp_path, how)
        try:
            d.start()
            pid = one_publisher(d)
            files = [tmp_path / how / name for name in ("ev.sock", "kv.sock", "kvr.sock")]
            assert all(f.exists() for f in files)
            links = list((runtime / "kvbm").glob("pub-*"))
            assert len(links) == 1 and oct(links[0].stat().st_mode & 0o777) == oct(0o700)
            if how == "SIGKILL":
                d.proc.kill()
            else:
                d.proc.send_signal(signal.SIGTERM)
            d.proc.wait(DEADLINE_S)
            assert wait_until(lambda: not alive(pid), DEADLINE_S), f"publisher {pid} outlived the daemon ({how})"
            assert wait_until(lambda: not any(f.exists() for f in files), DEADLINE_S), \
                [str(f) for f in files if f.exists()]
            assert wait_until(lambda: not list((runtime / "kvbm").glob("pub-*")), DEADLINE_S)
        finally:
            d.kill()
            shutil.rmtree(runtime, ignore_errors=True)


def test_a_publisher_that_cannot_bind_fails_the_start_in_one_line(tmp_path):
    """A refused event address is the daemon's start error (one line, no traceback), and no
    publisher is left running."""
    ctx = zmq.Context()
    squatter = ctx.socket(zmq.PUB)
    squatter.setsockopt(zmq.LINGER, 0)
    squatter.bind(f"ipc://{tmp_path}/kv.sock")
    try:
        d = Served(tmp_path, "busy", daemon={"kv_events": f"ipc://{tmp_path}/kv.sock", "events": ""})
        with pytest.raises(RuntimeError) as err:
            d.start()
        assert f"daemon.kv_events ipc://{tmp_path}/kv.sock: address already in use" in str(err.value)
        assert "Traceback" not in d.stderr()
        assert not publishers(d.proc.pid)
    finally:
        squatter.close(0)
        ctx.term()


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_a_subscription_flood_costs_the_daemon_no_memory(tmp_path):
    """libzmq's PUB keeps every distinct prefix a subscriber sends (no limit on their count):
    before, 200,000 random 32-byte ones grew the daemon by 357 MiB. The PUB sockets now live in
    the publisher (which exits past MAX_RSS_BYTES and is restarted, next test): 200,000 random
    subscriptions while the stream publishes leave the daemon's resident size where it was."""
    d, runtime = served(tmp_path, "subs")
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    c = None
    try:
        d.start()
        c = d.client()
        one_publisher(d)
        sub.connect(f"ipc://{tmp_path}/subs/kv.sock")
        k = make_keys("warm", 1)
        assert c.store(k, [block(k[0])], hashes=[1]) == 1
        before = rss_mib(d.proc.pid)
        rng = np.random.default_rng(7)
        for i in range(200_000):
            sub.setsockopt(zmq.SUBSCRIBE, rng.bytes(32))
            if i % 5000 == 0:  # the stream publishes meanwhile (the PUB reads subscriptions as it sends)
                k = make_keys(f"subs-{i}", 1)
                assert c.store(k, [block(k[0])], hashes=[i + 2]) == 1
        assert c.lookup(k)[0] == 1
        grown = rss_mib(d.proc.pid) - before
        print(f"daemon resident size after 200,000 subscriptions: {grown:+.1f} MiB")
        assert grown < 32, grown
        assert d.proc.poll() is None
    finally:
        sub.close(0)
        ctx.term()
        if c is not None:
            c.close()
        d.stop()
        shutil.rmtree(runtime, ignore_errors=True)


def test_a_publisher_past_its_memory_cap_exits_and_is_restarted(tmp_path, monkeypatch):
    """The publisher checks its resident size every RSS_CHECK_S and exits past MAX_RSS_BYTES
    (here lowered below what a bare one takes, so every one leaves at once): the daemon restarts
    it again and again, with backoff, and serves all along."""
    from kvbm.daemon import publisher as pub_mod
    from test_attack_events import InProcess

    monkeypatch.setattr(pub_mod, "MAX_RSS_BYTES", 1 << 20)
    srv = InProcess(tmp_path)
    c = srv.client()
    try:
        keys = make_keys("cap", 4)
        assert c.store(keys, [block(k) for k in keys]) == 4
        # the daemon copies publisher.restarts into its counters just after the restart (events.py):
        # wait for both, a loaded box reads between the two
        assert wait_until(lambda: c.lookup(keys)[0] == 4 and srv.d.publisher.restarts >= 2
                          and srv.d.counters.get("event_publisher_restarts", 0) >= 2, DEADLINE_S)
        assert srv.d.counters["event_publisher_restarts"] >= 2
    finally:
        c.close()
        srv.close()
