"""G1 <-> G2 bandwidth: how blocks leave and re-enter GPU memory, against the copy-engine limit.

Paths, all moving the same N scattered blocks between a device pool and a pinned host pool:
  limit      one contiguous cudaMemcpy of N * block bytes (what PCIe / C2C allows)
  memcpy     one cudaMemcpyAsync per block (torch .copy_ on slices), batched on one stream
  kernel     kvbm's CUDA gather kernel (paged pool -> contiguous device staging) + one memcpy,
             and scatter on the way back; also with max_ctas=8 (fewer SMs taken from a model)
  direct     kvbm's slot-to-slot kernel (ops.cuda_copy_blocks): device slots <-> pinned host
             slots in one launch, no staging (what the G1 <-> G2 transfer handler uses);
             also with max_ctas=8
  tier       the same through kvbm.transfer.transfer between a DeviceStorage and a pinned
             HostStorage (handler, locks, stats, offsets built in Python, synchronous)

Prints GB/s per path and the ratio to the limit, per block size (each size moves ~1 GiB).

Interference (--interference, on by default): a copy kernel runs on the SMs, a cudaMemcpy on
the copy engines. While a bf16 8192^3 matmul loop runs on one stream, each offload path runs
on another; reported: the matmuls' slowdown against running alone, and the copy's GB/s
under that load. This is the end-to-end question ARCHITECTURE.md asks of a copy kernel.
Needs a CUDA device and torch; without one it says so and exits 0 (bench/gpu_check.sh runs it
on a lent machine).

    python bench/bench_device.py [--block-kib 16,256,2048] [--total-mib 1024] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def measure(torch, ops, n: int, nb: int, repeat: int) -> dict:
    from kvbm import transfer as xfer
    from kvbm.tiers.device import DeviceStorage
    from kvbm.tiers.host import HostStorage

    total = n * nb
    dev = DeviceStorage(2 * n, nb, device="cuda")  # paged: 2n blocks, n of them moved
    dev.pool.copy_(torch.randint(0, 255, (2 * n * nb,), dtype=torch.uint8, device="cuda"))
    pool = dev.pool
    host_tier = HostStorage(2 * n, nb)
    assert host_tier.pinned, "HostStorage did not pin its pool although CUDA is present"
    host_pool = host_tier.pool
    ids = torch.randperm(2 * n)[:n].numpy()
    hids = torch.randperm(2 * n)[:n].numpy()  # scattered G2 slots
    dev_off, host_off = ids.astype("int64") * nb, hids.astype("int64") * nb
    staging = torch.empty(total, dtype=torch.uint8, device="cuda")
    host = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    stream = torch.cuda.current_stream()
    torch.cuda.synchronize()

    def timed(fn):
        best = float("inf")
        for _ in range(repeat):
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        return total / best / 1e9

    def limit_d2h():
        host.copy_(staging, non_blocking=True)

    def limit_h2d():
        staging.copy_(host, non_blocking=True)

    def memcpy_d2h():
        for i, b in enumerate(ids):
            host[i * nb:(i + 1) * nb].copy_(pool[b * nb:(b + 1) * nb], non_blocking=True)

    def memcpy_h2d():
        for i, b in enumerate(ids):
            pool[b * nb:(b + 1) * nb].copy_(host[i * nb:(i + 1) * nb], non_blocking=True)

    def kernel_d2h(ctas=0):
        ops.gather_blocks(pool, staging, ids, nb, stream=stream, max_ctas=ctas)
        host.copy_(staging, non_blocking=True)

    def kernel_h2d(ctas=0):
        staging.copy_(host, non_blocking=True)
        ops.scatter_blocks(pool, staging, ids, nb, stream=stream, max_ctas=ctas)

    def direct_d2h(ctas=0):
        ops.cuda_copy_blocks(pool, dev_off, host_pool, host_off, nb, stream=stream, max_ctas=ctas)

    def direct_h2d(ctas=0):
        ops.cuda_copy_blocks(host_pool, host_off, pool, dev_off, nb, stream=stream, max_ctas=ctas)

    keys = list(range(n))

    def tier_d2h():
        xfer.transfer(dev, ids.tolist(), host_tier, hids.tolist(), keys)

    def tier_h2d():
        xfer.transfer(host_tier, hids.tolist(), dev, ids.tolist(), keys)

    # correctness first: every path must move exactly the blocks it named
    expect = pool.view(2 * n, nb)[torch.from_numpy(ids).cuda()].cpu().reshape(-1).numpy()
    kernel_d2h()
    torch.cuda.synchronize()
    assert (host.numpy() == expect).all(), "gather kernel moved wrong bytes"
    host_pool[:] = 0
    direct_d2h()
    torch.cuda.synchronize()
    assert (host_pool.reshape(2 * n, nb)[hids] == expect.reshape(n, nb)).all(), "direct kernel moved wrong bytes"
    host_pool[:] = 0
    tier_d2h()
    assert (host_pool.reshape(2 * n, nb)[hids] == expect.reshape(n, nb)).all(), "tier transfer moved wrong bytes"

    paths = {"limit": (limit_d2h, limit_h2d), "memcpy": (memcpy_d2h, memcpy_h2d),
             "kernel": (kernel_d2h, kernel_h2d), "kernel8": (lambda: kernel_d2h(8), lambda: kernel_h2d(8)),
             "direct": (direct_d2h, direct_h2d), "direct8": (lambda: direct_d2h(8), lambda: direct_h2d(8)),
             "tier": (tier_d2h, tier_h2d)}
    res = {"blocks": n, "block_bytes": nb}
    for name, (d2h, h2d) in paths.items():
        res[f"{name}_d2h"], res[f"{name}_h2d"] = timed(d2h), timed(h2d)
    return res


def interference(torch, ops, nb: int = 256 * 1024, n: int = 2048, matmuls: int = 60) -> dict:
    """Matmul slowdown and copy GB/s when each G1 -> G2 path runs beside a matmul loop."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    pool = torch.randint(0, 255, (2 * n * nb,), dtype=torch.uint8, device="cuda")
    host = torch.empty(2 * n * nb, dtype=torch.uint8, pin_memory=True).numpy()
    ids = torch.randperm(2 * n)[:n].numpy().astype("int64") * nb
    hids = torch.randperm(2 * n)[:n].numpy().astype("int64") * nb
    hpool = torch.from_numpy(host)
    compute, copy = torch.cuda.Stream(), torch.cuda.Stream()

    def run_matmuls():
        with torch.cuda.stream(compute):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(matmuls):
                a @ b
            end.record()
        return start, end

    def memcpy():
        with torch.cuda.stream(copy):
            for s, d in zip(ids, hids):
                hpool[d:d + nb].copy_(pool[s:s + nb], non_blocking=True)

    def direct(ctas):
        ops.cuda_copy_blocks(pool, ids, host, hids, nb, stream=copy, max_ctas=ctas)

    paths = {"memcpy": memcpy, "direct": lambda: direct(0), "direct8": lambda: direct(8),
             "direct16": lambda: direct(16), "direct32": lambda: direct(32),
             "direct8_h2d": lambda: ops.cuda_copy_blocks(host, hids, pool, ids, nb, stream=copy, max_ctas=8)}
    run_matmuls()
    torch.cuda.synchronize()
    s0, e0 = run_matmuls()
    torch.cuda.synchronize()
    alone = s0.elapsed_time(e0)
    out = {"matmul_ms_alone": alone, "block_bytes": nb, "blocks": n}
    for name, fn in paths.items():
        torch.cuda.synchronize()
        s, e = run_matmuls()
        cs, ce = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cs.record(copy)
        rounds = 0
        while not e.query():  # keep the copy path busy for the whole matmul loop
            fn()
            copy.synchronize()  # one round at a time: the copy never outlives the matmuls by much
            rounds += 1
        ce.record(copy)
        torch.cuda.synchronize()
        out[name] = {"matmul_slowdown": s.elapsed_time(e) / alone - 1,
                     "copy_gb_per_s": rounds * n * nb / (cs.elapsed_time(ce) / 1e3) / 1e9, "rounds": rounds}
    return out


def connector_save(torch, blocks: int = 64, layers: int = 32, repeat: int = 5) -> dict:
    """The vLLM connector's save of one step's blocks (Llama-3.1-8B, TP1: 32 layers of
    [2, num_blocks, 16, 8, 128] bf16, 2 MiB a block): how long the engine's thread is held.
    sync: torch index_select + copy into pinned rows (the CPU path, and GPU with async_save off);
    kernel: PagedKV.gather_async (copy kernel on kvbm's stream, 8 CTAs): launch time, then time
    until its event completes."""
    from kvbm.connectors.paged import PagedKV

    kv = [torch.randn(2, 1024, 16, 8, 128, device="cuda").to(torch.bfloat16) for _ in range(layers)]
    paged = PagedKV(kv)
    ids = torch.randperm(1024)[:blocks].tolist()
    staging, ev = paged.gather_async(ids)
    ev.synchronize()
    assert torch.equal(staging, paged.gather(ids)), "kernel gather differs from torch indexing"
    sync, launch, done = [], [], []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t = time.perf_counter()
        paged.gather(ids)
        sync.append(time.perf_counter() - t)
        torch.cuda.synchronize()
        t = time.perf_counter()
        _, ev = paged.gather_async(ids)
        launch.append(time.perf_counter() - t)
        ev.synchronize()
        done.append(time.perf_counter() - t)
    nbytes = blocks * paged.block_nbytes
    return {"blocks": blocks, "block_bytes": paged.block_nbytes, "sync_ms": 1e3 * min(sync),
            "kernel_launch_ms": 1e3 * min(launch), "kernel_done_ms": 1e3 * min(done),
            "sync_gb_per_s": nbytes / min(sync) / 1e9, "kernel_gb_per_s": nbytes / min(done) / 1e9}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block-kib", default="16,256,2048", help="comma-separated block sizes in KiB")
    ap.add_argument("--total-mib", type=int, default=1024, help="bytes moved per path and size")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-interference", action="store_true", help="skip the matmul-beside-copy measurement")
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        print("bench_device: torch is not installed; nothing to measure")
        return 0
    from kvbm import ops

    if not torch.cuda.is_available() or not ops.cuda_available():
        print(f"bench_device: no CUDA device (torch.cuda={torch.cuda.is_available()}, "
              f"kvbm CUDA built={ops.CUDA_BUILT}); nothing to measure")
        return 0
    out = {"device": torch.cuda.get_device_name(0), "sizes": []}
    for kib in (int(x) for x in args.block_kib.split(",")):
        nb = kib * 1024
        n = max(1, args.total_mib * 2**20 // nb)
        res = measure(torch, ops, n, nb, args.repeat)
        torch.cuda.empty_cache()
        out["sizes"].append(res)
        if args.json:
            continue
        print(f"{out['device']}: {n} blocks x {kib} KiB ({n * nb / 2**30:.2f} GiB), best of {args.repeat}, GB/s")
        for d in ("d2h", "h2d"):
            lim = res[f"limit_{d}"]
            cells = " | ".join(f"{p} {res[f'{p}_{d}']:6.1f} ({res[f'{p}_{d}'] / lim:.2f}x)"
                               for p in ("memcpy", "kernel", "kernel8", "direct", "direct8", "tier"))
            print(f"  {d}: limit {lim:6.1f} | {cells}", flush=True)
    if not args.no_interference:
        out["interference"] = inter = interference(torch, ops)
        if not args.json:
            print(f"interference: {inter['blocks']} x {inter['block_bytes'] // 1024} KiB blocks G1 -> pinned G2 "
                  f"beside bf16 8192^3 matmuls ({inter['matmul_ms_alone']:.1f} ms alone)")
            for name in ("memcpy", "direct", "direct8", "direct16", "direct32", "direct8_h2d"):
                r = inter[name]
                print(f"  {name:9s} matmul slowdown {100 * r['matmul_slowdown']:5.1f} %  "
                      f"copy {r['copy_gb_per_s']:6.1f} GB/s under load ({r['rounds']} rounds)")
    out["connector_save"] = save = connector_save(torch)
    if not args.json:
        print(f"connector save: {save['blocks']} blocks x {save['block_bytes'] // 2**20} MiB (32 layers): "
              f"sync gather holds the engine {save['sync_ms']:.2f} ms ({save['sync_gb_per_s']:.1f} GB/s); "
              f"kernel gather {save['kernel_launch_ms']:.2f} ms to launch, done after {save['kernel_done_ms']:.2f} ms "
              f"({save['kernel_gb_per_s']:.1f} GB/s)")
    if args.json:
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
