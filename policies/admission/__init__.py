"""Admission policies: may a key offered to a tier (a store or a demotion) enter it?

    always           admit everything
    n_hit            admit a key only after it was observed n times (keeps one-hit wonders
                     off slow, wearable tiers such as NVMe)
    priority_floor   admit blocks whose TensorRT-LLM retention priority is at least a floor
    second_chance    admit a block that was hit, or offered a second time (ghosts of refusals):
                     far fewer NVMe writes, at the cost of first reuses after leaving G2

Each is registered by name in `kvbm.registry.ADMISSION`.
"""

from .always import AlwaysAdmission
from .n_hit import NHitAdmission
from .priority_floor import PriorityFloorAdmission
from .second_chance import SecondChanceAdmission

__all__ = ["AlwaysAdmission", "NHitAdmission", "PriorityFloorAdmission", "SecondChanceAdmission"]
