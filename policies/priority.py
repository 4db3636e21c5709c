"""Priority retention in TensorRT-LLM's manner: evict the lowest priority first, LRU within one.

Semantics follow TensorRT-LLM's KV cache docs ("Retention Policy", docs/source/features/kvcache.md)
and its `KvCacheRetentionConfig`:

    priority   0..100 per block (Hints.priority, default 35); all blocks of the lowest priority
               go before any block of the next; equal priorities are least recently used first
    duration   Hints.duration seconds after the block entered the tier, its priority reverts to
               the default 35 (TensorRT-LLM: "from the first time the block was made available
               for reuse"); it keeps its place in LRU order. Re-inserting resets both.
    expiry     lazy: a min-heap of expiry times is drained at insert and evict, O(log n) each

`block_priorities()` maps a request's token-range retention configs to per-block Hints.
"""

from __future__ import annotations

from bisect import bisect_right
from datetime import timedelta
from heapq import heapify, heappop, heappush

from ._lazyheap import pop_victims
from .base import DEFAULT_HINTS, DEFAULT_PRIORITY, EvictionPolicy, Hints


class PriorityPolicy(EvictionPolicy):
    name = "priority"

    def __init__(self, capacity, **kw):
        super().__init__(capacity, **kw)
        self._state: dict = {}  # key -> [priority, last access seq, insert seq]
        self._heap: list = []  # (priority, access seq, key); live iff it matches _state
        self._expiry: list = []  # (time, insert seq, key); live iff the insert seq matches
        self._seq = 0
        self._parked: dict = {}  # key -> protected entry set aside by evict (see pop_victims)

    def priority(self, key) -> int | None:
        """The effective priority of `key` now (None if unknown)."""
        self._expire()
        state = self._state.get(key)
        return None if state is None else state[0]

    def _expire(self) -> None:
        expiry, now = self._expiry, self.clock()
        while expiry and expiry[0][0] <= now:
            _, born, key = heappop(expiry)
            state = self._state.get(key)
            if state is not None and state[2] == born and state[0] != DEFAULT_PRIORITY:
                state[0] = DEFAULT_PRIORITY
                heappush(self._heap, (DEFAULT_PRIORITY, state[1], key))

    def _push(self, key, state) -> None:
        heappush(self._heap, (state[0], state[1], key))
        if len(self._heap) + len(self._parked) > 2 * len(self._state) + 1024:
            self._heap = [(p, s, k) for k, (p, s, _) in self._state.items()]
            heapify(self._heap)
            self._parked.clear()

    def insert(self, key, hints=None):
        hints = hints or DEFAULT_HINTS
        self._expire()
        self._seq += 1
        state = self._state[key] = [hints.priority, self._seq, self._seq]
        if hints.duration is not None and hints.priority != DEFAULT_PRIORITY:
            heappush(self._expiry, (self.clock() + hints.duration, self._seq, key))
            self._expire()  # a zero duration reverts at once
        self._push(key, state)

    def touch(self, keys):
        for key in keys:
            state = self._state.get(key)
            if state is not None:
                self._seq += 1
                state[1] = self._seq
                self._push(key, state)

    def remove(self, key):
        self._state.pop(key, None)

    def evict(self, n, protected=()):
        if n <= 0:
            return []
        self._expire()
        states = self._state

        def live(item):
            state = states.get(item[2])
            return state is not None and state[0] == item[0] and state[1] == item[1]

        victims = pop_victims(self._heap, n, protected, live, self._parked)
        if victims is None:
            return None
        for _, _, key in victims:
            del states[key]
        return [key for _, _, key in victims]

    def __len__(self):
        return len(self._state)

    def __contains__(self, key):
        return key in self._state


def _seconds(duration) -> float | None:
    return duration.total_seconds() if isinstance(duration, timedelta) else duration


def _as_range(r) -> tuple:
    if hasattr(r, "token_start"):  # a tensorrt_llm KvCacheRetentionConfig.TokenRangeRetentionConfig
        return r.token_start, r.token_end, r.priority, _seconds(r.duration_ms)
    start, end, priority, duration = r
    return start, end, priority, _seconds(duration)


def block_priorities(ranges, block_size, num_blocks, *, rule="first_token") -> list[Hints]:
    """Per-block Hints for a request's TensorRT-LLM token-range retention configs.

    `ranges`: (token_start, token_end or None, priority, duration seconds or timedelta or None)
    tuples, or TensorRT-LLM TokenRangeRetentionConfig objects. As in TensorRT-LLM they must not
    overlap, and only the last may be open-ended (None = to the end of the sequence).

    rule="first_token" (TensorRT-LLM's `getPerBlockRetentionPriorityDuration`): a block takes
    the range that holds its first token, else the default. rule="max_overlap": a block takes
    the highest priority among the ranges that overlap any of its tokens.
    Each Hints carries position=i; set parent with dataclasses.replace where needed.
    """
    if rule not in ("first_token", "max_overlap"):
        raise ValueError(f"block_priorities: rule={rule!r}; use 'first_token' or 'max_overlap'")
    if block_size <= 0 or num_blocks < 0:
        raise ValueError(
            f"block_priorities: block_size={block_size!r} must be > 0 and num_blocks={num_blocks!r} >= 0"
        )
    spans = sorted((_as_range(r) for r in ranges), key=lambda r: r[0])
    for i, (start, end, priority, _) in enumerate(spans):
        Hints(priority=priority)  # validates 0..100
        if start < 0 or (end is not None and end <= start):
            raise ValueError(f"block_priorities: token range ({start}, {end}) must have 0 <= token_start < token_end")
        if end is None and i != len(spans) - 1:
            raise ValueError(f"block_priorities: only the last token range may end at None, not ({start}, None)")
        if i + 1 < len(spans) and end > spans[i + 1][0]:
            raise ValueError(f"block_priorities: token ranges ({start}, {end}) and {spans[i + 1][:2]} overlap")
    starts = [s[0] for s in spans]
    hints = []
    for block in range(num_blocks):
        first, last = block * block_size, (block + 1) * block_size  # tokens [first, last)
        j = bisect_right(starts, first) - 1
        best = None
        if rule == "first_token":
            if j >= 0 and (spans[j][1] is None or first < spans[j][1]):
                best = spans[j]
        else:
            for start, end, priority, duration in spans[max(j, 0):]:
                if start >= last:
                    break
                if (end is None or end > first) and (best is None or priority > best[2]):
                    best = (start, end, priority, duration)
        hints.append(Hints(position=block) if best is None else Hints(best[2], best[3], position=block))
    return hints
