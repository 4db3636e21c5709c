"""The gates' one cutter (kvbm/daemon/event_gate.py shut_accepted): it shuts an accepted connection of
the listener it is given, on ipc:// and on tcp:// (a wildcard bind included: before, the event
gate compared the bound 0.0.0.0 with the connection's own address and never cut there), and never
the listener itself or a socket of another listener."""

import socket

from kvbm.daemon.event_gate import listener_address, shut_accepted


def _pair(family, bind_to):
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind(bind_to)
    listener.listen(4)
    client = socket.socket(family, socket.SOCK_STREAM)
    client.connect(listener.getsockname() if family == socket.AF_INET else bind_to)
    conn, _ = listener.accept()
    client.settimeout(10)
    return listener, client, conn


def test_a_wildcard_tcp_listener_s_connection_is_cut_and_the_listener_never():
    listener, client, conn = _pair(socket.AF_INET, ("0.0.0.0", 0))
    other, oclient, oconn = _pair(socket.AF_INET, ("127.0.0.1", 0))
    try:
        address = listener_address(f"tcp://0.0.0.0:{listener.getsockname()[1]}")
        assert address == ("", listener.getsockname()[1])
        assert not shut_accepted(listener.fileno(), address)  # the listener: same port, no peer
        assert not shut_accepted(oconn.fileno(), address)  # another listener's connection
        assert shut_accepted(conn.fileno(), address)
        assert client.recv(1) == b""  # the peer sees the connection end
        listener.settimeout(5)
        c2 = socket.create_connection(("127.0.0.1", listener.getsockname()[1]), timeout=5)
        listener.accept()[0].close()  # the listener still accepts
        c2.close()
    finally:
        for s in (listener, client, conn, other, oclient, oconn):
            s.close()


def test_an_ipc_listener_s_connection_is_cut_and_the_listener_never(tmp_path):
    path = str(tmp_path / "ev.sock")
    listener, client, conn = _pair(socket.AF_UNIX, path)
    try:
        address = listener_address(f"ipc://{path}")
        assert address == path
        assert not shut_accepted(listener.fileno(), address)
        assert shut_accepted(conn.fileno(), address)
        assert client.recv(1) == b""
    finally:
        for s in (listener, client, conn):
            s.close()
