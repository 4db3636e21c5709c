"""kvbm's work on vLLM's scheduler thread, in microseconds per request (lookup + planning).

    python bench/vllm_sched_cost.py [--blocks 16] [--requests 300] [--json]

The real KVBMConnector (scheduler role) on a real vLLM 0.32 config, driven with real vLLM
Request / SchedulerOutput objects, as vLLM's scheduler calls it for one request's life:
get_num_new_matched_tokens (adopt the block hashes, look up, pin) + update_state_after_alloc
(plan the load) + build_connector_meta (plan the stores) + request_finished + take_events (vLLM
calls it once per step; here once per request: the KV events of the stores and loads since the
last call, by engine hash, in-process manager only). Two cases per
backend, each timed over --requests fresh requests of --blocks full blocks:

    miss     nothing of the prompt is cached (lookup answers 0; all blocks planned for store)
    hit      every block is in kvbm's G2 (a load of all of them planned, nothing stored)
backends: the in-process BlockManager ("uni" executor) and the engine's own daemon (the
multiprocessing executor: each lookup is a round trip over a Unix socket).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # this process builds the config; no engine runs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=16, help="full blocks per prompt (default 16)")
    ap.add_argument("--requests", type=int, default=300, help="requests per case (default 300)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import numpy as np
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.engine.arg_utils import EngineArgs
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.kv_cache_utils import KVCacheBlock, get_request_block_hasher, init_none_hash
    from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput
    from vllm.v1.request import Request

    from kvbm.connectors import core, engine_daemon
    from kvbm.connectors.vllm import KVBMConnector
    from vllm_e2e import BLOCK, CONFIG

    work = Path(tempfile.mkdtemp(prefix="kvbm-sched-cost-"))
    os.environ.setdefault("KVBM_RUNTIME_DIR", str(work))
    (work / "model").mkdir()
    (work / "model" / "config.json").write_text(json.dumps(CONFIG))
    fn = get_hash_fn_by_name("sha256")
    init_none_hash(fn)
    hasher = get_request_block_hasher(BLOCK, fn)
    n_tok = args.blocks * BLOCK + 5
    cap = args.requests * args.blocks + 64

    def request(rid: str, seed: int) -> Request:
        toks = [(seed * 7919 + i * 104729) % 1000 + 3 for i in range(n_tok)]
        return Request(rid, toks, SamplingParams(max_tokens=4), None, block_hasher=hasher)

    def life(conn: KVBMConnector, req: Request, block_ids: list[int]) -> tuple[int, float]:
        """One request's scheduler-side calls; (matched tokens, seconds)."""
        t = time.perf_counter()
        n, _ = conn.get_num_new_matched_tokens(req, 0)
        conn.update_state_after_alloc(req, KVCacheBlocks(([KVCacheBlock(i) for i in block_ids],)), n or 0)
        out = SchedulerOutput.make_empty()
        req.num_computed_tokens = n or 0
        out.scheduled_new_reqs = [NewRequestData.from_request(req, (list(block_ids),))]
        out.num_scheduled_tokens = {req.request_id: req.num_tokens - (n or 0)}
        out.total_num_scheduled_tokens = req.num_tokens - (n or 0)
        meta = conn.build_connector_meta(out)
        conn.request_finished(req, block_ids)
        conn.take_events()
        return n or 0, time.perf_counter() - t, meta

    results = {}
    for backend in ("in-process", "engine daemon"):
        cfg = {"tiers": [{"name": "g2", "capacity": cap, "storage": {"name": "host", "pin": "never"}}]}
        args_ = EngineArgs(model=str(work / "model"), load_format="dummy", skip_tokenizer_init=True,
                           dtype="bfloat16", block_size=BLOCK, enforce_eager=True, max_model_len=4096,
                           kv_transfer_config={"kv_connector": "KVBMConnector",
                                               "kv_connector_module_path": "kvbm.connectors.vllm",
                                               "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                                               "kv_connector_extra_config": {"kvbm_config": cfg}})
        vcfg = args_.create_engine_config()
        if backend == "engine daemon":  # as under vLLM's multiprocessing executor
            vcfg.parallel_config.distributed_executor_backend = "mp"
        conn = KVBMConnector(vcfg, KVConnectorRole.SCHEDULER, None)
        conn.take_events()  # the first call starts naming blocks (vLLM's scheduler makes it at its first step)
        ids = list(range(args.blocks + 1))
        miss, hit = [], []
        backend_obj = conn.scheduler.backend
        row = np.zeros(backend_obj.block_nbytes, np.uint8)
        for i in range(args.requests):
            n, dt, meta = life(conn, request(f"m{i}", i), ids)
            assert n == 0
            miss.append(dt)
            for plan in meta.stores:  # what the worker would write
                t = backend_obj.start_store(plan.keys, [row] * len(plan.keys), parent=plan.parent,
                                            position=plan.position)
                backend_obj.poll([t], wait=True)
        for i in range(args.requests):
            n, dt, meta = life(conn, request(f"h{i}", i), ids)
            assert n == args.blocks * BLOCK, (n, backend)
            hit.append(dt)
            for plan in meta.loads:  # release the promise as the worker's load would
                if plan.pinned:
                    backend_obj.unpin(plan.keys)
        results[backend] = {case: {"p50_us": statistics.median(v) * 1e6,
                                   "p90_us": sorted(v)[int(0.9 * len(v))] * 1e6,
                                   "mean_us": statistics.fmean(v) * 1e6}
                            for case, v in (("miss", miss), ("hit", hit))}
        core.release_managers()
    del engine_daemon
    if args.json:
        print(json.dumps({"blocks": args.blocks, "requests": args.requests, "results": results}))
    else:
        print(f"kvbm on vLLM's scheduler thread, per request of {args.blocks} blocks "
              f"({args.requests} requests per case), microseconds")
        print(f"{'backend':<16}{'case':<6}{'p50':>10}{'p90':>10}{'mean':>10}")
        for backend, cases in results.items():
            for case, r in cases.items():
                print(f"{backend:<16}{case:<6}{r['p50_us']:>10.0f}{r['p90_us']:>10.0f}{r['mean_us']:>10.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
