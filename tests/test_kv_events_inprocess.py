"""The in-process connector's KV events: vLLM's scheduler takes them from the connector each step.

Issue 14 (5), without a daemon: SchedulerSide.take_events (kvbm/held.py) reports what the
in-process manager's tiers hold by the engine's block hashes, and KVBMConnector.take_events
turns them into vLLM's BlockStored / BlockRemoved. A view built from those vLLM objects, keyed
by (medium, locality) as vLLM 0.32 names a tier (G2 CPU/LOCAL, G3 STORAGE/LOCAL, G4
STORAGE/REMOTE: G3 and G4 share a medium), equals what the tiers hold (asked with lookups),
through stores, demotions down to G4 and promotions back; every event says ownership "kvbm";
and the manager's own event list is drained (before, nothing took it: it grew for ever).
"""

from __future__ import annotations

import uuid
from collections import defaultdict

import pytest

torch = pytest.importorskip("torch")
kv_events = pytest.importorskip("vllm.distributed.kv_events")

from kvbm.blocks import KVLayout, Namespace
from kvbm.config import KVBMConfig
from kvbm.connectors import core
from kvbm.connectors.vllm import _vllm_events
from kvbm.manager import BlockManager

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, block_size=16)
BS = LAYOUT.block_size
PLACE = {"g2": ("CPU", "LOCAL"), "g3": ("STORAGE", "LOCAL"), "g4": ("STORAGE", "REMOTE")}


def chain(tag: str, n: int) -> list[bytes]:
    return [uuid.uuid5(uuid.NAMESPACE_OID, f"{tag}/{i}").bytes * 2 for i in range(n)]


@pytest.fixture
def engine(tmp_path):
    cfg = KVBMConfig.from_dict({
        "layout": {f: getattr(LAYOUT, f) for f in LAYOUT.__dataclass_fields__},
        "tiers": [{"name": "g2", "capacity": 6, "eviction": "lru", "storage": "host"},
                  {"name": "g3", "capacity": 6, "eviction": "lru",
                   "storage": {"name": "disk", "path": str(tmp_path / "g3")}},
                  {"name": "g4", "capacity": 64, "eviction": "lru",
                   "storage": {"name": "object", "url": f"file://{tmp_path}/g4"}}]})
    manager = BlockManager.from_config(cfg)
    lock = __import__("threading").RLock()
    sched = core.SchedulerSide(manager, lock, Namespace("tiny", LAYOUT), BS)
    worker = core.WorkerSide(manager, lock)
    g = torch.Generator().manual_seed(0)
    worker.register([torch.randn(32, 2, 2, BS, 64, generator=g).to(torch.bfloat16) for _ in range(2)])
    yield manager, sched, worker
    manager.close()


def _prompt(sched, worker, req, hashes, blocks, names):
    keys = sched.keys(req, hashes)
    names.update(zip(hashes, keys))
    hit = sched.match(req, keys, len(hashes) * BS + 1, 0, must_compute_one=True) // BS
    plan = sched.plan_load(req, blocks, hit * BS)
    if plan is not None:
        worker.start_load(plan)
    store = sched.plan_store(req, blocks, len(hashes) * BS + 1)
    if store is not None:
        worker.start_store(store)
    worker.poll(wait=True)
    sched.finished(req)
    return hit


def test_connector_events_follow_the_in_process_tiers(engine):
    manager, sched, worker = engine
    assert sched.take_events() == []  # the first call starts naming blocks (vLLM calls it every step)
    view: dict[tuple, set] = defaultdict(set)
    seen: set = set()  # (type, medium, locality, ownership) of every event

    def follow():
        for ev in _vllm_events(sched.take_events()):
            assert isinstance(ev, (kv_events.BlockStored, kv_events.BlockRemoved))
            place = (ev.medium, ev.locality)
            seen.add((type(ev).__name__, *place, ev.ownership))
            (view[place].update if isinstance(ev, kv_events.BlockStored)
             else view[place].difference_update)(ev.block_hashes)

    names: dict = {}
    for i in range(5):  # 20 blocks through a 6-block G2 and a 6-block G3: the oldest go down to G4
        assert _prompt(sched, worker, f"a{i}", chain(f"p{i}", 4), [0, 1, 2, 3], names) == 0
        follow()
    assert _prompt(sched, worker, "b", chain("p0", 4), [4, 5, 6, 7], names) == 4  # from G4, promoted
    follow()
    truth: dict[tuple, set] = defaultdict(set)
    for h, k in names.items():
        n, where = manager.lookup([k])
        if n:
            truth[PLACE[where[0]]].add(h)
    assert {p: len(hs) for p, hs in truth.items()} == {  # exclusive tiers, all 20 blocks held
        ("CPU", "LOCAL"): 6, ("STORAGE", "LOCAL"): 6, ("STORAGE", "REMOTE"): 8}
    assert set(chain("p0", 4)) <= truth[("CPU", "LOCAL")]  # promoted out of G4 into G2
    assert {p: v for p, v in view.items() if v} == dict(truth)
    assert seen == {(t, *p, "kvbm") for t in ("BlockStored", "BlockRemoved") for p in PLACE.values()}
    assert manager.take_events() == []  # drained by the connector


def test_events_convert_for_a_vllm_without_locality(monkeypatch):
    """A vLLM before 0.32 has no locality / ownership fields: the conversion leaves them out."""
    import msgspec

    class OldStored(msgspec.Struct, omit_defaults=True, tag="BlockStored"):
        block_hashes: list
        parent_block_hash: object
        token_ids: list
        block_size: int
        lora_id: object
        medium: object

    monkeypatch.setattr(kv_events, "BlockStored", OldStored)
    ev = {"type": "BlockStored", "block_hashes": [b"h"], "parent_block_hash": None, "token_ids": [],
          "block_size": BS, "lora_id": None, "medium": "STORAGE", "lora_name": None,
          "locality": "REMOTE", "ownership": "kvbm"}
    assert _vllm_events([ev]) == [OldStored([b"h"], None, [], BS, None, "STORAGE")]


def test_each_medium_is_named_as_vllm_names_it():
    """HeldMedia over a fake manager with one tier per storage medium: the exact events of a store
    into G1 and a move from G1 to G4 (vLLM's GPU / STORAGE with LOCAL / REMOTE, ownership kvbm); a
    plugin's medium goes under its tier's name."""
    from types import SimpleNamespace

    from kvbm.held import HeldMedia

    def tier(name, medium):
        return SimpleNamespace(name=name, storage=SimpleNamespace(medium=medium), ready={}, pending={})

    g1, g2, g3, g4, g5 = (tier("g1", "device"), tier("g2", "host"), tier("g3", "disk"), tier("g4", "object"),
                          tier("g5", "tape"))
    held = HeldMedia(SimpleNamespace(tiers=[g1, g2, g3, g4, g5]), BS)
    assert held.places == [("GPU", "LOCAL"), ("CPU", "LOCAL"), ("STORAGE", "LOCAL"), ("STORAGE", "REMOTE"),
                           ("G5", "LOCAL")]

    def stored(hashes, parent, medium, locality):
        return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent, "token_ids": [],
                "block_size": BS, "lora_id": None, "medium": medium, "lora_name": None,
                "locality": locality, "ownership": "kvbm"}

    held.name("ns", ["k1", "k2"], [b"h1", b"h2"], b"h0")
    g1.ready.update(k1=0, k2=1)
    assert held.diff([]) == {"ns": [stored([b"h1", b"h2"], b"h0", "GPU", "LOCAL")]}
    del g1.ready["k1"], g1.ready["k2"]
    g4.ready.update(k1=0, k2=1)
    assert held.diff(["k1", "k2"]) == {"ns": [
        stored([b"h1", b"h2"], b"h0", "STORAGE", "REMOTE"),
        {"type": "BlockRemoved", "block_hashes": [b"h1", b"h2"], "medium": "GPU", "locality": "LOCAL",
         "ownership": "kvbm"}]}
    g3.ready["k2"] = 2  # a copy in G3 too: the same medium, another locality
    g5.ready["k1"] = 0
    assert held.diff(["k1", "k2"]) == {"ns": [stored([b"h1"], b"h0", "G5", "LOCAL"),
                                              stored([b"h2"], b"h1", "STORAGE", "LOCAL")]}
    assert held.view("ns") == {("STORAGE", "REMOTE"): {b"h1", b"h2"}, ("STORAGE", "LOCAL"): {b"h2"},
                               ("G5", "LOCAL"): {b"h1"}}
    assert held.snapshot("ns")[0] == {"type": "AllBlocksCleared"}
    assert sorted((e["medium"], e["locality"], e["block_hashes"]) for e in held.snapshot("ns")[1:]) == [
        ("G5", "LOCAL", [b"h1"]), ("STORAGE", "LOCAL", [b"h2"]), ("STORAGE", "REMOTE", [b"h1", b"h2"])]
