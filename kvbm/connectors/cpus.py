"""kvbm's own threads and processes run on every CPU, not on the engine's bound compute cores.

    unbind_cpus() -> bool    the calling thread (and what it starts later) may run on every CPU
                             the process's cgroup allows

Engines bind their compute threads to cores: vLLM's CPU worker pins its main thread and OpenMP
threads to the cores it was given (VLLM_CPU_OMP_THREADS_BIND), then waits for the next step
spinning on sched_yield. Threads and processes inherit the binding of the thread that starts
them, so before this kvbm's load lane, its zmq I/O thread and the engine's own daemon (a child
of the worker) all shared the worker's single core with that spinner: on a busy node the
daemon got no CPU for the 10 s of a client timeout, every load timed out, and the engine
recomputed what kvbm held. kvbm's threads move bytes and wait on sockets; they belong on any
free core, so they drop the binding when they start.
"""

from __future__ import annotations

import os


def unbind_cpus() -> bool:
    """Let the calling thread run on every CPU this process may use; False where the platform
    cannot say (no sched_setaffinity) or refuses."""
    setaffinity = getattr(os, "sched_setaffinity", None)
    if setaffinity is None:
        return False
    try:  # the kernel intersects the mask with the cgroup's cpuset
        setaffinity(0, range(os.cpu_count() or 1))
    except OSError:
        return False
    return True
