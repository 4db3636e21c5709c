"""The tcp request socket's connections, bounded: a stranger cannot take the daemon's file descriptors.

    ConnGate(router, max_message_bytes)   watches the router's tcp connections (its own thread)
      .received(frames)            owner thread, every request: its bytes were read on its connection
      .authenticated(frame, owner) owner thread: the connection this request came on showed the token
                                   of `owner` (a tenant); False: that owner holds per_owner_cap already
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

One tenant's connections are capped too (`per_owner_cap`: a quarter of `total_cap`, at most
MAX_OWNER). The loop serves connections in turn (the ROUTER's fair queue), so a tenant's share of
the loop, and of the requests and replies queued in the daemon (RCVHWM and REPLY_HWM a
connection), grows with the connections it opens; before, one token holder could open nearly all
of `total_cap` and every other tenant's request waited behind one of each of them. A connection
that shows a tenant's token past its cap is answered `busy` (every request on it) and shut down
DOOM_S later, once its refusal has gone out.

Replies a connection never reads: libzmq queues up to REPLY_HWM of them per connection (the
daemon's memory), whatever their size, and one token holder may open many connections. The gate
reads each connection's send queue from the kernel (SIOCOUTQ) every sample: a peer whose
receive buffer is full and whose window is shut leaves SNDBUF / 2 unsent there, which no
reading client ever does (its replies are small and few), and is shut down: its queued replies
are freed.

A message that never ends (frames with MORE set, forever: libzmq counts its high-water mark in
whole messages and MAXMSGSIZE per frame, so it buffers such a message without bound, and the
token is checked only on whole messages) is cut too: every SAMPLE_S the gate reads each
connection's byte count from the kernel (TCP_INFO tcpi_bytes_received, in place) and compares it
with the bytes of the requests the daemon read on it (`received`, owner thread; frame headers
included); a connection further ahead than one request (before its first authenticated one) or
its queue (RCVHWM requests and the kernel's receive buffer, after) is shut down.

The gate is reactive (libzmq has accepted a connection before the gate sees it); a flood faster
than this thread briefly holds more, and a tcp listener at EMFILE only retries its accept
(libzmq 4.3.5 does not abort there), so the daemon lives and the gate catches up.

On ipc:// (session 14, H58) the same gate runs: tenants with tokens may connect there too when
the operator opened the socket to their users (or run as the daemon's uid). The kernel names
each connection's uid (SO_PEERCRED, read at ACCEPTED): a connection of the daemon's own uid whose
requests carry no tenant's token is the operator's (out of scope: it can stop the daemon) and is
left alone, never counted, waited on or cut. Every other one is gated as on tcp: one tenant (or,
for the default tenant, one other uid) holds at most per_owner_cap connections, strangers rotate
through waiting_cap, all of them at most total_cap, and one that leaves UNREAD_IPC bytes of
replies unread (SIOCOUTQ on a unix socket: what its peer has not read yet; the send buffer is
raised to what the kernel allows, 2 x wmem_max) is shut down. What ipc:// lacks is a byte count
of what a peer sent (no TCP_INFO): a message that never ends is not cut there (SECURITY.md).
"""

from __future__ import annotations

import collections
import ctypes
import fcntl
import logging
import os
import socket
import stat
import struct
import termios
import threading
import time
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from .event_gate import listener_address, shut_accepted

log = logging.getLogger("kvbm.daemon")
MAX_WAITING = 128  # connections open at once that have not shown the token yet
HANDSHAKE_MS = 10_000  # a connection that has not finished its ZMTP greeting by then is dropped
RCVHWM = 8  # whole requests libzmq queues per connection before it stops reading it (clients have <= 3 in flight)
RCVBUF = 2 << 20  # the kernel's receive buffer per connection (it doubles it): no autotuning to 6+ MiB
SNDBUF = 1 << 20  # and its send buffer: replies a client does not read sit there (4+ MiB autotuned)
SAMPLE_S = 0.1  # how often the gate reads each connection's byte count
SLACK = 256 << 10  # greeting, READY, a few frame headers
DOOM_S = 2.0  # a connection refused past its tenant's cap is shut down this long after (its `busy` reply first)
UNREAD = SNDBUF // 2  # replies queued in the kernel for a connection; past it the gate shuts it down
_OWN_UID = os.getuid()


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


MAX_OWNER = 512  # connections one tenant may hold at most, whatever the descriptor limit (each Client: 2)


def owner_cap(total_cap: int) -> int:
    """Connections one tenant may hold: a quarter of all (at least 8, at most MAX_OWNER: each of
    another tenant's requests waits behind at most one request of each of them)."""
    return max(8, min(MAX_OWNER, total_cap // 4))


def harden(router: Any) -> None:
    """Socket options of a tcp request socket (before bind)."""
    router.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
    router.setsockopt(zmq.RCVHWM, RCVHWM)
    router.setsockopt(zmq.RCVBUF, RCVBUF)
    router.setsockopt(zmq.SNDBUF, SNDBUF)
    router.setsockopt(zmq.TCP_KEEPALIVE, 1)
    router.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 60)
    router.setsockopt(zmq.TCP_KEEPALIVE_INTVL, 10)
    router.setsockopt(zmq.TCP_KEEPALIVE_CNT, 6)


class ConnGate:
    def __init__(self, router: Any, max_message_bytes: int = 1 << 20, waiting_cap: int | None = None,
                 total_cap: int | None = None, per_owner_cap: int | None = None) -> None:
        w, t = caps()
        self.waiting_cap = w if waiting_cap is None else waiting_cap
        self.total_cap = t if total_cap is None else total_cap
        self.per_owner_cap = owner_cap(self.total_cap) if per_owner_cap is None else per_owner_cap
        self._owner_of: dict[int, Any] = {}  # authenticated fd -> its tenant ("" daemon.token's; ipc: a uid)
        self.by_owner: dict[Any, int] = {}  # tenant -> authenticated connections
        self._doomed: dict[int, float] = {}  # refused past their tenant's cap -> when: shut down DOOM_S later
        self._early: set[int] = set()  # authenticated before the gate read their ACCEPTED
        self.refused = 0  # connections refused so (past per_owner_cap)
        # bytes a connection may have sent past the requests the daemon read from it: before its
        # first authenticated request, one request; after, the requests libzmq queues and what
        # the kernel holds. More is a message that never ends (frames with MORE set, forever):
        # libzmq counts its high-water mark in whole messages and MAXMSGSIZE per frame, so it
        # would buffer such a message without bound
        self.waiting_backlog = max_message_bytes + SLACK
        # replies a connection does not read: past UNREAD bytes in the kernel's send queue its peer's
        # window is shut (its own receive buffer, up to 6 MiB, is full first): it is not reading
        self.unread_cap = UNREAD
        self.silent = 0  # of `cut`, connections that did not read their replies
        self.authed_backlog = (RCVHWM + 1) * max_message_bytes + 2 * RCVBUF + SLACK  # (+1: one being decoded)
        self.cut = 0
        self.overfed = 0  # of those, connections that sent more than the daemon read (backlog)
        self._read: dict[int, int] = {}  # fd -> bytes of the requests the daemon read on it (owner thread)
        self._router = router
        self._mon = router.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self._address = listener_address(router.getsockopt(zmq.LAST_ENDPOINT).decode())
        self.ipc = isinstance(self._address, str)  # a unix socket: uids known, no byte counts
        self._exempt: set[int] = set()  # ipc: connections of the daemon's own uid, no tenant token seen
        self._uid_of: dict[int, int] = {}  # ipc: fd -> its peer's uid (SO_PEERCRED)
        self._unread_of: dict[int, int] = {}  # ipc: fd -> its unread-reply bound (its send buffer / 2)
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

    def received(self, frames: list) -> None:
        """Owner thread, every request: count its bytes as read (the wire's frame headers included)."""
        try:
            fd = frames[-1].get(zmq.SRCFD)
        except (zmq.ZMQError, AttributeError, TypeError):
            return
        n = 0
        for f in frames[1:]:  # (frames[0] is the routing id the router made up)
            size = len(f)
            n += size + (2 if size < 256 else 9)
        self._read[fd] = self._read.get(fd, 0) + n

    def authenticated(self, frame: Any, owner: str = "") -> bool:
        """Owner thread, after a request passed the token check of tenant `owner`: its connection
        is a client's. False when `owner` holds per_owner_cap connections already: refuse the
        request; the connection is shut down at the next sample. On ipc:// a connection of the
        daemon's own uid with no tenant's token is left alone; another uid's default-tenant
        connections count under that uid."""
        try:
            fd = frame.get(zmq.SRCFD)
        except (zmq.ZMQError, AttributeError, TypeError):
            return True
        if fd in self._authed:  # (every request after the first: one set lookup)
            return True
        if not owner and fd in self._exempt:  # (ipc: the operator's own connections)
            return True
        with self._lock:
            if fd in self._doomed:
                return False
            key: Any = owner
            if self.ipc:
                uid = self._uid_of.get(fd)
                if uid is None:
                    uid = _peer_uid(fd)
                if not owner and uid == _OWN_UID:
                    self._waiting.pop(fd, None)
                    self._exempt.add(fd)
                    return True
                key = owner if owner else uid
            known = fd in self._waiting or fd in self._exempt
            if not known:  # its ACCEPTED is not read yet (this thread can be first): counted now
                self._early.add(fd)
            if self.by_owner.get(key, 0) >= self.per_owner_cap:
                self._doomed[fd] = time.monotonic()
                if fd in self._exempt:  # (cut DOOM_S later, from the waiting ones)
                    self._exempt.discard(fd)
                    self._waiting[fd] = None
                return False
            self._waiting.pop(fd, None)
            self._exempt.discard(fd)
            self._authed.add(fd)
            self._owner_of[fd] = key
            self.by_owner[key] = self.by_owner.get(key, 0) + 1
        return True

    def _forget(self, fd: int) -> None:
        """(under the lock) fd is no longer a connection of its tenant."""
        self._doomed.pop(fd, None)
        self._early.discard(fd)
        owner = self._owner_of.pop(fd, None)
        if owner is not None:
            left = self.by_owner.get(owner, 1) - 1
            if left > 0:
                self.by_owner[owner] = left
            else:
                self.by_owner.pop(owner, None)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._mon, zmq.POLLIN)
        next_sample = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_sample:
                next_sample = now + SAMPLE_S
                self._sample()
            try:
                if not poller.poll(int(SAMPLE_S * 1000)):
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

    def _sample(self) -> None:
        """Shut down each connection that sent more than the daemon read from it, plus its backlog."""
        with self._lock:
            now = time.monotonic()
            for fd, since in list(self._doomed.items()):  # past its tenant's cap, refused `busy` since
                if fd in self._waiting:                     # (its replies go out before it is cut)
                    if now - since >= DOOM_S:
                        del self._waiting[fd]
                        self.refused += 1
                        self._cut(fd)
                        del self._doomed[fd]
                elif fd not in self._early:  # (gone meanwhile) an early one waits for its ACCEPTED
                    del self._doomed[fd]
            fds = [(fd, True) for fd in self._authed] + [(fd, False) for fd in self._waiting]
        for fd, authed in fds:
            got = _bytes_received(fd)
            if got is None and not _is_socket(fd):  # closed, its DISCONNECTED lost (the monitor's queue
                with self._lock:                     # drops events past its high-water mark in a burst)
                    if fd in (self._authed if authed else self._waiting):
                        self._authed.discard(fd)
                        self._waiting.pop(fd, None)
                        self._forget(fd)
                        self._read.pop(fd, None)
                continue
            unread = _unsent(fd)
            if unread is not None and unread >= self._unread_of.get(fd, self.unread_cap):  # it does not read
                with self._lock:
                    if fd in (self._authed if authed else self._waiting):
                        self._authed.discard(fd)
                        self._waiting.pop(fd, None)
                        self._forget(fd)
                        self.silent += 1
                        self._cut(fd)
                continue
            if got is None or got - self._read.get(fd, 0) <= (self.authed_backlog if authed else self.waiting_backlog):
                continue
            with self._lock:
                if fd in (self._authed if authed else self._waiting):  # still that connection
                    self._authed.discard(fd)
                    self._waiting.pop(fd, None)
                    self._forget(fd)
                    self.overfed += 1
                    self._cut(fd)

    def _on(self, ev: dict) -> None:
        fd = ev.get("value")
        if not isinstance(fd, int):
            return
        with self._lock:
            if ev["event"] == zmq.EVENT_DISCONNECTED:
                self._read.pop(fd, None)  # (reset here, not at ACCEPTED: the loop may read first)
                self._exempt.discard(fd)
                self._uid_of.pop(fd, None)
                self._unread_of.pop(fd, None)
                if fd in self._cutting:
                    self._cutting.discard(fd)
                else:
                    self._authed.discard(fd)
                    self._waiting.pop(fd, None)
                    self._forget(fd)
                return
            if ev["event"] != zmq.EVENT_ACCEPTED:
                return
            if self.ipc:
                self._uid_of[fd] = uid = _peer_uid(fd)
                self._unread_of[fd] = _grow_sndbuf(fd) // 2
                if fd not in self._early and fd not in self._authed and fd not in self._waiting:
                    if uid == _OWN_UID:  # the operator's until a request shows a tenant's token
                        self._forget(fd)
                        self._read.setdefault(fd, 0)
                        self._exempt.add(fd)
                        return
            if fd in self._early:  # a request on it was read first: counted (or refused) already
                self._early.discard(fd)
                self._read.setdefault(fd, 0)
                if fd in self._doomed:  # refused: into the waiting ones, shut down DOOM_S after its refusal
                    self._waiting[fd] = None
                return
            self._cutting.discard(fd)  # (a descriptor is reused only after its DISCONNECTED)
            self._authed.discard(fd)
            self._waiting.pop(fd, None)
            self._forget(fd)
            # not = 0: under load the loop may have read this connection's first request before
            # this thread saw it accepted; zeroing it then cut the sender of the next 1 MiB request
            self._read.setdefault(fd, 0)
            if len(self._authed) + len(self._waiting) >= self.total_cap:
                self._cut(fd)
                return
            while len(self._waiting) >= self.waiting_cap:
                oldest, _ = self._waiting.popitem(last=False)
                self._cut(oldest)
            self._waiting[fd] = None

    def _cut(self, fd: int) -> None:
        if shut_accepted(fd, self._address):
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


_TCP_INFO = getattr(socket, "TCP_INFO", None)


def _peer_uid(fd: int) -> int:
    """The uid of the process at the other end of unix socket fd (SO_PEERCRED); -1 if unknown."""
    if _libc is None:
        return -1
    buf = ctypes.create_string_buffer(12)
    n = ctypes.c_uint32(12)
    if _libc.getsockopt(fd, socket.SOL_SOCKET, socket.SO_PEERCRED, buf, ctypes.byref(n)) != 0 or n.value < 12:
        return -1
    return struct.unpack("3i", buf.raw)[1]


def _grow_sndbuf(fd: int) -> int:
    """Raise a unix connection's send buffer towards SNDBUF (the kernel caps it at 2 x wmem_max);
    its size now (replies a peer has not read sit there: past half of it, it is not reading)."""
    if _libc is None:
        return 2 * UNREAD
    want = ctypes.c_int(SNDBUF)
    _libc.setsockopt(fd, socket.SOL_SOCKET, socket.SO_SNDBUF, ctypes.byref(want), 4)
    buf = ctypes.c_int(0)
    n = ctypes.c_uint32(4)
    if _libc.getsockopt(fd, socket.SOL_SOCKET, socket.SO_SNDBUF, ctypes.byref(buf), ctypes.byref(n)) != 0:
        return 2 * UNREAD
    return max(64 << 10, min(2 * UNREAD, buf.value))
try:
    _libc: Any = ctypes.CDLL(None, use_errno=True)
except OSError:  # (no libc to call: no byte counts, the backlog bound is off)
    _libc = None


def _unsent(fd: int) -> int | None:
    """Bytes in fd's send queue the peer has not acknowledged (SIOCOUTQ); None if unknown."""
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except (OSError, ValueError):
        return None


def _is_socket(fd: int) -> bool:
    """Whether fd is still an open socket (a stale entry's descriptor is closed, or reused by a file)."""
    try:
        return stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        return False


def _bytes_received(fd: int) -> int | None:
    """tcpi_bytes_received of the TCP connection on fd (Linux >= 4.1), read in place (no dup)."""
    if _libc is None or _TCP_INFO is None:
        return None
    buf = ctypes.create_string_buffer(256)
    n = ctypes.c_uint32(256)
    if _libc.getsockopt(fd, socket.IPPROTO_TCP, _TCP_INFO, buf, ctypes.byref(n)) != 0 or n.value < 136:
        return None
    return struct.unpack_from("=Q", buf.raw, 128)[0]
