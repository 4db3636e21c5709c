"""Attacks on the daemon's two KV-event streams (events.py: [kind, key, tier] rows on a PUB
socket; kv_events.py: vLLM's KVEventBatch on a PUB socket and its replay ROUTER) by another
local user and by a hostile subscriber.

- Who can reach them: an ipc:// stream is bound like the request socket (transport.bind): the
  socket file born 0600 whatever the umask, its folder not writable by others, an address a
  live process answers on refused. Before, the sockets took the daemon's umask (0777 under
  umask 0: any local user subscribed to every tenant's rows) and any folder.
- What a replay flood costs the daemon: snapshots for replays are scans on the owner thread
  (the thread that serves every tenant's requests); however requests and publishes race, they
  are bounded in rate.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import uuid
from pathlib import Path

import pytest

zmq = pytest.importorskip("zmq")

from servedaemon import Served, block, make_keys  # noqa: E402
from test_daemon_cli import NOBODY, as_uid, connect_probe, needs_root  # noqa: E402

DEADLINE_S = 60.0


def shared_folder(mode: int) -> Path:
    """A folder under /tmp others can enter (pytest's tmp folders are closed to them)."""
    folder = Path(f"/tmp/kvbm-ev-{uuid.uuid4().hex[:10]}")
    folder.mkdir()
    folder.chmod(mode)
    return folder


def stream_config(folder: Path) -> dict:
    return {"events": f"ipc://{folder}/ev.sock", "kv_events": f"ipc://{folder}/kv.sock",
            "kv_events_replay": f"ipc://{folder}/kvr.sock"}


@needs_root
def test_event_sockets_on_ipc_are_private_whatever_the_umask(tmp_path):
    """A daemon started under umask 0 with its streams in a folder others may enter: before, the
    three sockets were 0777 and uid 65534 connected to each (and read every namespace's rows);
    now each is 0600 and that uid's connect() fails."""
    folder = shared_folder(0o755)
    d = Served(tmp_path, "d", daemon=stream_config(folder))
    old = os.umask(0)  # the daemon inherits it
    try:
        d.start()
    finally:
        os.umask(old)
    try:
        for name in ("ev.sock", "kv.sock", "kvr.sock"):
            path = str(folder / name)
            assert oct(os.stat(path).st_mode & 0o777) == oct(0o600), name
            assert as_uid(NOBODY, lambda p=path: connect_probe(p)) == "refused", name
            assert connect_probe(path) == "connected", name  # the daemon's own user still subscribes
    finally:
        d.stop()
        shutil.rmtree(folder, ignore_errors=True)


def test_event_sockets_in_a_folder_others_may_write_are_refused(tmp_path):
    """Another user who may write the folder could replace the socket and feed the routers a
    stream of their own: the daemon refuses to start, one line naming the key and the fix."""
    folder = shared_folder(0o777)  # (no sticky bit)
    try:
        for key in ("events", "kv_events"):
            cfg = {key: f"ipc://{folder}/{key}.sock", "token": "t0ken-for-the-zap-threads"}
            if key == "kv_events":
                cfg["kv_events_replay"] = f"ipc://{tmp_path}/{key}-replay.sock"
            else:  # the vLLM-format stream, bound first, closes (sockets, ZAP thread) as the start fails
                cfg.update(kv_events=f"ipc://{tmp_path}/kv.sock", kv_events_replay=f"ipc://{tmp_path}/kvr.sock")
            d = Served(tmp_path, f"w-{key}", daemon=cfg)
            with pytest.raises(RuntimeError) as err:
                d.start()
            assert f"daemon.{key} ipc://{folder}/{key}.sock: others may write folder" in str(err.value)
            assert "Traceback" not in d.stderr()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_an_event_socket_a_live_process_answers_on_is_not_taken_over(tmp_path):
    """Before, libzmq unlinked whatever was at the path and bound there: a second daemon (or a
    typo shared by two configs) silently took the first one's subscribers."""
    ctx = zmq.Context()
    squatter = ctx.socket(zmq.PUB)
    squatter.setsockopt(zmq.LINGER, 0)
    path = tmp_path / "ev.sock"
    squatter.bind(f"ipc://{path}")
    try:
        d = Served(tmp_path, "second", daemon={"events": f"ipc://{path}"})
        with pytest.raises(RuntimeError) as err:
            d.start()
        assert f"daemon.events ipc://{path}: address already in use" in str(err.value)
        assert "Traceback" not in d.stderr()
    finally:
        squatter.close(0)
        ctx.term()


# ---------------------------------------------------------------- a hostile replay client


class InProcess:
    """`kvbm serve` in this process (the loop on a thread), so a test can count what its owner
    thread does; streams on ipc:// in tmp."""

    def __init__(self, tmp: Path, **daemon: object) -> None:
        from kvbm import KVBMConfig
        from kvbm.daemon.config import DaemonConfig
        from kvbm.daemon.server import Daemon
        from servedaemon import LAYOUT_DICT

        cfg = KVBMConfig.from_dict({
            "namespace": {"model": "tiny"}, "layout": LAYOUT_DICT,
            "tiers": [{"name": "g2", "capacity": 512, "eviction": "lru", "storage": "host"}],
            "daemon": {"address": f"ipc://{tmp}/d.sock", "events": "", "metrics": "",
                       "shm_name": f"kvbm-test-{uuid.uuid4().hex[:12]}", "nixl": False,
                       "kv_events": f"ipc://{tmp}/kv.sock", "kv_events_replay": f"ipc://{tmp}/kvr.sock",
                       **daemon}})
        self.d = Daemon(cfg, DaemonConfig.from_dict(cfg.daemon))
        self.kv = self.d.kv_events
        self.thread = threading.Thread(target=self.d.run, name="test-daemon-owner", daemon=True)
        self.thread.start()

    def client(self, **kw: object):
        from kvbm.client import Client
        from servedaemon import LAYOUT

        return Client(self.d.address, model="tiny", layout=LAYOUT, timeout=120.0, **kw)

    def close(self) -> None:
        self.d.stop()
        self.thread.join(DEADLINE_S)


def thread_cpu_s(native_id: int) -> float:
    """CPU seconds (user + system) one thread of this process has used."""
    with open(f"/proc/self/task/{native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_replay_flood_while_the_buffer_rolls_scans_at_most_once_a_second(tmp_path):
    """A subscriber that floods replay requests from 0 (older than the buffer: each one wants a
    snapshot) while its namespace publishes faster than the buffer keeps batches. A snapshot is
    a scan of every block named, run on the owner thread (which serves every tenant's requests).
    Before: the cached snapshot served only while the buffer still held every batch after it, so
    here nearly every request scanned again (one per request, unbounded). Now a namespace's scans
    are at least SNAPSHOT_EVERY_S apart, however requests and publishes race."""
    from kvbm.daemon import kv_events as K

    srv = InProcess(tmp_path, kv_events_buffer=1)
    scans: list[float] = []
    real = srv.kv._snapshot

    def counted(ns):
        scans.append(time.monotonic())
        return real(ns)

    srv.kv._snapshot = counted
    stop = threading.Event()
    c = srv.client()
    keys = make_keys("flood", 400)

    def publish():  # one batch per store: the 1-batch buffer rolls on every request
        i = 0
        while not stop.is_set():
            k = keys[i % len(keys)]
            c.store([k], [block(k)], hashes=[i + 1])
            i += 1

    writer = threading.Thread(target=publish, daemon=True)
    ctx = zmq.Context()
    req = ctx.socket(zmq.DEALER)
    req.setsockopt(zmq.LINGER, 0)
    req.setsockopt(zmq.RCVHWM, 0)
    try:
        c.store([keys[0]], [block(keys[0])], hashes=[0])
        writer.start()
        req.connect(srv.kv.replay_address)
        answered = 0
        t0 = time.monotonic()
        while answered < 60 or time.monotonic() - t0 < 3.0:  # >= 60 requests and >= 3 s of them
            req.send_multipart([b"", c.topic, (0).to_bytes(8, "big", signed=True)])
            while True:  # each answer ends with the end marker
                assert req.poll(int(DEADLINE_S * 1000)), "no replay answer within the deadline"
                if req.recv_multipart()[2] == K.END_SEQ:
                    break
            answered += 1
            assert time.monotonic() - t0 < 4 * DEADLINE_S
    finally:
        stop.set()
        writer.join(DEADLINE_S)
        req.close(0)
        ctx.term()
        c.close()
        srv.close()
    assert len(scans) >= 2  # the flood did want snapshots
    gaps = [b - a for a, b in zip(scans, scans[1:])]
    assert min(gaps) >= K.SNAPSHOT_EVERY_S * 0.99, f"{len(scans)} scans for {answered} requests"


def test_a_replay_flood_that_never_reads_takes_a_bounded_share_of_the_daemon(tmp_path):
    """A subscriber asks, again and again and never reading, for the whole replay buffer (every
    request answers up to kv_events_buffer batches, each a send on the replay thread, which
    shares the interpreter with the owner thread). Its answers are dropped at the ROUTER's
    high-water mark (memory bounded per peer); the replay thread's CPU stays a bounded share
    of the time (it rests in proportion to the work each answer took), and the daemon serves."""
    srv = InProcess(tmp_path, kv_events_buffer=2000)
    c = srv.client()
    keys = make_keys("rf", 2000)
    ctx = zmq.Context()
    req = ctx.socket(zmq.DEALER)
    req.setsockopt(zmq.LINGER, 0)
    req.setsockopt(zmq.SNDHWM, 0)
    try:
        for i, k in enumerate(keys):  # a full buffer: a batch per store (G2 holds 512: evictions too)
            c.store([k], [block(k)], hashes=[i + 1])
        st = srv.kv.streams[srv.kv.topics[c.topic]]
        assert len(st.buffer) == 2000
        start = st.buffer[0][0]
        req.connect(srv.kv.replay_address)
        tid = srv.kv._thread.native_id
        cpu0, t0 = thread_cpu_s(tid), time.monotonic()
        while time.monotonic() - t0 < 4.0:
            for _ in range(50):
                req.send_multipart([b"", c.topic, start.to_bytes(8, "big", signed=True)])
            time.sleep(0.05)
        share = (thread_cpu_s(tid) - cpu0) / (time.monotonic() - t0)
        assert c.lookup([keys[0]])[0] in (0, 1)  # the daemon still answers
        print(f"replay thread CPU share under the flood: {share:.2f}")
        assert share <= 0.25
    finally:
        req.close(0)
        ctx.term()
        c.close()
        srv.close()


# ---------------------------------------------------------------- a connection flood


def test_a_connection_flood_on_the_event_sockets_neither_kills_nor_starves_the_daemon(tmp_path):
    """Another local user (no credentials: loopback event sockets take anyone) opens more
    connections to the event sockets than the daemon may open files. Before: the daemon ran out
    of descriptors, and the next client's connect to its ipc:// socket made libzmq abort it
    ("Too many open files (src/ipc_listener.cpp:297)", SIGABRT): every tenant's cache gone.
    The gate (event_gate.py: a Python thread cutting what libzmq accepted past a cap) was not
    enough: on a loaded box (CI beside 4 busy processes) the flood outran it and the daemon
    aborted. Now the event sockets live in a child process (publisher.py): the flood costs the
    daemon no descriptor at all; the child may die of it (EMFILE) and is restarted, with backoff;
    the daemon lives and serves a new client, and once the flood goes a router subscribes again
    and gets the stream."""
    import resource
    import subprocess
    import sys

    import yaml

    from daemonproc import wait_ready
    from kvbm.client import Client
    from servedaemon import LAYOUT, LAYOUT_DICT

    limit = 256
    cfg = {"namespace": {"model": "tiny"}, "layout": LAYOUT_DICT,
           "tiers": [{"name": "g2", "capacity": 64, "eviction": "lru", "storage": "host"}],
           "daemon": {"address": f"ipc://{tmp_path}/d.sock", "events": "tcp://127.0.0.1:0", "metrics": "",
                      "kv_events": "tcp://127.0.0.1:0", "kv_events_replay": f"ipc://{tmp_path}/kvr.sock",
                      "shm_name": f"kvbm-test-{uuid.uuid4().hex[:12]}", "nixl": False}}
    (tmp_path / "kvbm.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out.txt"
    out.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVBM_")}
    proc = subprocess.Popen([sys.executable, "-m", "kvbm.cli", "serve", "--config", str(tmp_path / "kvbm.yaml")],
                            stdout=out.open("w"), stderr=(tmp_path / "err.txt").open("w"), env=env,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)))
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, 4096)
    socks = []
    try:
        info = wait_ready(proc, out, 180)
        assert info is not None, (tmp_path / "err.txt").read_text()[-2000:]
        fds0 = len(os.listdir(f"/proc/{proc.pid}/fd"))
        for address, kind in ((info["events"], zmq.SUB), (f"ipc://{tmp_path}/kvr.sock", zmq.DEALER)):
            for _ in range(limit + 64):  # more than the daemon may open files, on each of two sockets
                s = ctx.socket(kind)
                s.setsockopt(zmq.LINGER, 0)
                if kind == zmq.SUB:
                    s.setsockopt(zmq.SUBSCRIBE, b"")
                s.connect(address)
                socks.append(s)

        def fds() -> int:
            return len(os.listdir(f"/proc/{proc.pid}/fd"))

        deadline = time.monotonic() + DEADLINE_S
        seen = fds()
        while time.monotonic() < deadline and proc.poll() is None:  # the flood lands (zmq reconnects)
            time.sleep(0.5)
            now = fds()
            if now == seen:
                break
            seen = now
        assert proc.poll() is None, f"the daemon died: {(tmp_path / 'err.txt').read_text()[-2000:]}"
        assert fds() < limit - 32, fds()  # room left for clients, G3 files, G4 sockets
        assert fds() <= fds0 + 8, (fds0, fds())  # the flood's connections are not the daemon's
        c = Client(info["address"], model="tiny", layout=LAYOUT, timeout=120.0)
        try:
            k = make_keys("after-the-flood", 1)
            assert c.store(k, [block(k[0])]) == 1 and c.lookup(k)[0] == 1
            # the flood goes; a router subscribes again and gets the stream
            for s in socks:
                s.close(0)
            socks.clear()
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.SUBSCRIBE, c.topic)
            sub.connect(info["events"])
            socks.append(sub)
            i = 0
            while not sub.poll(200):  # (a slow joiner misses the rows of stores before it is in)
                assert time.monotonic() < deadline + DEADLINE_S, "no row reached a subscriber after the flood"
                k = make_keys(f"later-{i}", 1)
                c.store(k, [block(k[0])])
                i += 1
            assert sub.recv_multipart()[0] == c.topic
        finally:
            c.close()
        assert proc.poll() is None
    finally:
        for s in socks:
            s.close(0)
        ctx.term()
        if proc.poll() is None:
            proc.terminate()
            proc.wait(60)


# ---------------------------------------------------------------- replay buffers in all


def test_replay_buffers_of_many_namespaces_stay_within_one_byte_budget(tmp_path, monkeypatch):
    """A tenant makes many namespaces (salts), each holding a block and publishing batches:
    each namespace's replay buffer keeps up to kv_events_buffer batches, so in all they grew
    with namespaces x buffer (unbounded in practice: a namespace needs only one block held).
    Now all buffers share one byte budget (MAX_REPLAY_BYTES), the least recently published
    namespace's oldest batches go first, and a subscriber replaying from a batch that went gets
    a snapshot, so its view is still exact."""
    from kvbm.daemon import kv_events as K
    from test_kv_events import replay

    budget = 64 << 10
    monkeypatch.setattr(K, "MAX_REPLAY_BYTES", budget)
    srv = InProcess(tmp_path, kv_events_buffer=10_000)
    clients = [srv.client(salt=f"tenant-{i}") for i in range(12)]
    ctx = zmq.Context()
    try:
        firsts = {}
        for n, c in enumerate(clients):
            keys = make_keys(f"ns{n}", 120)
            for i, k in enumerate(keys):
                c.store([k], [block(k)], hashes=[(n << 20) + i + 1], parent_hash=(n << 20) + i if i else None)
            st = srv.kv.streams[srv.kv.topics[c.topic]]
            firsts[c.topic] = st.seq - len(keys) + 1  # (each store published one batch)
        total = sum(len(p) for st in srv.kv.streams.values() for _, p in st.buffer)
        assert total <= budget, f"{total} bytes buffered for replay, budget {budget}"
        c0 = clients[0]
        got = replay(ctx, srv.kv.replay_address, c0.topic, firsts[c0.topic])
        assert got, "nothing replayed"
        import msgpack

        first_batch = msgpack.unpackb(got[0][1], raw=False)[1]
        assert first_batch[0]["type"] == "AllBlocksCleared"  # its old batches went: a snapshot first
        view: dict = {}
        for _, payload in got:
            for ev in msgpack.unpackb(payload, raw=False)[1]:
                if ev["type"] == "AllBlocksCleared":
                    view.clear()
                elif ev["type"] == "BlockStored":
                    view.setdefault((ev["medium"], ev["locality"]), set()).update(ev["block_hashes"])
                else:
                    view.get((ev["medium"], ev["locality"]), set()).difference_update(ev["block_hashes"])
        truth = {(m, loc): set(hs) for m, by in c0.call("kv_view")["view"].items() for loc, hs in by.items()}
        assert {p: hs for p, hs in view.items() if hs} == {p: hs for p, hs in truth.items() if hs}
    finally:
        ctx.term()
        for c in clients:
            c.close()
        srv.close()


def test_snapshots_made_for_replays_are_kept_only_while_they_can_serve(tmp_path, monkeypatch):
    """Each replay of a namespace from before its buffer makes a snapshot (all its blocks, one
    batch); it serves further replays for SNAPSHOT_EVERY_S. Before, up to 1,024 of them stayed
    (one per namespace ever replayed, each as large as its namespace was then); now a snapshot
    older than SNAPSHOT_EVERY_S goes at the next scan."""
    from kvbm.daemon import kv_events as K
    from test_kv_events import replay

    monkeypatch.setattr(K, "SNAPSHOT_EVERY_S", 0.2)
    srv = InProcess(tmp_path, kv_events_buffer=1)
    clients = [srv.client(salt=f"snap-{i}") for i in range(6)]
    ctx = zmq.Context()
    try:
        for n, c in enumerate(clients):
            for i, k in enumerate(make_keys(f"s{n}", 3)):
                c.store([k], [block(k)], hashes=[(n << 8) + i + 1])
        for c in clients:  # a replay from -1 of each: a snapshot of each
            assert replay(ctx, srv.kv.replay_address, c.topic, -1)
        time.sleep(0.3)  # (every snapshot is now older than SNAPSHOT_EVERY_S)
        assert replay(ctx, srv.kv.replay_address, clients[0].topic, -1)
        assert list(srv.kv._snaps) == [srv.kv.topics[clients[0].topic]]
    finally:
        ctx.term()
        for c in clients:
            c.close()
        srv.close()
