"""G3 slot files and index, and file:// G4 objects, are 0600 in 0700 folders whatever the
umask; another local user can read none of them. The other-uid check forks a child that
drops to uid 65534 (nobody): it needs root and is skipped with the reason otherwise."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

import numpy as np
import pytest

from kvbm.tiers.disk import DiskStorage
from kvbm.tiers.object import ObjectStorage

NBYTES = 8192
NOBODY = 65534


@pytest.fixture
def public_dir():
    """A folder every user may enter (pytest's tmp_path is 0700: it would hide everything)."""
    where = Path(tempfile.mkdtemp(prefix="kvbm-modes-", dir="/tmp"))
    os.chmod(where, 0o755)
    yield where
    shutil.rmtree(where, ignore_errors=True)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def make_stores(where: Path):
    data = np.arange(NBYTES, dtype=np.uint8)
    g3 = DiskStorage(4, NBYTES, namespace="ns", path=where / "cache" / "g3", direct=False)
    g4 = ObjectStorage(4, NBYTES, namespace="ns", url=f"file://{where}/cache/g4", secret=b"s" * 32)
    assert g3.write([(1, g3.allocate(), data)]) == [True]
    assert g4.write([(1, g4.allocate(), data)]) == [True]
    return g3, g4


def files_of(where: Path) -> tuple[list[Path], list[Path]]:
    folders, files = [], []
    for root, dirs, names in os.walk(where / "cache"):
        folders += [Path(root) / d for d in dirs]
        files += [Path(root) / n for n in names]
    return folders, files


def test_files_0600_in_folders_0700_whatever_the_umask(public_dir):
    old = os.umask(0)  # the most permissive: every mode below is kvbm's own choice
    try:
        g3, g4 = make_stores(public_dir)
    finally:
        os.umask(old)
    g3.close()
    g4.close()
    folders, files = files_of(public_dir)
    assert {p.name for p in files} >= {"slots.bin", "index.log"} and len(files) == 3
    assert {str(p): mode(p) for p in files} == {str(p): 0o600 for p in files}
    assert {str(p): mode(p) for p in folders} == {str(p): 0o700 for p in folders}
    assert mode(public_dir / "cache") == 0o700  # made by kvbm, so 0700 too
    assert mode(public_dir) == 0o755  # the user's own folder is left as it was


def test_stores_from_before_are_closed_up_at_open(public_dir):
    """An old kvbm made 0755 folders and 0644 files: kvbm's own ones become 0700/0600."""
    old = os.umask(0o022)
    try:
        g3, g4 = make_stores(public_dir)
        g3.close()
        g4.close()
        for p in [public_dir / "cache", *sum(files_of(public_dir), [])]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        g3, g4 = make_stores(public_dir)
    finally:
        os.umask(old)
    g3.close()
    assert mode(public_dir / "cache" / "g3" / "ns") == 0o700
    assert mode(public_dir / "cache" / "g4" / "ns") == 0o700
    assert mode(g3.slots_path) == 0o600 and mode(g3.index_path) == 0o600


def test_a_world_writable_parent_is_warned_about_and_left_alone(public_dir, caplog):
    os.chmod(public_dir, 0o777)
    DiskStorage(2, NBYTES, namespace="ns", path=public_dir / "g3", direct=False).close()
    assert mode(public_dir) == 0o777
    assert any("writable by every user" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(os.geteuid() != 0, reason="another uid needs root: os.setuid in a forked child")
def test_another_uid_can_read_no_g3_or_g4_file(public_dir):
    g3, g4 = make_stores(public_dir)
    g3.close()
    g4.close()
    folders, files = files_of(public_dir)
    targets = [str(p) for p in files] + [str(p) for p in folders]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: nobody, trying to read or list each one
        os.close(r)
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            leaked = []
            for path in targets:
                try:
                    if os.path.isdir(path):
                        os.listdir(path)
                    else:
                        os.close(os.open(path, os.O_RDONLY))
                    leaked.append(path)
                except PermissionError:
                    pass
            os.write(w, ("\n".join(leaked) or "-").encode())
        finally:
            os._exit(0)
    os.close(w)
    report = b""
    while chunk := os.read(r, 65536):
        report += chunk
    os.close(r)
    os.waitpid(pid, 0)
    assert report.decode() == "-", f"readable by uid {NOBODY}: {report.decode()}"


@pytest.mark.skipif(os.geteuid() != 0, reason="another uid needs root: os.setuid in a forked child")
def test_a_folder_of_another_user_is_warned_about_not_fatal(public_dir):
    from kvbm.tiers.base import make_private_dir

    theirs = public_dir / "theirs"
    theirs.mkdir(mode=0o755)
    os.chmod(theirs, 0o755)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            make_private_dir(theirs)  # root's folder: chmod is refused, a warning, no exception
            code = 0 if mode(theirs) == 0o755 else 2
        finally:
            os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0
