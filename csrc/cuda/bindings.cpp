// Python glue for the CUDA ops; compiled into _native only when CUDA is built.
// Device memory is passed as integer pointers (torch: tensor.data_ptr()) with its
// size in bytes, so bounds are checked here before anything is launched.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <stdexcept>
#include <string>

#include "paged_copy.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using BlockIds = nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

void paged_copy_py(kvbm::cuda::Direction dir, const char* op, uintptr_t paged,
                   int64_t paged_nbytes, uintptr_t staging, int64_t staging_nbytes,
                   BlockIds block_ids, int64_t block_nbytes, uintptr_t stream, int max_ctas) {
  auto fail = [&](const std::string& why) { throw std::invalid_argument(std::string(op) + ": " + why); };
  if (block_nbytes <= 0) fail("block_nbytes must be > 0, got " + std::to_string(block_nbytes));
  const size_t n = block_ids.shape(0);
  const int64_t num_blocks = paged_nbytes / block_nbytes;
  const int64_t* ids = block_ids.data();
  for (size_t i = 0; i < n; ++i)
    if (ids[i] < 0 || ids[i] >= num_blocks)
      fail("block_ids[" + std::to_string(i) + "] = " + std::to_string(ids[i]) +
           " is outside the paged pool of " + std::to_string(num_blocks) + " blocks");
  if (static_cast<int64_t>(n) > staging_nbytes / block_nbytes)
    fail(std::to_string(n) + " blocks of " + std::to_string(block_nbytes) +
         " bytes do not fit the " + std::to_string(staging_nbytes) + "-byte staging buffer");
  nb::gil_scoped_release release;
  kvbm::cuda::paged_copy(dir, paged, staging, ids, n, block_nbytes, stream, max_ctas);
}

using Offsets = nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

void copy_blocks_py(uintptr_t src, int64_t src_nbytes, Offsets src_offsets, uintptr_t dst,
                    int64_t dst_nbytes, Offsets dst_offsets, int64_t block_nbytes, uintptr_t stream,
                    int max_ctas, bool sync, bool own_stream) {
  auto fail = [](const std::string& why) { throw std::invalid_argument("cuda_copy_blocks: " + why); };
  if (block_nbytes <= 0) fail("block_nbytes must be > 0, got " + std::to_string(block_nbytes));
  const size_t n = src_offsets.shape(0);
  if (dst_offsets.shape(0) != n)
    fail(std::to_string(n) + " src_offsets but " + std::to_string(dst_offsets.shape(0)) + " dst_offsets");
  auto in_bounds = [&](const char* name, const int64_t* off, int64_t size) {
    for (size_t i = 0; i < n; ++i)
      if (off[i] < 0 || off[i] > size - block_nbytes)
        fail(std::string(name) + "[" + std::to_string(i) + "] = " + std::to_string(off[i]) + ": " +
             std::to_string(block_nbytes) + " bytes there do not fit the " + std::to_string(size) +
             "-byte buffer");
  };
  in_bounds("src_offsets", src_offsets.data(), src_nbytes);
  in_bounds("dst_offsets", dst_offsets.data(), dst_nbytes);
  nb::gil_scoped_release release;
  if (own_stream) stream = kvbm::cuda::thread_stream();
  kvbm::cuda::copy_blocks(src, src_offsets.data(), dst, dst_offsets.data(), n, block_nbytes, stream,
                          max_ctas);
  if (sync) kvbm::cuda::synchronize(stream);
}

}  // namespace

void bind_cuda(nb::module_& m) {
  using kvbm::cuda::Direction;
  m.def("cuda_available", &kvbm::cuda::available, "True when a CUDA driver and a device are present.");
  m.def("cuda_device_count", &kvbm::cuda::device_count);
  m.def(
      "cuda_gather_blocks",
      [](uintptr_t paged, int64_t paged_nbytes, uintptr_t staging, int64_t staging_nbytes,
         BlockIds ids, int64_t block_nbytes, uintptr_t stream, int max_ctas) {
        paged_copy_py(Direction::kGather, "cuda_gather_blocks", paged, paged_nbytes, staging,
                      staging_nbytes, ids, block_nbytes, stream, max_ctas);
      },
      "paged"_a, "paged_nbytes"_a, "staging"_a, "staging_nbytes"_a, "block_ids"_a,
      "block_nbytes"_a, "stream"_a = 0, "max_ctas"_a = 0,
      "staging block i = paged block block_ids[i] (device pointers; async on stream).");
  m.def(
      "cuda_scatter_blocks",
      [](uintptr_t paged, int64_t paged_nbytes, uintptr_t staging, int64_t staging_nbytes,
         BlockIds ids, int64_t block_nbytes, uintptr_t stream, int max_ctas) {
        paged_copy_py(Direction::kScatter, "cuda_scatter_blocks", paged, paged_nbytes, staging,
                      staging_nbytes, ids, block_nbytes, stream, max_ctas);
      },
      "paged"_a, "paged_nbytes"_a, "staging"_a, "staging_nbytes"_a, "block_ids"_a,
      "block_nbytes"_a, "stream"_a = 0, "max_ctas"_a = 0,
      "paged block block_ids[i] = staging block i (device pointers; async on stream).");
  m.def("cuda_copy_blocks", &copy_blocks_py, "src"_a, "src_nbytes"_a, "src_offsets"_a, "dst"_a,
        "dst_nbytes"_a, "dst_offsets"_a, "block_nbytes"_a, "stream"_a, "max_ctas"_a = 0,
        "sync"_a = false, "own_stream"_a = false,
        "dst[dst_offsets[i]:][:block_nbytes] = src[src_offsets[i]:][:block_nbytes]; device or pinned host "
        "pointers; on stream (own_stream: the calling thread's own), waited for when sync.");
}
