"""The connector's in-process backend: the process's own BlockManager.

    resolve_config(spec, layout, model)   the kvbm config as a dict, checked against the engine's layout
    shared_manager(config)                one BlockManager (and its lock, and its offloader) per config
                                          in this process: an engine's scheduler and worker halves share it
    release_managers()                    close them all, and every daemon backend (tests, shutdown)
    ManagerBackend                        lookup / pin / start_store / start_load / poll over the manager
    as_backend(manager, lock)             a backend as given, or a BlockManager wrapped as one

kvbm.connectors.core re-exports these names; daemon_backend.py is the other backend.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Mapping, Sequence

from ..blocks import KVLayout
from ..config import ConfigError, KVBMConfig, load_config
from ..manager import BlockManager
from ..offload import Offloader, offload_headroom
from .daemon_backend import DaemonBackend, release_backends

_MANAGERS: dict[str, tuple[BlockManager, threading.RLock]] = {}
_OFFLOADERS: dict[int, Offloader] = {}  # id(manager) -> its background offloader
_MANAGERS_LOCK = threading.Lock()


def resolve_config(spec: str | Mapping[str, Any] | None, layout: KVLayout, model: str) -> dict[str, Any]:
    """The kvbm config as a plain dict, from a file path or an inline dict, with the engine's layout.

    A config without `layout` takes the engine's; a config with one must match it exactly
    (a block of another shape would be served as garbage). A default namespace takes the model.
    """
    if spec is None:
        raise ConfigError("kv_connector_extra_config.kvbm_config is missing: give a path to kvbm.yaml "
                          "or an inline config dict")
    if isinstance(spec, str):
        data = _as_dict(load_config(spec))
    elif isinstance(spec, Mapping):
        data = json.loads(json.dumps(dict(spec)))  # a private deep copy
    else:
        raise ConfigError(f"kvbm_config must be a path or a mapping, got {type(spec).__name__}")
    engine = {f: getattr(layout, f) for f in layout.__dataclass_fields__}
    if data.get("layout") is None:
        data["layout"] = engine
    else:
        given = KVBMConfig.from_dict({"tiers": [{"name": "g2", "capacity": 1}], "layout": data["layout"]}).layout
        if given != layout:
            raise ConfigError(f"layout in the kvbm config {given} does not match the engine's KV cache {layout}; "
                              f"remove `layout` from the config (the connector fills it) or fix it")
    ns = dict(data.get("namespace") or {})
    if ns.get("model", "default") == "default":
        ns["model"] = model
    data["namespace"] = ns
    KVBMConfig.from_dict(data)  # validate now: errors name the key
    return data


def _as_dict(config: KVBMConfig) -> dict[str, Any]:
    return {
        "layout": None if config.layout is None else
        {f: getattr(config.layout, f) for f in config.layout.__dataclass_fields__},
        "namespace": {"model": config.namespace.model, "salt": config.namespace.salt},
        "mode": config.mode, "promote_on_hit": config.promote_on_hit, "events": config.events,
        "tiers": [{"name": t.name, "capacity": t.capacity,
                   "eviction": {"name": t.eviction.name, **t.eviction.options},
                   "admission": {"name": t.admission.name, **t.admission.options},
                   "storage": {"name": t.storage.name, **t.storage.options},
                   **({} if t.headroom is None else {"headroom": t.headroom})} for t in config.tiers],
    }


def shared_manager(config: Mapping[str, Any]) -> tuple[BlockManager, threading.RLock]:
    """The process's BlockManager for this config (built on first use) and its lock."""
    key = json.dumps(config, sort_keys=True)
    with _MANAGERS_LOCK:
        entry = _MANAGERS.get(key)
        if entry is None:
            cfg = KVBMConfig.from_dict(config)
            manager, lock = BlockManager.from_config(cfg), threading.RLock()
            entry = (manager, lock)
            _MANAGERS[key] = entry
            _OFFLOADERS[id(manager)] = Offloader(manager, lock, offload_headroom(cfg, manager))
        return entry


def release_managers() -> None:
    """Close every shared manager and daemon backend (tests, engine shutdown)."""
    with _MANAGERS_LOCK:
        entries = list(_MANAGERS.values())
        _MANAGERS.clear()
        offloaders = list(_OFFLOADERS.values())
        _OFFLOADERS.clear()
    for offloader in offloaders:
        offloader.close()
    for manager, lock in entries:
        with lock:
            manager.close()
    release_backends()


class ManagerBackend:
    """The in-process path: a BlockManager behind its lock; tickets are the manager's."""

    def __init__(self, manager: BlockManager, lock: threading.RLock) -> None:
        self.manager = manager
        self.lock = lock
        # keeps room free in G2 (and below) so a store never demotes on the engine's thread
        self.offloader = _OFFLOADERS.get(id(manager))

    @property
    def block_nbytes(self) -> int:
        return self.manager.block_nbytes

    def lookup(self, keys: Sequence[Any]) -> tuple[int, list[str]]:
        with self.lock:
            self.manager.poll()  # stores that landed since the last step are servable now
            return self.manager.lookup(keys)

    pins = True  # match() pins what it promises until the worker's load holds it

    def pin(self, keys: Sequence[Any]) -> int:
        """Pin the ready prefix of keys where it is (no eviction, no demotion); returns count."""
        with self.lock:
            return self.manager.pin(keys)

    def unpin(self, keys: Sequence[Any]) -> None:
        with self.lock:
            self.manager.unpin(keys)

    def start_store(self, keys: Sequence[Any], staging: Any, hints: Any = None, parent: Any = None,
                    position: int = 0) -> Any:
        """A ticket, or None when the store was rejected (no room: a future miss, not an error)."""
        with self.lock:
            ticket = self.manager.submit_store(keys, list(staging), hints=hints, parent=parent,
                                               position=position)
        if self.offloader is not None:
            self.offloader.kick()
        return None if ticket.job.rejected else ticket

    def start_load(self, keys: Sequence[Any], staging: Any) -> Any:
        with self.lock:
            ticket = self.manager.submit_load(keys, list(staging))
        if self.offloader is not None:
            self.offloader.kick()  # promotions fill the top tier too
        return ticket

    def poll(self, tickets: Sequence[Any], wait: bool = False) -> None:
        with self.lock:
            if wait:
                for t in tickets:
                    if t is not None and not t.done:
                        try:
                            self.manager.wait(t)
                        except Exception:  # reported through the job's failed keys
                            pass
            self.manager.poll()

    def done(self, ticket: Any) -> bool:
        return ticket.done

    def loaded(self, ticket: Any) -> int:
        """Blocks of a finished load that arrived intact (a prefix of its keys)."""
        return ticket.job.loaded if ticket.error is None else 0

    held = None  # HeldMedia (kvbm/held.py), from the first take_events: the engine asks for KV events

    def name(self, keys: Sequence[Any], hashes: Sequence[Any], parent_hash: Any = None) -> None:
        """The engine's block hashes of keys, for the KV events of take_events."""
        if self.held is not None:
            with self.lock:
                self.held.name(None, list(keys), list(hashes), parent_hash)

    def take_events(self, block_size: int) -> list[dict]:
        """vLLM-shaped KV events (kvbm/held.py) of what the tiers hold, by engine block hashes,
        since the last call; drains the manager's own events (else they pile up)."""
        with self.lock:
            events = self.manager.take_events()
            if self.held is None:
                from ..held import HeldMedia

                self.held = HeldMedia(self.manager, block_size)
                # G3 keeps each block's names: what it recovered at start is published at the next call
                self.manager.keep_meta(self.held.meta)
                self.held.recovered(self.manager.kept_meta(), lambda ns: ns is None)
                return []
            return self.held.diff(ev.key for ev in events).get(None, [])

    def close(self) -> None:
        if self.offloader is not None:
            self.offloader.close()
        with self.lock:
            self.manager.close()


def as_backend(manager: Any, lock: threading.RLock | None = None) -> Any:
    """A backend as given, or a BlockManager (with its lock) wrapped as one."""
    if isinstance(manager, (ManagerBackend, DaemonBackend)):
        return manager
    return ManagerBackend(manager, lock if lock is not None else threading.RLock())
