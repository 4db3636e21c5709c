"""Every documented failure of the `kvbm` command ends in one line that names the key, path or
variable and what to do, exit status 2, no traceback and no leftover files. Run as a user runs
it: a subprocess (`python -m kvbm.cli`), stderr read whole."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ENV = {k: v for k, v in os.environ.items() if not k.startswith("KVBM_") or k.startswith("KVBM_REQUIRE")}


def kvbm(*argv, env=None, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "kvbm.cli", *argv], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, cwd=cwd, timeout=timeout)


def one_line_error(done, *needles):
    """Exit 2, stderr is exactly one `kvbm: error:` line containing every needle."""
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvbm: error: "), done.stderr
    assert "Traceback" not in done.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def write(path: Path, *parts: str) -> Path:
    path.write_text("".join(textwrap.dedent(p) for p in parts))
    return path


GOOD_TIERS = """\
    tiers:
      - {name: g2, capacity: 100, eviction: lru}
"""


# ---------------------------------------------------------------- config check: one path


def test_config_check_accepts_the_readmes_daemon_section(tmp_path):
    cfg = write(tmp_path / "kvbm.yaml", GOOD_TIERS, """\
    daemon:
      address: tcp://127.0.0.1:5557
      token: s3cret-s3cret
      events: tcp://127.0.0.1:5558
      metrics: 127.0.0.1:9400
      shm_name: kvbm-g2
      lease_s: 10
    """)
    done = kvbm("config", "check", str(cfg))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{cfg}: ok (exclusive, g2=100 blocks:lru")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kvbm.yaml"]  # nothing created


def test_config_check_names_an_unknown_policy_and_the_allowed_ones(tmp_path):
    cfg = write(tmp_path / "kvbm.yaml", GOOD_TIERS.replace("lru", "lur"))
    line = one_line_error(kvbm("config", "check", str(cfg)), "tiers.g2.eviction", "'lur'",
                          "did you mean 'lru'", "registered:", "arc", "s3fifo", f"(in {cfg})")
    assert "fifo" in line


def test_config_check_names_a_storage_option_typo_and_the_allowed_keys(tmp_path):
    cfg = write(tmp_path / "kvbm.yaml", """\
    layout: {num_layers: 2, num_kv_heads: 1, head_dim: 8, block_size: 4}
    tiers:
      - {name: g3, capacity: 100, storage: {name: disk, pth: /tmp/x}}
    """)
    one_line_error(kvbm("config", "check", str(cfg)), "tiers.g3.storage", "'pth'", "did you mean 'path'",
                   "allowed:", "path")


def test_config_check_names_an_unknown_url_protocol(tmp_path):
    cfg = write(tmp_path / "kvbm.yaml", """\
    layout: {num_layers: 2, num_kv_heads: 1, head_dim: 8, block_size: 4}
    tiers:
      - {name: g4, capacity: 100, storage: {name: object, url: "foo://bucket/kvbm"}}
    """)
    one_line_error(kvbm("config", "check", str(cfg)), "tiers.g4.storage.url", "unknown protocol 'foo'",
                   "file", "memory")


def test_serve_and_simulate_refuse_what_config_check_refuses(tmp_path):
    cfg = write(tmp_path / "kvbm.yaml", GOOD_TIERS.replace("lru", "lur"))
    check = one_line_error(kvbm("config", "check", str(cfg)))
    sim = one_line_error(kvbm("simulate", "mooncake", "--config", str(cfg), "--limit", "10", "--quiet"))
    assert sim == check


def test_an_env_override_typo_is_reported_as_the_variable(tmp_path):
    cfg = write(tmp_path / "kvbm.yaml", GOOD_TIERS)
    done = kvbm("config", "check", str(cfg), env={"KVBM_TIERS__G2__CAPACTY": "5"})
    line = one_line_error(done, "'capacty'", "did you mean 'capacity'", "set by the environment: KVBM_TIERS__G2__CAPACTY")
    assert str(cfg) not in line
    done = kvbm("config", "check", str(cfg), env={"KVBM_TIERS__G2__EVICTION": "lur"})
    one_line_error(done, "tiers.g2.eviction", "'lur'", "KVBM_TIERS__G2__EVICTION")


def test_serve_without_a_config_says_how_to_give_one():
    one_line_error(kvbm("serve"), "kvbm serve --config kvbm.yaml", "KVBM_CONFIG")


# ---------------------------------------------------------------- G3 paths


def disk_config(tmp_path, path):
    return write(tmp_path / "kvbm.yaml", f"""\
    layout: {{num_layers: 2, num_kv_heads: 1, head_dim: 8, block_size: 4}}
    tiers:
      - {{name: g2, capacity: 10, storage: {{name: host, pin: never}}}}
      - {{name: g3, capacity: 100, storage: {{name: disk, path: "{path}"}}}}
    """)


def test_a_g3_path_under_a_regular_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    cfg = disk_config(tmp_path, tmp_path / "afile" / "kvbm")
    for argv in (("config", "check", str(cfg)), ("simulate", "mooncake", "--config", str(cfg), "--limit", "5")):
        one_line_error(kvbm(*argv), "tiers.g3.storage.path", "is a file, not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "kvbm.yaml"]


def test_a_g3_path_that_cannot_be_created(tmp_path, monkeypatch):
    """A folder this user may not write (root may write anywhere, so access is denied here)."""
    from kvbm import KVBMConfig
    from kvbm.config import ConfigError, parse_config

    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real(p, mode))
    data = {"layout": {"num_layers": 2, "num_kv_heads": 1, "head_dim": 8, "block_size": 4},
            "tiers": [{"name": "g3", "capacity": 10, "storage": {"name": "disk", "path": str(locked / "kvbm")}}]}
    with pytest.raises(ConfigError, match=r"^tiers\.g3\.storage\.path = .*: .*/locked is not writable by this "
                                          r"user; set tiers\.g3\.storage\.path to a writable folder"):
        parse_config(data)
    assert KVBMConfig.from_dict(data)  # the structure is fine: only the folder is refused
    assert list(locked.iterdir()) == []


def test_a_g3_path_where_no_folder_can_be_made(tmp_path):
    """/proc: access() may say yes (root), yet no folder can be made there."""
    cfg = disk_config(tmp_path, "/proc/kvbm-test/g3")
    for argv in (("config", "check", str(cfg)), ("simulate", "mooncake", "--config", str(cfg), "--limit", "5")):
        one_line_error(kvbm(*argv), "tiers.g3.storage.path", "/proc", "writable folder")
    one_line_error(kvbm("demo", "--workdir", "/proc/kvbm-test", "--requests", "5"), "--workdir", "writable folder")
    assert not os.path.exists("/proc/kvbm-test")


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only tmpfs (root), else a folder the storage sees as EROFS (injected)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {done.stderr.decode().strip()}")
    yield ro
    subprocess.run(["umount", str(ro)], check=True)


def test_a_g3_dir_on_a_read_only_mount(tmp_path, read_only_dir):
    cfg = disk_config(tmp_path, read_only_dir / "kvbm")
    for argv in (("config", "check", str(cfg)), ("simulate", "mooncake", "--config", str(cfg), "--limit", "5")):
        one_line_error(kvbm(*argv), "tiers.g3.storage.path", "read-only file system", "writable folder")
    one_line_error(kvbm("demo", "--workdir", str(read_only_dir / "demo"), "--requests", "5"),
                   "--workdir", "read-only file system")
    assert list(read_only_dir.iterdir()) == []


def test_the_storage_open_error_names_the_key(tmp_path, monkeypatch):
    """Past the checks (a race, a mount turned read-only): the OSError of opening G3 names
    tiers.g3.storage.path, and the G2 opened before it is closed again."""
    import errno
    import functools

    from kvbm import KVBMConfig
    from kvbm.config import ConfigError
    from kvbm.manager import BlockManager
    from kvbm.tiers import disk, host

    closed = []
    monkeypatch.setattr(host.HostStorage, "close", lambda self: closed.append(self))

    @functools.wraps(disk.DiskStorage.__init__)  # its signature: the option check still passes
    def erofs(self, *a, **kw):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "g3"))
    monkeypatch.setattr(disk.DiskStorage, "__init__", erofs)
    cfg = KVBMConfig.from_dict({"layout": {"num_layers": 2, "num_kv_heads": 1, "head_dim": 8, "block_size": 4},
                                "tiers": [{"name": "g2", "capacity": 10, "storage": {"name": "host", "pin": "never"}},
                                          {"name": "g3", "capacity": 10,
                                           "storage": {"name": "disk", "path": str(tmp_path / "g3")}}]})
    with pytest.raises(ConfigError, match=r"tiers\.g3\.storage\.path: cannot use .*/g3: it is on a read-only "
                                          r"file system; set tiers\.g3\.storage\.path to a writable folder"):
        BlockManager.from_config(cfg)
    assert len(closed) == 1


# ---------------------------------------------------------------- traces and pipes


def test_an_empty_trace_is_an_error_not_a_success(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    one_line_error(kvbm("simulate", str(empty), "--quiet"), str(empty), "no requests")
    one_line_error(kvbm("demo", str(empty), "--quiet"), str(empty), "no requests")
    one_line_error(kvbm("simulate", "mooncake", "--limit", "0"), "--limit")


def test_a_json_error_names_the_files_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [1]}\n'
                   '{"timestamp": 0,\n')
    line = one_line_error(kvbm("simulate", str(bad), "--quiet"), f"{bad}:2:", "the line ends")
    assert "line 2 column" not in line and "line 1 column" not in line
    bad.write_text('{"timestamp": 0, "input_length": 1 "x": 2}\n')
    one_line_error(kvbm("simulate", str(bad), "--quiet"), f"{bad}:1:", "column 36", "Expecting ','")


def test_a_repeated_block_in_a_trace_request_names_its_line(tmp_path):
    bad = tmp_path / "rep.jsonl"
    bad.write_text('{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [1, 2]}\n'
                   '{"timestamp": 1, "input_length": 1, "output_length": 1, "hash_ids": [3, 4, 3]}\n')
    one_line_error(kvbm("simulate", str(bad), "--quiet"), f"{bad}:2:", "repeats block id 3")


def test_a_missing_trace_or_config_file_says_what_to_give(tmp_path):
    for argv in (("simulate", "nope.jsonl"), ("demo", "nope.jsonl")):
        one_line_error(kvbm(*argv, cwd=tmp_path), "trace file not found: nope.jsonl", "bundled trace by name: mooncake")
    one_line_error(kvbm("config", "check", "nope.yaml", cwd=tmp_path), "config file nope.yaml does not exist",
                   "YAML or TOML")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, needles", [
    (("simulate", "mooncake", "--capacity", "100"), ("unrecognized arguments: --capacity 100", "kvbm --help")),
    (("demo", "--requests", "x"), ("--requests: invalid int value: 'x'", "kvbm demo --help")),
    (("replay",), ("required: trace, --url", "kvbm replay --help")),
    ((), ("required: command", "kvbm --help")),
])
def test_a_bad_command_line_is_one_line_too(argv, needles):
    one_line_error(kvbm(*argv), *needles)


@pytest.mark.parametrize("argv", [("policies",), ("simulate", "mooncake", "--limit", "300", "--quiet")])
def test_a_closed_pipe_ends_quietly(argv):
    """`kvbm policies | head -1`: no BrokenPipeError traceback, status 141 (SIGPIPE's)."""
    cmd = " ".join([sys.executable, "-m", "kvbm.cli", *argv]) + " | head -1; echo \"status ${PIPESTATUS[0]}\""
    done = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=ENV, timeout=300)
    assert done.stderr == "", done.stderr
    first, status = done.stdout.strip().splitlines()
    assert first and status in ("status 0", "status 141")  # 0 when everything fit in the pipe
    # a reader that closes at once: the writer always sees the closed pipe
    cmd = " ".join([sys.executable, "-m", "kvbm.cli", *argv]) + " | true; echo \"status ${PIPESTATUS[0]}\""
    done = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=ENV, timeout=300)
    assert done.stderr == "" and done.stdout.strip() in ("status 0", "status 141"), done
