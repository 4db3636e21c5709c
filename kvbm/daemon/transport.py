"""The daemon's request socket: where it listens and who is on the other end.

    default_address() -> "ipc://<runtime dir>/kvbm.sock"   the same-node default
    bind(router, address)                   0700 folder, 0600 socket; in-use and bad paths -> ConfigError
    peer_credentials(frame) -> (uid, pid)   from the kernel (SO_PEERCRED) on ipc://; (-1, 0) on tcp://
    alive(pid) -> bool

On the default ipc:// transport the file system is the access check: the socket lives in a
folder only the daemon's user may enter (0700) and is itself 0600, so another local user's
connect() fails with EACCES before a byte is read. libzmq reads the peer's SO_PEERCRED on
every ipc connection and reports it as the message property Peer-Address
("localhost:<uid>:<gid>:<pid>"); the daemon files each session under that uid (session and
quota limits per uid) and pid (a dead client's session is released at once, not a lease
later). tcp:// is for explicit configuration; beyond loopback it needs daemon.token.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from typing import Any

from ..config import ConfigError  # (no zmq here at import: config.py imports this module)


def runtime_dir() -> str:
    """$XDG_RUNTIME_DIR/kvbm when the session has one, else /tmp/kvbm-<uid>."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        return os.path.join(base, "kvbm")
    return f"/tmp/kvbm-{os.getuid()}"


def default_address() -> str:
    return f"ipc://{runtime_dir()}/kvbm.sock"


def bind(router: Any, address: str, key: str = "daemon.address") -> str:
    """Bind `router` to `address` (the last endpoint is returned). For ipc://, the folder is
    created 0700 (an existing one must be ours and not writable by others) and the socket
    file is 0600; a path where a live daemon answers is refused, a stale one replaced."""
    if address.startswith("ipc://"):
        path = address[len("ipc://"):]
        _prepare_ipc(path, key)
        old = os.umask(0o177)  # the socket file is born 0600: no window where others may connect
        try:
            _bind(router, address, key)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
    else:
        _bind(router, address, key)
    import zmq

    return router.getsockopt(zmq.LAST_ENDPOINT).decode()


def _bind(router: Any, address: str, key: str) -> None:
    import zmq

    try:
        router.bind(address)
    except zmq.ZMQError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"{key} {address}: address already in use (another kvbm serve?); "
                              f"stop it or choose another address") from None
        raise ConfigError(f"{key} {address}: cannot listen there: {exc.strerror}") from None


def _prepare_ipc(path: str, key: str) -> None:
    folder = os.path.dirname(path) or "."
    try:
        unsafe_path(folder)  # a folder someone else may swap (their symlink, their parent): refuse first
        os.makedirs(folder, mode=0o700, exist_ok=True)
        st = os.stat(folder)
    except OSError as exc:
        raise ConfigError(f"{key} ipc://{path}: cannot create its folder {folder}: {exc.strerror}") from None
    why = unsafe_path(folder)
    if why:
        raise ConfigError(f"{key} ipc://{path}: {why}; choose a folder only you can change")
    if st.st_uid != os.getuid():
        # root included: a folder another user owns (pre-created in /tmp, say) is theirs to swap
        # the socket in, and every client then talks to their process
        raise ConfigError(f"{key} ipc://{path}: folder {folder} belongs to uid {st.st_uid}, not to this "
                          f"user; choose a folder of your own")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        raise ConfigError(f"{key} ipc://{path}: others may write folder {folder} (they could replace the "
                          f"socket); use a folder only you can write")
    if os.path.exists(path):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
        except OSError:  # nobody listens: a socket left by a killed daemon
            os.unlink(path)
        else:
            raise ConfigError(f"{key} ipc://{path}: address already in use (a daemon answers there); "
                              f"stop it or choose another address")
        finally:
            s.close()


def unsafe_path(folder: str, _depth: int = 0) -> str:
    """Why another user could change what `folder` leads to ("" when no one but us and root can):
    a symbolic link on the way that someone else owns (they re-point it), or a folder on the way
    that others may write and that is not sticky (they rename what is in it, or make the part we
    are about to make). Parts below the first missing one are not checked (makedirs creates them
    0700, ours)."""
    me = os.getuid()
    parts = os.path.abspath(folder).split(os.sep)
    cur = os.sep
    for i, name in enumerate(parts[1:], 1):
        parent = cur
        cur = os.path.join(cur, name)
        try:
            pst = os.stat(parent)
        except OSError:
            return ""  # (not ours to judge: the bind or connect reports it)
        # checked before `cur` exists too: in a folder others may write, whoever comes first makes it
        if pst.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not pst.st_mode & stat.S_ISVTX:
            return f"others may write folder {parent} (they could rename {cur})"
        try:
            lst = os.lstat(cur)
        except OSError:
            return ""  # not there yet (makedirs creates it 0700, ours), or not ours to judge
        if stat.S_ISLNK(lst.st_mode):
            if lst.st_uid not in (me, 0):
                return f"{cur} is a symbolic link of uid {lst.st_uid} (they could point it elsewhere)"
            target = os.path.realpath(cur)
            rest = os.path.join(target, *parts[i + 1:]) if i + 1 < len(parts) else target
            return unsafe_path(rest, _depth + 1) if rest != folder and _depth < 16 else ""
    return ""


def check_client_address(address: str, default: bool) -> None:
    """Before a client connects to an ipc:// socket: ConfigError when someone other than the
    daemon's user could have put their own socket there. `default` (the same-node default
    address, in /tmp/kvbm-<uid> without XDG_RUNTIME_DIR): the folder must be ours or root's, as
    the daemon makes it; another local user who created /tmp/kvbm-<our uid> first would
    otherwise get every store's bytes and answer every load with theirs. An address the user
    named may be an operator's daemon of another uid: only symlinks and folders others may
    swap are refused."""
    if not address.startswith("ipc://"):
        return
    path = address[len("ipc://"):]
    folder = os.path.dirname(path) or "."
    why = unsafe_path(folder)
    if not why and default:
        try:
            st = os.stat(folder)
        except OSError:
            return  # no daemon there: the connect times out as before
        if st.st_uid not in (os.getuid(), 0):
            why = f"folder {folder} belongs to uid {st.st_uid}, not to this user (was it created by someone else?)"
        elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
            why = f"others may write folder {folder}"
    if why:
        raise ConfigError(f"kvbm daemon address {address}: {why}; refusing to connect: remove it and "
                          f"restart kvbm serve, or set XDG_RUNTIME_DIR")


def peer_credentials(frame: Any) -> tuple[int, int]:
    """(uid, pid) of the process that sent this message (a zmq.Frame), from the kernel;
    (-1, 0) if unknown."""
    try:
        peer = frame.get("Peer-Address")
    except Exception:  # zmq.ZMQError: no such property on this transport
        return -1, 0
    parts = peer.split(":") if isinstance(peer, str) else []
    if len(parts) == 4 and parts[0] == "localhost":  # ipc: localhost:uid:gid:pid
        try:
            return int(parts[1]), int(parts[3])
        except ValueError:
            return -1, 0
    return -1, 0


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
