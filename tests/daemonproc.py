"""Shared by the daemon tests: wait for a `kvbm serve` subprocess to say it is ready."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path


def wait_ready(proc: subprocess.Popen, stdout: Path, timeout: float = 30.0) -> dict | None:
    """The daemon's `{"ready": ...}` line, or None if it exited or stayed silent past timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in stdout.read_text().splitlines():
            if line.startswith('{"ready"'):
                return json.loads(line)
        if proc.poll() is not None:
            return None
        time.sleep(0.05)
    return None
