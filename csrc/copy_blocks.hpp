// Batched gather/scatter between host buffers: chunk i is nbytes at
// src + src_offsets[i], copied to dst + dst_offsets[i].
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvbm {

// Throws std::invalid_argument (ValueError in Python) naming the first offset whose
// range [off, off + nbytes) does not fit in a buffer of `size` bytes.
void check_ranges(const char* op, const char* name, const int64_t* offsets, size_t n,
                  int64_t nbytes, size_t size);

// Copies the chunks, split by bytes over `threads` tasks (a chunk may be split).
// Bounds are the caller's job (check_ranges). Each chunk is a memmove, so a chunk
// may overlap itself; destination chunks that overlap each other race.
void copy_blocks(const uint8_t* src, const int64_t* src_offsets, uint8_t* dst,
                 const int64_t* dst_offsets, size_t n, int64_t nbytes, unsigned threads);

}  // namespace kvbm
