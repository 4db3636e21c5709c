"""kvbm: a tiered KV-cache block manager for LLM inference.

    BlockManager        the block pool over tiers G1 (GPU) .. G4 (object store)
    KVBMConfig          typed config; load_config(path) reads YAML/TOML + KVBM_... overrides
    KVLayout, Namespace block shape and identity (chained 128-bit BlockKeys)
    register_policy     add an eviction policy by name (notebooks, plugins)

Importing kvbm needs none of torch, CUDA, nixl or an engine; those are extras.
"""


def _policies_of_a_checkout() -> None:
    """kvbm.policies is the top-level policies/ folder, mapped in by every install (pyproject's
    wheel.packages). Python run inside a checkout imports the source folder kvbm/ first (e.g.
    `python -m pytest` after a non-editable install): map policies/ in from there too."""
    import importlib.util
    import os
    import sys

    if importlib.util.find_spec(__name__ + ".policies") is not None:  # an install, or editable
        return
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "policies")
    init = os.path.join(folder, "__init__.py")
    if not os.path.isfile(init):
        return
    spec = importlib.util.spec_from_file_location(__name__ + ".policies", init, submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    globals()["policies"] = module  # as an import of the submodule would


_policies_of_a_checkout()

from .blocks import BlockKey, KVLayout, Namespace  # noqa: E402
from .config import ConfigError, KVBMConfig, load_config  # noqa: E402
from .manager import BlockManager, Event  # noqa: E402
from .registry import register_admission, register_policy  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BlockKey", "BlockManager", "ConfigError", "Event", "KVBMConfig", "KVLayout", "Namespace",
    "load_config", "register_admission", "register_policy",
]
