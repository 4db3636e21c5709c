"""PagedKV's page geometry: the offsets the GPU copy kernel uses, checked on the host.

The CUDA path moves each layer's pages with `ops.cuda_copy_blocks(pages -> rows)`; here the
same offsets drive the host `ops.copy_blocks`, which must reproduce the torch-indexing
reference `gather()` byte for byte, and scatter back exactly the pages named.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kvbm import ops  # noqa: E402
from kvbm.connectors.paged import PagedKV  # noqa: E402

LAYOUTS = {
    # vLLM CUDA (flash-attention): [2, num_blocks, block_size, heads, head_dim] per layer
    "vllm-cuda": lambda g: [torch.randn(2, 10, 4, 3, 8, generator=g).to(torch.bfloat16) for _ in range(3)],
    # vLLM CPU: [num_blocks, heads, block_size, 2 * head]
    "vllm-cpu": lambda g: [torch.randn(10, 3, 4, 16, generator=g) for _ in range(2)],
    # TensorRT-LLM: one block-major pool [num_blocks, layers, 2, heads * block_size * head]
    "trtllm": lambda g: [torch.randn(10, 2, 2, 96, generator=g).to(torch.float16)],
}


def host_bytes(t):
    return t.reshape(-1).view(torch.uint8).numpy()


@pytest.mark.parametrize("name", LAYOUTS)
def test_page_offsets_reproduce_gather_and_scatter(name):
    kv_tensors = LAYOUTS[name](torch.Generator().manual_seed(1))
    kv = PagedKV(kv_tensors, block_dim=0 if name == "trtllm" else None)
    assert kv.layers is not None and not kv.direct  # geometry known; no GPU here
    ids = [7, 0, 4, 9]
    expected = kv.gather(ids).numpy()
    rows = np.zeros_like(expected)
    for t, (layer, pages, row) in zip(kv_tensors, kv.offsets(ids)):
        ops.copy_blocks(host_bytes(t), pages, rows, row, layer.page)
    assert np.array_equal(rows, expected)
    # and back: scatter rows into block ids 1, 2, 3, 5 through the same offsets
    before = [t.clone() for t in kv_tensors]
    for t, (layer, pages, row) in zip(kv_tensors, kv.offsets([1, 2, 3, 5])):
        ops.copy_blocks(rows, row, host_bytes(t), pages, layer.page)
    ref = [t.clone() for t in before]
    PagedKV(ref, block_dim=0 if name == "trtllm" else None).scatter(torch.from_numpy(rows), [1, 2, 3, 5])
    for got, want in zip(kv_tensors, ref):
        assert torch.equal(got, want)


def test_async_calls_fall_back_to_the_synchronous_copies_off_gpu():
    kv_tensors = LAYOUTS["vllm-cuda"](torch.Generator().manual_seed(2))
    kv = PagedKV(kv_tensors)
    staging, event = kv.gather_async([3, 1])
    assert event is None and torch.equal(staging, kv.gather([3, 1]))
    assert kv.scatter_async(staging, [0, 2]) is None
    assert torch.equal(kv.gather([0, 2]), staging)


def test_a_non_contiguous_layer_has_no_kernel_geometry():
    t = torch.randn(2, 10, 4, 3, 8).transpose(2, 3)
    assert PagedKV([t]).layers is None


@pytest.mark.parametrize("name", LAYOUTS)
def test_one_span_per_page_size_reproduces_gather(name):
    """The GPU path launches once per span (all layers of one page size), with offsets from the
    span's lowest address; the same offsets over host memory must give gather()'s bytes."""
    import ctypes

    kv_tensors = LAYOUTS[name](torch.Generator().manual_seed(3))
    kv = PagedKV(kv_tensors, block_dim=0 if name == "trtllm" else None)
    assert len(kv.spans) == 1  # same-shaped layers: one launch
    ids = [2, 8, 5]
    expected = kv.gather(ids).numpy()
    rows = np.zeros_like(expected)
    for span, pages, row in kv.span_offsets(ids):
        memory = np.ctypeslib.as_array((ctypes.c_uint8 * span.nbytes).from_address(span.base))
        ops.copy_blocks(memory, pages, rows, row, span.page)
    assert np.array_equal(rows, expected)


def test_layers_of_two_page_sizes_make_two_spans():
    g = torch.Generator().manual_seed(4)
    kv_tensors = [torch.randn(2, 6, 4, 3, 8, generator=g), torch.randn(2, 6, 4, 1, 8, generator=g),
                  torch.randn(2, 6, 4, 3, 8, generator=g)]
    kv = PagedKV(kv_tensors)
    assert sorted(s.page for s in kv.spans) == [4 * 1 * 8 * 4, 4 * 3 * 8 * 4]
    import ctypes

    rows = np.zeros((2, kv.block_nbytes), np.uint8)
    for span, pages, row in kv.span_offsets([5, 0]):
        memory = np.ctypeslib.as_array((ctypes.c_uint8 * span.nbytes).from_address(span.base))
        ops.copy_blocks(memory, pages, rows, row, span.page)
    assert np.array_equal(rows, kv.gather([5, 0]).numpy())
