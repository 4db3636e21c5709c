"""The TensorRT-LLM connector (kvbm.connectors.trtllm) without TensorRT-LLM.

Its engine-independent logic (TrtllmPlanner, TrtllmTransfers, retention_hints, over
kvbm.connectors.core) runs the vLLM connector's scheduler scenarios and the priority ones:
a high-priority system prompt survives a small `priority` tier, and reverts after its
duration (fake clock). Tests that need tensorrt_llm are marked `trtllm` and skip here."""

import pytest

torch = pytest.importorskip("torch")

from kvbm.policies.base import Hints
from kvbm.policies.priority import block_priorities

from kvbm.blocks import KVLayout, Namespace
from kvbm.connectors import core

BS, LAYERS, HEADS, HEAD = 32, 2, 2, 16
LAYOUT = KVLayout(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=HEAD, block_size=BS, dtype="bfloat16")


@pytest.fixture
def halves(tmp_path):
    cfg = core.resolve_config({"tiers": [{"name": "g2", "capacity": 4, "storage": {"name": "host", "pin": "never"}},
                                         {"name": "g3", "capacity": 16, "eviction": "priority",
                                          "storage": {"name": "disk", "path": str(tmp_path)}}]}, LAYOUT, "tiny")
    manager, lock = core.shared_manager(cfg)
    sched = core.SchedulerSide(manager, lock, Namespace("tiny", LAYOUT), BS)
    worker = core.WorkerSide(manager, lock)
    # TRT-LLM's pools are block-major: [num_blocks, kv, heads, block_size, head] per layer
    kv = [torch.randn(12, 2, HEADS, BS, HEAD).to(torch.bfloat16) for _ in range(LAYERS)]
    worker.register(kv)
    yield sched, worker, kv
    core.release_managers()


def test_store_match_load_roundtrip_with_priorities(halves):
    sched, worker, kv = halves
    before = [t.clone() for t in kv]
    hashes = [101, 102, 103]
    keys = sched.keys("r1", hashes)
    sched.set_priorities("r1", block_priorities([(0, BS, 90, None)], BS, 3))  # system prompt: keep
    worker.start_store(sched.plan_store("r1", [0, 1, 2], 3 * BS + 1))
    worker.poll(wait=True)
    assert sched.manager.lookup(keys)[0] == 3
    assert sched.match("r2", sched.keys("r2", hashes), 3 * BS + 1, 0, must_compute_one=True) == 3 * BS
    # exactly 3 blocks of prompt: a sync load leaves the last block to the engine
    assert sched.match("r3", sched.keys("r3", hashes), 3 * BS, 0, must_compute_one=True) == 2 * BS
    plan = sched.plan_load("r2", [5, 6, 7], 3 * BS)
    worker.start_load(plan)
    loads, _ = worker.poll(wait=True)
    assert loads == {"r2": []}
    for t, b in zip(kv, before):
        assert torch.equal(t[[5, 6, 7]], b[[0, 1, 2]])


def test_matched_blocks_are_pinned_until_the_load_holds_them(halves):
    # match() promises 3 blocks; before the worker loads them, a flood of stores fills G2 (4)
    # and G3 (16). Without a pin the promised blocks could be evicted or be mid-demotion when
    # the load comes (a load error: vLLM's default policy then fails the request).
    sched, worker, kv = halves
    keys = sched.keys("r1", [1, 2, 3])
    worker.start_store(sched.plan_store("r1", [0, 1, 2], 3 * BS + 1))
    worker.poll(wait=True)
    sched.finished("r1")
    assert sched.match("r2", sched.keys("r2", [1, 2, 3]), 3 * BS + 1, 0, must_compute_one=True) == 3 * BS
    for i in range(6):  # 24 other blocks
        sched.keys(f"flood{i}", [1000 + 4 * i + j for j in range(4)])
        worker.start_store(sched.plan_store(f"flood{i}", [4, 5, 6, 7], 4 * BS))
        worker.poll(wait=True)
        sched.finished(f"flood{i}")
    assert sched.manager.lookup(keys)[0] == 3  # still there
    plan = sched.plan_load("r2", [8, 9, 10], 3 * BS)
    worker.start_load(plan)
    assert worker.poll(wait=True)[0] == {"r2": []}
    sched.finished("r2")
    assert not any(t.pins for t in sched.manager.tiers)  # every pin released
    # a request that matched but never loaded (preempted, aborted) releases its pins too
    assert sched.match("r3", sched.keys("r3", [1, 2, 3]), 3 * BS + 1, 0, must_compute_one=True) == 3 * BS
    assert any(t.pins for t in sched.manager.tiers)
    sched.finished("r3")
    assert not any(t.pins for t in sched.manager.tiers)


def test_config_layout_must_match_engine():
    from kvbm.config import ConfigError

    with pytest.raises(ConfigError, match="does not match"):
        core.resolve_config({"layout": {"num_layers": 3, "num_kv_heads": 2, "head_dim": 16, "block_size": BS},
                             "tiers": [{"name": "g2", "capacity": 4}]}, LAYOUT, "tiny")


# ---------------------------------------------------------------- the TRT-LLM planner and transfers
# The same scenarios as the vLLM connector's scheduler tests, driven by TRT-LLM's plain data
# (token lists, RequestData-shaped records, one block-major pool tensor), plus priorities.

import threading
from datetime import timedelta
from types import SimpleNamespace

from kvbm.config import KVBMConfig
from kvbm.connectors import trtllm
from kvbm.manager import BlockManager


def tokens(seed, n):
    return [(seed * 7919 + i * 104729) % 1000 + 3 for i in range(n)]


def data(req_id, toks, block_ids, computed=0, scheduled=None, **extra):
    """A TRT-LLM RequestData: new tokens and block ids since the last step, positions."""
    return SimpleNamespace(request_id=req_id, new_tokens=list(toks), new_block_ids=list(block_ids),
                           computed_position=computed,
                           num_scheduled_tokens=len(toks) - computed if scheduled is None else scheduled, **extra)


def retention(ranges, decode=35, decode_s=None):
    return SimpleNamespace(token_range_retention_configs=ranges, decode_retention_priority=decode,
                           decode_duration_ms=decode_s)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def pool(num_blocks=24, seed=0):
    # TRT-LLM's pool: one tensor, block-major: [num_blocks, layers, kv, heads * block_size * head]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_blocks, LAYERS, 2, HEADS * BS * HEAD, generator=g).to(torch.bfloat16)


def engine(tiers, clock=None):
    """(planner, transfers, pool) over one manager built from `tiers` (with a fake clock if given)."""
    cfg = core.resolve_config({"tiers": tiers}, LAYOUT, "tiny")
    manager = BlockManager.from_config(KVBMConfig.from_dict(cfg), clock=clock or Clock())
    lock = threading.RLock()
    planner = trtllm.TrtllmPlanner(manager, lock, Namespace("tiny", LAYOUT), BS)
    transfers = trtllm.TrtllmTransfers(manager, lock)
    kv = pool()
    transfers.register(kv)
    return planner, transfers, kv


def g2(capacity=8, eviction="lru"):
    return {"name": "g2", "capacity": capacity, "eviction": eviction, "storage": {"name": "host", "pin": "never"}}


def run(planner, transfers, req_id, toks, block_ids, computed=0, salt=None, ret=None):
    """One request through match -> step (load + store) -> finish; returns (matched, failed loads)."""
    n = planner.match(req_id, toks, computed, salt=salt, retention=ret)
    meta = planner.step([data(req_id, toks, block_ids, computed=computed)], [])
    failed = transfers.load(meta)
    transfers.save(meta)
    transfers.worker.poll(wait=True)
    planner.finished(req_id)
    assert transfers.finished([req_id]) == [req_id]
    return n, failed


def test_trtllm_nothing_matches_cold():
    planner, _, _ = engine([g2()])
    assert planner.match("a", tokens(1, 3 * BS + 5), 0) == 0


def test_trtllm_store_then_match_whole_blocks():
    planner, transfers, _ = engine([g2()])
    toks = tokens(1, 3 * BS + 5)
    run(planner, transfers, "a", toks, [0, 1, 2, 3])
    # the same prefix: 3 whole blocks; the partial block is never counted
    assert planner.match("b", toks, 0) == 3 * BS
    # a device hit of the first block leaves two for kvbm; a partial device block, none
    assert planner.match("c", toks, BS) == 2 * BS
    assert planner.match("d", toks, BS + 3) == 0
    # exactly 3 blocks of prompt: the engine must compute the last token, so 2 blocks
    assert planner.match("e", toks[:3 * BS], 0) == 2 * BS
    # another cache salt (tenant) shares nothing; a different prefix shares nothing
    assert planner.match("f", toks, 0, salt="tenant-2") == 0
    assert planner.match("g", tokens(2, 3 * BS + 5), 0) == 0


def test_trtllm_salted_blocks_stay_in_their_namespace():
    planner, transfers, _ = engine([g2()])
    toks = tokens(3, 2 * BS + 1)
    run(planner, transfers, "a", toks, [0, 1, 2], salt="t1")
    assert planner.match("b", toks, 0, salt="t1") == 2 * BS
    assert planner.match("c", toks, 0) == 0


def test_trtllm_decode_blocks_are_stored_as_they_fill():
    planner, transfers, _ = engine([g2()])
    toks = tokens(4, 2 * BS - 1)
    planner.match("a", toks, 0)
    meta = planner.step([data("a", toks, [5, 6])], [])
    assert [p.block_ids for p in meta.stores] == [[5]]
    transfers.save(meta)
    # one decode token completes block 2 (TRT-LLM: computed_position = len(tokens) - 1)
    meta = planner.step([], [data("a", [7], [], computed=2 * BS - 1, scheduled=1)])
    assert [p.block_ids for p in meta.stores] == [[6]]
    transfers.save(meta)
    transfers.worker.poll(wait=True)
    assert planner.match("b", toks + [7, 8], 0) == 2 * BS


def test_trtllm_load_moves_real_bytes_into_the_pool():
    planner, transfers, kv = engine([g2()])
    before = kv.clone()
    toks = tokens(5, 3 * BS + 2)
    run(planner, transfers, "a", toks, [1, 2, 3, 4])
    n, failed = run(planner, transfers, "b", toks, [10, 11, 12, 13])
    assert n == 3 * BS and not failed
    assert torch.equal(kv[[10, 11, 12]], before[[1, 2, 3]])


def test_trtllm_load_errors_are_reported_never_served(tmp_path):
    planner, transfers, kv = engine([g2(capacity=2), {"name": "g3", "capacity": 16,
                                                      "storage": {"name": "disk", "path": str(tmp_path)}}])
    toks = tokens(8, 2 * BS + 1)
    run(planner, transfers, "x", toks, [0, 1, 2])
    run(planner, transfers, "f", tokens(9, 2 * BS + 1), [3, 4, 5])  # demotes x's blocks to G3
    g3 = planner.manager.tiers[1]
    keys = planner.side.keys("probe", trtllm.token_hashes(toks, BS))
    assert all(k in g3.ready for k in keys)
    with open(g3.storage.slots_path, "r+b") as f:  # flip bytes of x's second block on disk
        f.seek(g3.storage.offset(g3.ready[keys[1]]) + 100)
        f.write(b"\xff" * 64)
    marker = kv[11].clone()
    n, failed = run(planner, transfers, "y", toks, [10, 11, 12])
    assert n == 2 * BS and failed == {"y": [11]}
    assert torch.equal(kv[11], marker)  # never scattered
    assert keys[1] not in g3.ready  # dropped: never served again


def test_retention_hints_follow_trtllm_rules():
    rc = retention([(0, 2 * BS, 90, timedelta(seconds=30)), (2 * BS, None, 10, None)], decode=5, decode_s=60)
    hints = trtllm.retention_hints(rc, 3 * BS + 4, BS, 6)  # 4 prompt blocks, 2 decode blocks
    assert [h.priority for h in hints] == [90, 90, 10, 10, 5, 5]
    assert [h.duration for h in hints] == [30.0, 30.0, None, None, 60.0, 60.0]
    assert trtllm.retention_hints(None, 10, BS, 1) is None
    # TRT-LLM's TokenRangeRetentionConfig-shaped objects work too (duration_ms is a timedelta)
    obj = SimpleNamespace(token_start=0, token_end=BS, priority=80, duration_ms=timedelta(milliseconds=1500))
    assert trtllm.retention_hints(retention([obj]), 2 * BS, BS, 2)[0] == Hints(80, 1.5, position=0)


def _system_prompt_then_fill(clock, duration):
    """A 4-slot priority tier: A = 2 high-priority system-prompt blocks + 2 low; then B, C push in."""
    planner, transfers, _ = engine([g2(capacity=4, eviction="priority")], clock)
    sys_prompt = tokens(11, 2 * BS)
    a = sys_prompt + tokens(12, 2 * BS + 1)
    rc = retention([(0, 2 * BS, 90, duration), (2 * BS, None, 10, None)])
    run(planner, transfers, "a", a, [0, 1, 2, 3, 4], ret=rc)
    top = planner.manager.tiers[0]
    a_keys = planner.side.keys("probe-a", trtllm.token_hashes(a, BS))
    assert all(k in top.ready for k in a_keys)
    return planner, transfers, top, a_keys


def test_high_priority_system_prompt_survives_eviction():
    planner, transfers, top, a_keys = _system_prompt_then_fill(Clock(), None)
    # B (2 default-priority blocks) evicts A's two low-priority blocks, not the system prompt
    run(planner, transfers, "b", tokens(13, 2 * BS + 1), [5, 6, 7])
    assert [k in top.ready for k in a_keys] == [True, True, False, False]
    # C (2 more) evicts B (35) before the system prompt (90)
    run(planner, transfers, "c", tokens(14, 2 * BS + 1), [8, 9, 10])
    assert [k in top.ready for k in a_keys] == [True, True, False, False]
    assert planner.match("a2", tokens(11, 2 * BS) + tokens(99, 5), 0) == 2 * BS  # still served
    assert planner.match("b2", tokens(13, 2 * BS + 1), 0) == 0


def test_priority_reverts_after_its_duration():
    clock = Clock()
    planner, transfers, top, a_keys = _system_prompt_then_fill(clock, timedelta(seconds=10))
    run(planner, transfers, "b", tokens(13, 2 * BS + 1), [5, 6, 7])
    assert [k in top.ready for k in a_keys] == [True, True, False, False]
    clock.now = 11.0  # the system prompt's retention lapsed: ordinary (35), and older than B
    run(planner, transfers, "c", tokens(14, 2 * BS + 1), [8, 9, 10])
    assert not any(k in top.ready for k in a_keys)
    assert planner.match("b2", tokens(13, 2 * BS + 1), 0) == 2 * BS


def test_request_data_priorities_are_used_without_a_retention_config():
    planner, _, _ = engine([g2()])
    toks = tokens(15, 2 * BS + 1)
    planner.match("a", toks, 0)
    meta = planner.step([data("a", toks, [0, 1, 2], priorities=[80, 20, 20])], [])
    assert [h.priority for h in meta.stores[0].hints] == [80, 20]


def test_trtllm_api_check_names_what_differs():
    class Scheduler:
        def build_connector_meta(self, scheduler_output): ...
        def get_num_new_matched_tokens(self, req, computed): ...  # renamed parameters
        def request_finished(self, request, cache_block_ids): ...
        def update_state_after_alloc(self, request, block_ids): ...

    with pytest.raises(ImportError, match=r"get_num_new_matched_tokens.*KvCacheConnectorWorker is missing"):
        trtllm.check_trtllm_api(SimpleNamespace(KvCacheConnectorScheduler=Scheduler))


def test_adapters_say_tensorrt_llm_is_missing():
    pytest.importorskip("torch")
    try:
        import tensorrt_llm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs TensorRT-LLM"):
            trtllm.KVBMConnectorScheduler  # noqa: B018
    else:
        pytest.skip("tensorrt_llm is installed")


def test_layout_from_hf_config(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64,'
        ' "torch_dtype": "bfloat16"}')
    assert trtllm.layout_from_hf(str(tmp_path), BS) == KVLayout(num_layers=2, num_kv_heads=2, head_dim=16,
                                                                block_size=BS, dtype="bfloat16")


@pytest.mark.trtllm
def test_trtllm_adapter_against_the_real_api():
    pytest.importorskip("tensorrt_llm", reason="TensorRT-LLM cannot be installed here")
    from tensorrt_llm._torch.pyexecutor import kv_cache_connector

    trtllm.check_trtllm_api(kv_cache_connector)
    assert issubclass(trtllm.KVBMConnectorScheduler, kv_cache_connector.KvCacheConnectorScheduler)
    assert issubclass(trtllm.KVBMConnectorWorker, kv_cache_connector.KvCacheConnectorWorker)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_trtllm_gpu_save_waits_on_the_forward_stream():
    """On a GPU the save is kvbm's copy kernel queued behind TRT-LLM's forward stream (no host
    synchronize): it must read what the forward wrote, even when the forward is still running."""
    from kvbm import ops

    if not ops.cuda_available():
        pytest.skip("kvbm built without CUDA")
    cfg = core.resolve_config({"tiers": [g2()]}, LAYOUT, "tiny")
    manager = BlockManager.from_config(KVBMConfig.from_dict(cfg), clock=Clock())
    lock = threading.RLock()
    planner = trtllm.TrtllmPlanner(manager, lock, Namespace("tiny", LAYOUT), BS)
    transfers = trtllm.TrtllmTransfers(manager, lock)
    kv = pool().cuda()
    kv.zero_()
    transfers.register(kv)
    assert transfers.direct
    forward = torch.cuda.Stream()
    a = torch.randn(4096, 4096, device="cuda")
    with torch.cuda.stream(forward):
        for _ in range(30):  # a slow forward; the page writes queue behind it
            a = torch.tanh(a @ a)
        kv[[1, 2, 3]] = 5
    toks = tokens(11, 3 * BS + 1)
    planner.match("a", toks, 0)
    meta = planner.step([data("a", toks, [1, 2, 3, 4])], [])
    transfers.save(meta, forward)
    transfers.worker.fence(forward)  # the next step's writes wait for the gather
    with torch.cuda.stream(forward):
        kv.fill_(7)
    planner.finished("a")
    done = transfers.finished(["a"])  # its blocks are held while the gather or write runs
    transfers.worker.poll(wait=True)
    done += transfers.finished([])
    assert done == ["a"]
    torch.cuda.synchronize()
    kv.zero_()
    n, failed = run(planner, transfers, "b", toks, [8, 9, 10, 11])
    assert n == 3 * BS and not failed
    assert (kv[[8, 9, 10]] == 5).all()


def test_tensor_parallel_shards_never_read_each_other(tmp_path):
    """Two tensor-parallel workers share one cache (as through the daemon or a G4 bucket).

    Each holds a different shard of the same blocks under the scheduler's keys; before shard
    keys, rank 1 stored "the same" blocks rank 0 had stored (a no-op: already there) and then
    loaded rank 0's shard: valid checksums, wrong KV. Rank 0 keeps the scheduler's keys (its
    lookups see them); rank 1 keys its shard apart.
    """
    cfg = core.resolve_config({"tiers": [{"name": "g2", "capacity": 16, "storage": {"name": "host", "pin": "never"}}]},
                              LAYOUT, "tiny-tp")
    manager, lock = core.shared_manager(cfg)
    try:
        sched = core.SchedulerSide(manager, lock, Namespace("tiny-tp", LAYOUT), BS)
        ranks = [core.WorkerSide(manager, lock, rank=r) for r in (0, 1)]
        pools = []
        for r, worker in enumerate(ranks):  # each rank's pool holds its own shard's bytes
            kv = [torch.full((8, 2, HEADS, BS, HEAD), float(10 * r + layer)).to(torch.bfloat16)
                  for layer in range(LAYERS)]
            worker.register(kv)
            pools.append(kv)
        keys = sched.keys("r1", [7, 8])
        plan = sched.plan_store("r1", [0, 1], 2 * BS + 1)
        for worker in ranks:
            worker.start_store(plan)
            worker.poll(wait=True)
        assert manager.lookup(keys)[0] == 2  # the scheduler sees rank 0's shard
        assert manager.lookup([core.shard_key(k, 1) for k in keys])[0] == 2  # and rank 1's beside it
        for kv in pools:
            for t in kv:
                t.zero_()
        assert sched.match("r2", sched.keys("r2", [7, 8]), 2 * BS + 1, 0, must_compute_one=True) == 2 * BS
        load = sched.plan_load("r2", [4, 5], 2 * BS)
        for worker in ranks:
            worker.start_load(load)
            assert worker.poll(wait=True)[0] == {"r2": []}
        for r, kv in enumerate(pools):  # every rank got its own shard back, not rank 0's
            for layer, t in enumerate(kv):
                assert torch.all(t[[4, 5]] == 10 * r + layer), f"rank {r} loaded another rank's shard"
    finally:
        core.release_managers()


def test_lora_and_image_requests_never_share_blocks_with_plain_ones():
    # the same tokens under a LoRA adapter or with an image are other KV: the identity (salt)
    # that match() fixes keys the request's stores too
    planner, transfers, _ = engine([g2()])
    toks = tokens(9, 2 * BS + 1)
    plain = SimpleNamespace(cache_salt=None)
    lora = SimpleNamespace(cache_salt=None, lora_task_id=7)
    image = SimpleNamespace(cache_salt=None, multimodal_hashes=[[1, 2, 3, 4]], multimodal_positions=[5])
    salts = {name: trtllm.request_identity(r) for name, r in (("plain", plain), ("lora", lora), ("image", image))}
    assert all(keyable for _, keyable in salts.values())
    assert len({salt for salt, _ in salts.values()}) == 3
    run(planner, transfers, "a", toks, [0, 1, 2], salt=salts["lora"][0])
    assert planner.match("b", toks, 0, salt=salts["plain"][0]) == 0  # not the LoRA's KV
    assert planner.match("c", toks, 0, salt=salts["image"][0]) == 0
    assert planner.match("d", toks, 0, salt=salts["lora"][0]) == 2 * BS
    # images without hashes cannot be keyed: neither matched nor stored
    unhashed = SimpleNamespace(cache_salt=None, py_multimodal_data={"image": "pixels"})
    assert trtllm.request_identity(unhashed) == ("", False)
    assert planner.match("e", toks, 0, keyable=False) == 0
    assert planner.step([data("e", toks, [3, 4, 5])], []).stores == []


def test_a_request_never_matched_is_not_stored():
    # its LoRA / image identity was never seen: a store under plain token keys could be
    # served to a request it does not match
    planner, _, _ = engine([g2()])
    assert planner.step([data("x", tokens(10, 2 * BS + 1), [0, 1, 2])], []).stores == []


def test_request_finished_holds_blocks_only_when_something_was_stored():
    planner, transfers, _ = engine([g2()])
    toks = tokens(11, 2 * BS + 1)
    planner.match("a", toks, 0)
    planner.step([data("a", toks, [0, 1, 2])], [])
    assert planner.finished("a") is True  # 2 blocks planned: TRT-LLM holds them for the writes
    planner.match("b", toks[:BS - 1], 0)
    planner.step([data("b", toks[:BS - 1], [3])], [])
    assert planner.finished("b") is False  # no full block: nothing to wait for
