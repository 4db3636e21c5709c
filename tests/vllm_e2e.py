"""End to end: vLLM (CPU, tiny Llama, dummy weights) with the kvbm connector.

Run in a fresh process (tests/test_connector_vllm.py does): python tests/vllm_e2e.py OUT_DIR
Prints one JSON line with the results; the test asserts on it.

    1. prompt A (>= 8 blocks) cold, then again after reset_prefix_cache(): kvbm serves it
    2. prompts B, C fill G2 so A's blocks are demoted to G3; A again: served from G3
    3. A's blocks in kvbm corrupted (bytes flipped in G2): A again: the output changes
"""

import json
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

BLOCK = 128
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
    "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 1024, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2,
}


def main(out: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model = os.path.join(out, "tiny-llama")
    os.makedirs(model, exist_ok=True)
    with open(os.path.join(model, "config.json"), "w") as f:
        json.dump(CONFIG, f)
    kvbm = {
        "tiers": [
            {"name": "g2", "capacity": 12, "storage": {"name": "host", "pin": "never"}},
            {"name": "g3", "capacity": 64, "storage": {"name": "disk", "path": os.path.join(out, "g3")}},
        ],
    }
    t0 = time.perf_counter()
    llm = LLM(model=model, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              block_size=BLOCK, enforce_eager=True, kv_cache_memory_bytes=1 << 30,
              enable_prefix_caching=False, max_model_len=4096, seed=0,
              kv_transfer_config={"kv_connector": "KVBMConnector", "kv_connector_module_path": "kvbm.connectors.vllm",
                                  "kv_role": "kv_both", "kv_connector_extra_config": {"kvbm_config": kvbm}})
    build_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)

    def run(tokens):
        t = time.perf_counter()
        o = llm.generate([TokensPrompt(prompt_token_ids=tokens)], params, use_tqdm=False)[0]
        return {"ids": list(o.outputs[0].token_ids), "cached": o.num_cached_tokens or 0,
                "seconds": time.perf_counter() - t}

    def prompt(seed, n):
        return [(seed * 7919 + i * 104729) % 1000 + 3 for i in range(n)]

    from kvbm.connectors import core

    (manager, lock), = core._MANAGERS.values()
    n_a = 8 * BLOCK + 60  # 8 full blocks and a partial one
    a = prompt(1, n_a)
    res = {"build_s": build_s, "prompt_tokens": n_a}
    res["a_cold"] = run(a)
    llm.reset_prefix_cache()
    res["a_warm"] = run(a)
    res["tiers_after_warm"] = {t.name: len(t.ready) for t in manager.tiers}
    for seed in (2, 3):  # two more 8-block prompts push A's blocks out of G2 (12 blocks)
        run(prompt(seed, n_a))
        llm.reset_prefix_cache()
    g3_hits = manager.tiers[1].stats.hits
    res["tiers_before_g3"] = {t.name: len(t.ready) for t in manager.tiers}
    res["a_in_g3"] = sum(1 for k in manager.tiers[1].ready)  # noqa: C416
    res["a_from_g3"] = run(a)
    res["g3_hits"] = manager.tiers[1].stats.hits - g3_hits
    llm.reset_prefix_cache()
    # Negative control: A's blocks are in G2 again (promoted on hit); flip their bytes there.
    g2 = manager.tiers[0]
    flipped = 0
    for key, slot in list(g2.ready.items()):
        view = g2.storage.view(slot)
        view[:] = (view.astype("uint16") * 7 + 91).astype("uint8")
        flipped += 1
    res["flipped"] = flipped
    res["a_corrupt"] = run(a)
    res["stats"] = {name: {k: v for k, v in t.items() if k in ("hits", "stores", "demotions_in", "used")}
                    for name, t in manager.stats()["tiers"].items()}
    print("E2E " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/kvbm-vllm-e2e")
