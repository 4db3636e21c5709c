"""The event sockets in a process of their own: a connection flood exhausts its descriptors, never the daemon's.

    Publisher(streams, token)         (daemon side) starts the child, waits for its sockets to be bound
      .endpoints                      {"events" | "events_replay" | "kv_events" | "kv_events_replay": endpoint}
      .link(name, kind)               a daemon socket connected to the child over a private ipc path:
                                      PUSH for a PUB stream (events, kv_events), DEALER for a replay
      .service(now)                   (owner thread, every tick) a dead child is restarted, with backoff
      .pid, .restarts
      .close()
    python -m kvbm.daemon.publisher   the child (reads its config on stdin)

Why. Each connection to a public socket costs its process a file descriptor, and libzmq 4.3 aborts
the process when an ipc:// accept fails with EMFILE ("Too many open files
(src/ipc_listener.cpp:297)"). The event sockets take any local process on loopback without a
token, and the gate that cuts connections past a cap (event_gate.py) is reactive: on a loaded box a
flood outran it, and the daemon, with every tenant's cache, died. Now the public event sockets
(`events` and `kv_events` PUB, `events_replay` and `kv_events_replay` ROUTER) and their gate live
in this child; the daemon holds no listening event socket at all, so whatever connects to them
costs the daemon nothing. The child may die (EMFILE abort, its memory cap below); the daemon notices at its next tick
(0.25 s), keeps serving blocks, and starts a new one after a backoff (RESTART_MIN_S doubling to
RESTART_MAX_S, back to the minimum once a child lived RESTART_RESET_S). The new child binds the
same endpoints (a tcp:// port resolved at the first start is kept), so subscribers reconnect by
themselves; what was published meanwhile is lost: subscribers of either stream see the gap in the
per-namespace sequence numbers (assigned in the daemon, before the link) and replay (the replay
buffers, the snapshots and their pacing stay in the daemon, replay.py), as after any dropped message.

The private channel. The child binds one ipc:// path per stream in a folder the daemon made with
mkdtemp (0700, in the runtime folder, transport.runtime_dir) and each path 0600 (transport.bind);
the daemon connects to them with ZMQ_IMMEDIATE, so while no child is connected a publish is dropped
at once (zmq.Again), never queued or blocking: the request loop never waits for the child. At most
LINK_HWM messages wait on each link (a stopped child costs the daemon that much memory). A replay
link carries [peer id, request frames] to the daemon's replay thread (replay.py) and its answers
back; the public ROUTERs take requests of at most MAX_REQUEST_BYTES.

What the child keeps of the daemon's guarantees: every public socket is bound by transport.bind (an
ipc:// socket born 0600, a folder others may write refused, a live path never taken over), with
daemon.events_token (or the client token) as its ZMQ PLAIN password when one is set (one ZAP
handler for them all), at most event_gate.MAX_EVENT_PEERS connections each (a 16th of
RLIMIT_NOFILE if less), and the same high-water marks (a slow subscriber loses messages, the daemon
never blocks). Bind errors come back to the daemon's start as one line (ConfigError).

Memory. libzmq's PUB keeps every prefix a subscriber sends in a trie (~1.8 KB each, no limit on
their count; XPUB_MANUAL keeps them in another trie). The child checks its resident size every
RSS_CHECK_S and exits past MAX_RSS_BYTES, and runs under an address-space limit (MAX_AS_BYTES) that
fails its allocations first if it grows faster than that: a subscriber that floods subscriptions
restarts the stream (while it lasts: denies it), it cannot grow the node's memory without bound.

Lifetime. The child must not outlive the daemon: its stdin is a pipe from the daemon (EOF when the
daemon is gone, killed included), PR_SET_PDEATHSIG sends it SIGTERM as well, and it exits when its
parent is no longer the daemon. Leaving, it unlinks the ipc:// files it bound (those still its
own) and the private folder (a successor makes it again); it holds no shared memory. A SIGKILLed child
leaves its ipc:// files, which its successor (transport.bind: nobody answers there) replaces.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import zmq

log = logging.getLogger("kvbm.daemon")

STREAMS = ("kv_events", "kv_events_replay", "events", "events_replay")  # bound in this order
KEYS = {name: f"daemon.{name}" for name in STREAMS}
PLAIN_USER = "kvbm"  # the event sockets' PLAIN username; the password is daemon.subscriber_token
ZAP_DOMAIN = "kvbm-events"
LINK_HWM = 1000  # messages waiting on one daemon <-> child link, each way
PUB_HWM = 1000  # per subscriber (libzmq's default, as before)
MAX_REQUEST_BYTES = 4096  # a replay request frame (topic + seq): anything larger is cut off
START_TIMEOUT_S = 120.0  # the first child's ready line (a loaded box starts Python slowly)
RESTART_MIN_S, RESTART_MAX_S, RESTART_RESET_S = 0.5, 8.0, 30.0
RSS_CHECK_S = 0.25
MAX_RSS_BYTES = 512 << 20  # the child exits past this resident size (a subscription flood)
MAX_AS_BYTES = 4 << 30  # ... and cannot map more than this (libzmq then aborts the child)


class _Secret:
    """A PLAIN password that pyzmq's authenticator compares in constant time: it checks
    `password == stored` with a str, which falls back to this __eq__ (str does not know it)."""

    __slots__ = ("_raw",)

    def __init__(self, secret: str):
        self._raw = secret.encode()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            other = other.encode("utf-8", "surrogateescape")
        return isinstance(other, bytes) and hmac.compare_digest(self._raw, other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return "_Secret(***)"


def _is_replay(name: str) -> bool:
    # a ROUTER (requests in, answers out); the others are PUB. A tenant's own stream is
    # "<stream>@<tenant>" (events.py: daemon.tenants.<name>.events / .events_replay)
    return name.split("@", 1)[0].endswith("_replay")


def _link_path(folder: str, name: str) -> str:
    short = {"events": "e", "events_replay": "er", "kv_events": "k", "kv_events_replay": "r"}.get(name)
    if short is None:  # a tenant's stream: a short name of its own (an ipc path holds 107 bytes)
        import hashlib

        short = "t" + hashlib.blake2b(name.encode(), digest_size=6).hexdigest()
    return os.path.join(folder, short)


# ---------------------------------------------------------------------------------------- daemon


class Publisher:
    """The daemon's handle on the child that holds the public event sockets."""

    def __init__(self, streams: dict[str, str], token: str = "", start_timeout: float = START_TIMEOUT_S,
                 own: dict[str, dict] | None = None) -> None:
        """own: {"<stream>@<tenant>": {"address", "token", "key"}}: a tenant's own sockets, each with
        that tenant's token as its PLAIN password (and the config key its errors name)."""
        from .transport import _prepare_ipc, runtime_dir

        self.streams = {k: streams[k] for k in STREAMS if streams.get(k)}
        self.own = {name: {"token": o["token"], "key": o["key"]} for name, o in (own or {}).items()}
        self.streams.update({name: o["address"] for name, o in (own or {}).items()})
        self._token = token
        self.endpoints: dict[str, str] = {}
        self.restarts = 0
        self.proc: subprocess.Popen | None = None
        self._links: list = []
        self._due: float | None = None  # when the next child starts (after one died)
        self._backoff = RESTART_MIN_S
        self._spawned = 0.0
        self._closed = False
        self.ctx = zmq.Context()
        self.dir = ""
        try:
            base = runtime_dir()
            # as the request socket's folder: made 0700, refused if another uid owns it or others
            # may write it (they could swap the links and read every namespace's rows)
            _prepare_ipc(os.path.join(base, "pub"), "the event publisher's links")
            self.dir = tempfile.mkdtemp(prefix="pub-", dir=base)  # 0700: only this uid reaches the links
            self._spawn(self.streams)
            self.endpoints = self._ready(start_timeout)
            self._spawned = time.monotonic()
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def link(self, name: str, kind: int, wait_s: float = START_TIMEOUT_S) -> Any:
        """A socket of this process connected to the child's `name` link (see the docstring). Waits
        until the link is up (a child that just said ready), so the first publish is not dropped."""
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # no child: a send fails at once (dropped), nothing queues
        sock.setsockopt(zmq.SNDHWM, LINK_HWM)
        sock.setsockopt(zmq.RCVHWM, LINK_HWM)
        sock.connect(f"ipc://{_link_path(self.dir, name)}")
        self._links.append(sock)
        deadline = time.monotonic() + wait_s
        while self.pid is not None and time.monotonic() < deadline:
            if sock.poll(100, zmq.POLLOUT):
                break
        return sock

    # ---------------------------------------------------------------- the child

    def _spawn(self, streams: dict[str, str]) -> None:
        cfg = {"parent": os.getpid(), "dir": self.dir, "streams": streams, "token": self._token,
               "own": self.own, "max_rss": MAX_RSS_BYTES, "restart": self.proc is not None}
        # close_fds (the default): the child holds none of the daemon's descriptors
        self.proc = subprocess.Popen([sys.executable, "-m", "kvbm.daemon.publisher"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, close_fds=True)
        try:
            self.proc.stdin.write(json.dumps(cfg).encode() + b"\n")  # (the token never on a command line)
            self.proc.stdin.flush()
        except OSError:  # it died at once: service() sees it
            pass

    def _ready(self, timeout: float) -> dict[str, str]:
        """The first child's ready line -> endpoints; its bind error -> ConfigError (one line)."""
        from ..config import ConfigError

        proc = self.proc
        fd = proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        buf = b""
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"the event publisher (pid {proc.pid}) did not start within {timeout:.0f} s")
            if select.select([fd], [], [], min(left, 1.0))[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    code = proc.wait()
                    raise RuntimeError(f"the event publisher exited at start (exit code {code}); "
                                       f"see the lines above")
                buf += chunk
        msg = json.loads(buf.split(b"\n", 1)[0])
        if "error" in msg:
            proc.wait()
            raise ConfigError(msg["error"])
        return msg["endpoints"]

    def service(self, now: float) -> None:
        """(Owner thread, every tick.) A dead child: restart it after the backoff."""
        if self._closed or self.proc is None:
            return
        if self._due is None:
            code = self.proc.poll()
            if code is None:
                if self._backoff > RESTART_MIN_S and now - self._spawned > RESTART_RESET_S:
                    self._backoff = RESTART_MIN_S  # it lived a while: the next death restarts soon
                return
            self._reap()
            self._due = now + self._backoff
            log.warning("event publisher (pid %d) exited (%s); the event streams restart in %.1f s, "
                        "subscribers see a gap", self.proc.pid, _how(code), self._backoff)
            self._backoff = min(RESTART_MAX_S, self._backoff * 2)
        elif now >= self._due:
            self._due = None
            self._spawned = now
            self.restarts += 1
            try:
                self._spawn(self.endpoints or self.streams)  # the same endpoints: subscribers reconnect
            except OSError as exc:  # (out of descriptors or memory) the next tick tries again, later
                log.warning("event publisher: could not start a new one: %s", exc)
                self._due = now + self._backoff
                self._backoff = min(RESTART_MAX_S, self._backoff * 2)
                return
            log.info("event publisher restarted (pid %d)", self.proc.pid)

    def _reap(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass

    def close(self) -> None:
        """Stop the child (EOF on its stdin; SIGTERM, then SIGKILL if it lingers), close the links."""
        self._closed = True
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                proc.stdin.close()  # it leaves at EOF: unlinks its ipc files, exits 0
            except OSError:
                pass
            for sig, wait in ((None, 10.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 30.0)):
                if sig is not None:
                    try:
                        proc.send_signal(sig)
                    except OSError:
                        pass
                try:
                    proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if proc is not None:
            self._reap()
        for sock in self._links:
            sock.close(0)
        self._links = []
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def _how(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


# ---------------------------------------------------------------------------------------- child


class _Child:
    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self.dir = cfg["dir"]
        self.parent = cfg["parent"]
        self.bound: list[tuple[str, int]] = []  # (ipc path, inode) this process bound: unlinked at exit
        self.ctx = zmq.Context()

    def bind(self) -> dict[str, str]:
        """The public sockets (transport.bind, PLAIN with the token), the gate, the links, the
        forwarding threads; -> the endpoints."""
        from .event_gate import Gate
        from .transport import bind

        token = self.cfg.get("token") or ""
        own = self.cfg.get("own") or {}
        # each socket's PLAIN password: the streams' credential, or a tenant's own stream's token
        # (its ZAP domain of its own: one tenant's token opens no other socket)
        creds = {name: (token, ZAP_DOMAIN) for name in STREAMS}
        for i, (name, o) in enumerate(sorted(own.items())):
            creds[name] = (o["token"], f"{ZAP_DOMAIN}-{i}")
        zap = None
        if any(pw for pw, _ in creds.values()):
            from zmq.auth.thread import ThreadAuthenticator

            zap_log = logging.getLogger("kvbm.daemon.zap")
            zap_log.setLevel(max(zap_log.getEffectiveLevel(), logging.INFO))  # its DEBUG lines print passwords
            zap = ThreadAuthenticator(self.ctx, log=zap_log)
            zap.start()
            for pw, domain in set(creds.values()):
                if pw:
                    zap.configure_plain(domain=domain, passwords={PLAIN_USER: _Secret(pw)})
        public, endpoints = {}, {}
        for name in [*STREAMS, *sorted(own)]:
            address = self.cfg["streams"].get(name)
            if not address:
                continue
            sock = self.ctx.socket(zmq.ROUTER if _is_replay(name) else zmq.PUB)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, PUB_HWM)
            if _is_replay(name):
                sock.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
            pw, domain = creds[name]
            if pw:
                sock.plain_server = True
                sock.zap_domain = domain.encode()
            key = KEYS.get(name) or own[name]["key"]
            endpoints[name] = bind(sock, address, key)  # as the request socket (transport.py)
            self._record(endpoints[name])
            public[name] = sock
        Gate(list(public.values()))  # at most MAX_EVENT_PEERS connections each (event_gate.py)
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        for name, sock in public.items():
            link = self.ctx.socket(zmq.DEALER if _is_replay(name) else zmq.PULL)
            link.setsockopt(zmq.LINGER, 0)
            link.setsockopt(zmq.SNDHWM, LINK_HWM)
            link.setsockopt(zmq.RCVHWM, LINK_HWM)
            self._record(bind(link, f"ipc://{_link_path(self.dir, name)}", f"publisher link {name}"))
            # forwarded in libzmq (the GIL released): link -> PUB; ROUTER <-> link for replays
            front, back = (sock, link) if _is_replay(name) else (link, sock)
            threading.Thread(target=_forward, args=(front, back), name=f"kvbm-pub-{name}", daemon=True).start()
        return endpoints

    def _record(self, endpoint: str) -> None:
        if endpoint.startswith("ipc://"):
            path = endpoint[len("ipc://"):]
            self.bound.append((path, os.stat(path).st_ino))

    def serve(self) -> int:
        """Until the daemon is gone (stdin EOF, a new parent) or this process outgrew MAX_RSS_BYTES."""
        fd = sys.stdin.fileno()
        page = os.sysconf("SC_PAGE_SIZE")
        most = int(self.cfg.get("max_rss") or MAX_RSS_BYTES)
        while True:
            if select.select([fd], [], [], RSS_CHECK_S)[0] and not os.read(fd, 4096):
                return 0  # EOF: the daemon closed us or died
            if os.getppid() != self.parent:
                return 0
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * page
            if rss > most:
                log.warning("event publisher: %d MiB resident, past its %d MiB: exits (the daemon starts "
                            "another; subscribers see a gap)", rss >> 20, most >> 20)
                return 3

    def leave(self) -> None:
        """Unlink the ipc files still ours, and the private folder (PR_SET_PDEATHSIG comes when the
        daemon's thread ends, before getppid() changes: so always; a successor makes it again)."""
        for path, ino in self.bound:
            try:
                if os.stat(path).st_ino == ino:
                    os.unlink(path)
            except OSError:
                pass
        try:  # (empty now unless a successor is binding: a restarted child makes it again)
            os.rmdir(self.dir)
        except OSError:
            pass


def _forward(front: Any, back: Any) -> None:
    try:
        zmq.proxy(front, back)
    except zmq.ZMQError:  # the context ends (never, before os._exit)
        pass


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: SIGTERM when the parent (thread) that started us goes."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon stops us (a terminal's ^C reaches both)
    _die_with_parent()
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # an abort (EMFILE) dumps no core
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        if hard == resource.RLIM_INFINITY or hard > MAX_AS_BYTES:
            resource.setrlimit(resource.RLIMIT_AS, (MAX_AS_BYTES, hard))
    except (ImportError, OSError, ValueError):
        pass
    line = sys.stdin.buffer.readline()
    if not line:
        return 0
    cfg = json.loads(line)
    child = _Child(cfg)

    def on_term(*_: Any) -> None:  # the daemon's death (PDEATHSIG) or a stop
        child.leave()
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    if os.getppid() != child.parent:
        return 0
    try:
        endpoints = child.bind()
    except Exception as exc:  # a refused address: one line for the daemon's start
        from ..config import ConfigError

        child.leave()
        msg = str(exc) if isinstance(exc, ConfigError) else f"event publisher: {type(exc).__name__}: {exc}"
        if cfg.get("restart"):  # (a first start's error is the daemon's own one line)
            log.warning("event publisher could not restart: %s", msg)
        sys.stdout.write(json.dumps({"error": msg}) + "\n")
        sys.stdout.flush()
        return 2
    sys.stdout.write(json.dumps({"ready": True, "pid": os.getpid(), "endpoints": endpoints}) + "\n")
    sys.stdout.flush()
    code = child.serve()
    child.leave()
    return code


if __name__ == "__main__":
    # os._exit: the forwarding threads are blocked in libzmq; nothing else needs flushing
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
