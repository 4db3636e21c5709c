"""Storages, one per medium: device (G1), host (G2), disk (G3), object (G4), null.

The byte-holding storages import lazily through kvbm.registry.STORAGE (fsspec, O_DIRECT
files and torch are only touched when a tier uses them).
"""

from .base import MEDIUM_OF_TIER, TIER_NAMES, Region, Storage
from .null import NullStorage

__all__ = ["MEDIUM_OF_TIER", "TIER_NAMES", "NullStorage", "Region", "Storage"]
