"""Hybrid model presets: the page manifest of public hybrid models, for byte figures and sizing.

    HYBRID_PRESETS                 name -> the model's layer plan (from its HF config.json)
    hybrid_manifest(name, bs)      its PageManifest at block size bs (tensor-parallel rank 0 of 1)

`kvbm simulate --layout gpt-oss-20b` sizes tiers in these pages: one kvbm block per page
holding every group's piece (connectors/manifest.py), so bytes per page are the sum over groups.
"""

from __future__ import annotations

from .connectors.manifest import Buffer, PageManifest, Piece

# layers (sliding, full), kv heads, head_dim, sliding window in tokens; bf16 KV
HYBRID_PRESETS = {
    # gpt-oss: sliding (window 128) and full attention layers alternate
    "gpt-oss-20b": dict(sliding=12, full=12, kv_heads=8, head_dim=64, window=128),
    "gpt-oss-120b": dict(sliding=18, full=18, kv_heads=8, head_dim=64, window=128),
    # Gemma 3: five sliding (window 1024) per full layer
    "gemma3-12b": dict(sliding=40, full=8, kv_heads=8, head_dim=256, window=1024),
    "gemma3-27b": dict(sliding=52, full=10, kv_heads=16, head_dim=128, window=1024),
}


def hybrid_manifest(name: str, block_size: int, dtype: str = "bfloat16") -> PageManifest:
    p = HYBRID_PRESETS[name]

    def layers(kind: str, n: int) -> tuple[Buffer, ...]:
        return tuple(Buffer(f"{kind}.{i}", (2, block_size, p["kv_heads"], p["head_dim"]), dtype) for i in range(n))

    return PageManifest(block_size, [Piece("sliding", layers("sliding", p["sliding"]), window=p["window"]),
                                     Piece("full", layers("full", p["full"]))])


def plain_layout(name: str, block_size: int, dtype: str = "bfloat16"):
    """The same model with every layer full attention (what a connector without HMA stores)."""
    from .blocks import KVLayout

    p = HYBRID_PRESETS[name]
    return KVLayout(num_layers=p["sliding"] + p["full"], num_kv_heads=p["kv_heads"], head_dim=p["head_dim"],
                    block_size=block_size, dtype=dtype)
