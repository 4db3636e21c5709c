"""Time to first token of a repeated long prompt in vLLM: recompute vs kvbm vs vLLM's OffloadingConnector.

    python bench/vllm_ttft.py                 # CUDA: medium dummy Llama, all three configs
    python bench/vllm_ttft.py --cpu-tiny      # CPU: tiny dummy Llama, (a) and (b); (c) needs CUDA
    python bench/vllm_ttft.py --json out.json

Each config runs in its own process (vLLM's engine holds global state). Per repetition a fresh
prompt of >= 8 blocks runs cold, then vLLM's prefix cache is reset and it runs again; TTFT is
the latency of a `max_tokens=1` request. Configs:

    recompute   no connector, prefix caching off: the warm run recomputes every block
    kvbm        kvbm.connectors.vllm with one G2 host tier (pinned on CUDA)
    offload     vLLM's OffloadingConnector (CPU tier; its worker is CUDA-only)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

TINY = {  # as tests/vllm_e2e.py
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
    "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 1024, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2,
}
MEDIUM = {**TINY, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
          "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 32000}
CONFIGS = ("recompute", "kvbm", "offload")


def prompt(seed: int, n: int, vocab: int) -> list[int]:
    return [(seed * 7919 + i * 104729) % (vocab - 10) + 3 for i in range(n)]


def child(args: argparse.Namespace) -> dict:
    """One config in this process: warm-up, then reps x (cold, reset_prefix_cache, warm)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model_cfg = TINY if args.cpu else MEDIUM
    model = os.path.join(args.workdir, "model")
    os.makedirs(model, exist_ok=True)
    with open(os.path.join(model, "config.json"), "w") as f:
        json.dump(model_cfg, f)
    n_tokens = args.prompt_blocks * args.block_size + args.block_size // 2
    kw: dict = {"model": model, "load_format": "dummy", "skip_tokenizer_init": True, "dtype": "bfloat16",
                "block_size": args.block_size, "max_model_len": max(8192, n_tokens + 64), "seed": 0,
                "enforce_eager": True, "enable_prefix_caching": args.config != "recompute"}
    if args.cpu:
        kw["kv_cache_memory_bytes"] = 1 << 30
    else:
        kw["gpu_memory_utilization"] = 0.5
    blocks_needed = (args.reps + 2) * (args.prompt_blocks + 1)
    if args.config == "kvbm":
        g2 = {"name": "g2", "capacity": blocks_needed, "storage": {"name": "host"}}
        if args.cpu:
            g2["storage"]["pin"] = "never"
        kw["kv_transfer_config"] = {"kv_connector": "KVBMConnector", "kv_connector_module_path": "kvbm.connectors.vllm",
                                    "kv_role": "kv_both", "kv_connector_extra_config": {"kvbm_config": {"tiers": [g2]}}}
    elif args.config == "offload":
        kw["kv_transfer_config"] = {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
                                    "kv_connector_extra_config": {"cpu_bytes_to_use": args.offload_bytes}}
    t0 = time.perf_counter()
    llm = LLM(**kw)
    build_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    vocab = model_cfg["vocab_size"]

    def ttft(tokens: list[int]) -> tuple[float, int]:
        t = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=tokens)], params, use_tqdm=False)[0]
        return time.perf_counter() - t, out.num_cached_tokens or 0

    def settle() -> None:
        # let asynchronous stores land before the prefix cache goes, as a real next request would
        time.sleep(args.settle)
        llm.reset_prefix_cache()

    ttft(prompt(10_000, n_tokens, vocab))  # warm-up: first-run allocation, kernels
    settle()
    ttft(prompt(10_000, n_tokens, vocab))
    settle()
    cold, warm, cached = [], [], []
    for rep in range(args.reps):
        tokens = prompt(rep + 1, n_tokens, vocab)
        cold.append(ttft(tokens)[0])
        settle()
        s, c = ttft(tokens)
        warm.append(s)
        cached.append(c)
        settle()
    return {"config": args.config, "device": "cpu" if args.cpu else "cuda", "prompt_tokens": n_tokens,
            "block_size": args.block_size, "build_s": build_s, "cold_s": cold, "warm_s": warm,
            "cached_tokens": cached, "cold_ms": 1e3 * statistics.median(cold),
            "warm_ms": 1e3 * statistics.median(warm), "speedup": statistics.median(cold) / statistics.median(warm)}


def run_config(config: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as work:
        cmd = [sys.executable, __file__, "--child", config, "--workdir", work, "--reps", str(args.reps),
               "--prompt-blocks", str(args.prompt_blocks), "--block-size", str(args.block_size),
               "--settle", str(args.settle), "--offload-bytes", str(args.offload_bytes)]
        if args.cpu:
            cmd.append("--cpu-tiny")
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=False)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (p.stdout + p.stderr)[-3000:]
    return {"config": config, "error": f"exit {p.returncode}: {tail}"}


def table(results: list[dict]) -> str:
    rows = [f"{'config':<10} {'cold ms':>9} {'warm ms':>9} {'speedup':>8} {'cached/prompt':>14}  note"]
    for r in results:
        if "error" in r or "skipped" in r:
            rows.append(f"{r['config']:<10} {'-':>9} {'-':>9} {'-':>8} {'-':>14}  "
                        f"{r.get('skipped') or r['error'].strip().splitlines()[-1][:100]}")
            continue
        cached = f"{min(r['cached_tokens'])}/{r['prompt_tokens']}"
        rows.append(f"{r['config']:<10} {r['cold_ms']:>9.1f} {r['warm_ms']:>9.1f} {r['speedup']:>7.2f}x "
                    f"{cached:>14}  build {r['build_s']:.1f}s, {r['device']}")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-tiny", dest="cpu", action="store_true", help="CPU, tiny dummy Llama")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {CONFIGS}")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--prompt-blocks", type=int, default=None, help="full blocks per prompt (>= 8)")
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--settle", type=float, default=0.2, help="seconds between runs for stores to land")
    ap.add_argument("--offload-bytes", type=int, default=8 << 30, help="OffloadingConnector cpu_bytes_to_use")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per config")
    ap.add_argument("--json", help="write the results here ('-' for stdout)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.config = args.child
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    if not args.cpu:
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device: running --cpu-tiny", file=sys.stderr)
            args.cpu = True
    args.block_size = args.block_size or (128 if args.cpu else 16)  # vLLM CPU: a multiple of 32
    args.prompt_blocks = max(8, args.prompt_blocks or (8 if args.cpu else 256))
    results = []
    for config in args.configs.split(","):
        if config not in CONFIGS:
            ap.error(f"--configs: unknown {config!r}; choose from {CONFIGS}")
        if config == "offload" and args.cpu:
            results.append({"config": config, "skipped": "needs CUDA (vLLM's offloading worker is CUDA-only)"})
            continue
        results.append(run_config(config, args))
        print(table(results[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print(table(results))
    if args.json:
        text = json.dumps(results, indent=1)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text)


if __name__ == "__main__":
    main()
