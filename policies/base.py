"""The two policy contracts: which keys a tier keeps, and which keys it accepts.

A policy sees keys and small per-key hints only; it never sees bytes, tiers or transfers.
The BlockManager owns pins, in-flight state, capacity and events, so a policy stays short.

    EvictionPolicy.insert(key, hints)       a key was added to the tier (insert_many: several)
    EvictionPolicy.touch(keys)              the keys were accessed, in this order
    EvictionPolicy.remove(key)              the key left the tier for a reason other than evict
    EvictionPolicy.batch_stored(keys)       optional: keys inserted one by one were one stored run
    EvictionPolicy.evict(n, protected)      choose and forget n victims, or return None (no change)
    EvictionPolicy.accepts(key, hints)      optional bypass: is a new key worth a slot at all?
    AdmissionPolicy.admit(key, hints)       may this key enter the tier?
    AdmissionPolicy.observe(keys)           the keys were accessed somewhere (for N-hit counters)
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Collection, Hashable, Iterable, Sequence

Key = Hashable
Clock = Callable[[], float]

DEFAULT_PRIORITY = 35  # TensorRT-LLM's default retention priority
MIN_PRIORITY = 0
MAX_PRIORITY = 100


@dataclass(frozen=True, slots=True)
class Hints:
    """Small facts about one block that a policy may use; every field is optional.

    priority: TensorRT-LLM retention priority, 0-100 (35 default), lowest evicted first.
    duration: seconds after which `priority` reverts to the default (None = forever).
    parent:   the key of the previous block of the same sequence (None for a first block).
    position: block index inside its sequence (0 for the first block).
    size:     bytes of the block, for size-aware policies.
    owner:    who the block belongs to (a daemon's tenant; None = unknown), for policies that
              share a tier between owners (partition).
    """

    priority: int = DEFAULT_PRIORITY
    duration: float | None = None
    parent: Key | None = None
    position: int = 0
    size: int = 0
    owner: Any = None

    def __post_init__(self) -> None:
        if not MIN_PRIORITY <= self.priority <= MAX_PRIORITY:
            raise ValueError(
                f"Hints.priority={self.priority!r} is out of range: use {MIN_PRIORITY}..{MAX_PRIORITY} "
                f"(TensorRT-LLM semantics, default {DEFAULT_PRIORITY})"
            )
        if self.duration is not None and self.duration < 0:
            raise ValueError(f"Hints.duration={self.duration!r} must be >= 0 seconds or None")


DEFAULT_HINTS = Hints()


class EvictionPolicy(ABC):
    """Decides which keys a tier keeps.

    Subclasses set `name` and implement the five verbs. `capacity` is the tier's size in
    blocks (some algorithms size internal queues from it); the manager enforces it, not the
    policy. `clock` returns seconds and is injected so tests and traces are deterministic.
    """

    name: ClassVar[str] = ""
    #: True for policies that need the future (belady): refused outside the simulator.
    simulation_only: ClassVar[bool] = False
    #: True when insert() needs Hints.parent/position; the manager builds per-block hints then.
    wants_structure: ClassVar[bool] = False
    #: True when accepts() may refuse a new key (a bypass); the manager then asks before inserts.
    filters_inserts: ClassVar[bool] = False

    def __init__(self, capacity: int, *, clock: Clock = time.monotonic, **options: Any) -> None:
        if options:
            raise TypeError(
                f"policy {self.name!r} got unknown option(s) {sorted(options)}; "
                f"it takes none besides capacity and clock"
            )
        self.capacity = capacity
        self.clock = clock

    @abstractmethod
    def insert(self, key: Key, hints: Hints | None = None) -> None:
        """Track a key that was just added to the tier."""

    def insert_many(self, keys: Sequence[Key], hints: Hints | Sequence[Hints | None] | None = None) -> None:
        """Insert a run of new keys of one stored sequence, in order (none tracked yet).

        hints: one Hints for all, or one per key. Override for a bulk path, or to treat the
        run's last block specially (it ends what the engine stored).
        """
        if isinstance(hints, (list, tuple)):
            for key, h in zip(keys, hints):
                self.insert(key, h)
        else:
            for key in keys:
                self.insert(key, hints)

    @abstractmethod
    def touch(self, keys: Iterable[Key]) -> None:
        """Record an access to each key, in order; unknown keys are ignored."""

    def batch_stored(self, keys: Sequence[Key]) -> None:
        """keys, already inserted one at a time, were stored by one request as one run (head
        first). For engines that insert block by block (vLLM's CachePolicy interface) and tell
        the batch afterwards; a policy that learns from batches (insert_many) may regroup them.
        Must not change which keys are tracked. Default: nothing."""

    def accepts(self, key: Key, hints: Hints | None = None) -> bool:
        """May a new key take a slot at all, given what the tier holds? False is a bypass.

        Asked only when `filters_inserts` is True, just before the key would be inserted
        (after earlier keys of the same store). Must not change state.
        """
        return True

    @abstractmethod
    def remove(self, key: Key) -> None:
        """Forget a key that left the tier without being chosen by evict (no-op if unknown)."""

    @abstractmethod
    def evict(self, n: int, protected: Collection[Key] = ()) -> list[Key] | None:
        """Choose n keys outside `protected`, forget them and return them.

        Atomic: if n victims cannot be found, return None and change nothing.
        """

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __contains__(self, key: object) -> bool: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}(capacity={self.capacity}, size={len(self)})"


class AdmissionPolicy(ABC):
    """Decides whether a key offered to a tier (a store or a demotion) may enter it."""

    name: ClassVar[str] = ""
    #: True when the policy wants observe() calls on every access (costs a call per request).
    observes: ClassVar[bool] = False
    #: True when admit() is constantly True: the manager then skips the calls.
    admits_all: ClassVar[bool] = False

    def __init__(self, *, clock: Clock = time.monotonic, **options: Any) -> None:
        if options:
            raise TypeError(
                f"admission policy {self.name!r} got unknown option(s) {sorted(options)}"
            )
        self.clock = clock

    @abstractmethod
    def admit(self, key: Key, hints: Hints | None = None) -> bool:
        """True if `key` may enter the tier."""

    def observe(self, keys: Iterable[Key]) -> None:
        """An access to each key, wherever it was served (or missed)."""

    def forget(self, key: Key) -> None:
        """The key is gone from the whole hierarchy; drop any state about it."""
