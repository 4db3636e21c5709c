"""Registries in the fsspec manner: names map to lazy dotted paths, plugins add more.

    Registry.register(name, cls_or_path, clobber=False)   add an implementation
    Registry.get(name)                                     a class, by name, dotted path or entry point
    Registry.names()                                       every name that resolves without an import error

A name resolves in this order: registered names, the built-in table, the entry-point group,
then a dotted path ("pkg.mod.Class" or "pkg.mod:Class") so config can name any class.
"""

from __future__ import annotations

import difflib
import importlib
from importlib.metadata import entry_points
from typing import Any


class UnknownName(KeyError, ValueError):
    """A registry lookup failed; the message lists the names that exist."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the plain message
        return str(self.args[0])


class Registry:
    def __init__(self, kind: str, group: str, builtins: dict[str, str]) -> None:
        self.kind = kind
        self.group = group
        self._known = dict(builtins)  # name -> "module:Class" (imported lazily)
        self._loaded: dict[str, Any] = {}

    def register(self, name: str, obj: Any, clobber: bool = False) -> None:
        if not clobber and (name in self._loaded or name in self._known):
            raise ValueError(f"{self.kind} {name!r} is already registered; pass clobber=True to replace it")
        self._known.pop(name, None)
        if isinstance(obj, str):
            self._known[name] = obj
            self._loaded.pop(name, None)
        else:
            self._loaded[name] = obj

    def names(self) -> list[str]:
        eps = {ep.name for ep in entry_points(group=self.group)}
        return sorted(set(self._loaded) | set(self._known) | eps)

    def get(self, name: str) -> Any:
        if not isinstance(name, str) or not name:
            raise UnknownName(f"{self.kind} name must be a non-empty string, got {name!r}")
        if name in self._loaded:
            return self._loaded[name]
        if name in self._known:
            obj = _import_path(self._known[name])
            self._loaded[name] = obj
            return obj
        for ep in entry_points(group=self.group):
            if ep.name == name:
                obj = ep.load()
                self._loaded[name] = obj
                return obj
        if "." in name or ":" in name:
            try:
                return _import_path(name)
            except (ImportError, AttributeError) as exc:
                raise UnknownName(f"cannot import {self.kind} {name!r}: {exc}") from exc
        names = self.names()
        close = difflib.get_close_matches(str(name), names, n=1)
        raise UnknownName(
            f"unknown {self.kind} {name!r}{f' (did you mean {close[0]!r}?)' if close else ''}; "
            f"registered: {', '.join(names)} "
            f"(or give a dotted path 'package.module.Class', or register one under entry-point group {self.group!r})"
        )


def _import_path(path: str) -> Any:
    if ":" in path:
        module, _, attr = path.partition(":")
    else:
        module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


EVICTION = Registry(
    "eviction policy",
    "kvbm.policies",
    {
        "lru": "kvbm.policies.lru:LRUPolicy",
        "fifo": "kvbm.policies.fifo:FIFOPolicy",
        "frequency": "kvbm.policies.frequency:FrequencyPolicy",
        "priority": "kvbm.policies.priority:PriorityPolicy",
        "arc": "kvbm.policies.arc:ARCPolicy",
        "s3fifo": "kvbm.policies.s3fifo:S3FIFOPolicy",
        "prefix": "kvbm.policies.prefix:PrefixPolicy",
        "belady": "kvbm.policies.belady:BeladyPolicy",
        "hitdensity": "kvbm.policies.hitdensity:HitDensityPolicy",
        "auto": "kvbm.policies.auto:AutoPolicy",
        "partition": "kvbm.policies.partition:PartitionPolicy",
    },
)

ADMISSION = Registry(
    "admission policy",
    "kvbm.admission",
    {
        "always": "kvbm.policies.admission.always:AlwaysAdmission",
        "n_hit": "kvbm.policies.admission.n_hit:NHitAdmission",
        "priority_floor": "kvbm.policies.admission.priority_floor:PriorityFloorAdmission",
        "second_chance": "kvbm.policies.admission.second_chance:SecondChanceAdmission",
    },
)

STORAGE = Registry(
    "storage",
    "kvbm.storages",
    {
        "null": "kvbm.tiers.null:NullStorage",
        "host": "kvbm.tiers.host:HostStorage",
        "disk": "kvbm.tiers.disk:DiskStorage",
        "object": "kvbm.tiers.object:ObjectStorage",
        "device": "kvbm.tiers.device:DeviceStorage",
    },
)


def register_policy(name: str, cls: Any, clobber: bool = False) -> None:
    """Register an eviction policy class under `name` (for notebooks and plugins)."""
    EVICTION.register(name, cls, clobber=clobber)


def register_admission(name: str, cls: Any, clobber: bool = False) -> None:
    ADMISSION.register(name, cls, clobber=clobber)
