"""Another local user against the daemon's socket path (session 13 red team, H52).

The same-node default socket is `ipc://$XDG_RUNTIME_DIR/kvbm/kvbm.sock`, else
`/tmp/kvbm-<uid>/kvbm.sock`. /tmp is everyone's: another user may create `/tmp/kvbm-<our uid>`
before the daemon does, as a folder of theirs or as a symbolic link of theirs pointing at one of
ours (which they re-point later). Whoever controls that folder controls which process answers
at the socket path: every client's stores (bytes) go to them and every load gets their bytes.

Broke, fixed (transport.unsafe_path, check_client_address):
- a daemon running as root accepted a socket folder owned by another user (the uid check
  exempted root), so a user who pre-created it could swap the socket afterwards;
- the folder was checked with stat(), which follows a symbolic link: an attacker's link to a
  folder of ours passed, and was re-pointed after the bind;
- a client connected to the default address whoever owned its folder.
Now the daemon refuses (one line, exit 2) a socket folder another user owns, reached through
another user's symbolic link, or inside a folder others may write that is not sticky; a client
refuses the same before it connects (the default address: a folder not its own user's or
root's too).

The "attacker" here is uid 65534: the test (root) creates the entries and hands them over
with lchown, exactly what that user could have made in a sticky /tmp.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

zmq = pytest.importorskip("zmq")

from kvbm.config import ConfigError  # noqa: E402
from kvbm.daemon import transport  # noqa: E402
from servedaemon import LAYOUT, LAYOUT_DICT, Served  # noqa: E402

NOBODY = 65534
pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="hands files to another uid (lchown): needs root")


def _sticky(tmp_path):
    """A /tmp of our own: mode 1777, root's."""
    t = tmp_path / "tmp"
    t.mkdir()
    t.chmod(0o1777)
    return t


def _serve(tmp_path, address: str) -> subprocess.CompletedProcess:
    cfg = {"namespace": {"model": "tiny"}, "layout": LAYOUT_DICT,
           "tiers": [{"name": "g2", "capacity": 8, "eviction": "lru", "storage": "host"}],
           "daemon": {"address": address, "events": "", "metrics": "", "nixl": False,
                      "shm_name": f"kvbm-test-paths-{os.getpid()}"}}
    path = tmp_path / "kvbm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVBM_")}
    return subprocess.run([sys.executable, "-m", "kvbm.cli", "serve", "--config", str(path)],
                          capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL)


def _one_line_refusal(p: subprocess.CompletedProcess, *words: str) -> None:
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    for w in words:
        assert w in lines[0], lines[0]
    assert '"ready"' not in p.stdout


def test_a_socket_folder_another_user_created_first_is_refused_by_a_root_daemon(tmp_path):
    """uid 65534 makes `kvbm-0` (0700, theirs) in a sticky /tmp before the daemon starts. Before,
    a daemon running as root accepted it (the owner check exempted root) and bound its socket
    in a folder the attacker may change at will. Now: one line naming the folder's owner, exit
    2, nothing bound."""
    sticky = _sticky(tmp_path)
    folder = sticky / "kvbm-0"
    folder.mkdir(mode=0o700)
    os.lchown(folder, NOBODY, NOBODY)
    p = _serve(tmp_path, f"ipc://{folder}/kvbm.sock")
    _one_line_refusal(p, str(folder), f"uid {NOBODY}")
    assert not (folder / "kvbm.sock").exists()


def test_a_symbolic_link_of_another_user_as_the_socket_folder_is_refused(tmp_path):
    """uid 65534 makes `kvbm-0` a symbolic link to a folder of ours (0700, root's): stat()
    followed it and passed; the attacker re-points it once the daemon bound, and clients
    connecting later reach their socket. Now the daemon refuses the link (one line, exit 2),
    and so does a client."""
    sticky = _sticky(tmp_path)
    ours = tmp_path / "ours"
    ours.mkdir(mode=0o700)
    link = sticky / "kvbm-0"
    link.symlink_to(ours)
    os.lchown(link, NOBODY, NOBODY)
    p = _serve(tmp_path, f"ipc://{link}/kvbm.sock")
    _one_line_refusal(p, str(link), "symbolic link", f"uid {NOBODY}")
    assert not (ours / "kvbm.sock").exists()
    from kvbm.client import Client

    with pytest.raises(ConfigError, match="symbolic link"):
        Client(f"ipc://{link}/kvbm.sock", model="tiny", layout=LAYOUT, timeout=5.0)
    # a link of our own (or root's) is ours to point: the daemon serves through it
    os.lchown(link, 0, 0)
    assert transport.unsafe_path(str(link)) == ""


def test_a_socket_folder_inside_a_folder_others_may_write_is_refused(tmp_path):
    """A folder others may write, without the sticky bit: any of them may rename our socket's
    folder away and put theirs in its place. Refused by the daemon and the client alike."""
    open_dir = tmp_path / "shared"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    p = _serve(tmp_path, f"ipc://{open_dir}/kvbm/kvbm.sock")
    _one_line_refusal(p, "others may write", str(open_dir))
    from kvbm.client import Client

    with pytest.raises(ConfigError, match="others may write"):
        Client(f"ipc://{open_dir}/kvbm/kvbm.sock", model="tiny", layout=LAYOUT, timeout=5.0)


def test_a_client_on_the_default_address_refuses_a_folder_another_user_made(tmp_path, monkeypatch):
    """The default address's folder (here the test's own /tmp) was created by uid 65534, with a
    socket of theirs in it (a plain listening Unix socket, as their fake daemon). The client
    refuses before it connects: the fake saw no connection. A folder of ours there is fine."""
    import socket

    sticky = _sticky(tmp_path)
    folder = sticky / "kvbm-0"
    folder.mkdir(mode=0o755)
    fake = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fake.bind(str(folder / "kvbm.sock"))
    fake.listen(8)
    fake.setblocking(False)
    os.lchown(folder, NOBODY, NOBODY)
    import kvbm.client as client_mod

    monkeypatch.setattr(client_mod, "default_address", lambda: f"ipc://{folder}/kvbm.sock")
    try:
        with pytest.raises(ConfigError, match=f"uid {NOBODY}"):
            client_mod.Client(model="tiny", layout=LAYOUT, timeout=5.0)
        with pytest.raises(BlockingIOError):
            fake.accept()  # no one connected to the fake daemon
        # named explicitly, another uid's folder may be an operator's daemon: not refused here
        transport.check_client_address(f"ipc://{folder}/kvbm.sock", default=False)
        os.lchown(folder, 0, 0)
        transport.check_client_address(f"ipc://{folder}/kvbm.sock", default=True)
    finally:
        fake.close()


def test_a_daemon_in_a_folder_of_its_own_still_serves(tmp_path):
    """The checks refuse nothing of the usual layouts: a 0700 folder of ours under root's 0700
    ones, reached through a root-owned symbolic link."""
    real = tmp_path / "run"
    real.mkdir(mode=0o700)
    link = tmp_path / "run-link"
    link.symlink_to(real)
    d = Served(tmp_path, "d", daemon={"address": f"ipc://{link}/kvbm/d.sock"}).start()
    try:
        with d.client() as c:
            assert c.lookup([b"k" * 16])[0] == 0
    finally:
        d.stop()
