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

// Copies the chunks, split by bytes over `threads` workers (a chunk may be split), in
// tasks small enough that a worker the scheduler holds back delays the batch by one task
// at most. A batch of kStreamAbove bytes or more uses streaming stores (stream_copy.hpp).
// Bounds are the caller's job (check_ranges). A chunk may overlap itself (memmove);
// destination chunks that overlap each other race.
void copy_blocks(const uint8_t* src, const int64_t* src_offsets, uint8_t* dst,
                 const int64_t* dst_offsets, size_t n, int64_t nbytes, unsigned threads);

// copy_blocks and crc32c_blocks in one pass: crcs[i] = CRC-32C of chunk i (its source
// bytes), in one pass over memory instead of two: each word checksummed and stored as it
// is loaded (copy_crc32c), or, for a batch that streams, each 64 KiB piece checksummed
// and then streamed out of cache. Blocks are spread over `threads` workers.
void copy_blocks_crc32c(const uint8_t* src, const int64_t* src_offsets, uint8_t* dst,
                        const int64_t* dst_offsets, size_t n, int64_t nbytes, uint32_t* crcs,
                        unsigned threads);

// One sequential copy of n bytes with the C library's memcpy, or with copy_stream: the
// limits the benches hold the batched copies against.
void copy_bytes(uint8_t* dst, const uint8_t* src, size_t n, bool stream);

}  // namespace kvbm
