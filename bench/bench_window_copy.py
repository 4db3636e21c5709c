"""The daemon's window <-> G2 copies: through a mapping of the window (before 5370325) against
pread/pwrite on the window's descriptor (now: a client can ftruncate its window, which made the
mapping SIGBUS the daemon). Reports, never asserts.

    python bench/bench_window_copy.py            # 16 KiB x 64, 256 KiB x 64, 2 MiB x 32 blocks

Same /dev/shm file, same G2 buffer (slots scattered, as G2's are), both paths in turns per round
(a neighbour's burst hits them alike); the median of --rounds rounds per path, and the paired
median ratio (mapping time / syscall time in the same round). The mapping's copy is the limit.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import time

import numpy as np

from kvbm import ops


def run(nb: int, n: int, rounds: int) -> dict:
    path = f"/dev/shm/kvbm-bench-window-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.unlink(path)
    try:
        os.ftruncate(fd, n * nb)
        m = mmap.mmap(fd, n * nb, flags=mmap.MAP_SHARED)
        win = np.frombuffer(m, np.uint8)
        win[:] = 7
        g2 = np.ones(n * nb * 2, np.uint8)
        woff = np.arange(n, dtype=np.int64) * nb
        goff = np.arange(n, dtype=np.int64)[::-1] * 2 * nb
        paths = {
            "store mapping": lambda: ops.copy_blocks(win, woff, g2, goff, nb),
            "store pread": lambda: ops.pread_blocks(fd, g2, woff, nb, dst_offsets=goff),
            "load mapping": lambda: ops.copy_blocks(g2, goff, win, woff, nb),
            "load pwrite": lambda: ops.pwrite_blocks(fd, g2, woff, nb, src_offsets=goff),
        }
        times: dict[str, list[float]] = {k: [] for k in paths}
        for fn in paths.values():
            fn()
        for _ in range(rounds):
            for k, fn in paths.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        del win
        m.close()
    finally:
        os.close(fd)
    out = {k: statistics.median(v) for k, v in times.items()}
    for d in ("store", "load"):
        sys_name = "store pread" if d == "store" else "load pwrite"
        out[f"{d} ratio"] = statistics.median(a / b for a, b in zip(times[f"{d} mapping"], times[sys_name]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    print(f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}, native {ops.HAVE_NATIVE}")
    for nb, n in [(16 << 10, 64), (256 << 10, 64), (2 << 20, 32)]:
        r = run(nb, n, args.rounds)
        tot = nb * n
        cols = ", ".join(f"{k} {r[k] * 1e3:.2f} ms ({tot / r[k] / 1e9:.1f} GB/s)"
                         for k in ("store mapping", "store pread", "load mapping", "load pwrite"))
        print(f"{nb >> 10} KiB x {n} ({tot / 2**20:.0f} MiB): {cols}; syscall/mapping speed: "
              f"store {r['store ratio']:.2f}, load {r['load ratio']:.2f}")


if __name__ == "__main__":
    main()
