"""Priority floor: admit a block only if its retention priority is at least `floor`.

Uses TensorRT-LLM's retention priority (0..100, default 35; see policies/priority.py), e.g.
keep a remote tier for system prompts marked 80+. A key offered without hints has the
default priority.
"""

from __future__ import annotations

from ..base import DEFAULT_PRIORITY, MAX_PRIORITY, MIN_PRIORITY, AdmissionPolicy


class PriorityFloorAdmission(AdmissionPolicy):
    name = "priority_floor"

    def __init__(self, *, floor=DEFAULT_PRIORITY, **kw):
        super().__init__(**kw)
        if isinstance(floor, bool) or not isinstance(floor, int) or not MIN_PRIORITY <= floor <= MAX_PRIORITY:
            raise ValueError(
                f"priority_floor admission: floor={floor!r} must be an int in {MIN_PRIORITY}..{MAX_PRIORITY}"
            )
        self.floor = floor

    def admit(self, key, hints=None):
        return (DEFAULT_PRIORITY if hints is None else hints.priority) >= self.floor
