"""`kvbm serve` raises its soft RLIMIT_NOFILE to the hard limit (SECURITY.md, a connection flood):
a flood of connections must then outrun the event sockets' gate by the whole hard limit."""

from __future__ import annotations

import resource
import subprocess
import sys


def _limits_after_raise(soft: int, hard: int) -> tuple[int, int]:
    code = ("import resource; from kvbm.cli import _raise_nofile; _raise_nofile(); "
            "print(*resource.getrlimit(resource.RLIMIT_NOFILE))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)))
    got = out.stdout.split()
    return int(got[0]), int(got[1])


def test_the_soft_limit_goes_up_to_the_hard_one():
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    top = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    assert _limits_after_raise(256, top) == (top, top)


def test_a_soft_limit_already_at_the_hard_one_is_kept():
    assert _limits_after_raise(256, 256) == (256, 256)
