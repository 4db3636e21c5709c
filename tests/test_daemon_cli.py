"""`kvbm serve` on the same-node socket: who may connect, and starts that fail cleanly (issue 12
item 3, issue 13 items 6-7)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from test_daemon import Daemon, daemons, make_keys, block  # noqa: F401  (daemons is a fixture)

NOBODY = 65534


def serve(cfg_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVBM_")}
    return subprocess.run([sys.executable, "-m", "kvbm.cli", "serve", "--config", str(cfg_path)],
                          capture_output=True, text=True, timeout=180, env=env)


def second_config(d: Daemon, tmp_path: Path, address: str) -> Path:
    cfg = yaml.safe_load(d.config.read_text())
    cfg["daemon"].update(address=address, shm_name=d.shm + "-second")
    if address.startswith("tcp://"):
        cfg["daemon"]["token"] = "s3cret-s3cret"  # (tcp:// needs one)
    p = tmp_path / "second.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def left_by_second(d: Daemon) -> set[str]:
    """/dev/shm files of the second daemon (its windows are named after its shm_name): other
    daemons on the box (other tests, other xdist workers) come and go meanwhile."""
    return {n for n in os.listdir("/dev/shm") if n.startswith(d.shm + "-second")}


def test_serve_on_a_socket_in_use_is_one_line_and_leaves_nothing(daemons, tmp_path):
    d = daemons(g2=8)
    assert left_by_second(d) == set()
    r = serve(second_config(d, tmp_path, d.address))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "address already in use" in r.stderr and d.address in r.stderr
    assert left_by_second(d) == set()  # no G2 or window file left
    with d.client(timeout=120) as c:  # the first daemon's socket was not taken over
        assert c.lookup(make_keys("x", 1)) == (0, [])


def test_serve_on_a_port_in_use_is_one_line(daemons, tmp_path):
    d = daemons(g2=8)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        assert left_by_second(d) == set()
        r = serve(second_config(d, tmp_path, address))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert address in r.stderr and "in use" in r.stderr
    assert left_by_second(d) == set()


def test_default_socket_is_private(daemons):
    d = daemons(g2=8)
    path = d.address[len("ipc://"):]
    assert os.stat(path).st_mode & 0o777 == 0o600


def as_uid(uid: int, fn) -> str:
    """fn() in a forked child running as `uid` (no exec: the venv may be unreadable to it)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only plain syscalls and fresh sockets, then _exit
        out = ""
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            out = str(fn())
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            out = f"error {exc!r}"
        finally:
            os.write(w, out.encode())
            os._exit(0)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()


def connect_probe(path: str) -> str:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except PermissionError:
        return "refused"
    finally:
        s.close()
    return "connected"


needs_root = pytest.mark.skipif(os.getuid() != 0, reason="switching to another uid needs root (run the suite as root)")


@needs_root
def test_another_uid_cannot_connect_on_the_default_transport(daemons):
    d = daemons(g2=8)
    path = d.address[len("ipc://"):]
    assert as_uid(NOBODY, lambda: connect_probe(path)) == "refused"
    assert connect_probe(path) == "connected"  # (the same probe as the daemon's own user)


@needs_root
def test_quota_per_uid_holds_across_sessions_and_namespaces(daemons):
    """An operator opened the socket to another user (chmod): that uid's sessions, in four
    namespaces, share one uid quota (daemon.namespace_share of G2), learnt from SO_PEERCRED."""
    import numpy as np

    from kvbm.client import Client, RemoteError
    from test_daemon import LAYOUT

    import shutil
    import uuid

    folder = f"/tmp/kvbm-uq-{uuid.uuid4().hex[:10]}"  # (pytest's tmp folders are closed to others)
    d = daemons(g2=64, namespace_share=0.25, address=f"ipc://{folder}/d.sock", lease_s=60.0)  # pins held throughout
    keys = make_keys("uq", 40)
    os.chmod(folder, 0o755)
    os.chmod(f"{folder}/d.sock", 0o666)

    def nobody() -> str:
        pinned = refused = 0
        cs = [Client(d.address, model=f"tenant-{i}", layout=LAYOUT, timeout=120) for i in range(4)]
        for i, c in enumerate(cs):
            assert c.store(keys[i * 10:i * 10 + 8], [np.zeros(LAYOUT.block_nbytes, np.uint8)] * 8) == 8
        for i, c in enumerate(cs):
            try:
                pinned += c.pin(keys[i * 10:i * 10 + 8])
            except RemoteError as exc:
                refused += exc.code == "quota"
        uids = cs[0].stats()["daemon"]["state"]["uids"]
        for c in cs:
            c.close()
        return f"{pinned} {refused} {uids}"

    with d.client(timeout=120) as mine:  # root's own client is not held to nobody's quota
        assert mine.store(keys[:4], [block(k) for k in keys[:4]]) == 4
        assert mine.pin(keys[:4]) == 4
        out = as_uid(NOBODY, nobody)
    shutil.rmtree(folder, ignore_errors=True)
    assert out == "16 2 2", out  # 2 of 4 namespaces' pins fit in nobody's 16; two uids
