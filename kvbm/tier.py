"""The manager's nouns: a tier and its block states, the jobs of the two-phase verbs, events.

    Tier                    capacity + eviction policy + admission policy + storage, and the
                            ready / pending / busy / pins state of its blocks
    TierStats               per-tier counters (hits, stores, demotions, drops, ...)
    StoreJob / LoadJob      what prepare_store / prepare_load reserved or pinned
    Ticket                  an asynchronous store or load (submit_*, poll, wait)
    Event                   stored / removed / moved, drained with take_events()
    check_unique(keys)      one request names each block once (ValueError naming the repeat)
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple, Sequence

from .policies.base import AdmissionPolicy, EvictionPolicy
from .tiers.base import Storage


class Event(NamedTuple):
    kind: str  # "stored" | "removed" | "moved"
    key: Any
    tier: str  # where the block is now (moved) or was (removed)
    source: str | None = None  # tier a moved block came from


@dataclass(slots=True)
class TierStats:
    hits: int = 0  # blocks served to a load from this tier
    stores: int = 0  # blocks written into this tier from a source (engine)
    demotions_in: int = 0  # blocks that arrived from the tier above
    promotions_out: int = 0  # blocks moved or copied to the top tier on a hit
    evictions: int = 0  # victims chosen by this tier's policy
    drops: int = 0  # victims that left the hierarchy from this tier
    rejected: int = 0  # offers refused by this tier's admission policy
    failed: int = 0  # writes rolled back (a medium error, or the caller said so)
    load_failures: int = 0  # reads that did not return intact bytes (the block was dropped)
    recovered: int = 0  # blocks found again at start (persistent media)

    def copy(self) -> "TierStats":
        return TierStats(*map(self.__getattribute__, _STAT_FIELDS))


_STAT_FIELDS = tuple(f.name for f in fields(TierStats))


class Tier:
    """Capacity + eviction policy + admission policy + storage, and the block states."""

    __slots__ = ("name", "index", "capacity", "policy", "admission", "storage",
                 "ready", "pending", "busy", "pins", "stats")

    def __init__(self, name: str, capacity: int, policy: EvictionPolicy,
                 admission: AdmissionPolicy, storage: Storage) -> None:
        self.name = name
        self.index = 0
        self.capacity = capacity
        self.policy = policy
        self.admission = admission
        self.storage = storage
        self.ready: dict[Any, Any] = {}  # key -> slot, servable
        self.pending: dict[Any, Any] = {}  # key -> slot, being written
        self.busy: set = set()  # pending or pinned: protected from eviction
        self.pins: dict[Any, int] = {}  # key -> reader count
        self.stats = TierStats()

    @property
    def used(self) -> int:
        return len(self.ready) + len(self.pending)

    def __repr__(self) -> str:
        return f"Tier({self.name}, {self.used}/{self.capacity}, {self.policy.name})"


@dataclass(eq=False)  # identity: two jobs of equal fields are different work
class StoreJob:
    """Reserved, not-ready blocks awaiting their bytes. `rejected` jobs reserved nothing."""

    runs: list = field(default_factory=list)  # (tier, keys, slots or None, index of keys[0])
    source: Any = None
    rejected: str | None = None
    failed: Sequence[Any] = ()  # keys whose bytes did not land (rolled back)
    position: int = 0  # index of the stored keys' first block in its sequence

    @property
    def keys(self) -> list:
        return [k for _, keys, _, _ in self.runs for k in keys]


@dataclass(eq=False)  # identity: two jobs of equal fields are different work
class Ticket:
    """An asynchronous store or load: `done` once poll()/wait() completed it."""

    kind: str
    job: Any
    future: Any
    done: bool = False
    error: BaseException | None = None


@dataclass(eq=False)  # identity: two jobs of equal fields are different work
class LoadJob:
    """Pinned source blocks; `keys[:n]` are being loaded, `promotions` reserved in the top tier."""

    keys: list = field(default_factory=list)
    tiers: list = field(default_factory=list)
    slots: list = field(default_factory=list)
    promotions: list = field(default_factory=list)  # (key, source tier, top slot, index in keys)
    destination: Any = None
    loaded: int = 0  # keys[:loaded] landed intact: the usable prefix
    failed: Sequence[Any] = ()  # keys that could not be read (miss, checksum)


def repeated_key(keys: Sequence[Any]) -> str | None:
    """None when no key repeats, else the error a public verb raises for keys."""
    if len(set(keys)) == len(keys):
        return None
    first: dict = {}
    for i, k in enumerate(keys):
        if k in first:
            return (f"block {k!r} appears twice in one request (positions {first[k]} and {i}); a block "
                    f"cannot follow itself in a prefix chain: pass each block's key once")
        first[k] = i
    return None  # pragma: no cover - set() and dict agree


def check_unique(keys: Sequence[Any]) -> None:
    if len(set(keys)) != len(keys):
        raise ValueError(repeated_key(keys))
