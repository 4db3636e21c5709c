"""Throughput of kvbm.ops on this host: batched gather and CRC-32C. Reports, never asserts.

    python bench/bench_ops.py                 # 4096 x 256 KiB = 1 GiB, as in an offload burst
    python bench/bench_ops.py --blocks 512    # smaller, for a quick look

The gather copies the blocks in random order (what offloading scattered engine pages
does) and is compared with one numpy copy of the same bytes, which is the bandwidth
ceiling for a single stream; a ratio near 1 means per-block overhead is negligible.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from kvbm import ops


def timed(fn, repeat: int) -> tuple[float, float]:
    """(best, median) seconds of `repeat` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def report(label: str, nbytes: int, best: float, median: float, baseline: float | None = None) -> None:
    extra = f"   {baseline / best:5.2f}x of numpy copy speed" if baseline else ""
    print(f"{label:<50} {nbytes / best / 1e9:7.2f} GB/s best  {nbytes / median / 1e9:7.2f} median{extra}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=4096)
    ap.add_argument("--block-kib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 0], help="0 = auto")
    args = ap.parse_args()

    n, nbytes = args.blocks, args.block_kib << 10
    total = n * nbytes
    print(f"kvbm.ops: native={ops.HAVE_NATIVE} crc32c={ops.CRC32C_IMPL} cuda_built={ops.CUDA_BUILT} "
          f"cpus={len(os.sched_getaffinity(0))}; {n} blocks x {args.block_kib} KiB = {total / 2**30:.2f} GiB")

    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, total, dtype=np.uint8)
    dst = np.ones(total, dtype=np.uint8)  # written once so page faults stay out of the timings
    src_offsets = rng.permutation(n).astype(np.int64) * nbytes
    dst_offsets = np.arange(n, dtype=np.int64) * nbytes

    numpy_best, numpy_median = timed(lambda: np.copyto(dst, src), args.repeat)
    report("numpy copyto of the same bytes, in order", total, numpy_best, numpy_median)
    for native in [False, True] if ops.HAVE_NATIVE else [False]:
        for threads in args.threads if native else [1]:
            def gather(threads=threads, native=native):
                ops.copy_blocks(src, src_offsets, dst, dst_offsets, nbytes, threads=threads,
                                use_native=native)

            path = "native" if native else "fallback"
            report(f"copy_blocks {path}, random order, threads={threads or 'auto'}", total,
                   *timed(gather, args.repeat), baseline=numpy_best)

    if ops.HAVE_NATIVE:
        one = src[: 64 << 20]
        size = f"one {one.nbytes >> 20} MiB buffer"
        report(f"crc32c {ops.CRC32C_IMPL}, {size}", one.nbytes, *timed(lambda: ops.crc32c(one), args.repeat))
        slow = ops._native._crc32c_software
        report(f"crc32c slicing-by-8, {size}", one.nbytes, *timed(lambda: slow(one), args.repeat))
        for threads in args.threads:
            def checksums(threads=threads):
                ops.crc32c_blocks(src, dst_offsets, nbytes, threads=threads)

            report(f"crc32c_blocks, {n} blocks, threads={threads or 'auto'}", total,
                   *timed(checksums, args.repeat))
    small = src[: 1 << 20]
    report("crc32c fallback (pure Python), 1 MiB", small.nbytes,
           *timed(lambda: ops.crc32c(small, use_native=False), 1))


if __name__ == "__main__":
    main()
