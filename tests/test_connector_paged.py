"""PagedKV's page geometry: the offsets the GPU copy kernel uses, checked on the host.

The CUDA path moves every layer's pages in one `ops.cuda_copy_blocks` per address span; here
the same offsets, over the same addresses, drive the host `ops.copy_blocks`, which must reproduce the torch-indexing
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


def span_memory(span):
    """The span's address range as a numpy view (host memory here; on a GPU the kernel's)."""
    import ctypes

    return np.ctypeslib.as_array((ctypes.c_uint8 * span.nbytes).from_address(span.base))


@pytest.mark.parametrize("name", LAYOUTS)
def test_span_offsets_reproduce_gather_and_scatter(name):
    kv_tensors = LAYOUTS[name](torch.Generator().manual_seed(1))
    kv = PagedKV(kv_tensors, block_dim=0 if name == "trtllm" else None)
    assert kv.layers is not None and not kv.direct  # geometry known; no GPU here
    assert len(kv.spans) == 1  # same-shaped layers: one launch
    ids = [7, 0, 4, 9]
    expected = kv.gather(ids).numpy()
    rows = np.zeros_like(expected)
    for span, pages, row in kv.span_offsets(ids):
        ops.copy_blocks(span_memory(span), pages, rows, row, span.page)
    assert np.array_equal(rows, expected)
    # and back: scatter rows into block ids 1, 2, 3, 5 through the same offsets
    ref = [t.clone() for t in kv_tensors]
    for span, pages, row in kv.span_offsets([1, 2, 3, 5]):
        ops.copy_blocks(rows, row, span_memory(span), pages, span.page)
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


def test_layers_of_two_page_sizes_make_two_spans():
    g = torch.Generator().manual_seed(4)
    kv_tensors = [torch.randn(2, 6, 4, 3, 8, generator=g), torch.randn(2, 6, 4, 1, 8, generator=g),
                  torch.randn(2, 6, 4, 3, 8, generator=g)]
    kv = PagedKV(kv_tensors)
    assert sorted(s.page for s in kv.spans) == [4 * 1 * 8 * 4, 4 * 3 * 8 * 4]
    rows = np.zeros((2, kv.block_nbytes), np.uint8)
    for span, pages, row in kv.span_offsets([5, 0]):
        ops.copy_blocks(span_memory(span), pages, rows, row, span.page)
    assert np.array_equal(rows, kv.gather([5, 0]).numpy())
