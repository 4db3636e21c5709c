"""G2 <-> G3 bandwidth through DiskStorage, beside the limits measured in the same run.

    python bench/bench_disk.py [--dir DIR] [--gib 2] [--sizes 2M,256K,64K] [--json]

For each block size: HostStorage (G2) -> DiskStorage (G3) writes of --gib GiB in batches
of --batch-mib, then G3 -> G2 reads with every block's CRC-32C checked. Beside it, on the
same filesystem: `dd bs=2M oflag=direct` / `iflag=direct` (one sequential stream), fio with
the same (psync) and with libaio at queue depth 8 when fio is installed, and NIXL's POSIX
backend moving the same blocks between the same host pool and the same slot file when nixl
is importable. Each figure is the best of --repeat runs. The ratio to NIXL is a paired median:
the movers take turns in each round, NIXL's engine (AIO or io_uring) is the one with the best
median, and the ratio is the median over rounds of NIXL's time over kvbm's in that round (on
a shared machine steadier than a ratio of bests, and not biased by taking the best of two
engines per round). Nothing is asserted; all files are removed at the end.
"""

from __future__ import annotations

import argparse
import json
from statistics import median
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from kvbm import ops
from kvbm.tiers.disk import DiskStorage
from kvbm.tiers.host import HostStorage

GB = 1e9
UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    return int(float(text[:-1]) * UNITS[text[-1]]) if text[-1] in UNITS else int(text)


def best(fn, repeat: int) -> float:
    return min(fn() for _ in range(repeat))


# ---------------------------------------------------------------- kvbm and NIXL, interleaved


def kvbm_movers(host, disk, slots, batches) -> dict:
    def write() -> float:
        t = time.perf_counter()
        for b in batches:
            ok = disk.write([(i, slots[i], host.view(i)) for i in b])
            assert all(ok), "a G3 write failed"
        return time.perf_counter() - t

    def read() -> float:
        t = time.perf_counter()
        for b in batches:
            ok = disk.read([(i, slots[i], host.view(i)) for i in b])
            assert all(ok), "a G3 read failed or mismatched"
        return time.perf_counter() - t

    # The same blocks through kvbm's native I/O without the CRC-32C or the index: what the
    # checksum costs, beside NIXL (which checks nothing). Not a storage path: it skips the
    # integrity that makes a torn or stale block a miss.
    views = [host.view(i) for i in range(len(slots))]
    offs = np.array([disk.offset(s) for s in slots], dtype=np.int64)

    def raw(write_: bool) -> float:
        fn = ops.pwrite_blocks if write_ else ops.pread_blocks
        t = time.perf_counter()
        for b in batches:
            st = fn(disk.fd, views[b.start:b.stop], offs[b.start:b.stop], disk.block_nbytes, threads=disk.threads)
            assert not st.any(), "a raw G3 transfer failed"
        return time.perf_counter() - t

    # The bound on this machine: the same raw I/O while a second thread checksums as many bytes
    # of *other* memory (what kvbm's CRC costs the CPUs, with nothing to do with the I/O). In a
    # VM whose disk is emulated on the CPUs behind ours, any guest CPU during I/O stretches it.
    # 256 MiB: more than any last-level cache, so the CRC reads DRAM as kvbm's does
    scratch = np.ones(min(256 << 20, len(slots) * disk.block_nbytes), dtype=np.uint8)
    per = max(1, len(scratch) // disk.block_nbytes)
    scratch_offs = np.arange(per, dtype=np.int64) * disk.block_nbytes

    def raw_beside_crc(write_: bool) -> float:
        todo = len(slots)

        def burn() -> None:
            left = todo
            while left > 0:
                k = min(per, left)
                ops.crc32c_blocks(scratch, scratch_offs[:k], disk.block_nbytes, threads=1)
                left -= k

        t = time.perf_counter()
        th = threading.Thread(target=burn)
        th.start()
        s = raw(write_)
        th.join()
        return max(s, time.perf_counter() - t)

    return {"kvbm": (write, read), "io-only": (lambda: raw(True), lambda: raw(False)),
            "io+other-crc": (lambda: raw_beside_crc(True), lambda: raw_beside_crc(False))}


def size_run(folder: str, nbytes: int, total: int, batch_bytes: int, threads: int, repeat: int,
             nixl_movers=None) -> dict:
    """Best seconds per (mover, direction), the movers taking turns in each repeat so a
    drifting disk (a VM's, say) favours none of them."""
    n = total // nbytes
    host = HostStorage(n, nbytes, pin="never")
    # distinct bytes per block, cheaply: each 8-byte word is its index
    host.pool.view(np.uint64)[:] = np.arange(host.pool.size // 8, dtype=np.uint64)
    disk = DiskStorage(n, nbytes, namespace=f"bench-{nbytes}", path=folder, threads=threads)
    closers = []
    try:
        slots = [disk.allocate() for _ in range(n)]
        per_batch = max(1, batch_bytes // nbytes)
        batches = [range(i, min(n, i + per_batch)) for i in range(0, n, per_batch)]
        movers = kvbm_movers(host, disk, slots, batches)
        if nixl_movers is not None:
            extra, close = nixl_movers(host, disk, slots, batches)
            movers.update(extra)
            closers.append(close)
        movers["kvbm"][0]()  # warm-up: the first write into preallocated extents converts them
        out = {"block": nbytes, "blocks": n, "bytes": n * nbytes, "direct": disk.direct}
        rounds: dict[str, list[float]] = {}
        costs: dict[str, list[tuple[float, float]]] = {}
        for _ in range(repeat):
            for d, k in (("write", 0), ("read", 1)):
                for name, fns in movers.items():
                    c0, t0 = cpu_and_ticks()
                    s = fns[k]()
                    c1, t1 = cpu_and_ticks()
                    costs.setdefault(f"{name}_{d}", []).append(
                        (c1 - c0, (t1[0] - t0[0]) / max(1, t1[1] - t0[1])))
                    rounds.setdefault(f"{name}_{d}", []).append(s)
                    out[f"{name}_{d}_s"] = min(s, out.get(f"{name}_{d}_s", s))
        gib = n * nbytes / (1 << 30)
        out["cpu_s_per_gib"] = {k: round(median(c for c, _ in v) / gib, 3) for k, v in costs.items()}
        out["steal"] = {k: round(median(st for _, st in v), 3) for k, v in costs.items()}
        for d in ("write", "read"):
            times = [v for k, v in out.items() if k.startswith("nixl_") and k.endswith(f"_{d}_s")]
            if times:
                out[f"nixl_{d}_s"] = min(times)
                engines = [k for k in rounds if k.startswith("nixl_") and k.endswith(f"_{d}")]
                best = min(engines, key=lambda k: median(rounds[k]))
                out[f"nixl_{d}_engine"] = best.split("_")[1]
                out[f"ratio_nixl_{d}"] = median([a / b for a, b in zip(rounds[best], rounds[f"kvbm_{d}"])])
                out[f"ratio_nixl_io_only_{d}"] = median([a / b for a, b in zip(rounds[best], rounds[f"io-only_{d}"])])
                out[f"ratio_nixl_io_other_crc_{d}"] = median([a / b for a, b in zip(rounds[best],
                                                                                    rounds[f"io+other-crc_{d}"])])
        return out
    finally:
        for close in closers:
            close()
        disk.close()
        host.close()
        shutil.rmtree(disk.folder, ignore_errors=True)


def cpu_and_ticks() -> tuple[float, tuple[int, int]]:
    """This process's CPU seconds (all threads), and the machine's (steal, all) clock ticks:
    in a VM the host may emulate the disk on the CPUs behind ours, which shows as steal."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    try:
        ticks = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        steal = (ticks[7] if len(ticks) > 7 else 0, sum(ticks))
    except OSError:
        steal = (0, 0)
    return r.ru_utime + r.ru_stime, steal


def nixl_bench():
    """A factory of NIXL POSIX movers over the same host pool and slot file, or (None, why)."""
    try:
        import logging

        from nixl._api import nixl_agent, nixl_agent_config
        logging.getLogger("nixl").setLevel(logging.WARNING)
    except Exception as exc:  # noqa: BLE001 - not installed, or its CUDA wheel refuses to load
        return None, f"nixl is not importable ({exc.__class__.__name__}: {exc})"

    def movers(host, disk, slots, batches):
        out, cleanup = {}, []
        # NIXL's POSIX backend uses AIO by default; io_uring is its other engine. Both run.
        for label, params in (("aio", {}), ("uring", {"use_uring": "true"})):
            agent = nixl_agent(f"bench-{label}-{disk.block_nbytes}", nixl_agent_config(backends=[]))
            try:
                agent.create_backend("POSIX", params)
            except Exception as exc:  # noqa: BLE001 - report and go on without it
                print(f"  NIXL POSIX {label}: cannot start ({exc})", file=sys.stderr)
                continue
            b = ["POSIX"]
            mem = agent.register_memory([(host.address, host.nbytes, 0, "")], "DRAM", backends=b)
            fil = agent.register_memory([(0, disk.capacity_blocks * disk.stride, disk.fd, "")], "FILE", backends=b)
            cleanup.append((agent, mem, fil))

            def move(op: str, agent=agent, b=b) -> float:
                # the same batches as DiskStorage, descriptor lists built per call like its items
                t = time.perf_counter()
                for batch in batches:
                    dram = agent.get_xfer_descs([(host.address + host.offset(i), host.block_nbytes, 0)
                                                 for i in batch], "DRAM")
                    file = agent.get_xfer_descs([(disk.offset(slots[i]), disk.block_nbytes, disk.fd)
                                                 for i in batch], "FILE")
                    h = agent.initialize_xfer(op, dram, file, agent.name, backends=b)
                    state = agent.transfer(h)
                    while state not in ("DONE", "ERR"):
                        state = agent.check_xfer_state(h)
                    agent.release_xfer_handle(h)
                    if state != "DONE":
                        raise RuntimeError(f"NIXL {op} ended in {state}")
                return time.perf_counter() - t

            out[f"nixl_{label}"] = (lambda move=move: move("WRITE"), lambda move=move: move("READ"))

        def close():
            for agent, mem, fil in cleanup:
                agent.deregister_memory(mem, backends=["POSIX"])
                agent.deregister_memory(fil, backends=["POSIX"])

        return out, close

    return movers, None


# ---------------------------------------------------------------- dd and fio


def dd_run(folder: str, total: int, repeat: int) -> dict:
    path = os.path.join(folder, "dd.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    os.posix_fallocate(fd, 0, total)  # like our slot file: allocated up front
    os.close(fd)
    count = total // (2 << 20)

    def dd(*args: str) -> float:
        done = subprocess.run(["dd", "bs=2M", f"count={count}", *args], capture_output=True, text=True, check=True)
        m = re.search(r"copied, ([0-9.]+) s", done.stderr)
        return float(m.group(1))

    try:
        return {"dd_write_s": best(lambda: dd("if=/dev/zero", f"of={path}", "oflag=direct", "conv=notrunc"), repeat),
                "dd_read_s": best(lambda: dd(f"if={path}", "of=/dev/null", "iflag=direct"), repeat)}
    finally:
        os.unlink(path)


def fio_run(folder: str, total: int, repeat: int) -> dict:
    if shutil.which("fio") is None:
        return {}
    path = os.path.join(folder, "fio.bin")
    out = {}
    try:
        for label, engine in (("fio", ["--ioengine=psync"]), ("fio_qd8", ["--ioengine=libaio", "--iodepth=8"])):
            for rw in ("write", "read"):
                def fio(rw=rw, engine=engine) -> float:
                    done = subprocess.run(["fio", "--name=kvbm", f"--filename={path}", f"--rw={rw}", "--bs=2M",
                                           f"--size={total}", "--direct=1", "--fallocate=posix", *engine,
                                           "--output-format=json"], capture_output=True, text=True, check=True)
                    job = json.loads(done.stdout[done.stdout.index("{"):])["jobs"][0][rw]
                    return total / job["bw_bytes"]
                out[f"{label}_{rw}_s"] = best(fio, repeat)
    finally:
        if os.path.exists(path):
            os.unlink(path)
    return out


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=tempfile.gettempdir(), help="a folder on the filesystem to measure")
    p.add_argument("--gib", type=float, default=2.0, help="bytes moved per direction and block size")
    p.add_argument("--sizes", default="2M,256K,64K", help="block sizes")
    p.add_argument("--batch-mib", type=int, default=64, help="bytes per write()/read() call")
    p.add_argument("--threads", type=int, default=0, help="I/O threads per call (0: auto)")
    p.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    p.add_argument("--no-nixl", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    total = int(args.gib * (1 << 30)) // (2 << 20) * (2 << 20)
    folder = tempfile.mkdtemp(prefix="kvbm-bench-disk-", dir=args.dir)
    nixl_fn, nixl_why = (None, "--no-nixl") if args.no_nixl else nixl_bench()
    try:
        limits = dd_run(folder, total, args.repeat)
        limits.update(fio_run(folder, total, args.repeat))
        rows = [size_run(folder, parse_size(s), total, args.batch_mib << 20, args.threads, args.repeat, nixl_fn)
                for s in args.sizes.split(",")]
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    if args.json:
        print(json.dumps({"limits": limits, "rows": rows, "nixl": nixl_why or "ok",
                          "native": ops.HAVE_NATIVE}, indent=2))
        return 0
    def rate(nbytes: int, seconds: float) -> float:
        return nbytes / seconds / GB

    print(f"G3 bench on {args.dir} ({rows[0]['bytes'] / (1 << 30):.1f} GiB per run, best of {args.repeat}, "
          f"O_DIRECT={'yes' if rows[0]['direct'] else 'no'}, native={ops.HAVE_NATIVE}, cpus={os.cpu_count()})")
    for name in ("dd", "fio", "fio_qd8"):
        if f"{name}_write_s" in limits:
            label = {"dd": "dd bs=2M direct", "fio": "fio psync bs=2M direct", "fio_qd8": "fio libaio qd8 bs=2M"}[name]
            print(f"  {label:<24} write {rate(total, limits[f'{name}_write_s']):6.2f} GB/s   "
                  f"read {rate(total, limits[f'{name}_read_s']):6.2f} GB/s")
    if nixl_why:
        print(f"  NIXL POSIX: skipped, {nixl_why}")
    head = f"  {'block':>6} | {'write GB/s':>10} {'/dd':>5} {'/fio':>5} {'/nixl':>6} | " \
           f"{'read GB/s':>9} {'/dd':>5} {'/fio':>5} {'/nixl':>6} | {'nixl w/r GB/s':>13}"
    print(head)
    for r in rows:
        cells = [f"  {r['block'] >> 10:>5}K |"]
        for d in ("write", "read"):
            ours = rate(r["bytes"], r[f"kvbm_{d}_s"])
            cells.append(f"{ours:{10 if d == 'write' else 9}.2f}")
            for ref in ("dd", "fio"):
                ref_s = limits.get(f"{ref}_{d}_s")
                cells.append(f"{ours / rate(total, ref_s):5.2f}" if ref_s else f"{'-':>5}")
            nx = r.get(f"ratio_nixl_{d}")  # paired median
            cells.append((f"{nx:6.2f}" if nx else f"{'-':>6}") + " |")
        nw, nr = r.get("nixl_write_s"), r.get("nixl_read_s")
        cells.append(f"{rate(r['bytes'], nw):6.2f}/{rate(r['bytes'], nr):<6.2f}" if nw else f"{'-':>13}")
        print(" ".join(cells))
    print("  where the time goes (medians): this process's CPU s/GiB, and steal (the share of all CPU ticks the"
          " host took) while each ran")
    for r in rows:
        costs = ", ".join(f"{k} {v:.2f} s ({r['steal'][k]:.0%})" for k, v in r["cpu_s_per_gib"].items())
        print(f"  {r['block'] >> 10:>5}K: {costs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
