"""Stopping a `vllm serve` process group (tests/vllm_serve_helpers.stop_group) leaves no shared memory.

A group that does not stop on SIGINT is killed, and a killed group cannot clean up after itself:
vLLM's message queues live in /dev/shm (psm_*, ~250 MB each) and its resource tracker, which
would unlink them, dies in the same kill. Here a stand-in server process creates a segment the
way vLLM does (multiprocessing.shared_memory) and ignores SIGINT, so the kill path runs whatever
the machine's speed; the segment must be gone after stop_group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from vllm_serve_helpers import group_shm, stop_group  # noqa: E402

CHILD = textwrap.dedent("""
    import signal, time
    from multiprocessing import shared_memory
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    shm = shared_memory.SharedMemory(create=True, size=1 << 20)
    print(shm.name, flush=True)
    while True:
        time.sleep(60)
""")


def test_a_killed_group_leaves_no_shared_memory():
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        name = child.stdout.readline().strip()
        path = f"/dev/shm/{name.lstrip('/')}"
        assert name.lstrip("/").startswith("psm_") and os.path.exists(path)
        assert path in group_shm(child.pid)  # found through the group's mappings
        stop_group(child, grace_s=0.5)  # SIGINT is ignored: always the kill path
        assert child.returncode == -signal.SIGKILL
        assert not os.path.exists(path)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
