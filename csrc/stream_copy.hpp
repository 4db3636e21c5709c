// Large copies with non-temporal (streaming) stores.
//
// A plain store to a line that is not cached first reads it (read-for-ownership), so a
// copy much larger than the caches moves 3 bytes over the memory bus per byte copied;
// streaming stores write around the cache and move 2. glibc's memcpy switches to them
// only above its non_temporal_threshold (3/4 of the L3, 192 MiB on a 32 MiB-L3 EPYC),
// so a batch of 256 KiB block copies never gets them while one 1 GiB copy does: that
// is the 0.55x of issue 17. The destination ends up out of cache, which is what a
// batch larger than the cache wants anyway.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvbm {

// Copies n bytes (the ranges must not overlap) with streaming stores where the CPU has
// them (AVX2, else SSE2 on x86-64), memcpy elsewhere, and orders the stores (sfence)
// before returning, so another thread that synchronizes with this one sees them.
void copy_stream(uint8_t* dst, const uint8_t* src, size_t n);

// "avx2", "sse2" or "memcpy": what copy_stream uses on this CPU.
const char* copy_stream_impl();

// Batches at least this large use streaming stores (copy_blocks, copy_blocks_crc32c):
// the whole batch does not stay in the last-level cache, so caching the destination
// only costs the read-for-ownership.
constexpr uint64_t kStreamAbove = 8u << 20;

}  // namespace kvbm
