"""The kvbm vLLM connector with vLLM's hybrid memory allocator, against vLLM's real objects.

KV cache configs are vLLM's own (KVCacheConfig, FullAttentionSpec, SlidingWindowSpec,
MambaSpec), requests and scheduler outputs are vLLM's; real per-layer tensors move through
G2 and back. The Mamba cases run here, on the scheduler's objects: the end-to-end test
(test_hybrid_vllm.py) runs Gemma 3 (sliding window + full attention) in vLLM itself.
"""

import json
import os
import sys
from pathlib import Path

import pytest

if os.environ.get("KVBM_REQUIRE_VLLM") == "1":
    import vllm  # noqa: F401
else:
    pytest.importorskip("vllm", reason="vLLM is not installed (see README: vLLM connector)")
torch = pytest.importorskip("torch")

from kvbm.config import ConfigError  # noqa: E402
from kvbm.connectors import core  # noqa: E402
from kvbm.connectors.manifest import state_key  # noqa: E402
from kvbm.connectors.vllm import KVBMConnector  # noqa: E402
from kvbm.connectors.vllm_hma import KVBMHybridConnector, is_hybrid, manifest_from_vllm  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole, supports_hma  # noqa: E402
from vllm.v1.core.kv_cache_manager import KVCacheBlocks  # noqa: E402
from vllm.v1.core.kv_cache_utils import KVCacheBlock  # noqa: E402
from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput  # noqa: E402
from vllm.v1.kv_cache_interface import (  # noqa: E402
    ChunkedLocalAttentionSpec,
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    MambaSpec,
    SlidingWindowSpec,
)

sys.path.insert(0, str(Path(__file__).parent))
from test_connector_vllm import request, tokens, vllm_config  # noqa: E402,F401
from vllm_e2e import BLOCK  # noqa: E402

HEADS, HEAD, NBLOCKS = 2, 64, 40
ATTN = dict(block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD, dtype=torch.bfloat16)
STATE = dict(shapes=((3, 32), (2, 8, 4)), dtypes=(torch.bfloat16, torch.float32))


def kv_config(*groups):
    return KVCacheConfig(num_blocks=NBLOCKS, kv_cache_tensors=[],
                         kv_cache_groups=[KVCacheGroupSpec(list(names), spec) for names, spec in groups])


def gemma_config(window=2 * BLOCK):
    return kv_config((["s0", "s1"], SlidingWindowSpec(sliding_window=window, **ATTN)),
                     (["f2"], FullAttentionSpec(**ATTN)))


def mamba_config():
    return kv_config((["f0"], FullAttentionSpec(**ATTN)),
                     (["m1"], MambaSpec(block_size=BLOCK, mamba_cache_mode="align", **STATE)))


def tensors(config, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for group in config.kv_cache_groups:
        spec = group.kv_cache_spec
        for name in group.layer_names:
            if isinstance(spec, MambaSpec):
                out[name] = [torch.randn(NBLOCKS, *shape, generator=g).to(dt) for shape, dt in zip(spec.shapes, spec.dtypes)]
            else:  # vLLM's CPU layout: [num_blocks, heads, block_size, 2 * head]
                out[name] = torch.randn(NBLOCKS, HEADS, BLOCK, 2 * HEAD, generator=g).to(torch.bfloat16)
    return out


def page(kv, name, block):
    t = kv[name]
    return [x[block].clone() for x in t] if isinstance(t, list) else [t[block].clone()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.fixture
def make(vllm_config, tmp_path):  # noqa: F811
    """make(kv_cache_config) -> (scheduler half, worker half) sharing one manager (G2 of 32 pages)."""
    cfg = {"tiers": [{"name": "g2", "capacity": 32, "storage": {"name": "host", "pin": "never"}}]}
    vllm_config.kv_transfer_config.kv_connector_extra_config = {"kvbm_config": cfg}

    def make(kv_cache_config):
        sched = KVBMConnector(vllm_config, KVConnectorRole.SCHEDULER, kv_cache_config)
        worker = KVBMConnector(vllm_config, KVConnectorRole.WORKER, kv_cache_config)
        return sched, worker

    yield make
    core.release_managers()


def alloc(*groups):
    """KVCacheBlocks as vLLM allocates them: one list per group, None for the null block."""
    null = KVCacheBlock(0)
    null.is_null = True
    return KVCacheBlocks(tuple([null if b is None else KVCacheBlock(b) for b in ids] for ids in groups))


def schedule(sched, req, groups, num_computed=0, num_scheduled=None):
    out = SchedulerOutput.make_empty()
    req.num_computed_tokens = num_computed
    out.scheduled_new_reqs = [NewRequestData.from_request(req, tuple(list(g) for g in groups))]
    out.num_scheduled_tokens = {req.request_id: req.num_tokens - num_computed if num_scheduled is None else num_scheduled}
    out.total_num_scheduled_tokens = sum(out.num_scheduled_tokens.values())
    return sched.build_connector_meta(out)


def step(worker, meta):
    worker.bind_connector_metadata(meta)
    worker.start_load_kv(None)
    worker.wait_for_save()
    worker._finish_loads(wait=True)
    results = worker.get_transfer_results(set())
    errors = worker.get_block_ids_with_load_errors()
    worker.clear_connector_metadata()
    return results, errors


def store(sched, worker, req_id, toks, groups, num_scheduled=None):
    req = request(req_id, toks)
    sched.get_num_new_matched_tokens(req, 0)
    sched.update_state_after_alloc(req, alloc(*groups), 0)
    meta = schedule(sched, req, groups, num_scheduled=num_scheduled)
    step(worker, meta)
    return req, meta


# ---------------------------------------------------------------- config


def test_hybrid_configs_get_the_hybrid_connector(make):
    assert supports_hma(KVBMConnector)
    assert is_hybrid(gemma_config()) and is_hybrid(mamba_config())
    assert not is_hybrid(kv_config((["a", "b"], FullAttentionSpec(**ATTN))))
    assert is_hybrid(kv_config((["a"], SlidingWindowSpec(sliding_window=512, **ATTN))))  # all layers windowed
    assert not is_hybrid(None) and not is_hybrid(kv_config())
    sched, worker = make(gemma_config())
    assert type(sched) is KVBMHybridConnector and type(worker) is KVBMHybridConnector
    plain = KVBMConnector(sched._vllm_config, KVConnectorRole.SCHEDULER, kv_config((["a"], FullAttentionSpec(**ATTN))))
    assert type(plain) is KVBMConnector


def test_manifest_from_vllm_specs():
    m = manifest_from_vllm(gemma_config())
    per_layer = 2 * BLOCK * HEADS * HEAD * 2
    assert [(p.kind, p.window, len(p.buffers)) for p in m.pieces] == [("sliding", 2 * BLOCK, 2), ("full", 0, 1)]
    assert m.pieces[0].buffers[0].shape == (2, BLOCK, HEADS, HEAD) and m.page_nbytes == 3 * per_layer
    mm = manifest_from_vllm(mamba_config())
    assert [p.kind for p in mm.pieces] == ["full", "mamba"]
    assert [(b.shape, b.dtype) for b in mm.pieces[1].buffers] == [((3, 32), "bfloat16"), ((2, 8, 4), "float32")]
    assert m.fingerprint != manifest_from_vllm(gemma_config(window=4 * BLOCK)).fingerprint


def test_unsupported_groups_are_refused_with_what_to_do():
    odd = kv_config((["a"], FullAttentionSpec(**ATTN)),
                    (["b"], ChunkedLocalAttentionSpec(attention_chunk_size=256, **ATTN)))
    with pytest.raises(ConfigError, match="ChunkedLocalAttentionSpec is not supported"):
        manifest_from_vllm(odd)
    two_sizes = kv_config((["a"], FullAttentionSpec(**ATTN)),
                          (["b"], SlidingWindowSpec(sliding_window=64, **{**ATTN, "block_size": 64})))
    with pytest.raises(ConfigError, match=r"block sizes \[64, 128\]"):
        manifest_from_vllm(two_sizes)


def test_registered_tensors_must_match_the_manifest(make):
    _, worker = make(gemma_config())
    kv = tensors(gemma_config())
    kv["f2"] = torch.zeros(NBLOCKS, HEADS, BLOCK, HEAD, dtype=torch.bfloat16)  # half a page
    with pytest.raises(ConfigError, match="group 1 \\(full\\)"):
        worker.register_kv_caches(kv)


# ---------------------------------------------------------------- sliding window + full attention


def test_sliding_hit_restores_every_full_page_and_the_last_window(make):
    cfg = gemma_config()  # window 256 tokens: a hit needs the sliding groups' last 2 pages
    sched, worker = make(cfg)
    kv = tensors(cfg)
    worker.register_kv_caches(kv)
    toks = tokens(1, 5 * BLOCK + 3)
    sliding, full = [1, 2, 3, 4, 5, 6], [11, 12, 13, 14, 15, 16]
    _, meta = store(sched, worker, "a", toks, [sliding, full])
    assert [len(p.keys) for p in meta.stores] == [5]
    before = {name: [page(kv, name, b) for b in range(NBLOCKS)] for name in kv}

    again = request("b", toks)
    n, async_load = sched.get_num_new_matched_tokens(again, 0)
    assert (n, async_load) == (5 * BLOCK, True)
    # vLLM allocates the sliding groups only the window: the positions before it are null
    new_sliding, new_full = [None, None, None, 21, 22, 23], [31, 32, 33, 34, 35, 36]
    sched.update_state_after_alloc(again, alloc(new_sliding, new_full), n)
    meta = schedule(sched, again, [[b or 0 for b in new_sliding], new_full], num_computed=n)
    (plan,) = meta.loads
    assert plan.block_ids == [(None, 31), (None, 32), (None, 33), (21, 34), (22, 35)]
    results, errors = step(worker, meta)
    assert results.finished_recving == {"b"} and not results.failed_recving and not errors
    for j in range(5):  # every full page
        assert same(page(kv, "f2", 31 + j), before["f2"][11 + j]), j
    for name in ("s0", "s1"):  # the last window's sliding pages, nothing before it
        assert same(page(kv, name, 21), before[name][4]) and same(page(kv, name, 22), before[name][5])
        assert same(page(kv, name, 0), before[name][0])  # the null block is never written


def test_a_page_missing_a_piece_is_never_stored(make):
    cfg = gemma_config()
    sched, worker = make(cfg)
    worker.register_kv_caches(tensors(cfg))
    toks = tokens(2, 4 * BLOCK + 1)
    # page 2's sliding block is null (vLLM freed it): pages 0 and 1 are stored, nothing after
    _, meta = store(sched, worker, "a", toks, [[1, 2, 0, 4, 5], [11, 12, 13, 14, 15]])
    assert [len(p.keys) for p in meta.stores] == [2]
    assert len(meta.stores[0].hashes) == 2  # the engine's names of what is stored (KV events)
    assert sched.get_num_new_matched_tokens(request("b", toks), 0) == (2 * BLOCK, True)


def test_a_load_short_of_one_page_fails_the_whole_request(make):
    cfg = gemma_config()
    sched, worker = make(cfg)
    worker.register_kv_caches(tensors(cfg))
    toks = tokens(3, 4 * BLOCK + 1)
    store(sched, worker, "a", toks, [[1, 2, 3, 4, 5], [11, 12, 13, 14, 15]])
    again = request("b", toks)
    n, _ = sched.get_num_new_matched_tokens(again, 0)
    assert n == 4 * BLOCK
    groups = [[0, 0, 23, 24, 25], [31, 32, 33, 34, 35]]
    sched.update_state_after_alloc(again, alloc([None, None, 23, 24, 25], groups[1]), n)
    meta = schedule(sched, again, groups, num_computed=n)
    backend = worker.worker.backend
    loaded = backend.loaded
    backend.loaded = lambda ticket: loaded(ticket) - 1  # the last page does not arrive
    results, errors = step(worker, meta)
    # reported per request (vLLM takes no block-level errors with several groups): recompute all
    assert results.failed_recving == {"b"} and results.finished_recving == {"b"} and errors == set()
    # the scheduler learns it and does not match that request again (no load/fail loop)
    sched.update_connector_output(results)
    assert sched.get_num_new_matched_tokens(again, 0) == (0, False)
    # its recompute stores every page again (a page whose load failed comes back)
    meta = schedule(sched, again, [[41, 42, 43, 44, 45], [51, 52, 53, 54, 55]], num_computed=0)
    assert [len(p.keys) for p in meta.stores] == [4] and not meta.loads
    assert sched.get_num_new_matched_tokens(request("c", toks), 0) == (4 * BLOCK, True)


def test_pages_of_another_group_layout_never_match(make, vllm_config):  # noqa: F811
    sched, worker = make(gemma_config())
    worker.register_kv_caches(tensors(gemma_config()))
    toks = tokens(4, 3 * BLOCK + 1)
    store(sched, worker, "a", toks, [[1, 2, 3, 4], [11, 12, 13, 14]])
    assert sched.get_num_new_matched_tokens(request("b", toks), 0) == (3 * BLOCK, True)
    # same bytes per page, another window: another manifest, another namespace
    other = KVBMConnector(vllm_config, KVConnectorRole.SCHEDULER, gemma_config(window=4 * BLOCK))
    assert other.manager is sched.manager
    assert other.get_num_new_matched_tokens(request("c", toks), 0) == (0, False)


# ---------------------------------------------------------------- Mamba (scheduler objects only)


def test_mamba_hit_ends_on_a_page_stored_with_its_state(make):
    cfg = mamba_config()
    sched, worker = make(cfg)
    kv = tensors(cfg)
    worker.register_kv_caches(kv)
    toks = tokens(5, 3 * BLOCK + 5)
    # prefill in two steps: 256 tokens (ends on page 1's boundary: state in mamba block 7), then the rest
    req = request("a", toks)
    sched.get_num_new_matched_tokens(req, 0)
    sched.update_state_after_alloc(req, alloc([1, 2, 3, 4], [None, 7, None, None]), 0)
    meta = schedule(sched, req, [[1, 2, 3, 4], [0, 7, 0, 0]], num_scheduled=2 * BLOCK)
    assert [(len(p.keys), p.block_ids) for p in meta.stores] == [(2, [(1, None), (2, None)]), (1, [(2, 7)])]
    assert meta.stores[1].keys == [state_key(meta.stores[0].keys[1])]
    step(worker, meta)
    state = page(kv, "m1", 7)
    full_pages = [page(kv, "f0", b) for b in (1, 2)]

    again = request("b", toks)
    # pages 0..2 are stored but only page 1 holds a state: the hit ends there
    n, _ = sched.get_num_new_matched_tokens(again, 0)
    assert n == 2 * BLOCK
    sched.update_state_after_alloc(again, alloc([21, 22, 23, 24], [None, 27, None, None]), n)
    meta = schedule(sched, again, [[21, 22, 23, 24], [0, 27, 0, 0]], num_computed=n)
    (plan,) = meta.loads
    keys = sched.scheduler.keys("b", again.block_hashes)
    assert plan.block_ids == [(21, None), (22, 27)] and plan.keys == [keys[0], state_key(keys[1])]
    results, errors = step(worker, meta)
    assert results.finished_recving == {"b"} and not results.failed_recving
    assert same(page(kv, "m1", 27), state)
    assert same(page(kv, "f0", 21), full_pages[0]) and same(page(kv, "f0", 22), full_pages[1])
    # every pin taken for the match is released once the load holds its pages
    assert all(not t.pins for t in sched.manager.tiers)


def test_mamba_without_any_state_page_is_a_miss(make):
    cfg = mamba_config()
    sched, worker = make(cfg)
    worker.register_kv_caches(tensors(cfg))
    toks = tokens(6, 3 * BLOCK + 5)
    # one prefill step ending mid-block: pages stored, but no state at any boundary
    _, meta = store(sched, worker, "a", toks, [[1, 2, 3, 4], [0, 0, 0, 9]])
    assert [len(p.keys) for p in meta.stores] == [3]
    assert sched.get_num_new_matched_tokens(request("b", toks), 0) == (0, False)
    assert all(not t.pins for t in sched.manager.tiers)


def test_mamba_hit_leaves_the_last_prompt_token_to_vllm(make):
    cfg = mamba_config()
    sched, worker = make(cfg)
    worker.register_kv_caches(tensors(cfg))
    toks = tokens(7, 2 * BLOCK)  # exactly two pages, the step ends on page 1's boundary
    store(sched, worker, "a", toks, [[1, 2], [0, 7]])
    # a state that has seen the last token cannot take it again: the hit stops one page short,
    # where no state was kept -> a miss, never a double-applied token
    assert sched.get_num_new_matched_tokens(request("b", toks), 0) == (0, False)
    longer = request("c", toks + [5])
    assert sched.get_num_new_matched_tokens(longer, 0) == (2 * BLOCK, True)


def test_hybrid_request_finished_all_groups_forgets_the_request(make):
    sched, worker = make(gemma_config())
    worker.register_kv_caches(tensors(gemma_config()))
    req, _ = store(sched, worker, "a", tokens(8, 2 * BLOCK + 1), [[1, 2, 3], [11, 12, 13]])
    assert sched.request_finished_all_groups(req, ([1, 2, 3], [11, 12, 13])) == (False, None)
    assert "a" not in sched._pages and "a" not in sched._requests
    json.dumps(sched.manifest.to_dict())  # plain data


def test_sliding_hit_through_the_engines_own_daemon(vllm_config, tmp_path):  # noqa: F811
    # vLLM's multiprocessing executor: scheduler and workers apart, one kvbm daemon for the
    # engine, holding pages (its layout is the page's: opaque bytes)
    import uuid

    cfg = {"tiers": [{"name": "g2", "capacity": 32, "storage": {"name": "host", "pin": "never"}}]}
    vllm_config.kv_transfer_config.kv_connector_extra_config = {"kvbm_config": cfg}
    pc = vllm_config.parallel_config
    backend, engine_id = pc.distributed_executor_backend, vllm_config.kv_transfer_config.engine_id
    pc.distributed_executor_backend = "mp"
    vllm_config.kv_transfer_config.engine_id = f"hybrid-{uuid.uuid4().hex[:8]}"
    try:
        sched = KVBMConnector(vllm_config, KVConnectorRole.SCHEDULER, gemma_config())
        worker = KVBMConnector(vllm_config, KVConnectorRole.WORKER, gemma_config())
        assert isinstance(sched.manager, core.DaemonBackend)
        kv = tensors(gemma_config())
        worker.register_kv_caches(kv)
        toks = tokens(9, 4 * BLOCK + 3)
        store(sched, worker, "a", toks, [[1, 2, 3, 4, 5], [11, 12, 13, 14, 15]])
        worker.worker.poll(wait=True)  # the daemon's stores have landed
        before = {name: [page(kv, name, b) for b in range(NBLOCKS)] for name in kv}
        again = request("b", toks)
        n, _ = sched.get_num_new_matched_tokens(again, 0)
        assert n == 4 * BLOCK
        sched.update_state_after_alloc(again, alloc([None, None, 23, 24, 25], [31, 32, 33, 34, 35]), n)
        meta = schedule(sched, again, [[0, 0, 23, 24, 25], [31, 32, 33, 34, 35]], num_computed=n)
        results, errors = step(worker, meta)
        assert results.finished_recving == {"b"} and not results.failed_recving and not errors
        assert all(same(page(kv, "f2", 31 + j), before["f2"][11 + j]) for j in range(4))
        for name in ("s0", "s1"):
            assert same(page(kv, name, 23), before[name][3]) and same(page(kv, name, 24), before[name][4])
    finally:
        pc.distributed_executor_backend = backend
        vllm_config.kv_transfer_config.engine_id = engine_id
        core.release_managers()
