"""Any kvbm eviction policy as a vLLM offloading `CachePolicy` (vLLM 0.32's CPUOffloadingManager).

vLLM's own OffloadingConnector picks its CPU tier's policy by name, and loads an out-of-tree
one from a module path. Name a kvbm policy with the `kvbm_` prefix (vLLM's built-in names
`lru` and `arc` would otherwise win):

    "kv_connector_extra_config": {"eviction_policy": "kvbm_s3fifo",
                                  "cache_policy_module_path": "kvbm.connectors.vllm_policy"}

Each `kvbm_<name>` attribute of this module is a CachePolicy class built on first access for
the kvbm policy registered as <name> (lru, fifo, arc, s3fifo, frequency, priority, prefix,
hitdensity, or a third party's). The adapter keeps vLLM's chunk table and its evictable set
(ref_cnt == 0); the kvbm policy only orders keys, and pinned chunks are passed as protected.
Recency follows vLLM: a request's keys are touched tail first, so its head is the most recent.
"""

from __future__ import annotations

from typing import Any, Iterable

from ..registry import EVICTION

try:
    from vllm.v1.kv_offload.cpu.policies.base import CachePolicy, ChunkStatus
except ImportError as exc:  # pragma: no cover - exercised only without vLLM
    raise ImportError(f"kvbm.connectors.vllm_policy needs vLLM's kv_offload (tested with 0.32): {exc}") from exc

PREFIX = "kvbm_"


class _Unevictable(set):
    """`protected` for a kvbm policy: the caller's keys plus every chunk in use (ref_cnt != 0)."""

    __slots__ = ("evictable",)

    def __contains__(self, key: Any) -> bool:
        return key not in self.evictable or set.__contains__(self, key)

    def __bool__(self) -> bool:
        return True


class KVBMCachePolicy(CachePolicy):
    """A vLLM CachePolicy whose eviction order comes from a kvbm EvictionPolicy."""

    kvbm_policy: str = "lru"
    kvbm_options: dict = {}

    def __init__(self, cache_capacity: int) -> None:
        super().__init__(cache_capacity)
        self._cls = EVICTION.get(self.kvbm_policy)
        self.clear()

    def clear(self) -> None:
        self.policy = self._cls(self.cache_capacity, **self.kvbm_options)
        self.chunks: dict[Any, ChunkStatus] = {}
        self._evictable: set = set()

    def get(self, key: Any) -> ChunkStatus | None:
        return self.chunks.get(key)

    def insert(self, key: Any, chunk: ChunkStatus) -> None:
        self.chunks[key] = chunk
        self.policy.insert(key, None)
        if chunk.ref_cnt == 0:
            self._evictable.add(key)

    def remove(self, key: Any) -> None:
        del self.chunks[key]
        self.policy.remove(key)
        self._evictable.discard(key)

    def touch(self, keys: Iterable[Any], req_context: Any = None) -> None:
        keys = [k for k in keys if k in self.chunks]
        keys.reverse()
        self.policy.touch(keys)

    def on_request_finished(self, key_groups: Any, insertion_only_keys: set, reused_keys: set,
                            req_context: Any = None) -> None:
        """Touch only what the request reused, and tell the policy which chunks it stored as one
        run. vLLM's default touches every key the request offered, the chunks it just inserted
        too; a kvbm policy counts a touch as a reuse, so every new block would look reused at
        once (ARC then degenerates to LRU, frequency and hitdensity lose their classes)."""
        for keys in key_groups:
            reused = [k for k in keys if k in reused_keys]
            if reused:
                self.touch(reused, req_context)
            stored = [k for k in keys if k in insertion_only_keys and k in self.chunks]
            if stored:  # one stored run, head first (hitdensity classes blocks by it)
                self.policy.batch_stored(stored)

    def evict(self, n: int, protected: set) -> list[tuple[Any, ChunkStatus]] | None:
        if n == 0:
            return []
        if not protected and len(self._evictable) == len(self.chunks):
            guard: Any = ()
        else:
            guard = _Unevictable(protected)
            guard.evictable = self._evictable
        victims = self.policy.evict(n, guard)
        if victims is None:
            return None
        out = []
        for key in victims:
            self._evictable.discard(key)
            out.append((key, self.chunks.pop(key)))
        return out

    def mark_evictable(self, key: Any) -> None:
        self._evictable.add(key)

    def mark_non_evictable(self, key: Any) -> None:
        self._evictable.discard(key)


_CLASSES: dict[str, type] = {}


def cache_policy(name: str, **options: Any) -> type[KVBMCachePolicy]:
    """The CachePolicy class for kvbm policy `name` (with options), e.g. for CachePolicyFactory."""
    EVICTION.get(name)  # unknown names fail here, listing the registered ones
    return type(f"{PREFIX}{name}", (KVBMCachePolicy,), {"kvbm_policy": name, "kvbm_options": dict(options)})


def __getattr__(attr: str) -> type[KVBMCachePolicy]:
    if not attr.startswith(PREFIX):
        raise AttributeError(f"module {__name__!r} has no attribute {attr!r}; "
                             f"name kvbm policies as {PREFIX}<name> (e.g. {PREFIX}s3fifo)")
    cls = _CLASSES.get(attr)
    if cls is None:
        cls = _CLASSES[attr] = cache_policy(attr[len(PREFIX):])
    return cls
