"""Helpers shared by the bench scripts (run them as `python bench/<script>.py`).

    best_of(fn, repeat)     fastest wall time of repeated calls
    cpu_model()             the CPU's marketing name, for machine descriptions
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any, Callable


def best_of(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """(fastest wall time of `repeat` calls, the last call's result)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def cpu_model() -> str:
    """/proc/cpuinfo's model name, else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
