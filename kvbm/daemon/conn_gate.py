"""The tcp request socket's connections, bounded: a stranger cannot take the daemon's file descriptors.

    ConnGate(router)               watches the router's tcp connections (its own thread)
      .authenticated(frame)        owner thread: the connection this request came on showed the token
      .live / .waiting             connections open now / of them, not yet authenticated
      .cut                         connections shut down by the gate, in all
      .close()                     before the router closes

A tcp:// request socket needs `daemon.token` (config.py), but anyone who can reach the port may
still connect: each connection costs the daemon a file descriptor before any request proves
anything. Without a bound, a local user (or, off loopback, anyone on the network) opening
RLIMIT_NOFILE connections left the daemon none for clients' windows, G3, G4 and its own
sockets (and an ipc:// listener of the same process aborts at EMFILE in libzmq 4.3).

The gate reads the router's monitor: ACCEPTED gives a connection's descriptor, DISCONNECTED
(also sent for a failed or timed-out handshake) takes it back. A request that passed the token
check marks its connection (its descriptor, `zmq.SRCFD` of the message) authenticated. At most
`waiting_cap` connections may be open without having authenticated: when one more arrives, the
oldest of them is shut down (shutdown(2) on a duplicate of its descriptor, after checking that it
is still a connection accepted by this listener), so a new honest client always gets its turn:
it is cut only if `waiting_cap` more connections arrive before the daemon reads its first
request. All connections together are capped at `total_cap` (a new one past it is shut down),
which only token holders can reach. libzmq drops a connection that has not finished its ZMTP
greeting within the handshake interval (10 s here), and TCP keepalive reaps dead peers.

The gate is reactive (libzmq has accepted a connection before the gate sees it); a flood faster
than this thread briefly holds more, and a tcp listener at EMFILE only retries its accept
(libzmq 4.3.5 does not abort there), so the daemon lives and the gate catches up.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import threading
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger("kvbm.daemon")
MAX_WAITING = 256  # connections open at once that have not shown the token yet
HANDSHAKE_MS = 10_000  # a connection that has not finished its ZMTP greeting by then is dropped


def caps() -> tuple[int, int]:
    """(waiting_cap, total_cap) from RLIMIT_NOFILE: an 8th of it (at most MAX_WAITING) may wait
    for authentication, half of it may be connections at all; the rest is for windows, G3, G4."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY or soft <= 0:
            soft = 1 << 20
    except (ImportError, OSError, ValueError):
        soft = 1024
    waiting = max(8, min(MAX_WAITING, soft // 8))
    return waiting, max(2 * waiting, soft // 2)


def harden(router: Any) -> None:
    """Socket options of a tcp request socket (before bind)."""
    router.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
    router.setsockopt(zmq.TCP_KEEPALIVE, 1)
    router.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 60)
    router.setsockopt(zmq.TCP_KEEPALIVE_INTVL, 10)
    router.setsockopt(zmq.TCP_KEEPALIVE_CNT, 6)


class ConnGate:
    def __init__(self, router: Any, waiting_cap: int | None = None, total_cap: int | None = None) -> None:
        w, t = caps()
        self.waiting_cap = w if waiting_cap is None else waiting_cap
        self.total_cap = t if total_cap is None else total_cap
        self.cut = 0
        self._router = router
        self._mon = router.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self._address = _address(router.getsockopt(zmq.LAST_ENDPOINT).decode())
        self._lock = threading.Lock()
        self._authed: set[int] = set()  # descriptors of connections that showed the token
        self._waiting: collections.OrderedDict[int, None] = collections.OrderedDict()  # the others, oldest first
        self._cutting: set[int] = set()  # shut down here, their DISCONNECTED not seen yet
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvbm-conn-gate", daemon=True)
        self._thread.start()

    @property
    def live(self) -> int:
        return len(self._authed) + len(self._waiting)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def authenticated(self, frame: Any) -> None:
        """Owner thread, after a request passed the token check: its connection is a client's."""
        try:
            fd = frame.get(zmq.SRCFD)
        except (zmq.ZMQError, AttributeError, TypeError):
            return
        if fd in self._authed:  # (every request after the first: one set lookup)
            return
        with self._lock:
            if fd in self._waiting:
                del self._waiting[fd]
                self._authed.add(fd)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._mon, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                if not poller.poll(100):
                    continue
            except zmq.ZMQError:
                return
            while True:
                try:
                    ev = recv_monitor_message(self._mon, zmq.NOBLOCK)
                except zmq.Again:
                    break
                except zmq.ZMQError:
                    return
                self._on(ev)

    def _on(self, ev: dict) -> None:
        fd = ev.get("value")
        if not isinstance(fd, int):
            return
        with self._lock:
            if ev["event"] == zmq.EVENT_DISCONNECTED:
                if fd in self._cutting:
                    self._cutting.discard(fd)
                else:
                    self._authed.discard(fd)
                    self._waiting.pop(fd, None)
                return
            if ev["event"] != zmq.EVENT_ACCEPTED:
                return
            self._cutting.discard(fd)  # (a descriptor is reused only after its DISCONNECTED)
            self._authed.discard(fd)
            self._waiting.pop(fd, None)
            if len(self._authed) + len(self._waiting) >= self.total_cap:
                self._cut(fd)
                return
            while len(self._waiting) >= self.waiting_cap:
                oldest, _ = self._waiting.popitem(last=False)
                self._cut(oldest)
            self._waiting[fd] = None

    def _cut(self, fd: int) -> None:
        if _shut(fd, self._address):
            self._cutting.add(fd)
        self.cut += 1
        if self.cut == 1 or self.cut % 1000 == 0:
            log.warning("request socket %s: %d connections open (%d not authenticated); shut %d down in all",
                        self._address, len(self._authed) + len(self._waiting), len(self._waiting), self.cut)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        try:
            self._router.disable_monitor()
        except zmq.ZMQError:
            pass
        self._mon.close(0)


def _address(endpoint: str) -> tuple[str, int]:
    """(host, port) of a tcp:// listener, as getsockname() says it on a connection it accepted;
    host "" for a wildcard bind (any local address)."""
    host, port = endpoint.split("://", 1)[1].rsplit(":", 1)
    host = host.strip("[]")
    return ("" if host in ("0.0.0.0", "::", "*") else host, int(port))


def _shut(fd: int, address: tuple[str, int]) -> bool:
    """shutdown(2) the connection on fd if it is still one accepted by the listener at `address`."""
    try:
        dup = os.dup(fd)
    except OSError:
        return False
    try:
        s = socket.socket(fileno=dup)
    except OSError:  # not a socket any more
        os.close(dup)
        return False
    try:
        name = s.getsockname()
        ours = (s.type == socket.SOCK_STREAM and isinstance(name, tuple) and name[1] == address[1]
                and (not address[0] or name[0] == address[0]) and _peer(s))
        if ours:
            s.shutdown(socket.SHUT_RDWR)
        return ours
    except OSError:
        return False
    finally:
        s.close()  # the duplicate only


def _peer(s: socket.socket) -> bool:
    """A connected socket (an accepted connection), not a listener bound to the same port."""
    try:
        s.getpeername()
    except OSError:
        return False
    return True
