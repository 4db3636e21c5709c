"""Which models and KV cache configs are hybrid, from what an engine without HMA support sees.

    hybrid_reason(hf_config, max_attention_window)   why a model is hybrid (several attention
                                                     windows, sliding-window, chunked or SSM
                                                     layers), or None

TensorRT-LLM gives variable-window (VSWA) and SSM models a pool per window size / state kind,
so a block id no longer names one row of every layer: its adapter refuses them at start
(trtllm.py). Plain data in, a reason out: no engine import.
"""

from __future__ import annotations

from typing import Any

_SSM_TYPES = ("mamba", "mamba2", "jamba", "nemotron_h", "bamba", "zamba", "zamba2", "falcon_h1",
              "qwen3_next", "granitemoehybrid", "plamo2", "lfm2")

_SWA_TYPES = ("gemma2", "gemma3", "gemma3_text", "gemma3n", "gemma3n_text", "cohere2", "gpt_oss")


def hybrid_reason(cfg: dict, max_attention_window: Any = None) -> str | None:
    """Why this model (HF config.json dict) or KV cache config is hybrid, or None when it is not.

    TensorRT-LLM gives variable-window (VSWA) and SSM models a pool per window size / state
    kind, so a block id no longer names one row of every layer: kvbm would store garbage."""
    cfg = cfg.get("text_config", cfg)
    windows = [w for w in (max_attention_window or []) if w]
    if len(set(windows)) > 1:
        return f"kv_cache_config.max_attention_window has several windows {sorted(set(windows))}"
    kinds = {str(t) for t in cfg.get("layer_types") or []}
    if kinds - {"full_attention", "attention"}:
        return f"layer_types {sorted(kinds)}"
    if str(cfg.get("model_type", "")).lower() in _SSM_TYPES or cfg.get("hybrid_override_pattern") \
            or cfg.get("layers_block_type") or cfg.get("attn_layer_period"):
        return f"state-space (Mamba) layers (model_type {cfg.get('model_type')!r})"
    if cfg.get("sliding_window") and str(cfg.get("model_type", "")).lower() in _SWA_TYPES:
        return f"sliding-window layers beside full attention (model_type {cfg.get('model_type')!r})"
    if cfg.get("attention_chunk_size"):
        return f"chunked local attention (attention_chunk_size {cfg.get('attention_chunk_size')})"
    if cfg.get("sliding_window") and cfg.get("use_sliding_window", True) and (
            cfg.get("sliding_window_pattern") or cfg.get("max_window_layers") is not None
            and cfg.get("max_window_layers") < cfg.get("num_hidden_layers", 0)):
        return f"sliding-window layers beside full attention (sliding_window {cfg.get('sliding_window')})"
    return None
