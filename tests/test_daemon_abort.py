"""A daemon that fails to start after its event streams came up leaves nothing running.

Daemon.__init__ rolls back what it built when a later step fails (here: the metrics port is
taken). The event streams (events.py's PUB and kv_events.py's publisher, replay socket and
threads) are closed with the rest: before, only the PUB socket was closed by name, and the KV-event
publisher's threads and sockets stayed in the process (a `kvbm serve` exits then, but an embedding
process, or a test, kept them). Condition waits with deadlines of 60 s.
"""

from __future__ import annotations

import socket
import sys
import threading
import uuid
from pathlib import Path

import pytest

pytest.importorskip("zmq")
pytest.importorskip("msgpack")

sys.path.insert(0, str(Path(__file__).parent))
from daemonproc import wait_until  # noqa: E402
from servedaemon import LAYOUT_DICT  # noqa: E402


def test_a_failed_start_after_the_event_streams_leaves_no_thread(tmp_path):
    from kvbm import KVBMConfig
    from kvbm.daemon.config import DaemonConfig
    from kvbm.daemon.server import Daemon

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    before = {t.ident for t in threading.enumerate()}
    cfg = KVBMConfig.from_dict({
        "namespace": {"model": "tiny"}, "layout": LAYOUT_DICT,
        "tiers": [{"name": "g2", "capacity": 16, "eviction": "lru", "storage": "host"}],
        "daemon": {"address": f"ipc://{tmp_path}/d.sock", "events": f"ipc://{tmp_path}/ev.sock",
                   "metrics": f"127.0.0.1:{port}", "shm_name": f"kvbm-test-{uuid.uuid4().hex[:12]}",
                   "nixl": False, "kv_events": f"ipc://{tmp_path}/kv.sock",
                   "kv_events_replay": f"ipc://{tmp_path}/kvr.sock"}})
    try:
        with pytest.raises(OSError):
            Daemon(cfg, DaemonConfig.from_dict(cfg.daemon))
        assert wait_until(lambda: {t.ident for t in threading.enumerate()} <= before), \
            [t.name for t in threading.enumerate() if t.ident not in before]
    finally:
        taken.close()
