"""kvbm: a tiered KV-cache block manager for LLM inference.

    BlockManager        the block pool over tiers G1 (GPU) .. G4 (object store)
    KVBMConfig          typed config; load_config(path) reads YAML/TOML + KVBM_... overrides
    KVLayout, Namespace block shape and identity (chained 128-bit BlockKeys)
    register_policy     add an eviction policy by name (notebooks, plugins)

Importing kvbm needs none of torch, CUDA, nixl or an engine; those are extras.
"""

from .blocks import BlockKey, KVLayout, Namespace
from .config import ConfigError, KVBMConfig, load_config
from .manager import BlockManager, Event
from .registry import register_admission, register_policy

__version__ = "0.1.0"

__all__ = [
    "BlockKey", "BlockManager", "ConfigError", "Event", "KVBMConfig", "KVLayout", "Namespace",
    "load_config", "register_admission", "register_policy",
]
