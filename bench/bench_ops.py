"""Throughput of kvbm.ops on this host beside the limit measured in the same run. Reports, never asserts.

    python bench/bench_ops.py                 # 4096 x 256 KiB = 1 GiB, as in an offload burst
    python bench/bench_ops.py --blocks 512    # smaller, for a quick look
    python bench/bench_ops.py --json          # the figures as JSON (bench/report.py reads it)

The gather copies the blocks in random order (what offloading scattered engine pages does).
Its limit is one thread's sequential copy of the same bytes, the best of three in this run:
numpy's copyto, the C library's memcpy (from csrc/, GIL released) and kvbm's streaming copy
(csrc/stream_copy.cpp). Every candidate and every kvbm path runs in turns (round robin, --repeat
rounds), so a neighbour's burst hits them alike. The limit is the candidate with the best median
time; a ratio is the median over rounds of the limit's time in that round over the path's time
in the same round: on a shared machine a paired median is steadier than a ratio of two bests
(and, unlike the best of three candidates per round, not biased against the path by noise).
GB/s columns: best and median.

Also: the fused copy + CRC-32C against a copy followed by a checksum pass, the gather between
two G2 HostStorage pools (the real medium: huge pages or not), and minor page faults per
call (from getrusage), which should be 0 once buffers are warm.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import numpy as np

from kvbm import ops


def minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def paired_ratio(times: dict, limits: list[str], label: str) -> float:
    """Median over rounds of (the best limit's time that round) / (label's time that round)."""
    per_round = [min(times[k][i][0] for k in limits) / times[label][i][0] for i in range(len(times[label]))]
    return sorted(per_round)[len(per_round) // 2]


def round_robin(fns: dict, repeat: int, times: dict | None = None) -> dict:
    """{label: (best s, median s, minor faults in the best call)}, the calls taking turns;
    `times` (if given) receives every round's (seconds, faults) per label."""
    times = {} if times is None else times
    times.update({k: [] for k in fns})
    for fn in fns.values():  # warm-up: first touch, thread pool start
        fn()
    for _ in range(repeat):
        for label, fn in fns.items():
            f0, t0 = minflt(), time.perf_counter()
            fn()
            times[label].append((time.perf_counter() - t0, minflt() - f0))
    out = {}
    for label, runs in times.items():
        secs = sorted(s for s, _ in runs)
        out[label] = (secs[0], secs[len(secs) // 2], min(runs)[1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=4096)
    ap.add_argument("--block-kib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    n, nbytes = args.blocks, args.block_kib << 10
    total = n * nbytes
    cpus = len(os.sched_getaffinity(0))
    head = (f"kvbm.ops: native={ops.HAVE_NATIVE} crc32c={ops.CRC32C_IMPL} stream={ops.COPY_STREAM_IMPL} "
            f"cuda_built={ops.CUDA_BUILT} cpus={cpus} load={os.getloadavg()[0]:.1f}; "
            f"{n} blocks x {args.block_kib} KiB = {total / 2**30:.2f} GiB")

    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, total, dtype=np.uint8)
    dst = np.ones(total, dtype=np.uint8)  # written once so page faults stay out of the timings
    src_offsets = rng.permutation(n).astype(np.int64) * nbytes
    dst_offsets = np.arange(n, dtype=np.int64) * nbytes

    limits = {"numpy copyto": lambda: np.copyto(dst, src)}
    if ops.HAVE_NATIVE:
        limits["C memcpy"] = lambda: ops.copy_buffer(dst, src)
        limits["C streaming copy"] = lambda: ops.copy_buffer(dst, src, stream=True)
    paths = {}
    for native in [False, True] if ops.HAVE_NATIVE else [False]:
        for threads in (1, 0) if native else (1,):
            def gather(threads=threads, native=native):
                ops.copy_blocks(src, src_offsets, dst, dst_offsets, nbytes, threads=threads, use_native=native)

            paths[f"copy_blocks {'native' if native else 'fallback'}, threads={threads or 'auto'}"] = gather
    rounds: dict = {}
    res = round_robin({**limits, **paths}, args.repeat, rounds)
    limit_label = min(limits, key=lambda k: res[k][1])  # by median
    limit_s = res[limit_label][0]

    rows = []

    def row(label, nb, best, median, faults, ratio=None, kind="path"):
        rows.append({"label": label, "gbs": nb / best / 1e9, "gbs_median": nb / median / 1e9,
                     "faults": faults, "ratio": ratio, "kind": kind})

    for label in limits:
        row(label + " (one thread, in order)", total, *res[label], kind="limit")
    for label in paths:
        row(label + ", random order", total, *res[label], ratio=paired_ratio(rounds, [limit_label], label))

    extra = {}
    if ops.HAVE_NATIVE:
        # G2 as it really is: HostStorage pools (anonymous mmap, pre-faulted, huge pages advised)
        from kvbm.tiers.host import HostStorage

        a, b = HostStorage(n, nbytes, pin="never"), HostStorage(n, nbytes, pin="never")
        a.pool[:] = src[: a.pool.size] if a.pool.size == src.size else 1
        slots = rng.permutation(n)
        a_offs, b_offs = a.offsets(slots), b.offsets(np.arange(n))
        for threads in (1, 0):
            extra[f"HostStorage -> HostStorage, threads={threads or 'auto'}"] = (
                lambda t=threads: ops.copy_blocks(a.pool, a_offs, b.pool, b_offs, nbytes, threads=t))
        for threads in (1, 0):
            extra[f"copy_blocks then crc32c_blocks, threads={threads or 'auto'}"] = (
                lambda t=threads: (ops.copy_blocks(src, src_offsets, dst, dst_offsets, nbytes, threads=t),
                                   ops.crc32c_blocks(dst, dst_offsets, nbytes, threads=t)))
            extra[f"copy_blocks_crc32c (fused), threads={threads or 'auto'}"] = (
                lambda t=threads: ops.copy_blocks_crc32c(src, src_offsets, dst, dst_offsets, nbytes, threads=t))
        for threads in (1, 0):
            extra[f"crc32c_blocks, threads={threads or 'auto'}"] = (
                lambda t=threads: ops.crc32c_blocks(src, dst_offsets, nbytes, threads=t))
        rounds = {}
        more = round_robin({**limits, **extra}, max(3, args.repeat // 2), rounds)
        for label, r in more.items():
            if label in limits:
                continue
            ratio = paired_ratio(rounds, [limit_label], label) if not label.startswith("crc32c_blocks") else None
            row(label if label.startswith("crc32c_blocks") else label + ", random order", total, *r, ratio=ratio)
        huge = _huge_kib(a.pool)
        a.close(), b.close()
        one = src[: 64 << 20]
        r = round_robin({"crc32c": lambda: ops.crc32c(one)}, args.repeat)["crc32c"]
        row(f"crc32c {ops.CRC32C_IMPL}, one 64 MiB buffer", one.nbytes, *r)
    else:
        huge = None
    small = src[: 1 << 20]
    r = round_robin({"py": lambda: ops.crc32c(small, use_native=False)}, 1)["py"]
    row("crc32c fallback (pure Python), 1 MiB", small.nbytes, *r)

    result = {"head": head, "limit": limit_label, "limit_gbs": total / limit_s / 1e9, "rows": rows,
              "host_pool_hugepages_kib": huge, "loadavg": os.getloadavg()[0]}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(head)
    print(f"limit: {limit_label}, {result['limit_gbs']:.2f} GB/s best (the one-thread copy below with the best median)")
    if huge is not None:
        print(f"G2 HostStorage pool backed by {huge} KiB of huge pages")
    for r in rows:
        x = f"{r['ratio']:6.2f}x of the limit" if r["ratio"] else ""
        print(f"{r['label']:<62} {r['gbs']:7.2f} GB/s best {r['gbs_median']:7.2f} median "
              f"{r['faults']:>6} faults  {x}")


def _huge_kib(pool: np.ndarray) -> int | None:
    """AnonHugePages of the mapping holding `pool` (from /proc/self/smaps), or None if unknown."""
    addr = pool.ctypes.data
    try:
        lines = open("/proc/self/smaps").read().splitlines()
    except OSError:
        return None
    inside = False
    for line in lines:
        first = line.split()[0]
        if "-" in first and not first.endswith(":"):
            lo, hi = (int(x, 16) for x in first.split("-"))
            inside = lo <= addr < hi
        elif inside and first == "AnonHugePages:":
            return int(line.split()[1])
    return None


if __name__ == "__main__":
    main()
