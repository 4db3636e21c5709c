// Block copies between an engine's paged KV pool on the GPU and a contiguous
// staging buffer. Plain C++ interface so the nanobind glue needs no CUDA headers.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvbm::cuda {

// True when a CUDA driver and at least one device are present. Never throws:
// a host without a driver just answers false.
bool available();
int device_count();

enum class Direction {
  kGather,   // paged -> staging (offload)
  kScatter,  // staging -> paged (onboard)
};

// For each i: paged block block_ids[i] (at paged + id * block_nbytes) <-> staging
// block i (at staging + i * block_nbytes). Asynchronous on `stream` (0: default
// stream) of the current device. block_ids are host memory, already bounds-checked;
// they are uploaded on the stream, so the array may be freed on return.
// max_ctas > 0 caps the thread blocks, leaving SMs to a model running beside it.
// Throws std::runtime_error on a CUDA error.
void paged_copy(Direction dir, uintptr_t paged, uintptr_t staging, const int64_t* block_ids,
                size_t n, int64_t block_nbytes, uintptr_t stream, int max_ctas);

// For each i: dst + dst_offsets[i] <- src + src_offsets[i], block_nbytes bytes. Either side
// may be device memory or page-locked host memory (with unified addressing a kernel reads
// and writes both), so G1 <-> G2 moves slot to slot in one launch, without a staging hop.
// Offsets are host memory, already bounds-checked; each pointer is checked here: pageable
// host memory throws std::invalid_argument (a kernel cannot reach it).
void copy_blocks(uintptr_t src, const int64_t* src_offsets, uintptr_t dst, const int64_t* dst_offsets,
                 size_t n, int64_t block_nbytes, uintptr_t stream, int max_ctas);

// A non-blocking stream owned by the calling thread (created on first use): kvbm's own
// transfers then never serialize with the engine's work on the legacy default stream.
uintptr_t thread_stream();

// Wait for everything queued on `stream`.
void synchronize(uintptr_t stream);

}  // namespace kvbm::cuda
