"""The wire half of a kvbm.client.Client: one DEALER socket to the daemon, request ids, timeouts.

    Wire.call(op, **fields) -> reply        one request, one reply; no_session: hello again, retry once
    Wire._call(op, fields) -> reply         the same without the re-hello (hello itself, one-shot ops)
    Wire._submit(op, **fields) -> id        send without waiting (pipelined batches) ...
    Wire._collect(id, op) -> reply          ... and take its reply later, keeping others' for their turn
    Wire._send(msg)                         fire and forget (a release whose reply is dropped)
    Wire._roundtrip / _recv                 wait for one reply with a deadline; a fresh socket on timeout
    Wire._heartbeat()                       the lease keeper, on its own thread and socket

What a timeout means depends on the op (the three sets at the bottom): ops that leave state in
the daemon (prepare, pin) are cancelled, ops that release state (commit, release, unpin) are
retried once under the same request id (the daemon answers a repeat from its reply cache), and
ops bound to the old session's handles or window are never redone after a re-hello.

Wire holds no session state of its own: Client (kvbm/client.py) sets `address`, `token`,
`timeout`, `session`, `lease_s`, `_ctx`, `_sock`, `_lock`, `_next`, `_stash`, `_stop`,
`rehellos` in its constructor and provides `_hello()`, which `call` uses to reopen a session.
"""

from __future__ import annotations

import time
from typing import Any

try:
    import zmq
except ImportError as exc:  # the daemon extra
    raise ImportError("kvbm.client needs pyzmq and msgpack: pip install 'kvbm-tiered[daemon]'") from exc

from .daemon.protocol import RemoteError, pack, request, unpack

__all__ = ["Wire"]


class Wire:
    """Request/reply over the client's socket (a base of Client; see the module docstring)."""

    def _socket(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.address)
        return sock

    def _new_request_socket(self) -> None:
        self._sock = self._socket()
        self._rcvtimeo = -1

    def _recv(self, left: float) -> bytes | None:
        """The next message on the request socket, waiting at most `left` seconds; None then.
        A blocking recv with a timeout (set only when it changes): a poll before each recv cost
        a zmq Poller and its syscalls on every request."""
        if left <= 0:
            return None
        ms = int(left * 1000) + 1
        if ms != self._rcvtimeo:
            self._sock.setsockopt(zmq.RCVTIMEO, ms)
            self._rcvtimeo = ms
        try:
            return self._sock.recv()
        except zmq.Again:
            return None

    def call(self, op: str, **fields: Any) -> dict:
        """One request, one reply; RemoteError on an error reply, TimeoutError if none comes.

        A session the daemon no longer knows is reopened and the request retried once, for
        requests that name no handle of the old session (those raise RemoteError no_session)."""
        with self._lock:
            try:
                return self._call(op, fields)
            except RemoteError as exc:
                if exc.code != "no_session" or op in _SESSION_BOUND or self._stop.is_set():
                    raise
            self._hello()
            self.rehellos += 1
            return self._call(op, fields)

    def _call(self, op: str, fields: dict) -> dict:
        with self._lock:
            rid = self._next
            self._next += 1
            msg = request(op, rid, self.token, self.session, **fields)
            try:
                reply = self._roundtrip(op, rid, msg)
            except TimeoutError:
                if op in _CANCELLED_ON_TIMEOUT and self.session is not None:
                    # The daemon may still do it later: _roundtrip sent a cancel so that it is
                    # undone then (or refused, if the cancel gets there first).
                    raise
                if op not in _RETRIED_ON_TIMEOUT:
                    raise
                reply = self._roundtrip(op, rid, msg)  # same id: answered from the daemon's cache if done
        if not reply.get("ok"):
            raise RemoteError(str(reply.get("error")), str(reply.get("message")))
        return reply

    def _take_id(self) -> int:
        rid = self._next
        self._next += 1
        return rid

    def _send(self, msg: bytes) -> None:
        try:
            self._sock.send(msg, zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def _submit(self, op: str, **fields: Any) -> int:
        """Send a request without waiting for it (under the lock); _collect takes its reply."""
        rid = self._take_id()
        self._stash[rid] = {}
        self._sock.send(request(op, rid, self.token, self.session, **fields))
        return rid

    def _collect(self, rid: int, op: str) -> dict:
        """The reply to a submitted request; replies to other submitted ones are kept for later."""
        reply = self._stash.pop(rid, None) or None
        deadline = time.monotonic() + self.timeout
        left = self.timeout
        while reply is None:
            data = self._recv(left)
            if data is None:
                self._sock.close(0)
                self._new_request_socket()
                self._stash.clear()
                raise TimeoutError(f"kvbm daemon at {self.address} did not answer {op} in {self.timeout}s")
            left = deadline - time.monotonic()
            r = unpack(data, 1 << 22)
            if r.get("id") == rid:
                reply = r
            elif r.get("id") in self._stash:
                self._stash[r["id"]] = r
        if not reply.get("ok"):
            raise RemoteError(str(reply.get("error")), str(reply.get("message")))
        return reply

    def _roundtrip(self, op: str, rid: int, msg: bytes) -> dict:
        self._sock.send(msg)
        deadline = time.monotonic() + self.timeout
        left = self.timeout
        while True:
            data = self._recv(left)
            if data is None:
                # a fresh socket, so a late reply cannot be taken for the next request's. The
                # cancel goes out on the old, connected socket, lingering so that it reaches the
                # daemon's socket even while the daemon is stopped (a fresh socket cannot finish
                # its handshake then, and its queue was dropped at close: the request leaked)
                old = self._sock
                if op in _CANCELLED_ON_TIMEOUT and self.session is not None:
                    try:
                        old.send(request("cancel", self._take_id(), self.token, self.session,
                                         cancels=rid), zmq.NOBLOCK)
                    except zmq.ZMQError:
                        pass
                    old.close(2000)
                else:
                    old.close(0)
                self._new_request_socket()
                raise TimeoutError(f"kvbm daemon at {self.address} did not answer {op} in {self.timeout}s")
            reply = unpack(data, 1 << 22)
            if reply.get("id") == rid:
                return reply
            left = deadline - time.monotonic()  # a late reply to an older request: wait on

    def _heartbeat(self) -> None:
        period = max(0.05, self.lease_s / 4)
        sock = self._socket()  # its own socket: zmq sockets are not shared across threads
        try:
            while not self._stop.wait(period):
                msg = {"op": "heartbeat", "id": 0, "session": self.session}
                if self.token:
                    msg["auth"] = self.token
                try:
                    sock.send(pack(msg), zmq.NOBLOCK)
                    while sock.poll(0):
                        sock.recv()
                except zmq.ZMQError:
                    pass
        finally:
            sock.close(0)


_SESSION_BOUND = frozenset({"hello", "bye", "store_commit", "load_release", "cancel",  # name a handle
                            "store", "load"})  # or scratch slots of the old window: _one_shot redoes them
_CANCELLED_ON_TIMEOUT = frozenset({"store_prepare", "load_prepare", "pin", "lookup_pin"})  # they leave state behind
_RETRIED_ON_TIMEOUT = frozenset({"store_commit", "load_release", "unpin"})  # they release state
