"""kvbm as a vLLM secondary tier: cascade and promotion bandwidth beside a bare DiskStorage.

    /tmp/vllm-venv/bin/python bench/bench_vllm_tier.py [--dir DIR] [--gib 1] [--chunk 2M] [--repeat 3]

A primary buffer shaped like vLLM's CPU tier (chunks x chunk bytes, page-aligned, pre-faulted)
is cascaded into KVBMSecondaryTier (one G3 O_DIRECT slot file) with vLLM's own TransferJob
objects in jobs of 16 chunks, as vLLM's TieringOffloadingManager submits them, then every
chunk is promoted back into other primary chunks and compared. The peer, in the same run and
on the same filesystem: DiskStorage.write/read of the same chunks from the same buffer (what
the tier costs on top of kvbm's own G3 path). Needs vLLM (tested with 0.32's CPU build).
"""

from __future__ import annotations

import argparse
import mmap
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from vllm.v1.kv_offload.tiering.base import TransferJob  # noqa: E402

from kvbm.connectors.vllm_tier import KVBMSecondaryTier  # noqa: E402
from kvbm.tiers.disk import DiskStorage  # noqa: E402

JOB = 16  # chunks per cascade job


def primary(chunks: int, nbytes: int) -> np.ndarray:
    buf = mmap.mmap(-1, chunks * nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    rows = np.frombuffer(buf, dtype=np.uint8).reshape(chunks, nbytes)
    rows[:] = np.random.default_rng(0).integers(0, 255, size=(1, nbytes), dtype=np.uint8)
    rows[:, :8] = np.arange(chunks, dtype=np.uint64).view(np.uint8).reshape(chunks, 8)
    return rows


def run_tier(folder: str, rows: np.ndarray, half: int) -> tuple[float, float]:
    """Seconds to cascade chunks [0, half) and to promote them into [half, 2 * half)."""
    tier = KVBMSecondaryTier(None, memoryview(rows), "kvbm", tiers=[
        {"name": "g3", "capacity": half, "storage": {"name": "disk", "path": folder}}])
    keys = [i.to_bytes(8, "little") + b"\0" * 8 for i in range(half)]

    def drain(want: int) -> None:
        got = 0
        while got < want:
            done = tier.get_finished_jobs()
            assert all(r.success for r in done), done
            got += len(done)
            if not done:
                time.sleep(0.0005)

    try:
        t = time.perf_counter()
        for j, lo in enumerate(range(0, half, JOB)):
            tier.submit_store(TransferJob(j, keys[lo:lo + JOB], np.arange(lo, min(half, lo + JOB)), False, None))
        drain(-(-half // JOB))
        store = time.perf_counter() - t
        rows[half:2 * half] = 0
        t = time.perf_counter()
        for j, lo in enumerate(range(0, half, JOB)):
            dst = np.arange(half + lo, half + min(half, lo + JOB))
            tier.submit_load(TransferJob(10_000 + j, keys[lo:lo + JOB], dst, True, None))
        drain(-(-half // JOB))
        load = time.perf_counter() - t
        assert np.array_equal(rows[half:2 * half], rows[:half]), "a promoted chunk differs"
        return store, load
    finally:
        tier.shutdown()


def run_disk(folder: str, rows: np.ndarray, half: int) -> tuple[float, float]:
    """The same chunks through DiskStorage alone, in the same batches."""
    disk = DiskStorage(half, rows.shape[1], path=folder)
    keys = [i.to_bytes(8, "little") + b"\0" * 8 for i in range(half)]
    try:
        t = time.perf_counter()
        for lo in range(0, half, JOB):
            ok = disk.write([(keys[i], i, rows[i]) for i in range(lo, min(half, lo + JOB))])
            assert all(ok)
        store = time.perf_counter() - t
        t = time.perf_counter()
        for lo in range(0, half, JOB):
            ok = disk.read([(keys[i], i, rows[half + i]) for i in range(lo, min(half, lo + JOB))])
            assert all(ok)
        load = time.perf_counter() - t
        return store, load
    finally:
        disk.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--chunk", default="2M", help="chunk bytes: 2M, 256K, ...")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    unit = {"K": 1 << 10, "M": 1 << 20}[args.chunk[-1].upper()]
    nbytes = int(args.chunk[:-1]) * unit
    half = max(JOB, int(args.gib * (1 << 30)) // nbytes)
    rows = primary(2 * half, nbytes)
    gb = half * nbytes / 1e9
    best = {"tier": [float("inf")] * 2, "disk": [float("inf")] * 2}
    for _ in range(args.repeat):  # interleaved, so both see the same disk state
        for name, fn in (("tier", run_tier), ("disk", run_disk)):
            folder = tempfile.mkdtemp(prefix=f"kvbm-bench-{name}-", dir=args.dir)
            try:
                store, load = fn(folder, rows, half)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            best[name] = [min(best[name][0], store), min(best[name][1], load)]
    print(f"{half} chunks of {nbytes >> 10} KiB ({gb:.2f} GB), jobs of {JOB}, best of {args.repeat}")
    for name, label in (("tier", "KVBMSecondaryTier (vLLM jobs)"), ("disk", "DiskStorage alone (peer)")):
        s, l = best[name]
        print(f"{label:<32} cascade {gb / s:6.2f} GB/s   promote {gb / l:6.2f} GB/s")
    print(f"tier / disk: cascade {best['disk'][0] / best['tier'][0]:.2f}x, "
          f"promote {best['disk'][1] / best['tier'][1]:.2f}x")


if __name__ == "__main__":
    main()
