"""The daemon's window <-> G2 copies: through a plain mapping of the window (before 5370325: a
client's ftruncate made it SIGBUS the daemon), pread/pwrite on the window's descriptor (5370325 to
session 12), and the guarded mapping copy (session 13: ops.window_to_blocks / blocks_to_window,
a SIGBUS guard per block), bare and as the daemon runs it (Window.read_into / write_from: on a
copier thread the request loop waits on, with its deadline). Reports, never asserts.

    python bench/bench_window_copy.py            # 16 KiB x 64, 256 KiB x 64, 2 MiB x 32 blocks

Same /dev/shm file, same G2 buffer (slots scattered, as G2's are), all paths in turns per round
(a neighbour's burst hits them alike); the median of --rounds rounds per path, and the paired
median ratios (mapping time / path time in the same round). The plain mapping's copy is the limit.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import time

import numpy as np

from kvbm import ops
from kvbm.daemon.windows import Window


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
        wmap = ops.window_map(fd, n * nb)
        w = Window.__new__(Window)  # the daemon's Window over this file (its copier thread, its deadline)
        w.fd, w._guarded, w.stride, w.block_nbytes, w._busy = fd, wmap, nb, nb, None
        slots = list(range(n))
        paths = {
            "store mapping": lambda: ops.copy_blocks(win, woff, g2, goff, nb),
            "store pread": lambda: ops.pread_blocks(fd, g2, woff, nb, dst_offsets=goff),
            "store guarded": lambda: ops.window_to_blocks(fd, wmap, woff, g2, goff, nb),
            "store window": lambda: w.read_into(slots, g2, goff),
            "load mapping": lambda: ops.copy_blocks(g2, goff, win, woff, nb),
            "load pwrite": lambda: ops.pwrite_blocks(fd, g2, woff, nb, src_offsets=goff),
            "load guarded": lambda: ops.blocks_to_window(g2, goff, fd, wmap, woff, nb),
            "load window": lambda: w.write_from(g2, goff, slots),
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
        if wmap is not None:
            wmap.close()
    finally:
        os.close(fd)
    out = {k: statistics.median(v) for k, v in times.items()}
    for d in ("store", "load"):
        for how in ("pread" if d == "store" else "pwrite", "guarded", "window"):
            out[f"{d} {how} ratio"] = statistics.median(
                a / b for a, b in zip(times[f"{d} mapping"], times[f"{d} {how}"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    print(f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}, native {ops.HAVE_NATIVE}")
    for nb, n in [(16 << 10, 64), (256 << 10, 64), (2 << 20, 32)]:
        r = run(nb, n, args.rounds)
        tot = nb * n
        print(f"{nb >> 10} KiB x {n} ({tot / 2**20:.0f} MiB):")
        for d, sysc in (("store", "pread"), ("load", "pwrite")):
            cols = ", ".join(f"{h} {r[f'{d} {h}'] * 1e3:.2f} ms ({tot / r[f'{d} {h}'] / 1e9:.1f} GB/s)"
                             for h in ("mapping", sysc, "guarded", "window"))
            ratios = ", ".join(f"{h} {r[f'{d} {h} ratio']:.2f}" for h in (sysc, "guarded", "window"))
            print(f"  {d}: {cols}; speed / mapping's: {ratios}")


if __name__ == "__main__":
    main()
