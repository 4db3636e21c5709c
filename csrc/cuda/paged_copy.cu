#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "paged_copy.hpp"

namespace kvbm::cuda {
namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("kvbm cuda: ") + what + ": " + cudaGetErrorString(err));
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
    const T* from = kGather ? p : s;
    T* to = kGather ? s : p;
    for (int64_t w = threadIdx.x; w < words; w += blockDim.x) to[w] = from[w];
  }
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

  const int64_t cap = max_ctas > 0 ? max_ctas : int64_t(1) << 30;
  const int ctas = static_cast<int>(std::min<int64_t>(static_cast<int64_t>(n), cap));
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

}  // namespace kvbm::cuda
