"""kvbm as a secondary tier of vLLM's own tiered offloading, against vLLM's real interface.

vLLM's TieringOffloadingManager drives a SecondaryTierManager with TransferJobs over the
primary tier's chunks; here the primary is a numpy buffer shaped like vLLM's (chunks x bytes)
and the jobs are vLLM's own dataclasses, so every byte that lands is checked.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

if os.environ.get("KVBM_REQUIRE_VLLM") == "1":  # CI installs vLLM: a broken install must fail, not skip
    import vllm  # noqa: F401
else:
    pytest.importorskip("vllm", reason="vLLM is not installed (see README: vLLM connector)")

from vllm.v1.kv_offload.base import LookupResult  # noqa: E402
from vllm.v1.kv_offload.tiering.base import SecondaryTierManager, TransferJob  # noqa: E402
from vllm.v1.kv_offload.tiering.factory import SecondaryTierFactory  # noqa: E402

from kvbm.connectors.vllm_tier import KVBMSecondaryTier  # noqa: E402

CHUNK = 8192  # bytes per primary chunk (one offloaded block)
CHUNKS = 32


def primary():
    rows = np.zeros((CHUNKS, CHUNK), dtype=np.uint8)
    return rows, memoryview(rows)


def key(i: int) -> bytes:
    return i.to_bytes(8, "little") + b"\0" * 8


def fill(rows, chunk: int, i: int) -> None:
    rows[chunk] = np.frombuffer(np.random.default_rng(i).bytes(CHUNK), dtype=np.uint8)


def expected(i: int) -> np.ndarray:
    return np.frombuffer(np.random.default_rng(i).bytes(CHUNK), dtype=np.uint8)


def finish(tier, want: int, timeout: float = 180.0):  # generous: CI runs beside a CPU hog
    results, deadline = [], time.monotonic() + timeout
    while len(results) < want and time.monotonic() < deadline:
        results += tier.get_finished_jobs()
        time.sleep(0.005)
    assert len(results) == want, results
    return results


def job(job_id: int, keys, chunks, promotion: bool) -> TransferJob:
    return TransferJob(job_id, keys, np.asarray(chunks, dtype=np.int64), promotion, None)


@pytest.fixture
def tier(tmp_path):
    rows, view = primary()
    # built the way vLLM builds an out-of-tree tier: type + module_path + the tier's own keys
    t = SecondaryTierFactory.create_secondary_tier(
        {"type": "KVBMSecondaryTier", "module_path": "kvbm.connectors.vllm_tier", "model": "test",
         "tiers": [{"name": "g3", "capacity": 6, "storage": {"name": "disk", "path": str(tmp_path / "g3")}},
                   {"name": "g4", "capacity": 20, "storage": {"name": "object", "url": f"file://{tmp_path}/g4"}}]},
        view, offloading_spec=None)
    t.rows = rows
    yield t
    t.shutdown()


def test_built_by_vllms_factory_as_a_storage_tier(tier):
    assert isinstance(tier, KVBMSecondaryTier) and isinstance(tier, SecondaryTierManager)
    assert tier.block_size_bytes == CHUNK and tier.medium.value == "STORAGE"
    assert [t.name for t in tier.manager.tiers] == ["g3", "g4"]


def test_cascade_then_promote_moves_exact_bytes(tier):
    rows = tier.rows
    # the primary stores blocks 0..9 in chunks 0..9 and cascades them to us in one job
    for i in range(10):
        fill(rows, i, i)
    tier.submit_store(job(1, [key(i) for i in range(10)], range(10), promotion=False))
    assert finish(tier, 1)[0].success
    # G3 holds 6, the 4 oldest went down to G4; every one is a hit for vLLM
    assert [tier.lookup(key(i)) for i in range(10)] == [LookupResult.HIT] * 10
    assert tier.lookup(key(99)) is LookupResult.MISS
    assert sorted(tier.manager.locate([key(i) for i in range(10)])) == [0] * 6 + [1] * 4
    # the primary evicted them; a request wants 0..9 back: promote into chunks 20..29
    rows[:] = 0
    tier.submit_load(job(2, [key(i) for i in range(10)], range(20, 30), promotion=True))
    result = finish(tier, 1)[0]
    assert result.success and result.successful_keys is None and result.transfer_bytes == 10 * CHUNK
    for i in range(10):
        assert np.array_equal(rows[20 + i], expected(i)), f"block {i} came back with wrong bytes"


def test_a_partial_promotion_names_the_keys_that_landed(tier):
    rows = tier.rows
    for i in range(3):
        fill(rows, i, i)
    tier.submit_store(job(1, [key(0), key(1), key(2)], [0, 1, 2], promotion=False))
    finish(tier, 1)
    # key 7 was never stored: only the prefix before it can be promoted
    tier.submit_load(job(2, [key(0), key(1), key(7), key(2)], [10, 11, 12, 13], promotion=True))
    result = finish(tier, 1)[0]
    assert not result.success and list(result.successful_keys) == [key(0), key(1)]
    assert np.array_equal(rows[10], expected(0)) and np.array_equal(rows[11], expected(1))


def test_a_corrupt_block_is_never_promoted(tier, tmp_path):
    rows = tier.rows
    fill(rows, 0, 0)
    tier.submit_store(job(1, [key(0)], [0], promotion=False))
    finish(tier, 1)
    slot = tier.manager.tiers[0].ready[key(0)]
    disk = tier.manager.tiers[0].storage
    with open(disk.slots_path, "r+b") as f:  # flip one byte of the block on disk
        f.seek(disk.offset(slot) + 100)
        b = f.read(1)
        f.seek(disk.offset(slot) + 100)
        f.write(bytes([b[0] ^ 0xFF]))
    tier.submit_load(job(2, [key(0)], [5], promotion=True))
    result = finish(tier, 1)[0]
    assert not result.success and list(result.successful_keys) == []
    assert tier.lookup(key(0)) is LookupResult.MISS  # dropped, never served again


def test_stores_of_blocks_it_holds_are_accesses(tier):
    rows = tier.rows
    for i in range(6):
        fill(rows, i, i)
    tier.submit_store(job(1, [key(i) for i in range(6)], range(6), promotion=False))
    finish(tier, 1)
    # block 0 is stored again (another request cascaded it) and touched: it is the most
    # recent now, so storing 6 new blocks pushes 1..5 down to G4 before it
    tier.submit_store(job(2, [key(0)], [0], promotion=False))
    tier.touch([key(0)])
    finish(tier, 1)
    for i in range(6, 11):
        fill(rows, i, i)
    tier.submit_store(job(3, [key(i) for i in range(6, 11)], range(6, 11), promotion=False))
    finish(tier, 1)
    assert tier.manager.locate([key(0)]) == [0]
    assert tier.manager.locate([key(1)]) == [1]
    tier.drain_jobs()
    assert not tier.has_pending_work()


def test_inside_vllms_tiering_manager(tmp_path):
    """vLLM's own orchestrator: a CPU primary of 8 chunks cascades to kvbm; evicted blocks come
    back through a promotion out of kvbm's G3, byte for byte."""
    import uuid

    from vllm.v1.kv_offload.base import ReqContext, ScheduleEndContext
    from vllm.v1.kv_offload.cpu.shared_offload_region import SharedOffloadRegion
    from vllm.v1.kv_offload.tiering.manager import CPUPrimaryTierOffloadingManager, TieringOffloadingManager

    region = SharedOffloadRegion(engine_id=f"kvbm-test-{uuid.uuid4().hex[:8]}", num_chunks=8, rank=None,
                                 kv_bytes_per_chunk=CHUNK, cpu_page_size=4096)
    primary = CPUPrimaryTierOffloadingManager(8, region)
    tier = SecondaryTierFactory.create_secondary_tier(
        {"type": "KVBMSecondaryTier", "module_path": "kvbm.connectors.vllm_tier", "model": "test",
         "tiers": [{"name": "g3", "capacity": 64, "storage": {"name": "disk", "path": str(tmp_path / "g3")}}]},
        primary.get_kv_memoryview(), offloading_spec=None)
    m = TieringOffloadingManager(primary, [tier])
    rows = np.asarray(primary.get_kv_memoryview()).view(np.uint8)

    def settle():  # scheduler steps until every cascade or promotion has been reported
        deadline = time.monotonic() + 180  # a deadline, not a step count: the copies run on threads
        while time.monotonic() < deadline:
            m.on_schedule_end(ScheduleEndContext((), ()))
            if not tier.has_pending_work() and not m._jobs:
                return
            time.sleep(0.002)
        raise AssertionError("tier jobs did not finish within 180 s")

    try:
        # four requests store 4 blocks each, the engine writing their bytes into the chunks
        for r in range(4):
            ctx = ReqContext(req_id=f"store-{r}")
            m.on_new_request(ctx)
            keys = [key(4 * r + j) for j in range(4)]
            out = m.prepare_store(keys, ctx)
            for k, chunk in zip(out.keys_to_store, out.store_spec.block_ids):
                rows[int(chunk)] = expected(int.from_bytes(k[:8], "little"))
            m.complete_store(out.keys_to_store, ctx)
            m.on_request_finished(ctx)
            settle()
        assert len(tier.manager.tiers[0].ready) == 16  # every block cascaded to kvbm
        # blocks 0..3 left the 8-chunk primary; a request wants them: promotion from kvbm
        ctx = ReqContext(req_id="load")
        m.on_new_request(ctx)
        keys = [key(j) for j in range(4)]
        first = [m.lookup(k, ctx) for k in keys]
        assert LookupResult.HIT not in first  # not in the primary: promotions started
        settle()
        assert [m.lookup(k, ctx) for k in keys] == [LookupResult.HIT] * 4
        spec = m.prepare_load(keys, ctx)
        for j, chunk in enumerate(spec.block_ids):
            assert np.array_equal(rows[int(chunk)], expected(j)), f"block {j} promoted with wrong bytes"
        m.complete_load(keys, ctx)
        m.on_request_finished(ctx)
    finally:
        m.shutdown()


def test_full_g3_is_emptied_in_the_background(tmp_path):
    # vLLM wants submit_store non-blocking: with G3 full, moving its victims to G4 inline would
    # put disk and object I/O on vLLM's scheduler thread. The offloader keeps G3's headroom
    # (here 2 of 6 blocks) free on its own thread instead.
    rows, view = primary()
    tier = KVBMSecondaryTier(None, view, "kvbm", model="test", tiers=[
        {"name": "g3", "capacity": 6, "headroom": 2, "storage": {"name": "disk", "path": str(tmp_path / "g3")}},
        {"name": "g4", "capacity": 20, "storage": {"name": "object", "url": f"file://{tmp_path}/g4"}}])
    try:
        for i in range(12):
            fill(rows, i, i)
        for j in range(3):  # three cascades of 4 blocks
            tier.submit_store(job(j, [key(4 * j + i) for i in range(4)], range(4 * j, 4 * j + 4), promotion=False))
            assert finish(tier, 1)[0].success
        assert tier._offloader.wait_idle(10)
        g3, g4 = tier.manager.tiers
        assert len(g3.ready) <= 6 - 2 and len(g3.ready) + len(g4.ready) == 12
        rows[:] = 0
        tier.submit_load(job(9, [key(i) for i in range(12)], range(12, 24), promotion=True))
        assert finish(tier, 1)[0].success
        for i in range(12):
            assert np.array_equal(rows[12 + i], expected(i))
    finally:
        tier.shutdown()
