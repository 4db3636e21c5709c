"""One rank of an offline vLLM engine under torchrun (distributed_executor_backend="external_launcher").

    python -m torch.distributed.run --nproc-per-node 2 tests/vllm_torchrun.py OUT MODE

MODE "dp": data parallel 2 (each torchrun process is one whole engine: scheduler and worker);
MODE "tp": tensor parallel 2 (each process is one TP rank with a scheduler of its own, vLLM's
external launcher keeping the schedulers in lockstep). The in-process kvbm config gives all
processes the engine's own daemon, named by torchrun's master (kvbm/connectors/vllm.py).

"dp": rank 0 serves prompt A while rank 1 serves B; once the daemon holds both prompts' blocks
(every rank waits for it), rank 1 serves A and rank 0 serves B: each prompt's 8 full blocks
come from kvbm on the rank that never saw it (its own prefix cache holds none of them).
"tp": both ranks serve A, vLLM forgets its copy (reset_prefix_cache), A again: 8 blocks from
kvbm, both ranks' shards. Each rank writes OUT/rank<RANK>.json: what it served, the cached
tokens, the /dev/shm files its process held, and the engine daemon it reached.
"""

import json
import os
import sys
import time
from pathlib import Path

BLOCK = 128


def shm_held() -> list[str]:
    """/dev/shm files this process maps or holds open (vLLM's buffers, kvbm's windows)."""
    paths = set()
    with open("/proc/self/maps") as f:
        for line in f:
            if "/dev/shm/" in line:
                paths.add(line.split(maxsplit=5)[5].strip().removesuffix(" (deleted)"))
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/dev/shm/"):
            paths.add(target.removesuffix(" (deleted)"))
    return sorted(paths)


def main(out: str, mode: str) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from vllm_serve_helpers import engine_daemon, prompt, stored_blocks

    import torch.distributed as dist
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    rank = int(os.environ["RANK"])
    kvbm = {"tiers": [{"name": "g2", "capacity": 64, "storage": {"name": "host", "pin": "never"}}]}
    parallel = {"data_parallel_size": 2} if mode == "dp" else {"tensor_parallel_size": 2}
    llm = LLM(model=os.path.join(out, "tiny-llama"), load_format="dummy", skip_tokenizer_init=True,
              dtype="bfloat16", block_size=BLOCK, enforce_eager=True, kv_cache_memory_bytes=256 << 20,
              max_model_len=4096, seed=0, distributed_executor_backend="external_launcher", **parallel,
              kv_transfer_config={"kv_connector": "KVBMConnector", "kv_connector_module_path": "kvbm.connectors.vllm",
                                  "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                                  "kv_connector_extra_config": {"kvbm_config": kvbm}})
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

    def serve(tokens):
        o = llm.generate([TokensPrompt(prompt_token_ids=tokens)], params, use_tqdm=False)[0]
        return {"ids": list(o.outputs[0].token_ids), "cached": o.num_cached_tokens or 0}

    folder = os.path.join(os.environ["KVBM_RUNTIME_DIR"], f"kvbm-{os.getuid()}")
    d = engine_daemon(Path(folder))

    def wait_stored(n: int) -> None:
        deadline = time.monotonic() + 300
        while stored_blocks(d["address"], d["token"], d["layout"]) < n:
            assert time.monotonic() < deadline, f"the daemon did not store {n} blocks"
            time.sleep(0.2)

    a, b = prompt(31, 8 * BLOCK + 60), prompt(32, 8 * BLOCK + 60)
    res = {"rank": rank, "daemon": d["address"], "pid": d["pid"]}
    if mode == "dp":
        first, then = (a, b) if rank == 0 else (b, a)
        res["first"] = serve(first)  # this rank's prompt: computed here, its 8 blocks go to kvbm
        wait_stored(16)  # both ranks' blocks are in the daemon
        dist.barrier()
        res["then"] = serve(then)  # the other rank's prompt: only kvbm can supply its blocks
    else:
        res["first"] = serve(a)
        wait_stored(16)  # both TP ranks' shards of A's 8 blocks
        dist.barrier()
        llm.reset_prefix_cache()
        res["then"] = serve(a)
    res["shm"] = shm_held()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
