"""The README's snippets run as written.

Every ```python block runs, in order, in one namespace (as a reader pastes them into one
session); the `Client` block talks to a real `kvbm serve` started here (its address replaces
the README's tcp://127.0.0.1:5557, the only change). The YAML config blocks go through
`kvbm config check`. Each `kvbm ...` line of the ```bash blocks is either run as written (cheap)
or listed in NOT_RUN with the reason, so a new command in the README fails here until it is
classified.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)

RUN = {  # cheap enough for CI: the whole bundled trace through one or two metadata-only tiers
    "kvbm simulate mooncake",
    "kvbm simulate mooncake --tier g2=10000:lru --tier g3=100000:frequency --json",
    "kvbm simulate mooncake --tier g2=10000:lru --tier g3=100000:lru --offload",
    "kvbm policies",
}
NOT_RUN = {  # command prefix -> why the test does not run it as written
    "kvbm demo": "about 20 s of real I/O; tests/test_demo-style coverage runs it with --requests",
    "kvbm simulate mooncake --sweep": "a sweep over the whole trace with belady: minutes (test_cli runs a small sweep)",
    "kvbm simulate trace.": "a placeholder trace path",
    "kvbm serve": "a long-running daemon (the Client snippet below runs against one)",
    "kvbm stats": "needs a running daemon at the README's address",
    "kvbm config check": "the README's YAML blocks are checked below",
    "kvbm replay": "needs an OpenAI-compatible server at --url (tests/test_loadgen* use a stub)",
}


def blocks(lang: str) -> list[str]:
    return [body for kind, body in BLOCK.findall(README.read_text()) if kind == lang]


def kvbm_lines() -> list[str]:
    out = []
    for body in blocks("bash"):
        for line in body.splitlines():
            line = line.split("  #")[0].strip()
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith("kvbm "):
                    out.append(part)
    return out


def test_every_kvbm_command_is_run_or_says_why_not():
    lines = kvbm_lines()
    assert len(lines) >= 8
    for line in lines:
        assert line in RUN or any(line.startswith(p) for p in NOT_RUN), f"README command not classified: {line}"


def test_ci_runs_the_readmes_test_command():
    """.ci/run runs the README's test command as written, plus -p no:cacheprovider (a clean
    clone stays clean): a worker count or flag changed in one place must change in the other."""
    (readme,) = [line.strip() for body in blocks("bash") for line in body.splitlines() if "python -m pytest" in line]
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    (run,) = [line.strip() for line in ci if "python -m pytest" in line and not line.lstrip().startswith("#")]
    assert run == readme + " -p no:cacheprovider", (run, readme)


@pytest.mark.parametrize("line", sorted(RUN))
def test_bash_commands_run_as_written(line):
    assert line in kvbm_lines(), f"{line!r} is no longer in the README: drop it from RUN"
    done = subprocess.run([sys.executable, "-m", "kvbm.cli", *line.split()[1:]], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


@pytest.fixture
def daemon(tmp_path):
    """`kvbm serve` with the README's layout, on an ipc:// socket of its own."""
    pytest.importorskip("zmq")
    pytest.importorskip("msgpack")
    from daemonproc import wait_ready

    shm = f"kvbm-readme-{uuid.uuid4().hex[:12]}"
    cfg = {"namespace": {"model": "meta-llama/Llama-3.1-8B"},
           "layout": {"num_layers": 32, "num_kv_heads": 8, "head_dim": 128, "block_size": 16, "dtype": "bfloat16"},
           "tiers": [{"name": "g2", "capacity": 16, "eviction": "lru", "storage": "host"}],
           "daemon": {"address": f"ipc://{tmp_path}/d.sock", "events": "", "metrics": "", "shm_name": shm,
                      "nixl": False}}
    path = tmp_path / "kvbm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "stdout.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVBM_")}
    proc = subprocess.Popen([sys.executable, "-m", "kvbm.cli", "serve", "--config", str(path)],
                            stdout=out.open("w"), stderr=(tmp_path / "stderr.txt").open("w"), env=env)
    info = wait_ready(proc, out, timeout=180)
    try:
        assert info is not None, (tmp_path / "stderr.txt").read_text()[-2000:]
        yield info["address"]
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        for f in Path("/dev/shm").glob(f"{shm}*"):
            f.unlink()


def test_python_snippets_run_as_written(daemon, monkeypatch):
    # the README registers a policy of its own (mru): it must not outlive this test, or every
    # later sweep of "all registered policies" (test_reference) replays it too
    from kvbm import registry

    for reg in (registry.EVICTION, registry.ADMISSION):
        monkeypatch.setattr(reg, "_known", dict(reg._known))
        monkeypatch.setattr(reg, "_loaded", dict(reg._loaded))
    snippets = blocks("python")
    assert len(snippets) >= 5
    namespace: dict = {"__name__": "readme"}
    for i, code in enumerate(snippets):
        if "Client(" in code:
            assert "tcp://127.0.0.1:5557" in code
            code = code.replace("tcp://127.0.0.1:5557", daemon)
        exec(compile(code, f"README.md python block {i + 1}", "exec"), namespace)
    assert namespace["n"] == 4  # the Client block: all four blocks stored, found and loaded


def test_yaml_config_blocks_pass_config_check(tmp_path):
    """The Configuration block plus the daemon: blocks (merged), as one kvbm.yaml."""
    config, daemon = None, None
    for body in blocks("yaml"):
        data = yaml.safe_load(body)
        if isinstance(data, dict) and "tiers" in data:
            config = data
        elif isinstance(data, dict) and "daemon" in data:
            daemon = {**(daemon or {}), **data["daemon"]}  # every daemon: block of the README, merged
    assert config is not None and daemon is not None
    # /etc/kvbm/... files (the daemon's and each tenant's), made here: a distinct secret each (0600)
    holders = [daemon] + [t for t in (daemon.get("tenants") or {}).values() if isinstance(t, dict)]
    assert "token_file" in daemon
    for holder in holders:
        for key, where in sorted((k, v) for k, v in holder.items() if k.endswith("_file")):
            made = tmp_path / Path(where).name
            made.write_bytes(os.urandom(16).hex().encode())
            made.chmod(0o600)
            holder[key] = str(made)
    config["daemon"] = daemon
    path = tmp_path / "kvbm.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVBM_")}
    done = subprocess.run([sys.executable, "-m", "kvbm.cli", "config", "check", str(path)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ok (exclusive, g2=" in done.stdout
