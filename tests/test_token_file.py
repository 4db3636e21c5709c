"""daemon.token_file: a token file that group or others may read or write is refused with one
error naming the file and the fix (`chmod 600 FILE`); `kvbm serve` exits 2 on it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kvbm.config import ConfigError
from kvbm.daemon.config import DaemonConfig


def token_file(tmp_path, mode: int, text: str = "s3cret-token\n"):
    path = tmp_path / "token"
    path.write_text(text)
    os.chmod(path, mode)
    return path


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o666])
def test_a_token_file_others_may_read_or_write_is_refused(tmp_path, mode):
    path = token_file(tmp_path, mode)
    with pytest.raises(ConfigError) as info:
        DaemonConfig.from_dict({"token_file": str(path)})
    msg = str(info.value)
    assert f"{path} is readable or writable by other users (mode {mode:04o})" in msg
    assert msg.endswith(f"run `chmod 600 {path}`")


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_an_owner_only_token_file_is_read(tmp_path, mode):
    path = token_file(tmp_path, mode)
    assert DaemonConfig.from_dict({"token_file": str(path)}).token == "s3cret-token"


def test_a_missing_or_empty_token_file_says_so(tmp_path):
    with pytest.raises(ConfigError, match="cannot read .*absent"):
        DaemonConfig.from_dict({"token_file": str(tmp_path / "absent")})
    with pytest.raises(ConfigError, match="is empty"):
        DaemonConfig.from_dict({"token_file": str(token_file(tmp_path, 0o600, "\n"))})


def test_kvbm_serve_refuses_it_with_exit_2_and_one_line(tmp_path):
    pytest.importorskip("zmq")
    path = token_file(tmp_path, 0o644)
    cfg = tmp_path / "kvbm.yaml"
    cfg.write_text(
        "layout: {num_layers: 2, num_kv_heads: 2, head_dim: 64, block_size: 16}\n"
        "tiers: [{name: g2, capacity: 8, storage: host}]\n"
        f"daemon: {{token_file: {path}, shm_name: kvbm-test-token-{os.getpid()}}}\n")
    done = subprocess.run([sys.executable, "-m", "kvbm.cli", "serve", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert str(path) in lines[0] and f"chmod 600 {path}" in lines[0]
    assert not os.path.exists(f"/dev/shm/kvbm-test-token-{os.getpid()}")
