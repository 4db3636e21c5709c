"""daemon.events_token: the event streams' own credential, which tenants' clients do not hold.

With only daemon.token, the event sockets' PLAIN password is the client token, so any tenant's
client could subscribe to every namespace's rows and engine hashes (SECURITY.md). With
events_token set, the three event sockets (events, kv_events, kv_events_replay) take that
credential and refuse the client token; requests still take the client token only.
"""

from __future__ import annotations

import os

import pytest
import zmq

from kvbm.config import ConfigError
from kvbm.daemon.config import DaemonConfig
from servedaemon import Served, block, make_keys
from test_daemon_events import _handshake


def test_config_events_token_rules(tmp_path):
    with pytest.raises(ConfigError, match="events_token equals daemon.token"):
        DaemonConfig.from_dict({"token": "same", "events_token": "same"})
    # the event streams beyond loopback need a credential: events_token alone is one
    ok = DaemonConfig.from_dict({"events": "tcp://0.0.0.0:5558", "kv_events": "tcp://0.0.0.0:5560",
                                 "events_token": "router"})
    assert ok.subscriber_token == "router" and ok.token == ""
    # ... but the request socket beyond loopback still needs the client token
    with pytest.raises(ConfigError, match="daemon.address 'tcp://0.0.0.0:5557' is "):
        DaemonConfig.from_dict({"address": "tcp://0.0.0.0:5557", "events_token": "router"})
    # without events_token the streams keep the client token (as before)
    assert DaemonConfig.from_dict({"token": "t"}).subscriber_token == "t"
    # a token file others may read is refused, and named by its own key
    f = tmp_path / "ev.token"
    f.write_text("router-secret")
    os.chmod(f, 0o644)
    with pytest.raises(ConfigError, match="events_token_file"):
        DaemonConfig.from_dict({"events_token_file": str(f)})
    os.chmod(f, 0o600)
    assert DaemonConfig.from_dict({"events_token_file": str(f)}).subscriber_token == "router-secret"
    with pytest.raises(ConfigError, match="daemon.events_token must be a string"):
        DaemonConfig.from_dict({"events_token": 5})


def test_a_tenant_token_cannot_subscribe_when_routers_have_their_own(tmp_path):
    d = Served(tmp_path, "ev", daemon={
        "token": "client-t", "events_token": "router-t", "events": "tcp://127.0.0.1:*",
        "kv_events": f"ipc://{tmp_path}/kv.sock", "kv_events_replay": f"ipc://{tmp_path}/kvr.sock"}).start()
    ctx = zmq.Context()
    try:
        for address, kind in ((d.info["events"], zmq.SUB), (f"ipc://{tmp_path}/kv.sock", zmq.SUB),
                              (f"ipc://{tmp_path}/kvr.sock", zmq.DEALER)):
            for creds, outcome in ((None, "failed"), ("client-t", "failed"), ("router-t", "ok")):
                sock = ctx.socket(kind)
                sock.setsockopt(zmq.LINGER, 0)
                if creds is not None:
                    sock.plain_username, sock.plain_password = b"kvbm", creds.encode()
                assert _handshake(sock, address) == outcome, (address, creds)
                sock.close(0)
        # requests take the client token, not the router's
        with d.client(token="client-t") as c:
            k = make_keys("events-token", 1)
            assert c.store(k, [block(k[0])]) == 1 and c.lookup(k)[0] == 1
        with pytest.raises(Exception, match="unauthorized|auth"):
            with d.client(token="router-t") as c:
                c.lookup(make_keys("x", 1))
    finally:
        ctx.term()
        d.stop()


def test_the_event_sockets_password_compares_in_constant_time_and_is_never_logged():
    # pyzmq's authenticator checks `password == stored`: the stored one is a _Secret, whose
    # __eq__ (reached because str does not know it) is hmac.compare_digest
    from kvbm.daemon.publisher import _Secret

    s = _Secret("tok-en")
    assert "tok-en" == s and b"tok-en" == s
    assert not ("tok-em" == s) and not ("tok-en " == s) and not ("" == s) and not (None == s)  # noqa: E711
    assert "tok-en" not in repr(s)
