"""`kvbm demo`: the real manager moving real KV bytes over G2 (host), G3 (disk) and G4 (objects).

A slice of the bundled Mooncake trace is replayed as an engine would: look a request's blocks
up, load the hit prefix into engine buffers, store the rest. Every block's bytes are a pattern
derived from its key, so each onboarded block is checked byte for byte against what was
stored, wherever it travelled (G2 -> G3 -> G4 and back up).

Defaults: Llama-3.1-8B's KV layout (32 layers, 8 KV heads, head dim 128, bf16) as held by one
rank of an 8-way tensor-parallel deployment (1 KV head per rank), 16-token blocks: 256 KiB per
block. Each trace block id stands for one such block. 1,000 requests (27k block accesses) with
G2 = 500 blocks, G3 = 2,000 blocks in a temporary directory, and G4 = 8,000 blocks in a local
directory through fsspec (file://) move several GB and finish in well under a minute on two cores.
Each tier takes its config default eviction (auto on every tier, which runs lru on G3 and G4) unless `eviction`
(`kvbm demo --policy`) names one for all three.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .blocks import KVLayout
from .build import check_dir
from .config import KVBMConfig
from .manager import BlockManager
from .sim.traces import TraceError, load_trace

LLAMA_8B_TP8 = dict(num_layers=32, num_kv_heads=1, head_dim=128, block_size=16, dtype="bfloat16",
                    tp_rank=0, tp_size=8)


def block_content(key: int, nbytes: int) -> np.ndarray:
    """Distinct, cheap, key-derived bytes: 64-bit words (key * odd constant + word index)."""
    words = (nbytes + 7) // 8
    base = np.uint64((key * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF)
    arr = np.arange(words, dtype=np.uint64)
    arr *= np.uint64(0xBF58476D1CE4E5B9)
    arr ^= base
    return arr.view(np.uint8)[:nbytes]


def run_demo(trace_path: str | Path, *, requests: int = 1000, g2: int = 500, g3: int = 2000,
             g4: int = 8000, layout: KVLayout | None = None, workdir: str | Path | None = None,
             keep: bool = False, eviction: str | None = None, progress: bool = True) -> dict[str, Any]:
    layout = layout or KVLayout(**LLAMA_8B_TP8)
    nbytes = layout.block_nbytes
    trace = load_trace(trace_path, limit=requests)
    if not trace.requests:
        raise TraceError(f"{trace_path}: the trace has no requests, nothing to replay; give a trace "
                         f"with one JSON object per line (see kvbm/sim/data/README.md)")
    if workdir:
        check_dir(workdir, "--workdir")  # before anything is created
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="kvbm-demo-"))
    made = not root.exists()  # ours to remove if the demo cannot start
    root.mkdir(parents=True, exist_ok=True)
    policy = {"eviction": eviction} if eviction else {}  # else each tier's default (auto; lru below G2)
    config = KVBMConfig.from_dict({
        "namespace": {"model": "meta-llama/Llama-3.1-8B"},
        "tiers": [
            {"name": "g2", "capacity": g2, "storage": "host", **policy},
            {"name": "g3", "capacity": g3, "storage": {"name": "disk", "path": str(root / "g3")}, **policy},
            {"name": "g4", "capacity": g4, "storage": {"name": "object", "url": f"file://{root / 'g4'}"},
             **policy},
        ],
        "events": False,
    })
    config.layout = layout
    verified = mismatched = failed_loads = accesses = prefix_hits = 0
    t0 = time.perf_counter()
    try:
        mgr = BlockManager.from_config(config)
    except BaseException:
        if made or not workdir:
            shutil.rmtree(root, ignore_errors=True)
        raise
    try:
        reqs = trace.requests
        if progress:
            from tqdm import tqdm

            reqs = tqdm(reqs, desc="kvbm demo", unit="req", delay=1.0, leave=False)
        for req in reqs:
            keys = list(req.hash_ids)
            accesses += len(keys)
            n, _ = mgr.lookup(keys)
            if n:
                out = [np.empty(nbytes, np.uint8) for _ in range(n)]
                job = mgr.load(keys[:n], destination=out)
                failed_loads += n - job.loaded
                for key, buf in zip(keys[:job.loaded], out):
                    if np.array_equal(buf, block_content(key, nbytes)):
                        verified += 1
                    else:
                        mismatched += 1
                n = job.loaded
                prefix_hits += n
            if n < len(keys):
                rest = keys[n:]
                mgr.store(rest, source=[block_content(k, nbytes) for k in rest],
                          parent=keys[n - 1] if n else None)
        seconds = time.perf_counter() - t0
        stats = mgr.stats()
    finally:
        mgr.close()
        if not keep and not workdir:
            shutil.rmtree(root, ignore_errors=True)
    moved = sum(p["bytes"] for p in stats["transfers"].values())
    return {
        "trace": str(trace_path),
        "requests": len(trace.requests),
        "block_accesses": accesses,
        "block_nbytes": nbytes,
        "layout": {k: getattr(layout, k) for k in LLAMA_8B_TP8},
        "prefix_hit_ratio": prefix_hits / accesses if accesses else 0.0,
        "verified_blocks": verified,
        "mismatched_blocks": mismatched,
        "failed_loads": failed_loads,
        "bytes_moved": moved,
        "seconds": seconds,
        "tiers": stats["tiers"],
        "transfers": stats["transfers"],
        "workdir": str(root) if keep or workdir else None,
    }


def print_report(r: dict[str, Any]) -> None:
    mib = r["block_nbytes"] / 2**20
    lay = r["layout"]
    print(f"kvbm demo: {r['requests']:,} requests, {r['block_accesses']:,} block accesses of {mib:.2f} MiB "
          f"({lay['num_layers']} layers x {lay['num_kv_heads']} KV head x {lay['head_dim']} x "
          f"{lay['block_size']} tokens, {lay['dtype']}, TP rank {lay['tp_rank']}/{lay['tp_size']})")
    print(f"prefix hit ratio {r['prefix_hit_ratio']:.4f}; verified {r['verified_blocks']:,} onboarded blocks "
          f"byte for byte, {r['mismatched_blocks']} mismatched, {r['failed_loads']} failed loads")
    print(f"moved {r['bytes_moved'] / 1e9:.2f} GB in {r['seconds']:.1f} s\n")
    print(f"{'tier':<5}{'medium':<8}{'capacity':>10}{'used':>8}{'hits':>8}{'stores':>9}{'demoted in':>12}"
          f"{'promoted':>10}{'dropped':>9}{'io err':>8}{'crc err':>8}")
    for name, t in r["tiers"].items():
        print(f"{name:<5}{t['medium']:<8}{t['capacity']:>10,}{t['used']:>8,}{t['hits']:>8,}{t['stores']:>9,}"
              f"{t['demotions_in']:>12,}{t['promotions_out']:>10,}{t['drops']:>9,}{t['io_errors']:>8}"
              f"{t['checksum_errors']:>8}")
    print(f"\n{'path':<18}{'blocks':>9}{'GB':>9}{'seconds':>9}{'GB/s':>8}")
    for path, p in r["transfers"].items():
        gbps = f"{p['gb_per_s']:.2f}" if p["gb_per_s"] is not None else "-"
        print(f"{path:<18}{p['blocks']:>9,}{p['bytes'] / 1e9:>9.2f}{p['seconds']:>9.2f}{gbps:>8}")
