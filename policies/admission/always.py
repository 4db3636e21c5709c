"""Admit every key: the tier's eviction policy alone decides what it keeps."""

from __future__ import annotations

from ..base import AdmissionPolicy


class AlwaysAdmission(AdmissionPolicy):
    name = "always"
    admits_all = True

    def admit(self, key, hints=None):
        return True
