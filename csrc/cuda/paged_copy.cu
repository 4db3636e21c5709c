#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "paged_copy.hpp"

namespace kvbm::cuda {
namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("kvbm cuda: ") + what + ": " + cudaGetErrorString(err));
}

// One KV block by one thread block. Each thread issues kUnroll loads before its stores, so a
// few thread blocks keep enough bytes in flight to fill PCIe when reading pinned host memory
// (measured on an H200: 8 thread blocks with one load in flight read host memory at 0.38x of
// the copy-engine limit; a capped grid is what leaves the SMs to the model).
constexpr int kUnroll = 4;

template <typename T>
__device__ __forceinline__ void copy_block(const T* from, T* to, int64_t words) {
  const int64_t step = static_cast<int64_t>(blockDim.x) * kUnroll;
  for (int64_t w = threadIdx.x; w < words; w += step) {
    T r[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = w + u * static_cast<int64_t>(blockDim.x);
      if (j < words) r[u] = from[j];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = w + u * static_cast<int64_t>(blockDim.x);
      if (j < words) to[j] = r[u];
    }
  }
}

// One thread block per KV block (grid-strided when capped); its threads stream
// the block in T-sized words: 16-byte vectors when everything is aligned.
template <typename T, bool kGather>
__global__ void paged_copy_kernel(uint8_t* paged, uint8_t* staging, const int64_t* ids,
                                  int64_t n, int64_t words) {
  const int64_t nbytes = words * sizeof(T);
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    T* p = reinterpret_cast<T*>(paged + ids[i] * nbytes);
    T* s = reinterpret_cast<T*>(staging + i * nbytes);
    copy_block(kGather ? p : s, kGather ? s : p, words);
  }
}

// Two-sided variant: offs holds (src offset, dst offset) pairs.
template <typename T>
__global__ void indexed_copy_kernel(const uint8_t* src, uint8_t* dst, const int64_t* offs,
                                    int64_t n, int64_t words) {
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    copy_block(reinterpret_cast<const T*>(src + offs[2 * i]), reinterpret_cast<T*>(dst + offs[2 * i + 1]),
               words);
  }
}

// The address a kernel uses for p: device and managed memory as is, page-locked host memory
// through its mapping (the same address under unified addressing). Pageable memory fails.
uint8_t* kernel_address(uintptr_t p, const char* name) {
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, reinterpret_cast<void*>(p)) != cudaSuccess) {
    cudaGetLastError();
    attr.type = cudaMemoryTypeUnregistered;
  }
  if (attr.type == cudaMemoryTypeUnregistered || attr.devicePointer == nullptr)
    throw std::invalid_argument(
        std::string("cuda copy_blocks: ") + name +
        " is pageable host memory, which a kernel cannot reach: allocate it pinned "
        "(torch pin_memory=True, cudaHostAlloc) or register it (cudaHostRegister)");
  return static_cast<uint8_t*>(attr.devicePointer);
}

int grid_for(int64_t n, int max_ctas) {
  const int64_t cap = max_ctas > 0 ? max_ctas : int64_t(1) << 30;
  return static_cast<int>(std::min<int64_t>(n, cap));
}

template <typename T>
void launch(Direction dir, uint8_t* paged, uint8_t* staging, const int64_t* ids, int64_t n,
            int64_t block_nbytes, cudaStream_t stream, int ctas) {
  const int64_t words = block_nbytes / static_cast<int64_t>(sizeof(T));
  if (dir == Direction::kGather)
    paged_copy_kernel<T, true><<<ctas, 256, 0, stream>>>(paged, staging, ids, n, words);
  else
    paged_copy_kernel<T, false><<<ctas, 256, 0, stream>>>(paged, staging, ids, n, words);
}

}  // namespace

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: clear the error, report none
    return 0;
  }
  return count;
}

bool available() { return device_count() > 0; }

void paged_copy(Direction dir, uintptr_t paged, uintptr_t staging, const int64_t* block_ids,
                size_t n, int64_t block_nbytes, uintptr_t stream_handle, int max_ctas) {
  if (n == 0 || block_nbytes == 0) return;
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const size_t ids_bytes = n * sizeof(int64_t);

  // Stream-ordered scratch: no device-wide sync, freed after the kernel runs.
  int64_t* ids = nullptr;
  check(cudaMallocAsync(reinterpret_cast<void**>(&ids), ids_bytes, stream), "cudaMallocAsync");
  check(cudaMemcpyAsync(ids, block_ids, ids_bytes, cudaMemcpyHostToDevice, stream),
        "upload block ids");

  const int ctas = grid_for(static_cast<int64_t>(n), max_ctas);
  auto* p = reinterpret_cast<uint8_t*>(paged);
  auto* s = reinterpret_cast<uint8_t*>(staging);
  const bool vec16 = ((paged | staging | static_cast<uintptr_t>(block_nbytes)) % 16) == 0;
  if (vec16)
    launch<uint4>(dir, p, s, ids, static_cast<int64_t>(n), block_nbytes, stream, ctas);
  else
    launch<uint8_t>(dir, p, s, ids, static_cast<int64_t>(n), block_nbytes, stream, ctas);
  check(cudaGetLastError(), "paged_copy kernel launch");
  check(cudaFreeAsync(ids, stream), "cudaFreeAsync");
}

void copy_blocks(uintptr_t src, const int64_t* src_offsets, uintptr_t dst, const int64_t* dst_offsets,
                 size_t n, int64_t block_nbytes, uintptr_t stream_handle, int max_ctas) {
  if (n == 0 || block_nbytes == 0) return;
  const uint8_t* s = kernel_address(src, "src");
  uint8_t* d = kernel_address(dst, "dst");
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);

  // Interleave the offsets so each thread block reads one pair; upload stream-ordered.
  std::vector<int64_t> pairs(2 * n);
  bool vec16 = ((reinterpret_cast<uintptr_t>(s) | reinterpret_cast<uintptr_t>(d) |
                 static_cast<uintptr_t>(block_nbytes)) % 16) == 0;
  for (size_t i = 0; i < n; ++i) {
    pairs[2 * i] = src_offsets[i];
    pairs[2 * i + 1] = dst_offsets[i];
    vec16 = vec16 && ((src_offsets[i] | dst_offsets[i]) % 16) == 0;
  }
  int64_t* offs = nullptr;
  const size_t bytes = pairs.size() * sizeof(int64_t);
  check(cudaMallocAsync(reinterpret_cast<void**>(&offs), bytes, stream), "cudaMallocAsync");
  check(cudaMemcpyAsync(offs, pairs.data(), bytes, cudaMemcpyHostToDevice, stream), "upload offsets");
  // pairs is pageable: that copy is staged before cudaMemcpyAsync returns, so it may go now.
  const int ctas = grid_for(static_cast<int64_t>(n), max_ctas);
  if (vec16)
    indexed_copy_kernel<uint4><<<ctas, 256, 0, stream>>>(s, d, offs, static_cast<int64_t>(n),
                                                         block_nbytes / 16);
  else
    indexed_copy_kernel<uint8_t><<<ctas, 256, 0, stream>>>(s, d, offs, static_cast<int64_t>(n),
                                                           block_nbytes);
  check(cudaGetLastError(), "copy_blocks kernel launch");
  check(cudaFreeAsync(offs, stream), "cudaFreeAsync");
}

uintptr_t thread_stream() {
  struct Owned {
    cudaStream_t s = nullptr;
    ~Owned() {
      if (s) cudaStreamDestroy(s);
    }
  };
  thread_local Owned owned;
  if (!owned.s) check(cudaStreamCreateWithFlags(&owned.s, cudaStreamNonBlocking), "cudaStreamCreate");
  return reinterpret_cast<uintptr_t>(owned.s);
}

void synchronize(uintptr_t stream) {
  check(cudaStreamSynchronize(reinterpret_cast<cudaStream_t>(stream)), "cudaStreamSynchronize");
}

}  // namespace kvbm::cuda
