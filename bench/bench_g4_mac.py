"""The G4 MAC's cost against the copy it guards.

HMAC-SHA256, keyed BLAKE2b, CRC-32C and a copy of one 16 MiB block; then ObjectStorage puts
and gets of 8 such blocks (CRC + MAC in one chunked pass) on memory:// and on file:// in
/dev/shm, two threads. Best of 3, GB/s. Run: python bench/bench_g4_mac.py
"""

from __future__ import annotations

import hashlib
import hmac
import os
import shutil
import tempfile
import time
import uuid

import numpy as np

from kvbm import ops
from kvbm.tiers.object import ObjectStorage

MiB = 1 << 20
N, NB = 8, 16 * MiB


def best(fn, n: int = 3) -> float:
    t = float("inf")
    for _ in range(n):
        start = time.perf_counter()
        fn()
        t = min(t, time.perf_counter() - start)
    return t


def primitives(block: np.ndarray) -> None:
    key = os.urandom(32)
    dst = np.empty_like(block)
    for name, fn in (("hmac-sha256", lambda: hmac.new(key, block, hashlib.sha256).digest()),
                     ("blake2b keyed", lambda: hashlib.blake2b(block, key=key).digest()),
                     ("crc32c", lambda: ops.crc32c(block)),
                     ("copy", lambda: np.copyto(dst, block))):
        print(f"{name:14s} 16 MiB  {block.nbytes / best(fn) / 1e9:6.2f} GB/s")


def storage(url: str, data: np.ndarray) -> None:
    g4 = ObjectStorage(N, NB, namespace="ns", url=url, max_concurrency=2, secret=b"bench" * 8)
    try:
        slots = [g4.allocate() for _ in range(N)]
        keys = list(range(N))
        w = best(lambda: g4.write(list(zip(keys, slots, data))))
        out = np.zeros_like(data)
        r = best(lambda: g4.read(list(zip(keys, slots, out))))
        assert np.array_equal(out, data)
        print(f"ObjectStorage {url.split(':')[0]:7s} write {data.nbytes / w / 1e9:5.2f} GB/s  "
              f"read {data.nbytes / r / 1e9:5.2f} GB/s")
    finally:
        g4.close()


def main() -> None:
    data = np.random.default_rng(0).integers(0, 256, (N, NB), dtype=np.uint8)
    primitives(data[0])
    shm = tempfile.mkdtemp(prefix="kvbm-bench-g4-", dir="/dev/shm")
    try:
        storage(f"memory://bench-{uuid.uuid4().hex[:6]}", data)
        storage(f"file://{shm}/g4", data)
    finally:
        shutil.rmtree(shm, ignore_errors=True)


if __name__ == "__main__":
    main()
