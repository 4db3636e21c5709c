"""Real bytes on a GPU: the CUDA copy kernel, pinned G2, a CUDA G1 tier, and the connector's
worker half over vLLM's CUDA KV layout. Marked `gpu`; skipped without a driver and a device
(CI has none: bench/gpu_check.sh runs these on a lent GPU machine).

Every check is byte equality against a host reference: a block served with wrong bytes is
the worst bug this product can have, and a GPU copy is where offsets go wrong.
"""

from __future__ import annotations

import numpy as np
import pytest

from kvbm import BlockManager, KVBMConfig, KVLayout, ops
from kvbm import transfer as xfer

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (ops.cuda_available() and torch.cuda.is_available()),
                       reason="no CUDA driver or device (or kvbm built without CUDA)"),
]

LAYOUTS = [
    KVLayout(num_layers=3, num_kv_heads=5, head_dim=7, block_size=13, dtype="bfloat16"),  # 5,460 B: byte path
    KVLayout(num_layers=4, num_kv_heads=2, head_dim=64, block_size=32, dtype="bfloat16"),  # 64 KiB: 16 B path
]


def content(key: int, nbytes: int) -> np.ndarray:
    return np.random.default_rng(key).integers(0, 256, nbytes, dtype=np.uint8)


def pinned(nbytes: int) -> np.ndarray:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).numpy()


def slots(rng, n_slots: int, n: int, nbytes: int) -> np.ndarray:
    return rng.permutation(n_slots)[:n].astype(np.int64) * nbytes


# ---------------------------------------------------------------- the kernel


@pytest.mark.parametrize("nbytes", [4096, 4095, 5460])  # 16-byte vectors, bytes, bytes
@pytest.mark.parametrize("path", ["d2h", "h2d", "d2d", "h2h"])
def test_cuda_copy_blocks_equals_host_copy(path, nbytes):
    rng = np.random.default_rng(nbytes)
    n_src, n_dst, n = 64, 48, 29
    src_host = rng.integers(0, 256, n_src * nbytes, dtype=np.uint8)
    dst_init = rng.integers(0, 256, n_dst * nbytes, dtype=np.uint8)
    so, do = slots(rng, n_src, n, nbytes), slots(rng, n_dst, n, nbytes)
    expected = dst_init.copy()
    ops.copy_blocks(src_host, so, expected, do, nbytes, use_native=False)

    def place(arr, on_gpu):
        if on_gpu:
            return torch.from_numpy(arr.copy()).cuda()
        out = pinned(arr.size)
        out[:] = arr
        return out

    src = place(src_host, path[0] == "d")
    dst = place(dst_init, path[2] == "d")
    torch.cuda.synchronize()  # kvbm's own stream is not ordered after torch's uploads
    ops.cuda_copy_blocks(src, so, dst, do, nbytes, sync=True)
    got = dst.cpu().numpy() if path[2] == "d" else dst
    assert np.array_equal(got, expected)  # copied blocks right, every other byte untouched


def test_cuda_copy_blocks_on_a_caller_stream_and_capped_ctas():
    nbytes, n = 1 << 16, 40
    src = torch.randint(0, 255, (n * nbytes,), dtype=torch.uint8, device="cuda")
    dst = pinned(n * nbytes)
    order = np.arange(n)[::-1].astype(np.int64) * nbytes
    stream = torch.cuda.Stream()
    torch.cuda.synchronize()
    ops.cuda_copy_blocks(src, np.arange(n) * nbytes, dst, order, nbytes, stream=stream, max_ctas=3)
    stream.synchronize()
    assert np.array_equal(dst.reshape(n, nbytes), src.cpu().numpy().reshape(n, nbytes)[::-1])


def test_cuda_copy_blocks_refuses_pageable_host_memory():
    src = torch.zeros(8192, dtype=torch.uint8, device="cuda")
    pageable = np.ones(8192, dtype=np.uint8)
    with pytest.raises(ValueError, match="dst is pageable host memory"):
        ops.cuda_copy_blocks(src, [0], pageable, [0], 4096, sync=True)
    assert (pageable == 1).all()


def test_cupy_arrays_take_the_same_kernels():
    cupy = pytest.importorskip("cupy")
    nbytes = 4096
    pool = np.random.default_rng(3).integers(0, 256, 16 * nbytes, dtype=np.uint8)
    ids = np.array([5, 0, 11, 7])
    expected = np.zeros(4 * nbytes, np.uint8)
    ops.gather_blocks(pool, expected, ids, nbytes, use_native=False)
    dev_pool, staging = cupy.asarray(pool), cupy.zeros(4 * nbytes, dtype=cupy.uint8)
    ops.gather_blocks(dev_pool, staging, ids, nbytes, stream=cupy.cuda.get_current_stream())
    cupy.cuda.get_current_stream().synchronize()
    assert np.array_equal(cupy.asnumpy(staging), expected)


# ---------------------------------------------------------------- tiers and the manager


def test_host_pool_is_pinned_when_cuda_is_present():
    from kvbm.tiers.host import HostStorage

    h = HostStorage(4, 4096)
    assert h.pinned
    assert torch.from_numpy(h.pool).is_pinned()


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"{l.block_nbytes}B")
def test_g1_cuda_g2_pinned_g3_disk_round_trip(tmp_path, monkeypatch, layout):
    n = layout.block_nbytes
    calls = []
    real = ops.cuda_copy_blocks
    monkeypatch.setattr(ops, "cuda_copy_blocks",
                        lambda *a, **k: (calls.append((len(a[1]), k.get("max_ctas"))), real(*a, **k)))
    cfg = KVBMConfig.from_dict({"tiers": [
        {"name": "g1", "capacity": 4, "storage": {"name": "device", "device": "cuda"}},
        {"name": "g2", "capacity": 6, "storage": "host"},
        {"name": "g3", "capacity": 64, "storage": {"name": "disk", "path": str(tmp_path)}},
    ]})
    cfg.layout = layout
    m = BlockManager.from_config(cfg)
    assert m.tiers[1].storage.pinned
    keys = list(range(1, 21))
    # store 1..20 in pairs: G1 (4) overflows into pinned G2 (6), G2 into G3
    for i in range(0, 20, 2):
        job = m.store(keys[i:i + 2], source=[content(k, n) for k in keys[i:i + 2]])
        assert job.rejected is None and not job.failed and job.keys == keys[i:i + 2]
    where = [m.tiers[i].name for i in m.locate(keys)]
    assert where == ["g3"] * 10 + ["g2"] * 6 + ["g1"] * 4
    # G1 -> G2 demotions went through the kernel, slot to slot, on the device tier's 8 thread blocks
    assert sum(n for n, _ in calls) >= 10 and {c for _, c in calls} == {8}
    # load everything into host buffers and into CUDA tensors: identical bytes from each tier
    out = [np.zeros(n, np.uint8) for _ in keys]
    assert m.load(keys, destination=out).loaded == 20
    dev = [torch.zeros(n, dtype=torch.uint8, device="cuda") for _ in keys]
    assert m.load(keys, destination=dev).loaded == 20
    for k, a, b in zip(keys, out, dev):
        assert np.array_equal(a, content(k, n)), k
        assert np.array_equal(b.cpu().numpy(), content(k, n)), k
    m.close()


def test_transfer_stats_name_the_device_host_path():
    layout = LAYOUTS[1]
    n = layout.block_nbytes
    from kvbm.tiers.device import DeviceStorage
    from kvbm.tiers.host import HostStorage

    d, h = DeviceStorage(8, n, device="cuda"), HostStorage(8, n)
    src = torch.from_numpy(np.concatenate([content(k, n) for k in range(8)])).cuda()
    d.pool.copy_(src)
    torch.cuda.synchronize()
    stats = xfer.PathStats()
    ok = xfer.transfer(d, [7, 0, 3], h, [1, 2, 5], ["a", "b", "c"], stats)
    assert ok == [True] * 3
    for s, dslot in zip([7, 0, 3], [1, 2, 5]):
        assert np.array_equal(h.view(dslot), content(s, n))
    assert stats.report()["device->host"]["blocks"] == 3


# ---------------------------------------------------------------- the connector's worker half


@pytest.fixture
def halves(tmp_path):
    """(scheduler, manager, make_worker) over G2 pinned host (4) + G3 disk (32)."""
    from kvbm.blocks import Namespace
    from kvbm.connectors import core

    cfg = core.resolve_config({"tiers": [
        {"name": "g2", "capacity": 4, "storage": "host"},
        {"name": "g3", "capacity": 32, "storage": {"name": "disk", "path": str(tmp_path)}},
    ]}, WORKER_LAYOUT, "tiny-gpu")
    manager, lock = core.shared_manager(cfg)
    sched = core.SchedulerSide(manager, lock, Namespace("tiny-gpu", WORKER_LAYOUT), WORKER_LAYOUT.block_size)
    yield sched, manager, lambda async_save: core.WorkerSide(manager, lock, async_save=async_save)
    core.release_managers()


WORKER_LAYOUT = KVLayout(num_layers=3, num_kv_heads=2, head_dim=64, block_size=16, dtype="bfloat16")


def vllm_cuda_kv(num_blocks=24, seed=0):
    """vLLM's CUDA (flash-attention) layout per layer: [2, num_blocks, block_size, heads, head_dim]."""
    L = WORKER_LAYOUT
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(2, num_blocks, L.block_size, L.num_kv_heads, L.head_dim, device="cuda",
                        generator=g).to(torch.bfloat16) for _ in range(L.num_layers)]


@pytest.mark.parametrize("async_save", [False, True], ids=["sync-gather", "kernel-gather"])
def test_worker_side_over_vllm_cuda_layout(halves, async_save):
    sched, manager, make_worker = halves
    BS = WORKER_LAYOUT.block_size
    worker = make_worker(async_save)
    kv = vllm_cuda_kv()
    assert worker.register(kv).direct  # the GPU copy kernel applies to this layout
    before = [t.clone() for t in kv]
    hashes = [11, 12, 13, 14, 15, 16]
    keys = sched.keys("r1", hashes)
    ids = [3, 9, 1, 20, 7, 5]
    # chunked prefill: 3 blocks, then 3 more; G2 (4) overflows into G3 on the second
    worker.start_store(sched.plan_store("r1", ids[:3], 3 * BS))
    worker.poll(wait=True)
    worker.start_store(sched.plan_store("r1", ids, 6 * BS + 1))
    worker.poll(wait=True)
    n_hit, where = manager.lookup(keys)
    assert n_hit == 6 and sorted(where) == ["g2"] * 4 + ["g3"] * 2
    for t in kv:
        t.zero_()
    assert sched.match("r2", sched.keys("r2", hashes), 6 * BS + 1, 0, must_compute_one=True) == 6 * BS
    worker.start_load(sched.plan_load("r2", [0, 2, 4, 6, 8, 10], 6 * BS))
    loads, _ = worker.poll(wait=True)
    assert loads == {"r2": []}
    for t, b in zip(kv, before):
        assert torch.equal(t[:, [0, 2, 4, 6, 8, 10]], b[:, [3, 9, 1, 20, 7, 5]])
        assert not t[:, [1, 3, 5]].any()  # nothing else written


def test_kernel_gather_is_ordered_after_the_step_and_fenced_before_the_next(halves):
    """The gather must read what this step wrote, and the next step may overwrite the pages
    (a finished request's blocks, reused) only after it: both orderings are stream waits."""
    sched, _, make_worker = halves
    BS = WORKER_LAYOUT.block_size
    worker = make_worker(True)
    kv = [t.zero_() for t in vllm_cuda_kv()]
    worker.register(kv)
    a = torch.randn(4096, 4096, device="cuda")
    for _ in range(30):  # a slow step: the page writes below queue behind it
        a = torch.tanh(a @ a)
    for t in kv:
        t[:, [2, 5]] = 1
    sched.keys("r1", [1, 2])
    worker.start_store(sched.plan_store("r1", [2, 5], 2 * BS + 1))
    assert worker._gathers  # in flight: the kernel waits behind the slow step
    worker.fence()  # the next step begins: its kernels wait for the gather
    for t in kv:
        t.fill_(2)  # the pages are reused at once
    worker.poll(wait=True)
    for t in kv:
        t.zero_()
    assert sched.match("r2", sched.keys("r2", [1, 2]), 2 * BS + 1, 0, must_compute_one=True) == 2 * BS
    worker.start_load(sched.plan_load("r2", [0, 1], 2 * BS))
    assert worker.poll(wait=True)[0] == {"r2": []}
    for t in kv:
        assert (t[:, [0, 1]] == 1).all()  # exactly what the step wrote: not 0, not 2


@pytest.mark.parametrize("layout", ["vllm-cuda", "trtllm"])
def test_paged_kernel_copies_equal_torch_indexing(layout):
    from kvbm.connectors.paged import PagedKV

    g = torch.Generator(device="cuda").manual_seed(5)
    if layout == "vllm-cuda":
        kv = [torch.randn(2, 12, 16, 2, 64, device="cuda", generator=g).to(torch.bfloat16) for _ in range(2)]
        paged = PagedKV(kv)
    else:  # TRT-LLM's one block-major pool
        kv = [torch.randn(12, 2, 2, 1000, device="cuda", generator=g).to(torch.float16)]
        paged = PagedKV(kv, block_dim=0)
    assert paged.direct
    ids = [11, 0, 6, 3]
    staging, event = paged.gather_async(ids)
    event.synchronize()
    assert torch.equal(staging, paged.gather(ids))
    event = paged.scatter_async(staging, [1, 2, 4, 5])
    event.synchronize()
    assert torch.equal(paged.gather([1, 2, 4, 5]), staging)
