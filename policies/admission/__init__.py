"""Admission policies: may a key offered to a tier (a store or a demotion) enter it?

    always           admit everything
    n_hit            admit a key only after it was observed n times (keeps one-hit wonders
                     off slow, wearable tiers such as NVMe)
    priority_floor   admit blocks whose TensorRT-LLM retention priority is at least a floor

Each is registered by name in `kvbm.registry.ADMISSION`.
"""

from .always import AlwaysAdmission
from .n_hit import NHitAdmission
from .priority_floor import PriorityFloorAdmission

__all__ = ["AlwaysAdmission", "NHitAdmission", "PriorityFloorAdmission"]
