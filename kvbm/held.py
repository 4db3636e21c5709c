"""HeldMedia: which media hold each block an engine named, as KV events in vLLM's shape.

    HeldMedia(manager, block_size)
      .name(ns, keys, hashes, parent)   engine block hashes for keys (a store's); published at the next diff
      .diff(keys) -> {ns: [event]}      for the keys a batch of manager events touched: what the tiers
                                        hold now vs what was last published (BlockStored / BlockRemoved)
      .snapshot(ns) -> [event]          AllBlocksCleared + everything published as held (one batch)
      .view(ns) -> {medium: {hash}}     what the tiers hold now (the ground truth a subscriber must reach)
      .blocks(ns)                       named blocks of ns still tracked

Events are dicts with vLLM's field names (vllm/distributed/kv_events.py: "type" BlockStored,
BlockRemoved or AllBlocksCleared), so the daemon packs them without vLLM installed
(daemon/kv_events.py) and the in-process connector builds vLLM's classes from them
(connectors/vllm.py take_events). A medium per tier from its storage (MEDIUM: host "CPU",
disk "DISK", object "OBJECT"); token ids are not known here and are sent empty.

Diffing what is held, instead of translating each manager event, keeps a subscriber exact
whatever happened in between (a cascade, a promotion that copies or moves, a rollback): a block
is published in a medium while a tier of that medium holds it ready. A named block is tracked
while some tier holds it (ready or in flight); keys abandoned without an event (a rolled-back
reservation) are swept once the map outgrows twice what the manager holds, so the map stays
bounded by the manager's capacity.
"""

from __future__ import annotations

from typing import Any, Iterable

MEDIUM = {"host": "CPU", "disk": "DISK", "object": "OBJECT", "device": "GPU"}
SWEEP_SLACK = 1024


class HeldMedia:
    def __init__(self, manager: Any, block_size: int) -> None:
        self.manager = manager
        self.block_size = block_size
        names = [MEDIUM.get(getattr(t.storage, "medium", ""), t.name.upper()) for t in manager.tiers]
        self.media = list(dict.fromkeys(names))  # a bit per distinct medium
        self.tier_bits = [(t, 1 << self.media.index(m)) for t, m in zip(manager.tiers, names)]
        self.entries: dict = {}  # key -> [namespace, hash, parent hash, published media bits]
        self.dirty: list = []  # keys named since the last diff
        self._blocks: dict[Any, int] = {}  # namespace -> tracked keys

    def name(self, ns: Any, keys: list, hashes: list, parent: Any = None) -> None:
        """Engine hashes for keys; a key already published keeps the hash it was published under."""
        for i, (k, h) in enumerate(zip(keys, hashes)):
            if h is None:
                continue
            e = self.entries.get(k)
            if e is not None and e[3]:
                continue
            if e is None:
                self._blocks[ns] = self._blocks.get(ns, 0) + 1
            self.entries[k] = [ns, h, hashes[i - 1] if i else parent, 0]
            self.dirty.append(k)  # maybe held already (recovered, pulled): published at the next diff

    def diff(self, keys: Iterable[Any]) -> dict[Any, list]:
        """{namespace: events} for the keys touched since the last diff (and the newly named)."""
        todo, self.dirty = self.dirty, []
        out: dict[Any, tuple[dict, dict]] = {}  # ns -> (stored entries per medium, removed hashes per medium)
        seen = set()
        for k in (*todo, *keys):
            if k in seen:
                continue
            seen.add(k)
            e = self.entries.get(k)
            if e is None:
                continue
            now, old = self._media_of(k), e[3]
            if now != old:
                stored, removed = out.setdefault(e[0], ({}, {}))
                for medium in self._names(now & ~old):
                    stored.setdefault(medium, []).append(e)
                for medium in self._names(old & ~now):
                    removed.setdefault(medium, []).append(e[1])
                e[3] = now
            if not now and not self._pending(k):
                self._forget(k)
        self._sweep()
        return {ns: [ev for m, es in stored.items() for ev in self._stored(es, m)]
                + [{"type": "BlockRemoved", "block_hashes": hs, "medium": m} for m, hs in removed.items()]
                for ns, (stored, removed) in out.items()}

    def snapshot(self, ns: Any) -> list:
        """What was published for ns so far, as one batch (exactly the state after the last diff)."""
        by_medium: dict[str, list] = {}
        for e in self.entries.values():
            if e[0] == ns:
                for medium in self._names(e[3]):
                    by_medium.setdefault(medium, []).append(e)
        return [{"type": "AllBlocksCleared"}] + [ev for m, es in by_medium.items() for ev in self._stored(es, m)]

    def view(self, ns: Any) -> dict[str, set]:
        out: dict[str, set] = {}
        for k, e in self.entries.items():
            if e[0] == ns:
                for medium in self._names(self._media_of(k)):
                    out.setdefault(medium, set()).add(e[1])
        return out

    def blocks(self, ns: Any) -> int:
        return self._blocks.get(ns, 0)

    def _stored(self, entries: list, medium: str) -> list:
        """BlockStored events; a run of blocks each the parent of the next goes in one event."""
        evs: list = []
        for _, h, parent, _ in entries:
            last = evs[-1] if evs else None
            if last is not None and last["block_hashes"][-1] == parent:
                last["block_hashes"].append(h)
                continue
            evs.append({"type": "BlockStored", "block_hashes": [h], "parent_block_hash": parent, "token_ids": [],
                        "block_size": self.block_size, "lora_id": None, "medium": medium, "lora_name": None})
        return evs

    def _sweep(self) -> None:
        held = sum(len(t.ready) + len(t.pending) for t in self.manager.tiers)
        if len(self.entries) <= 2 * held + SWEEP_SLACK:
            return
        for k in [k for k, e in self.entries.items() if not e[3] and not self._media_of(k) and not self._pending(k)]:
            self._forget(k)

    def _forget(self, k: Any) -> None:
        ns = self.entries.pop(k)[0]
        left = self._blocks.get(ns, 1) - 1
        if left:
            self._blocks[ns] = left
        else:
            self._blocks.pop(ns, None)

    def _media_of(self, k: Any) -> int:
        bits = 0
        for t, bit in self.tier_bits:
            if k in t.ready:
                bits |= bit
        return bits

    def _pending(self, k: Any) -> bool:
        return any(k in t.pending for t in self.manager.tiers)

    def _names(self, bits: int) -> list[str]:
        return [m for i, m in enumerate(self.media) if bits & (1 << i)]
