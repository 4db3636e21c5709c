"""Metadata-only storage: no bytes, every transfer completes at once (simulator, tests)."""

from __future__ import annotations

from .base import Region, Storage


class NullStorage(Storage):
    medium = "null"
    instant = True

    def allocate(self):
        return None

    def free(self, slot):
        pass

    def describe(self, slot):
        return [Region("none", 0, 0, self.block_nbytes)]
