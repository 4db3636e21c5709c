"""Typed configuration, loaded from YAML or TOML, with KVBM_... environment overrides.

    load_config(path=None, env=os.environ) -> KVBMConfig
    load_with(build, path, env)           any loader: file + KVBM_... overrides, errors say which
    parse_config(data)                    from_dict + the tier checks serve and simulate run
    KVBMConfig.from_dict(data)            validate a plain dict (every error names the key)
    parse_capacity("4GiB", layout)        blocks from "10000", 10000, "4GiB", "512MB"

Example (kvbm.yaml):

    namespace: {model: meta-llama/Llama-3.1-8B, salt: ""}
    layout: {num_layers: 32, num_kv_heads: 8, head_dim: 128, block_size: 16, dtype: bfloat16}
    mode: exclusive          # or inclusive
    promote_on_hit: true
    tiers:
      - {name: g2, capacity: 8GiB}            # eviction: auto (every tier's default; lru below the first), admission: always
      - {name: g3, capacity: 200GiB, eviction: {name: frequency, half_life: 600}, admission: {name: n_hit, n: 2}}

Environment overrides use double underscores for nesting and tier names as keys:
KVBM_MODE=inclusive, KVBM_TIERS__G2__CAPACITY=16GiB, KVBM_TIERS__G3__EVICTION=arc. An error
caused by an override names the variables ("set by the environment: KVBM_..."), one in the
file names the file. A `daemon:` section is kept for `kvbm serve` (kvbm.daemon.config checks it).
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import yaml

from .blocks import KVLayout, check_name
from .tiers.base import TIER_NAMES


# The eviction policy of a tier whose config names none (issue 15): `auto` on every tier. On the
# first tier, where every store lands, it follows the best of its candidates by miniature
# simulations of the tier's own traffic (policies/auto.py). Below it (KVBMConfig gives such an
# `auto` the option `below`) a tier is fed by the cascade, one demoted block at a time, hits
# there remove the block and misses are never seen: auto's measurements cannot work there, and
# it runs lru (policies/auto_lower.py: the first tier's auto on a G3 was up to 0.053 below the
# best of lru/arc/s3fifo/prefix, lru at most 0.0124; bench/RESULTS.md, issue 15, session 11).
DEFAULT_EVICTION = "auto"
DEFAULT_LOWER_EVICTION = "auto"  # with below=True: lru's decisions and memory
DEFAULT_ADMISSION = "always"


def default_eviction(index: int) -> str:
    """The eviction policy of the index-th tier (fastest first) when its config names none."""
    return DEFAULT_EVICTION if index == 0 else DEFAULT_LOWER_EVICTION


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key and what to write instead."""


_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(-?[0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_capacity(value: Any, layout: KVLayout | None, where: str = "capacity") -> int:
    """Capacity in blocks: an integer (blocks) or a string with a byte unit (needs a layout)."""
    if isinstance(value, bool):
        raise ConfigError(f"{where} must be a number of blocks or a size like '4GiB', got {value!r}")
    if isinstance(value, int):
        blocks = value
    else:
        m = _SIZE_RE.match(str(value))
        if not m:
            raise ConfigError(f"{where}: cannot read {value!r}; write blocks (10000) or bytes ('4GiB', '512MB')")
        number, unit = float(m.group(1)), m.group(2).lower()
        if unit in ("", "blocks", "block"):
            if number != int(number):
                raise ConfigError(f"{where}: {value!r} is a fractional number of blocks")
            blocks = int(number)
        elif unit in _UNITS:
            if layout is None:
                raise ConfigError(
                    f"{where}: {value!r} is in bytes; give a `layout` (or --layout) so kvbm can "
                    f"convert bytes to blocks, or write the capacity in blocks"
                )
            blocks = int(number * _UNITS[unit]) // layout.block_nbytes
        else:
            raise ConfigError(f"{where}: unknown unit {m.group(2)!r} in {value!r}; use one of {', '.join(_UNITS)} or blocks")
    if blocks <= 0:
        raise ConfigError(f"{where} must be at least one block, got {value!r} (= {blocks} blocks)")
    return blocks


@dataclass
class PolicySpec:
    """A policy by registered name (or dotted path) plus its keyword options."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, value: Any, where: str) -> "PolicySpec":
        if isinstance(value, PolicySpec):
            return value
        if isinstance(value, str) and value:
            return cls(value)
        if isinstance(value, Mapping) and isinstance(value.get("name"), str):
            opts = {k: v for k, v in value.items() if k != "name"}
            return cls(value["name"], opts)
        raise ConfigError(f"{where} must be a policy name or a mapping with 'name' and options, got {value!r}")


@dataclass
class TierConfig:
    name: str
    capacity: int  # blocks
    # None: the default of the tier's place, filled in by KVBMConfig (default_eviction)
    eviction: PolicySpec | None = None
    admission: PolicySpec = field(default_factory=lambda: PolicySpec(DEFAULT_ADMISSION))
    storage: PolicySpec = field(default_factory=lambda: PolicySpec("null"))
    # Blocks kept free by background offload (kvbm.offload) where a tier below exists; None:
    # capacity // 16. Used by the engine connectors and the daemon, not by the simulator.
    headroom: int | None = None

    @property
    def offload_headroom(self) -> int:
        return self.capacity // 16 if self.headroom is None else self.headroom


@dataclass
class NamespaceConfig:
    model: str = "default"
    salt: str = ""


@dataclass
class KVBMConfig:
    tiers: list[TierConfig]
    layout: KVLayout | None = None
    namespace: NamespaceConfig = field(default_factory=NamespaceConfig)
    mode: str = "exclusive"
    promote_on_hit: bool = True
    events: bool = True
    daemon: dict[str, Any] | None = None  # the `daemon:` section, for kvbm serve (unchecked here)

    def __post_init__(self) -> None:
        for i, t in enumerate(self.tiers):
            if t.eviction is None:
                t.eviction = PolicySpec(default_eviction(i))
            if i > 0 and t.eviction.name == "auto" and "below" not in t.eviction.options:
                # auto below the first tier: its mode for a demotion-fed tier (policies/auto_lower.py)
                t.eviction = PolicySpec("auto", {**t.eviction.options, "below": True})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "KVBMConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"config must be a mapping at the top level, got {type(data).__name__}")
        check_keys(data, ("tiers", "layout", "namespace", "mode", "promote_on_hit", "events", "daemon"), "")
        daemon = data.get("daemon")
        if daemon is not None and not isinstance(daemon, Mapping):
            raise ConfigError(f"daemon must be a mapping (see README: Cache daemon), got {daemon!r}")
        layout = None
        if data.get("layout") is not None:
            lay = data["layout"]
            if not isinstance(lay, Mapping):
                raise ConfigError(f"layout must be a mapping, got {lay!r}")
            check_keys(lay, [f.name for f in fields(KVLayout)], "layout.")
            try:
                layout = KVLayout(**lay)
            except TypeError as exc:
                raise ConfigError(f"layout: {exc}") from exc
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
        ns = data.get("namespace") or {}
        if not isinstance(ns, Mapping):
            raise ConfigError(f"namespace must be a mapping with model and salt, got {ns!r}")
        check_keys(ns, ("model", "salt"), "namespace.")
        for name in ("model", "salt"):
            if name in ns:
                try:
                    check_name(ns[name], f"namespace.{name}")
                except ValueError as exc:
                    raise ConfigError(str(exc)) from None
        mode = data.get("mode", "exclusive")
        if mode not in ("exclusive", "inclusive"):
            raise ConfigError(f"mode must be 'exclusive' or 'inclusive', got {mode!r}")
        for flag in ("promote_on_hit", "events"):
            if flag in data and not isinstance(data[flag], bool):
                raise ConfigError(f"{flag} must be true or false, got {data[flag]!r}")
        raw_tiers = data.get("tiers")
        if not raw_tiers or not isinstance(raw_tiers, (list, tuple)):
            raise ConfigError("tiers must be a non-empty list, e.g. [{name: g2, capacity: 10000, eviction: lru}]")
        tiers = [_parse_tier(t, i, layout) for i, t in enumerate(raw_tiers)]
        _check_order(tiers)
        return cls(
            tiers=tiers,
            layout=layout,
            namespace=NamespaceConfig(**ns),
            mode=mode,
            promote_on_hit=data.get("promote_on_hit", True),
            events=data.get("events", True),
            daemon=dict(daemon) if daemon is not None else None,
        )


def _parse_tier(raw: Any, i: int, layout: KVLayout | None) -> TierConfig:
    where = f"tiers[{i}]"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a mapping like {{name: g2, capacity: 10000}}, got {raw!r}")
    check_keys(raw, ("name", "capacity", "eviction", "admission", "storage", "headroom"), f"{where}.")
    name = raw.get("name")
    if name not in TIER_NAMES:
        raise ConfigError(f"{where}.name must be one of {', '.join(TIER_NAMES)}, got {name!r}")
    where = f"tiers.{name}"
    if "capacity" not in raw:
        raise ConfigError(f"{where}.capacity is missing: give blocks (10000) or bytes ('4GiB')")
    capacity = parse_capacity(raw["capacity"], layout, f"{where}.capacity")
    return TierConfig(
        name=name,
        capacity=capacity,
        eviction=PolicySpec.parse(raw["eviction"], f"{where}.eviction") if "eviction" in raw else None,
        admission=PolicySpec.parse(raw.get("admission", DEFAULT_ADMISSION), f"{where}.admission"),
        storage=PolicySpec.parse(raw.get("storage", "null"), f"{where}.storage"),
        headroom=_parse_headroom(raw.get("headroom"), capacity, layout, f"{where}.headroom"),
    )


def _parse_headroom(value: Any, capacity: int, layout: KVLayout | None, where: str) -> int | None:
    """Blocks (64), bytes ('1GiB') or a share of the capacity ('5%'); 0 turns offload off."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            share = float(value.strip()[:-1])
        except ValueError:
            raise ConfigError(f"{where}: cannot read {value!r}; write blocks (64), bytes ('1GiB') or '5%'") from None
        blocks = int(capacity * share / 100)
    elif value == 0 and not isinstance(value, bool):
        return 0
    else:
        blocks = parse_capacity(value, layout, where)
    if not 0 <= blocks < capacity:
        raise ConfigError(f"{where} = {value!r} ({blocks} blocks) must be below the tier's capacity "
                          f"({capacity} blocks); it is the room kept free for new stores")
    return blocks


def _check_order(tiers: list[TierConfig]) -> None:
    seen = [t.name for t in tiers]
    for a, b in zip(seen, seen[1:]):
        if a == b:
            raise ConfigError(f"tier {a} appears twice; each of {', '.join(TIER_NAMES)} at most once")
        if TIER_NAMES.index(a) > TIER_NAMES.index(b):
            raise ConfigError(
                f"tiers are out of order: {b} comes after {a}; list them fastest first "
                f"({' -> '.join(TIER_NAMES)})"
            )


def check_keys(data: Mapping[str, Any], allowed, prefix: str) -> None:
    allowed = list(allowed)
    for key in data:
        if key not in allowed:
            near = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"unknown config key {prefix}{key!r}{hint}; allowed: {', '.join(allowed)}")


# KVBM_ variables that steer the build, the extension or CI rather than the config.
NON_CONFIG_ENV = ("KVBM_CONFIG", "KVBM_NATIVE", "KVBM_CUDA", "KVBM_EXPECT_CUDA", "KVBM_REQUIRE_NATIVE",
                  "KVBM_REQUIRE_VLLM", "KVBM_REQUIRE_NIXL", "KVBM_CI_", "KVBM_NB_")


def apply_env(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """Overlay KVBM_A__B__C=value onto data (values parsed as YAML scalars)."""
    for var, raw in sorted(env.items()):
        if not var.startswith("KVBM_") or var.startswith(NON_CONFIG_ENV):
            continue
        path = [p.lower() for p in var[len("KVBM_"):].split("__")]
        value = yaml.safe_load(raw) if raw != "" else ""
        if path[0] == "tiers":
            if len(path) < 3:
                raise ConfigError(f"{var}: write KVBM_TIERS__<TIER>__<KEY>, e.g. KVBM_TIERS__G2__CAPACITY=4GiB")
            tiers = data.setdefault("tiers", [])
            tier = next((t for t in tiers if isinstance(t, dict) and t.get("name") == path[1]), None)
            if tier is None:
                tier = {"name": path[1]}
                tiers.append(tier)
                tiers.sort(key=lambda t: TIER_NAMES.index(t["name"]) if t.get("name") in TIER_NAMES else 99)
            _set_path(tier, path[2:], value)
        else:
            _set_path(data, path, value)
    return data


def _set_path(node: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {} if child is None else {"name": child}
            node[part] = child
        node = child
    node[path[-1]] = value


def read_file(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist; give the path of a YAML or TOML config (see README)")
    text = p.read_text()
    try:
        if p.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = yaml.safe_load(text)
    except Exception as exc:  # both parsers raise their own error types
        raise ConfigError(f"{p}: cannot parse: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> KVBMConfig:
    """Read `path` (or $KVBM_CONFIG), overlay KVBM_... variables, validate."""
    return load_with(parse_config, path, env)


def parse_config(data: Mapping[str, Any]) -> KVBMConfig:
    """from_dict, then every tier resolved as the manager will build it (policy names and
    options, storage options, URL protocols, paths), without opening anything (kvbm.build)."""
    from .build import check_tiers

    cfg = KVBMConfig.from_dict(data)
    check_tiers(cfg, check_only=True)
    return cfg


T = TypeVar("T")


def config_env(env: Mapping[str, str]) -> list[str]:
    """The KVBM_... variables that override config keys."""
    return sorted(v for v in env if v.startswith("KVBM_") and not v.startswith(NON_CONFIG_ENV))


def load_with(build: Callable[[dict[str, Any]], T], path: str | os.PathLike | None = None,
              env: Mapping[str, str] | None = None) -> T:
    """build(data) for `path` (or $KVBM_CONFIG) overlaid with KVBM_... variables. A ConfigError
    says where the wrong value came from: the file, or the environment (by variable name)."""
    env = os.environ if env is None else env
    path = path or env.get("KVBM_CONFIG")
    raw = read_file(path) if path else {}
    try:
        return build(apply_env(copy.deepcopy(raw), env))
    except ConfigError as exc:
        err = exc
    overrides = config_env(env)
    if overrides:
        try:  # the file alone: does it fail the same way?
            build(copy.deepcopy(raw))
            from_env = True
        except ConfigError as exc:
            from_env = str(exc) != str(err)
        if from_env:
            raise ConfigError(f"{err} (set by the environment: {', '.join(overrides)})") from None
    raise ConfigError(f"{err} (in {path})" if path else str(err)) from None
