"""G1 <-> G2 bandwidth: how blocks leave and re-enter GPU memory, against the copy-engine limit.

Paths, all moving the same N blocks between a device pool and a pinned host pool:
  limit      one contiguous cudaMemcpy of N * block bytes (what PCIe / C2C allows)
  memcpy     one cudaMemcpyAsync per block (torch .copy_ on slices), batched on one stream
  kernel     kvbm's CUDA gather kernel (paged pool -> contiguous device staging) + one memcpy,
             and scatter on the way back; also with max_ctas=8 (fewer SMs taken from a model)

Prints GB/s per path and the ratio to the limit. Needs a CUDA device and torch; without one it
says so and exits 0 (the GPU check script runs it on a lent machine).

    python bench/bench_device.py [--blocks 4096] [--block-kib 256] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=4096)
    ap.add_argument("--block-kib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true")
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
    n, nb = args.blocks, args.block_kib * 1024
    total = n * nb
    pool = torch.randint(0, 255, (2 * n * nb,), dtype=torch.uint8, device="cuda")  # paged: 2n blocks
    ids = torch.randperm(2 * n)[:n].numpy()
    staging = torch.empty(total, dtype=torch.uint8, device="cuda")
    host = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    stream = torch.cuda.current_stream()

    def timed(fn):
        best = float("inf")
        for _ in range(args.repeat):
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

    # correctness first: a gather + copy out must equal the blocks it named
    kernel_d2h()
    torch.cuda.synchronize()
    expect = pool.view(2 * n, nb)[torch.from_numpy(ids).cuda()].cpu().reshape(-1)
    assert torch.equal(host, expect), "gather kernel moved wrong bytes"

    res = {
        "device": torch.cuda.get_device_name(0), "blocks": n, "block_bytes": nb,
        "limit_d2h": timed(limit_d2h), "limit_h2d": timed(limit_h2d),
        "memcpy_d2h": timed(memcpy_d2h), "memcpy_h2d": timed(memcpy_h2d),
        "kernel_d2h": timed(kernel_d2h), "kernel_h2d": timed(kernel_h2d),
        "kernel8_d2h": timed(lambda: kernel_d2h(8)), "kernel8_h2d": timed(lambda: kernel_h2d(8)),
    }
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{res['device']}: {n} blocks x {args.block_kib} KiB ({total / 2**30:.2f} GiB), best of {args.repeat}")
    for d in ("d2h", "h2d"):
        lim = res[f"limit_{d}"]
        print(f"  {d}: limit {lim:6.1f} GB/s | per-block memcpy {res[f'memcpy_{d}']:6.1f} "
              f"({res[f'memcpy_{d}'] / lim:.2f}x) | kernel {res[f'kernel_{d}']:6.1f} ({res[f'kernel_{d}'] / lim:.2f}x)"
              f" | kernel, 8 CTAs {res[f'kernel8_{d}']:6.1f} ({res[f'kernel8_{d}'] / lim:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
