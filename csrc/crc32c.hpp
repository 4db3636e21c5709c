// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as used by iSCSI, ext4 and
// RocksDB. crc32c("123456789") == 0xE3069283.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvbm {

// Extends `crc` (the checksum of earlier bytes, 0 to start) over data[0, n).
// Uses SSE4.2 when the CPU has it, slicing-by-8 otherwise.
uint32_t crc32c(uint32_t crc, const uint8_t* data, size_t n);

// The portable slicing-by-8 path, whatever the CPU (kept callable for tests).
uint32_t crc32c_software(uint32_t crc, const uint8_t* data, size_t n);

// Copies n bytes from src to dst (the ranges must not overlap) and returns crc extended over
// them, in one pass: each 8-byte word is loaded once, fed to the CRC and stored (plain
// stores; copy_blocks_crc32c streams large batches its own way).
uint32_t copy_crc32c(uint8_t* dst, const uint8_t* src, size_t n, uint32_t crc);

// "sse4.2" or "software": the path crc32c() takes on this CPU.
const char* crc32c_impl();

// out[i] = crc32c(0, base + offsets[i], nbytes) for i in [0, n). Offsets are
// trusted here (the caller checks bounds); blocks are spread over `threads` tasks.
void crc32c_blocks(const uint8_t* base, const int64_t* offsets, size_t n, int64_t nbytes,
                   uint32_t* out, unsigned threads);

}  // namespace kvbm
