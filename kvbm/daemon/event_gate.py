"""The event sockets' connections, bounded (in the event publisher's process, publisher.py).

    Gate([socket, ...], cap=default_cap())     watches each socket's connections (its own thread)
      .live(i) -> int                          connections socket i holds now
      .cut                                     connections shut down past the cap, in all
      .close()                                 before the sockets' context ends

Without a token an event socket on loopback (the default `events: tcp://127.0.0.1:5558`) takes any
local process, and each connection costs the daemon a file descriptor. At its RLIMIT_NOFILE the
daemon can accept no client any more, and on an ipc:// listener libzmq 4.3 aborts the whole
process (EMFILE is not among the accept errors it expects: "Too many open files
(src/ipc_listener.cpp:297)"), so a local user with no credentials could stop every tenant's
cache by opening connections. With a token the handshake that refuses a stranger still holds a
descriptor while it lasts.

The gate reads each socket's monitor: ACCEPTED counts a connection (its descriptor), DISCONNECTED
(which libzmq also reports for a refused or timed-out handshake) uncounts it. A connection accepted
while the socket already holds `cap` is shut down at once: shutdown(2) on a duplicate of its
descriptor, after checking that the descriptor is still a socket accepted by that listener (its
local address is the listener's), so libzmq closes it as a peer that left. So the event sockets
hold at most `cap` descriptors each (MAX_EVENT_PEERS, 128, or a 16th of RLIMIT_NOFILE if less) (plus the few in flight between an accept and its monitor
event), whatever connects; a subscriber past the cap is refused until others leave (the stream,
not the daemon, is what a connection flood can deny). A descriptor reused by then for anything
else is left alone.

The gate is reactive (a thread cuts what libzmq already accepted), and on a loaded box a fast flood
outran it. So it runs in the event publisher, the child process that holds the public event sockets
(publisher.py): there it keeps a flood on an idle box from killing the publisher; a flood that
outruns it kills the publisher (EMFILE), which the daemon restarts, and never the daemon, whose
descriptors no event connection ever takes.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger("kvbm.daemon")
MAX_EVENT_PEERS = 128  # connections one event socket holds (subscribers, replayers, handshakes)


def default_cap() -> int:
    """MAX_EVENT_PEERS, or a 16th of the descriptors the process may open if that is less (the
    daemon's clients, G3 and G4 need the rest)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return MAX_EVENT_PEERS
    if soft == getattr(resource, "RLIM_INFINITY", -1) or soft <= 0:
        return MAX_EVENT_PEERS
    return max(4, min(MAX_EVENT_PEERS, soft // 16))


class Gate:
    def __init__(self, sockets: list, cap: int | None = None) -> None:
        self.cap = default_cap() if cap is None else cap
        self.cut = 0
        self._watch: list[tuple[Any, Any, set]] = []  # (monitor socket, listener's address, live fds)
        for sock in sockets:
            mon = sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
            self._watch.append((mon, listener_address(sock.getsockopt(zmq.LAST_ENDPOINT).decode()), set()))
        self._sockets = list(sockets)
        self._stop = threading.Event()
        self._cutting: set[int] = set()  # fds shut down here whose DISCONNECTED has not come yet
        self._thread = threading.Thread(target=self._run, name="kvbm-event-gate", daemon=True)
        self._thread.start()

    def live(self, i: int) -> int:
        return len(self._watch[i][2])

    def _run(self) -> None:
        poller = zmq.Poller()
        for mon, _, _ in self._watch:
            poller.register(mon, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                ready = dict(poller.poll(100))
            except zmq.ZMQError:
                return
            for mon, address, live in self._watch:
                while mon in ready:
                    try:
                        ev = recv_monitor_message(mon, zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    except zmq.ZMQError:
                        return
                    self._on(ev, address, live)

    def _on(self, ev: dict, address: Any, live: set) -> None:
        fd = ev.get("value")
        if not isinstance(fd, int):
            return
        if ev["event"] == zmq.EVENT_DISCONNECTED:
            if fd in self._cutting:
                self._cutting.discard(fd)
            else:
                live.discard(fd)
        elif ev["event"] == zmq.EVENT_ACCEPTED:
            if len(live) < self.cap:
                live.add(fd)
            elif shut_accepted(fd, address):
                self._cutting.add(fd)
                self.cut += 1
                if self.cut == 1 or self.cut % 1000 == 0:
                    log.warning("event socket %s: %d connections open, the most it holds; refused %d in all",
                                address, len(live), self.cut)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock, (mon, _, _) in zip(self._sockets, self._watch):
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
            mon.close(0)


def listener_address(endpoint: str) -> Any:
    """What getsockname() says on a connection this endpoint's listener accepted: the ipc:// path,
    or (host, port) with host "" for a wildcard tcp bind (any local address)."""
    if endpoint.startswith("ipc://"):
        return endpoint[len("ipc://"):]
    host, port = endpoint.split("://", 1)[1].rsplit(":", 1)
    host = host.strip("[]")
    return ("" if host in ("0.0.0.0", "::", "*") else host, int(port))


def shut_accepted(fd: int, address: Any) -> bool:
    """shutdown(2) the connection on fd if it is still one accepted by the listener at `address`
    (listener_address): never the listener itself, nor whatever reused the descriptor."""
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
        if isinstance(address, tuple):
            ours = (s.type == socket.SOCK_STREAM and isinstance(name, tuple) and name[1] == address[1]
                    and (not address[0] or name[0] == address[0]))
        else:
            ours = isinstance(name, (str, bytes)) and os.fsdecode(name) == address
        ours = ours and _connected(s)
        if ours:
            s.shutdown(socket.SHUT_RDWR)
        return ours
    except OSError:
        return False
    finally:
        s.close()  # the duplicate only


def _connected(s: socket.socket) -> bool:
    """An accepted connection, not a listener bound to the same address."""
    try:
        s.getpeername()
    except OSError:
        return False
    return True
