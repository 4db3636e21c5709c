"""End to end: vLLM (CPU, tiny Gemma 3: sliding-window + full attention, dummy weights) with
the kvbm connector and vLLM's hybrid memory allocator (one KV cache group per layer type).

Run in a fresh process (tests/test_hybrid_vllm.py does): python tests/hybrid_e2e.py OUT_DIR
Prints one JSON line with the results; the test asserts on it.

    1. prompt A (8 full blocks + a partial one) cold, then after reset_prefix_cache(): from kvbm (G2)
    2. prompts B, C push A's pages out of G2 into G3; A again: served from G3
    3. drop: A's page 7 removed from kvbm -> the hit ends before it (pages 0..6), same output
    4. a load that brings one page less than promised -> the request recomputes, same output
    5. flips in one group's piece: the sliding groups' pieces outside the last window (never
       loaded) -> same output; inside it -> output changes; the full group's piece -> changes
"""

import json
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

BLOCK = 128
WINDOW = 256  # tokens: a hit needs the sliding groups' last ceil(255/128) = 2 pages
CONFIG = {
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 256,
    "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 64, "vocab_size": 1024, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "sliding_window": WINDOW,
    "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
    "query_pre_attn_scalar": 64, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
    "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "hidden_activation": "gelu_pytorch_tanh",
    "final_logit_softcapping": None, "attn_logit_softcapping": None,
}


def prompt(seed, n):
    return [(seed * 7919 + i * 104729) % 1000 + 3 for i in range(n)]


def settle(cond, timeout=120.0):
    """Wait for the connector's asynchronous stores (and the demotions they cause) to land: a
    run returns when its tokens do, while its pages still travel to G2 and push older ones to G3."""
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.05)


def main(out: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model = os.path.join(out, "tiny-gemma3")
    os.makedirs(model, exist_ok=True)
    with open(os.path.join(model, "config.json"), "w") as f:
        json.dump(CONFIG, f)
    kvbm = {"tiers": [
        {"name": "g2", "capacity": 12, "eviction": {"name": "lru"}, "storage": {"name": "host", "pin": "never"}},
        {"name": "g3", "capacity": 64, "eviction": {"name": "lru"},
         "storage": {"name": "disk", "path": os.path.join(out, "g3")}},
    ]}
    t0 = time.perf_counter()
    llm = LLM(model=model, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              block_size=BLOCK, enforce_eager=True, kv_cache_memory_bytes=1 << 28,
              enable_prefix_caching=True, max_model_len=4096, seed=0,
              kv_transfer_config={"kv_connector": "KVBMConnector", "kv_connector_module_path": "kvbm.connectors.vllm",
                                  "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                                  "kv_connector_extra_config": {"kvbm_config": kvbm}})
    res = {"build_s": time.perf_counter() - t0}
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)

    def run(tokens):
        t = time.perf_counter()
        o = llm.generate([TokensPrompt(prompt_token_ids=tokens)], params, use_tqdm=False)[0]
        llm.reset_prefix_cache()
        return {"ids": list(o.outputs[0].token_ids), "cached": o.num_cached_tokens or 0,
                "seconds": round(time.perf_counter() - t, 2)}

    from kvbm.connectors import core
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    engine = llm.llm_engine.engine_core.engine_core
    sched = engine.scheduler.connector
    worker = get_kv_transfer_group()
    res["classes"] = [type(sched).__name__, type(worker).__name__]
    res["groups"] = [type(g.kv_cache_spec).__name__ for g in engine.scheduler.kv_cache_config.kv_cache_groups]
    manifest = sched.manifest
    res["manifest"] = {"kinds": [p.kind for p in manifest.pieces], "page_nbytes": manifest.page_nbytes,
                       "fingerprint": manifest.fingerprint}
    seen = {}
    keys_of = sched.scheduler.keys

    def record(req_id, hashes, salt=None):
        keys = keys_of(req_id, hashes, salt)
        seen["last"] = list(keys)
        return keys

    sched.scheduler.keys = record
    (manager, lock), = core._MANAGERS.values()
    g2, g3 = manager.tiers

    n_a = 8 * BLOCK + 60
    a = prompt(1, n_a)
    res["prompt_tokens"] = n_a
    res["a_cold"] = run(a)
    keys = seen["last"][:8]
    res["a_warm"] = run(a)
    res["tiers_after_warm"] = {t.name: len(t.ready) for t in manager.tiers}
    for seed in (2, 3):  # 16 more pages: A's 8 leave the 12-page G2 for G3
        run(prompt(seed, n_a))
    # G3 loses one group's piece of page 7 (its sliding piece, on disk): the page fails its
    # checksum, the load cannot bring every piece, the request recomputes (and stores it again)
    lo, hi = manifest.piece_range([p.kind for p in manifest.pieces].index("sliding"))
    settle(lambda: keys[7] in g3.ready)
    slot = g3.ready[keys[7]]
    with open(g3.storage.slots_path, "r+b") as f:
        f.seek(g3.storage.offset(slot) + lo + 100)
        f.write(b"\xff" * 64)
    res["a_piece_lost"] = run(a)
    res["piece_lost_dropped"] = keys[7] not in g3.ready
    for seed in (4, 5):  # A's pages back out to G3
        run(prompt(seed, n_a))
    settle(lambda: all(k in g3.ready for k in keys))
    res["a_in_g3"] = sum(1 for k in keys if k in g3.ready)
    g3_hits = g3.stats.hits
    res["a_from_g3"] = run(a)
    res["g3_hits"] = g3.stats.hits - g3_hits

    # drop: page 7 (the sliding groups' last window) leaves kvbm: the hit ends at page 7
    with lock:
        manager.remove([keys[7]])
    res["a_dropped"] = run(a)
    res["a_refilled"] = run(a)  # page 7 stored again by that run: the whole hit is back

    # a load that brings every page but the last: the whole request is recomputed
    backend = worker.worker.backend
    loaded = backend.loaded
    backend.loaded = lambda ticket: max(0, loaded(ticket) - 1)
    try:
        res["a_short_load"] = run(a)
    finally:
        backend.loaded = loaded

    def flip(piece, pages):
        """Flip one group's piece of A's pages in G2 (promoted there by the hits above)."""
        lo, hi = manifest.piece_range(piece)
        with lock:
            for p in pages:
                view = g2.storage.view(g2.ready[keys[p]])
                view[lo:hi] = (view[lo:hi].astype("uint16") * 7 + 91).astype("uint8")

    kinds = [p.kind for p in manifest.pieces]
    sliding = kinds.index("sliding")
    full = kinds.index("full")
    # A's pages are in G2 again (promoted by the hits above): flips there reach the next load
    res["a_pages_in_g2"] = sum(1 for k in keys if k in g2.ready)
    for name, piece, pages in (("flip_sliding_outside", sliding, range(0, 6)),
                               ("flip_sliding_window", sliding, range(6, 8)),
                               ("flip_full", full, range(0, 8))):
        lo, hi = manifest.piece_range(piece)
        with lock:
            before = {p: g2.storage.view(g2.ready[keys[p]])[lo:hi].copy() for p in pages}
        flip(piece, pages)
        res[name] = run(a)
        with lock:  # restore the piece's true bytes for the next control
            for p, data in before.items():
                g2.storage.view(g2.ready[keys[p]])[lo:hi] = data
    res["a_restored"] = run(a)
    res["stats"] = {name: {k: v for k, v in t.items() if k in ("hits", "stores", "demotions_in", "used")}
                    for name, t in manager.stats()["tiers"].items()}
    print("E2E " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/kvbm-hybrid-e2e")
