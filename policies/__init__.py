"""Built-in eviction and admission policies (installed as `kvbm.policies`).

One policy per file; each is registered by name in `kvbm.registry`. Third parties add
policies through the entry-point group `kvbm.policies` or a dotted path in config.
"""

from .base import DEFAULT_HINTS, DEFAULT_PRIORITY, AdmissionPolicy, EvictionPolicy, Hints

__all__ = ["AdmissionPolicy", "EvictionPolicy", "Hints", "DEFAULT_HINTS", "DEFAULT_PRIORITY"]
