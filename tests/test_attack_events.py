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
