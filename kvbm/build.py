"""From a validated config to tiers: the one path serve, simulate, demo and `config check` take.

    check_tiers(config, simulation) -> [TierPlan]   every name, option and URL resolved; no side effects
    build_tiers(config, clock, simulation) -> [Tier] the same plans, then the storages are opened

`check_tiers` builds the policies (small objects, nothing outside the process) and checks each
storage's options against what its class accepts, an object store's URL protocol against
fsspec's registry and a disk's path against the file system, without creating a file, a
shared-memory segment or a socket. `build_tiers` runs it first, so `kvbm config check` reports
exactly the errors the commands would, and then opens the storages; an OSError there names the
config key, and the storages already opened are closed again.
"""

from __future__ import annotations

import errno
import inspect
import os
from dataclasses import dataclass
from typing import Any, Callable

from .config import ConfigError, KVBMConfig, TierConfig
from .registry import ADMISSION, EVICTION, STORAGE, UnknownName
from .tier import Tier
from .tiers.base import namespace_id

# Passed by the manager, never by config.
_SET_BY_KVBM = {"self", "capacity_blocks", "block_nbytes", "namespace"}


@dataclass
class TierPlan:
    config: TierConfig
    policy: Any
    admission: Any
    storage_cls: type
    storage_options: dict


def check_tiers(config: KVBMConfig, *, clock: Callable[[], float] | None = None,
                simulation: dict[str, Any] | None = None, check_only: bool = False) -> list[TierPlan]:
    """Resolve and check every tier of config; raises ConfigError naming the key.

    `simulation` carries the future for simulation-only policies (belady); without it they are
    refused, unless `check_only` (config check: the simulator may run them)."""
    import time

    clock = clock or time.monotonic
    nbytes = config.layout.block_nbytes if config.layout else 0
    plans = []
    for tc in config.tiers:
        where = f"tiers.{tc.name}"
        pcls = _resolve(EVICTION, tc.eviction.name, f"{where}.eviction")
        kwargs = dict(tc.eviction.options)
        if pcls.simulation_only:
            if simulation is None and not check_only:
                raise ConfigError(
                    f"{where}.eviction: {tc.eviction.name!r} needs the future and runs only "
                    f"inside `kvbm simulate`; choose an online policy ({', '.join(EVICTION.names())})"
                )
            kwargs.update(simulation or {"future": [], "now": lambda: 0})
        policy = _build(pcls, f"{where}.eviction", tc.capacity, clock=clock, **kwargs)
        acls = _resolve(ADMISSION, tc.admission.name, f"{where}.admission")
        admission = _build(acls, f"{where}.admission", clock=clock, **tc.admission.options)
        scls = _resolve(STORAGE, tc.storage.name, f"{where}.storage")
        if not scls.instant and not nbytes:
            raise ConfigError(f"{where}.storage: {tc.storage.name!r} holds real bytes; give a `layout` "
                              f"so kvbm knows the block size")
        options = dict(tc.storage.options)
        _check_storage_options(scls, tc.storage.name, options, f"{where}.storage")
        plans.append(TierPlan(tc, policy, admission, scls, options))
    return plans


def build_tiers(config: KVBMConfig, *, clock: Callable[[], float],
                simulation: dict[str, Any] | None = None) -> list[Tier]:
    plans = check_tiers(config, clock=clock, simulation=simulation)
    nbytes = config.layout.block_nbytes if config.layout else 0
    ns = namespace_id(config.namespace.model, config.layout.fingerprint if config.layout else "-",
                      config.namespace.salt)
    tiers: list[Tier] = []
    try:
        for p in plans:
            where = f"tiers.{p.config.name}.storage"
            try:
                storage = _build(p.storage_cls, where, p.config.capacity, nbytes, namespace=ns, **p.storage_options)
            except OSError as exc:
                raise ConfigError(_os_error(where, p.storage_options, exc)) from None
            tiers.append(Tier(p.config.name, p.config.capacity, p.policy, p.admission, storage))
    except BaseException:
        for t in tiers:  # no half-built hierarchy keeps files, shm or threads
            try:
                t.storage.close()
            except Exception:
                pass
        raise
    return tiers


# ---------------------------------------------------------------- storage options


def accepted_options(cls: type) -> set[str] | None:
    """Keyword options cls's constructor accepts, following **options up the MRO; None when
    some class takes arbitrary keywords (cannot tell)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names - _SET_BY_KVBM
        if klass.__module__ == "kvbm.tiers.base":  # Storage refuses what no subclass took
            return names - _SET_BY_KVBM
    return None


def _check_storage_options(cls: type, name: str, options: dict, where: str) -> None:
    import difflib

    allowed = accepted_options(cls)
    if allowed is not None:
        for key in options:
            if key not in allowed:
                near = difflib.get_close_matches(str(key), sorted(allowed), n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise ConfigError(f"{where}: unknown option {key!r} for storage {name!r}{hint}; "
                                  f"allowed: {', '.join(sorted(allowed)) or 'none'}")
    if "url" in options:
        check_url(options["url"], f"{where}.url")
    if "path" in options and options["path"] is not None:
        check_dir(options["path"], f"{where}.path")


def check_url(url: Any, where: str) -> None:
    """An fsspec URL whose protocol is registered and importable."""
    import fsspec
    from fsspec.core import split_protocol

    if not isinstance(url, str) or not url:
        raise ConfigError(f"{where} must be a URL such as file:///var/kvbm or s3://bucket/kvbm, got {url!r}")
    protocol = split_protocol(url)[0] or "file"
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        known = fsspec.available_protocols()
        common = ", ".join(p for p in ("file", "memory", "s3", "gcs", "az", "http", "https") if p in known)
        raise ConfigError(f"{where}: unknown protocol {protocol!r} in {url!r}; use one that fsspec knows, "
                          f"e.g. {common} ({len(known)} in all: fsspec.available_protocols())") from None
    except ImportError as exc:
        raise ConfigError(f"{where}: protocol {protocol!r} needs a package that is not installed: {exc}") from None


def check_dir(path: Any, where: str) -> None:
    """A folder that exists or can be created: its nearest existing ancestor is a writable folder."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ConfigError(f"{where} must be a folder path, got {path!r}")
    p = os.path.abspath(os.fspath(path))
    probe = p
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise ConfigError(f"{where} = {path!r}: {probe} is a file, not a folder; "
                          f"set {where} to a folder on a local disk")
    if not os.access(probe, os.W_OK | os.X_OK):
        why = "is on a read-only file system" if _read_only(probe) else "is not writable by this user"
        raise ConfigError(f"{where} = {path!r}: {probe} {why}; set {where} to a writable folder on a local disk")
    # access() says yes where a folder still cannot be made (root under /proc or /sys, a full
    # disk): make one and remove it again, so nothing is left behind
    trial = os.path.join(probe, f".kvbm-check-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        os.mkdir(trial)
    except OSError as exc:
        raise ConfigError(f"{where} = {path!r}: cannot make a folder in {probe}: {_hint(exc)}; "
                          f"set {where} to a writable folder on a local disk") from None
    os.rmdir(trial)


def _read_only(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _os_error(where: str, options: dict, exc: OSError) -> str:
    key = f"{where}.path" if "path" in options else (f"{where}.url" if "url" in options else where)
    what = exc.filename or options.get("path") or options.get("url") or ""
    return f"{key}: cannot use {what}: {_hint(exc)}; set {key} to a writable folder on a local disk"


def _hint(exc: OSError) -> str:
    return {errno.EROFS: "it is on a read-only file system", errno.ENOTDIR: "a part of it is a file, not a folder",
            errno.EACCES: "permission denied", errno.EPERM: "permission denied",
            errno.ENOSPC: "the disk is full"}.get(exc.errno, exc.strerror or str(exc))


def _resolve(registry, name: str, where: str):
    try:
        return registry.get(name)
    except UnknownName as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _build(cls, where: str, *args, **kwargs):
    try:
        return cls(*args, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
