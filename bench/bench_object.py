"""G2 <-> G4 throughput: ObjectStorage against raw fsspec puts/gets of the same objects.

    python bench/bench_object.py                      # 64 x 16 MiB through moto on loopback, and file://
    python bench/bench_object.py --blocks 16 --repeat 1   # a quick look

The S3 endpoint is moto's server in a subprocess on 127.0.0.1 (so it has its own GIL).
Blocks live in a G2 host pool. "raw" is s3fs's own batch API (`pipe` / `cat` / `cat_ranges`,
batch_size = the same concurrency) moving the bare payloads, with no header, no CRC-32C, no
MAC and no copy into G2: the limit ObjectStorage is measured against, on two clients:

    raw s3fs            a stock S3FileSystem (botocore's defaults: it CRC32s every PUT body
                        and every whole GET) with the same connection pool: the peer
    raw, kvbm's config  the very S3FileSystem ObjectStorage uses (botocore's checksums off:
                        kvbm's CRC-32C and MAC cover the payload): the strict limit

kvbm writes v3 objects (Poly1305 MAC) when `cryptography` is installed; "kvbm write/read, v2
HMAC" is the same storage writing and reading v2 objects (HMAC-SHA256, what kvbm wrote before
and writes without `cryptography`), in its own namespace, taking turns with the rest.

The ratio is the faster raw way's time over kvbm's (1.0 = no overhead), against each. Every
timing is the median of --repeat runs, all ways taking turns so drift hits them alike; client
CPU (this process, all threads) per GiB beside it. Reports, never asserts; every block read
back is compared with what was written. --json prints the figures as JSON (bench/report.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from kvbm import ops
from kvbm.tiers.host import HostStorage
from kvbm.tiers.object import ObjectStorage
from common import cpu_model  # bench/common.py

MiB = 1 << 20
BUCKET = "kvbm-bench"


def machine() -> str:
    cpu = cpu_model()
    versions = []
    for mod in ("numpy", "fsspec", "s3fs", "aiobotocore", "botocore", "moto"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            pass
    return (f"{platform.node()}: {cpu}, {len(os.sched_getaffinity(0))} cpus, "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
            f"Python {platform.python_version()}, kvbm crc32c={ops.CRC32C_IMPL}\n  " + ", ".join(versions))


def per_byte_costs(buf: np.ndarray) -> dict[str, float]:
    """CPU seconds per GiB, on this machine now, of what kvbm adds to each object: the CRC-32C,
    the MAC (kvbm/tiers/seal.py: Poly1305 for v3 objects, HMAC-SHA256 for v2), the copy into or
    out of G2, and botocore's zlib CRC32 (what a stock client computes over each PUT body;
    kvbm's client skips it)."""
    import hashlib
    import hmac
    import zlib

    view, out = memoryview(buf), np.empty_like(buf)
    ways = {"crc32c": lambda: ops.crc32c(view), "hmac_sha256": lambda: hmac.new(b"k" * 32, view, hashlib.sha256).digest(),
            "copy": lambda: np.copyto(out, buf), "botocore_crc32": lambda: zlib.crc32(view)}
    try:
        from cryptography.hazmat.primitives.poly1305 import Poly1305

        ways["poly1305"] = lambda: Poly1305.generate_tag(b"k" * 32, view)
    except ImportError:
        pass
    costs = {}
    for name, fn in ways.items():
        best = float("inf")
        for _ in range(3):
            c0 = time.process_time()
            fn()
            best = min(best, time.process_time() - c0)
        costs[name] = best * 2**30 / buf.nbytes
    return costs


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Case:
    """One medium: ObjectStorage and raw fsspec batches over the same filesystem instance."""

    def __init__(self, name: str, g4: ObjectStorage, src: HostStorage, dst: HostStorage, conc: int,
                 stock=None, g4_v2: ObjectStorage | None = None) -> None:
        self.name, self.g4, self.src, self.dst, self.conc = name, g4, src, dst, conc
        self.stock = stock  # a stock S3FileSystem on the same endpoint (async cases)
        self.g4_v2 = g4_v2  # the same storage writing v2 (HMAC-SHA256) objects, own namespace
        n = src.capacity_blocks
        self.keys = [i.to_bytes(16, "little") for i in range(1, n + 1)]
        self.slots = [g4.allocate() for _ in range(n)]
        self.slots_v2 = [g4_v2.allocate() for _ in range(n)] if g4_v2 is not None else []
        self.raw_paths = [f"{g4.prefix}-raw/{k.hex()}" for k in self.keys]
        if not g4._async:
            g4.fs.makedirs(f"{g4.prefix}-raw", exist_ok=True)
        # botocore takes bytes, not a memoryview: made here, outside the timings, so the raw
        # baseline is the strict limit (kvbm pays its header copy and CRC inside its time)
        self.raw_data = {p: src.view(i).tobytes() for i, p in enumerate(self.raw_paths)}
        self.ops = {"kvbm write": self.kvbm_write, "raw write": self.raw_write}
        if g4_v2 is not None:
            self.ops["kvbm write, v2 HMAC"] = lambda: self.kvbm_write(v2=True)
        if stock is not None:
            self.ops["raw write, kvbm's config"] = lambda: self.raw_write(self.g4.fs)
            self.ops["raw write"] = lambda: self.raw_write(stock)
        self.ops.update({"kvbm read": self.kvbm_read, "raw read": self.raw_read})
        if g4_v2 is not None:
            self.ops["kvbm read, v2 HMAC"] = lambda: self.kvbm_read(v2=True)
        if stock is not None:  # s3fs sends a HEAD before each plain GET; a ranged GET does not
            self.ops["raw read"] = lambda: self.raw_read(stock)
            self.ops["raw read, ranged"] = lambda: self.raw_read_ranged(stock)
            self.ops["raw read, ranged, kvbm's config"] = lambda: self.raw_read_ranged(self.g4.fs)
        self.wall: dict[str, list[float]] = {k: [] for k in self.ops}
        self.cpu: dict[str, list[float]] = {k: [] for k in self.ops}

    def kvbm_write(self, v2: bool = False) -> None:
        g4, slots = (self.g4_v2, self.slots_v2) if v2 else (self.g4, self.slots)
        items = [(k, s, self.src.view(i)) for i, (k, s) in enumerate(zip(self.keys, slots))]
        assert all(g4.write(items)), f"{self.name}: a write failed ({g4.errors})"

    def kvbm_read(self, v2: bool = False) -> None:
        g4, slots = (self.g4_v2, self.slots_v2) if v2 else (self.g4, self.slots)
        items = [(k, s, self.dst.view(i)) for i, (k, s) in enumerate(zip(self.keys, slots))]
        assert all(g4.read(items)), f"{self.name}: a read failed ({g4.errors})"

    def raw_write(self, fs=None) -> None:
        fs = fs or self.g4.fs
        if self.g4._async:
            fs.pipe(self.raw_data, batch_size=self.conc)
        else:  # synchronous filesystems have no batch API: a thread pool of the same size
            with ThreadPoolExecutor(self.conc) as pool:
                list(pool.map(lambda kv: fs.pipe_file(*kv), self.raw_data.items()))

    def raw_read(self, fs=None) -> None:
        fs = fs or self.g4.fs
        if self.g4._async:
            out = fs.cat(self.raw_paths, batch_size=self.conc)
        else:
            with ThreadPoolExecutor(self.conc) as pool:
                out = dict(zip(self.raw_paths, pool.map(fs.cat_file, self.raw_paths)))
        assert len(out) == len(self.raw_paths)

    def raw_read_ranged(self, fs) -> None:
        n = len(self.raw_paths)
        out = fs.cat_ranges(self.raw_paths, [0] * n, [None] * n, batch_size=self.conc)
        assert len(out) == n

    def run(self, repeat: int, sync: bool) -> None:
        for fn in self.ops.values():  # warm-up: connections, first-touch pages, new objects
            fn()
        for _ in range(repeat):
            for label, fn in self.ops.items():
                if sync:
                    os.sync()  # the last run's dirty pages must not be written back in this one
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                self.wall[label].append(time.perf_counter() - t0)
                self.cpu[label].append(time.process_time() - c0)
            self.dst.pool[:] = 0  # every run must land its bytes again
        self.kvbm_read()
        assert np.array_equal(self.dst.pool, self.src.pool), f"{self.name}: bytes differ after the round trip"
        if self.g4_v2 is not None:
            self.dst.pool[:] = 0
            self.kvbm_read(v2=True)
            assert np.array_equal(self.dst.pool, self.src.pool), f"{self.name}: v2 bytes differ after the round trip"

    def report(self) -> dict:
        gib = self.src.capacity_blocks * self.src.block_nbytes / 2**30
        med = {k: statistics.median(v) for k, v in self.wall.items()}
        cpu = {k: statistics.median(v) for k, v in self.cpu.items()}
        out = {"case": self.name, "gib": gib, "rows": [], "ratios": {}}
        for op in ("write", "read"):
            raws = [k for k in med if k.startswith(f"raw {op}")]
            peers = [k for k in raws if "kvbm's config" not in k]
            v2 = [f"kvbm {op}, v2 HMAC"] if f"kvbm {op}, v2 HMAC" in med else []
            for label in [f"kvbm {op}", *v2, *raws]:
                out["rows"].append({"label": label, "gibs": gib / med[label], "cpu_s_per_gib": cpu[label] / gib,
                                    "runs": self.wall[label]})
                print(f"  {self.name:<8} {label:<32} {gib / med[label]:6.3f} GiB/s  "
                      f"client cpu {cpu[label] / gib:5.2f} s/GiB  runs {_runs(self.wall[label])}")
            for kind, among in (("peer", peers), ("strict", raws)):
                limit = min(among, key=med.get)  # the faster raw way is the limit
                ratio = med[limit] / med[f"kvbm {op}"]
                out["ratios"][f"{op} {kind}"] = {"ratio": ratio, "limit": limit}
                if kind == "peer" or among != peers:
                    print(f"  {self.name:<8} {op:<5} ratio kvbm / {limit}: {ratio:.2f}")
                if v2:  # the same ratio for v2 (HMAC-SHA256) objects, for the record
                    out["ratios"][f"{op} {kind}, v2 HMAC"] = {"ratio": med[limit] / med[v2[0]], "limit": limit}
                    if kind == "peer" or among != peers:
                        print(f"  {self.name:<8} {op:<5} ratio kvbm v2 HMAC / {limit}: {med[limit] / med[v2[0]]:.2f}")
        return out


def _v2(g4: ObjectStorage, other: ObjectStorage) -> ObjectStorage | None:
    """`other` writing v2 (HMAC-SHA256) objects, beside g4 writing v3; None when g4 itself
    writes v2 (no `cryptography`): nothing to compare."""
    if g4.write_version == 2:
        other.close()
        return None
    other.write_version = 2
    return other


def _runs(ts: list[float]) -> str:
    return "/".join(f"{t:.2f}" for t in ts) + " s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--block-mib", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="parent folder for the file:// case (default: $TMPDIR)")
    ap.add_argument("--skip-s3", action="store_true")
    ap.add_argument("--skip-file", action="store_true")
    ap.add_argument("--json", action="store_true", help="the figures as JSON on stdout (the table on stderr)")
    args = ap.parse_args()
    stdout = sys.stdout
    if args.json:
        sys.stdout = sys.stderr
    results = {"machine": machine(), "loadavg": os.getloadavg()[0], "cases": []}

    t_start = time.perf_counter()
    n, nbytes, conc = args.blocks, args.block_mib * MiB, args.concurrency
    print(results["machine"])
    results["head"] = (f"{n} blocks x {args.block_mib} MiB = {n * nbytes / 2**30:.2f} GiB, concurrency {conc}, "
                       f"median of {args.repeat} after a warm-up; ratio = raw time / kvbm time (1.0 = no overhead)")
    print(results["head"])

    src = HostStorage(n, nbytes, pin="never")
    dst = HostStorage(n, nbytes, pin="never")
    rng = np.random.default_rng(0)
    for i in range(n):
        src.view(i)[:] = rng.integers(0, 256, nbytes, dtype=np.uint8)
    results["cpu_s_per_gib"] = per_byte_costs(src.view(0))
    print("CPU s/GiB on this machine now: " + ", ".join(f"{k} {v:.2f}" for k, v in results["cpu_s_per_gib"].items()))

    if not args.skip_s3:  # first, before file:// leaves dirty pages for moto's spill files to queue behind
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from s3server import FAKE_CREDENTIALS, MotoServer

        os.environ.update(FAKE_CREDENTIALS)
        with MotoServer() as server:
            # botocore's read timeout as stock s3fs has it (60 s, not kvbm's 5 s): on a loaded
            # machine a starved moto answers a 16 MiB PUT late; the bench measures bandwidth
            opts = {"endpoint_url": server.endpoint, "config_kwargs": {"read_timeout": 60}}
            g4 = ObjectStorage(n, nbytes, namespace="bench", url=f"s3://{BUCKET}/g4",
                               max_concurrency=conc, storage_options=opts, timeout=120)
            g4.fs.mkdir(BUCKET)
            g4_v2 = _v2(g4, ObjectStorage(n, nbytes, namespace="bench-v2", url=f"s3://{BUCKET}/g4",
                                          max_concurrency=conc, storage_options=opts, timeout=120))
            import s3fs

            stock = s3fs.S3FileSystem(endpoint_url=server.endpoint, skip_instance_cache=True,
                                      config_kwargs={"max_pool_connections": max(10, conc)})
            case = Case("s3/moto", g4, src, dst, conc, stock=stock, g4_v2=g4_v2)
            case.run(args.repeat, sync=False)
            results["cases"].append(case.report())
            print(f"  s3/moto  errors {g4.errors}" + (f", v2 {g4_v2.errors}" if g4_v2 else ""))
            g4.close()
            if g4_v2 is not None:
                g4_v2.close()

    if not args.skip_file:
        tmp = tempfile.mkdtemp(prefix="kvbm-bench-g4-", dir=args.dir)
        try:
            g4 = ObjectStorage(n, nbytes, namespace="bench", url=f"file://{tmp}", max_concurrency=conc)
            g4_v2 = _v2(g4, ObjectStorage(n, nbytes, namespace="bench-v2", url=f"file://{tmp}",
                                          max_concurrency=conc))
            case = Case("file://", g4, src, dst, conc, g4_v2=g4_v2)
            case.run(args.repeat, sync=True)
            print(f"  file://  in {tmp} (page cache; os.sync() before each timed run)")
            results["cases"].append(case.report())
            g4.close()
            if g4_v2 is not None:
                g4_v2.close()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if args.json:
        sys.stdout = stdout
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
