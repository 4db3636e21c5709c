"""Scheduler-side replay: the kvbm connector's BlockManager calls vs vLLM's CPUOffloadingManager.

Replays the bundled Mooncake trace, one tier of 10,000 blocks, in one process and run:

    kvbm           lookup -> load(prefix) -> store(all): the calls KVBMConnector makes per request
                   (metadata-only manager: the scheduler-side cost without bytes)
    vllm lru       vLLM 0.32 CPUOffloadingManager with its own LRU CachePolicy
    vllm kvbm_lru  the same manager with kvbm's LRU through KVBMCachePolicy (the adapter's cost)

Per request: prefix hits = leading blocks ready; those are loaded; then every block is
offered for store (ready blocks are an access, new ones are inserted). Needs vLLM installed.

    python bench/bench_connector.py [--capacity 10000] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import json

from kvbm.cli import BUNDLED
from kvbm.manager import BlockManager
from kvbm.config import KVBMConfig
from kvbm.sim.traces import load_trace
from common import best_of  # bench/common.py


def replay_kvbm(requests, capacity):
    cfg = KVBMConfig.from_dict({"events": False, "tiers": [{"name": "g2", "capacity": capacity, "eviction": "lru"}]})
    m = BlockManager.from_config(cfg)
    prefix = total = 0
    for keys in requests:
        n, _ = m.lookup(keys)
        if n:
            m.load(keys[:n])
        m.store(keys)
        prefix += n
        total += len(keys)
    return prefix / total


def replay_vllm(requests, capacity, policy="lru", module=None):
    from vllm.v1.kv_offload.base import LookupResult, ReqContext
    from vllm.v1.kv_offload.cpu.manager import CPUOffloadingManager

    m = CPUOffloadingManager(num_chunks=capacity, cache_policy=policy, cache_policy_module_path=module)
    prefix = total = 0
    for i, keys in enumerate(requests):
        ctx = ReqContext(req_id=str(i))
        m.on_new_request(ctx)
        n = 0
        for k in keys:
            if m.lookup(k, ctx) is not LookupResult.HIT:
                break
            n += 1
        if n:
            m.prepare_load(keys[:n], ctx)
            m.complete_load(keys[:n], ctx)
        out = m.prepare_store(keys, ctx)
        if out is not None:
            m.complete_store(out.keys_to_store, ctx)
        m.on_request_finished(ctx)
        prefix += n
        total += len(keys)
    return prefix / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--capacity", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    trace = load_trace(BUNDLED["mooncake"])
    # vLLM's offload keys are bytes (block hash + group index); kvbm's adopted keys are bytes too
    requests = [[h.to_bytes(8, "little") + b"\0\0\0\0" for h in r.hash_ids] for r in trace.requests]
    n = sum(map(len, requests))
    runs = {
        "kvbm": lambda: replay_kvbm(requests, args.capacity),
        "vllm_lru": lambda: replay_vllm(requests, args.capacity),
        "vllm_kvbm_lru": lambda: replay_vllm(requests, args.capacity, "kvbm_lru", "kvbm.connectors.vllm_policy"),
    }
    out = {"block_accesses": n, "capacity": args.capacity}
    for name, fn in runs.items():
        t, ratio = best_of(fn, args.repeat)
        out[name] = {"prefix_hit_ratio": round(ratio, 5), "accesses_per_s": round(n / t), "seconds": round(t, 3)}
    out["kvbm_over_vllm_speed"] = round(out["kvbm"]["accesses_per_s"] / out["vllm_lru"]["accesses_per_s"], 2)
    out["adapter_over_vllm_lru_time"] = round(out["vllm_kvbm_lru"]["seconds"] / out["vllm_lru"]["seconds"], 2)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"trace: {len(requests):,} requests, {n:,} block accesses; one tier of {args.capacity:,} blocks")
    for name in runs:
        r = out[name]
        print(f"{name:<15} prefix hit ratio {r['prefix_hit_ratio']:.4f}  {r['accesses_per_s']:>12,} accesses/s")
    print(f"kvbm / vLLM manager speed: {out['kvbm_over_vllm_speed']}x; "
          f"KVBMCachePolicy(lru) / vLLM LRU time: {out['adapter_over_vllm_lru_time']}x")


if __name__ == "__main__":
    main()
