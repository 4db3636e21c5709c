"""Hybrid model (sliding window + full attention) vs a plain model of the same size, through kvbm.

    python bench/bench_hybrid.py [--model gpt-oss-20b] [--block-size 16] [--pages 64] [--repeat 5] [--json]

1. Bytes stored per cached token, and bytes a hit of N tokens must bring to the engine (what
   the sliding window saves), from the preset's page manifest (kvbm/hybrid_presets.py).
2. Load GB/s on this machine: `--pages` pages written to a G2 host tier, then loaded back into
   the engine's paged tensors (vLLM's CPU layout, one tensor per layer): read from G2 + scatter.
   Hybrid: HybridPagedKV scatters every full piece and only the last window's sliding pieces;
   plain: PagedKV scatters every layer of every page. GB/s = page bytes moved from kvbm / s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model  # noqa: E402


def tensors(layers: int, blocks: int, heads: int, head_dim: int, block_size: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randn(blocks, heads, block_size, 2 * head_dim, generator=g).to(torch.bfloat16) for _ in range(layers)]


def backend_for(layout, pages: int):
    from kvbm.config import KVBMConfig
    from kvbm.connectors.core import ManagerBackend
    from kvbm.manager import BlockManager

    cfg = KVBMConfig.from_dict({"layout": {f: getattr(layout, f) for f in layout.__dataclass_fields__},
                                "tiers": [{"name": "g2", "capacity": pages, "eviction": {"name": "lru"},
                                           "storage": {"name": "host", "pin": "never"}}]})
    return ManagerBackend(BlockManager.from_config(cfg), threading.RLock())


class Load:
    """Pages stored once in a G2 tier; `once()` times one load of them (read from G2 + scatter)."""

    def __init__(self, kv, backend, gather_ids, load_ids) -> None:
        self.kv, self.backend, self.load_ids = kv, backend, load_ids
        self.keys = [os.urandom(16) for _ in gather_ids]
        ticket = backend.start_store(self.keys, kv.gather(gather_ids))
        backend.poll([ticket], wait=True)
        self.times: list[float] = []

    def once(self) -> None:
        t = time.perf_counter()
        rows = self.kv.staging(len(self.keys))
        ticket = self.backend.start_load(self.keys, rows)
        self.backend.poll([ticket], wait=True)
        assert self.backend.loaded(ticket) == len(self.keys)
        self.kv.scatter(rows, self.load_ids)
        self.times.append(time.perf_counter() - t)

    def result(self) -> dict:
        times = sorted(self.times)
        return {"best_s": times[0], "median_s": times[len(times) // 2]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt-oss-20b")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--pages", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from kvbm.connectors.paged import PagedKV
    from kvbm.connectors.paged_hybrid import HybridPagedKV
    from kvbm.hybrid_presets import HYBRID_PRESETS, hybrid_manifest, plain_layout

    if args.model not in HYBRID_PRESETS:
        print(f"bench_hybrid: --model {args.model!r} is not a hybrid preset; use one of "
              f"{', '.join(HYBRID_PRESETS)}", file=sys.stderr)
        return 2
    bs, n = args.block_size, args.pages
    p = HYBRID_PRESETS[args.model]
    manifest = hybrid_manifest(args.model, bs)
    plain = plain_layout(args.model, bs)
    out = {"model": args.model, "block_size": bs, "pages": n, "machine": cpu_model(),
           "stored_bytes_per_token": {"hybrid": manifest.page_stride / bs, "plain": plain.block_nbytes / bs},
           "hit_bytes_per_token": {}}
    for tokens in (1024, 8192, 32768):
        pages = tokens // bs
        out["hit_bytes_per_token"][tokens] = {"hybrid": manifest.needed_nbytes(pages) / tokens,
                                              "plain": plain.block_nbytes / bs}

    # 2. load GB/s: the same bytes per page, hybrid scatters fewer of them
    layers = p["sliding"] + p["full"]
    kv_t = tensors(layers, 2 * n + 1, p["kv_heads"], p["head_dim"], bs)
    names = [b.name for piece in manifest.pieces for b in piece.buffers]
    hybrid = HybridPagedKV(manifest, dict(zip(names, kv_t)))
    src = [(i + 1, i + 1) for i in range(n)]  # every group's block id of each page (one pool)
    needed = [set(r) for r in manifest.needed(n)]
    dst = [tuple((n + 1 + j) if j in needed[g] else None for g in range(len(manifest.pieces))) for j in range(n)]
    flat = PagedKV(kv_t)
    hl = Load(hybrid, backend_for(manifest.layout(), n), src, dst)
    pll = Load(flat, backend_for(plain, n), [i + 1 for i in range(n)], [n + 1 + j for j in range(n)])
    for _ in range(args.repeat):  # interleaved: both see the same load on a shared machine
        hl.once()
        pll.once()
    h, pl = hl.result(), pll.result()
    moved = n * manifest.page_stride
    out["load"] = {
        "hybrid": {**h, "GBps": moved / h["best_s"] / 1e9, "scattered_bytes": manifest.needed_nbytes(n)},
        "plain": {**pl, "GBps": n * plain.block_nbytes / pl["best_s"] / 1e9, "scattered_bytes": n * plain.block_nbytes},
    }
    out["load"]["median_ratio_hybrid_over_plain"] = h["median_s"] / pl["median_s"]
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{args.model}, block {bs}: {manifest!r}")
    s = out["stored_bytes_per_token"]
    print(f"stored per cached token: hybrid {s['hybrid']:,.0f} B, plain {s['plain']:,.0f} B")
    for tokens, v in out["hit_bytes_per_token"].items():
        print(f"a {tokens}-token hit brings per token: hybrid {v['hybrid']:,.0f} B, plain {v['plain']:,.0f} B "
              f"({v['hybrid'] / v['plain']:.2f}x)")
    for k, v in out["load"].items():
        if not isinstance(v, dict):
            continue
        print(f"load {n} pages ({moved / 2**20:.0f} MiB) from G2 + scatter, {k}: best {v['best_s'] * 1e3:.1f} ms, "
              f"median {v['median_s'] * 1e3:.1f} ms, {v['GBps']:.2f} GB/s")
    print(f"hybrid / plain load time (medians, interleaved): {out['load']['median_ratio_hybrid_over_plain']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
