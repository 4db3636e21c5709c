"""The TensorRT-LLM adapter refuses hybrid KV caches (variable windows, sliding-window or SSM
layers) at start with a one-line error, instead of storing rows that are not whole blocks."""

import json
from types import SimpleNamespace

import pytest

from kvbm.connectors import trtllm

LLAMA = {"model_type": "llama", "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "hidden_size": 64, "torch_dtype": "bfloat16"}


@pytest.mark.parametrize("cfg, window, expect", [
    (LLAMA, None, None),
    (LLAMA, [4096, 4096], None),  # one window for every layer: one pool
    ({**LLAMA, "sliding_window": 4096, "use_sliding_window": False, "max_window_layers": 1}, None, None),
    ({**LLAMA, "sliding_window": 4096}, None, None),  # Mistral: every layer the same window
    (LLAMA, [512, 512, 4096], "max_attention_window has several windows [512, 4096]"),
    ({**LLAMA, "model_type": "gemma3_text", "sliding_window": 512}, None, "model_type 'gemma3_text'"),
    ({**LLAMA, "layer_types": ["sliding_attention", "full_attention"]}, None, "layer_types"),
    ({"text_config": {**LLAMA, "layer_types": ["linear_attention", "full_attention"]}}, None, "layer_types"),
    ({**LLAMA, "model_type": "nemotron_h", "hybrid_override_pattern": "M-M*"}, None, "state-space"),
    ({**LLAMA, "model_type": "jamba"}, None, "state-space"),
    ({**LLAMA, "model_type": "gpt_oss", "sliding_window": 128}, None, "sliding-window"),
    ({**LLAMA, "attention_chunk_size": 8192}, None, "chunked local attention"),
    ({**LLAMA, "sliding_window": 4096, "max_window_layers": 1}, None, "sliding-window layers beside full"),
])
def test_hybrid_reason(cfg, window, expect):
    why = trtllm.hybrid_reason(cfg, window)
    if expect is None:
        assert why is None
    else:
        assert why is not None and expect in why


def test_start_refuses_a_hybrid_model_in_one_line(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA, "model_type": "gemma3_text", "sliding_window": 512}))
    monkeypatch.setenv("KVBM_CONFIG", str(tmp_path / "kvbm.yaml"))  # never read: refused before
    args = SimpleNamespace(model=str(tmp_path), kv_cache_config=SimpleNamespace(tokens_per_block=32))
    with pytest.raises(ImportError) as err:
        trtllm._setup(args)
    msg = str(err.value)
    assert "\n" not in msg and "hybrid KV caches are not supported" in msg and "gemma3_text" in msg
    assert "kvbm.connectors.vllm" in msg  # says what to do


def test_start_refuses_variable_windows(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    monkeypatch.setenv("KVBM_CONFIG", str(tmp_path / "kvbm.yaml"))
    args = SimpleNamespace(model=str(tmp_path),
                           kv_cache_config=SimpleNamespace(tokens_per_block=32, max_attention_window=[256, 4096]))
    with pytest.raises(ImportError, match=r"max_attention_window has several windows \[256, 4096\]"):
        trtllm._setup(args)
