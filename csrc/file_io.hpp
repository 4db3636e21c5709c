// Batched block I/O on one file: block i is nbytes between bufs[i] and the file at
// file_offsets[i]. Every block gets a status, 0 or an errno, so one bad block is a miss
// and the others still move.
//
// On an O_DIRECT descriptor (checked with fcntl at each call) the kernel wants the buffer
// address, the file offset and the length aligned to the logical block size; we use 4096.
// A block whose buffer is not aligned, or whose nbytes is not a multiple of 4096, goes
// through an aligned bounce buffer, and its length is padded up to 4096: a write also
// writes zeros over [offset + nbytes, offset + align_up(nbytes)), so slot files space
// their blocks that far apart. An unaligned file offset is the kernel's EINVAL.
//
// Neighbouring blocks (file_offsets[i + 1] == file_offsets[i] + nbytes) that need no
// bounce are merged into one pwritev/preadv; when a merged call fails or comes up short,
// its blocks are redone one by one, so statuses stay per block.
//
// threads == 1 keeps every call on the calling thread. Otherwise an O_DIRECT descriptor
// goes through Linux AIO (up to 32 requests of <= 2 MiB in flight from one thread; a write's
// checksums on that thread, a read's on a second as each run lands), since a pool sized for memory copies would give the drive a queue depth of
// a few; a buffered one (or one where AIO is unavailable) spreads over the thread pool.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvbm {

constexpr int64_t kDirectAlign = 4096;

// Throws std::invalid_argument (ValueError) naming the first negative offset, or one
// whose (padded) end would not fit in an off_t.
void check_file_offsets(const char* op, const int64_t* file_offsets, size_t n, int64_t nbytes);

// True when fd was opened with O_DIRECT (false for a bad fd: the I/O reports EBADF).
bool fd_is_direct(int fd);

// status[i] = 0 when all nbytes of block i are in the file, else the errno of the
// failure. crcs, when not null, receives the CRC-32C of each block's source bytes.
void pwrite_blocks(int fd, const uint8_t* const* bufs, const int64_t* file_offsets, size_t n,
                   int64_t nbytes, unsigned threads, int32_t* status, uint32_t* crcs);

// status[i] = 0 when nbytes landed in bufs[i]; ENODATA when the file ends first; else
// the errno. A failed block's buffer may hold part of the data (never report it).
// crcs, when not null, receives the CRC-32C of each block read (0 for failed ones).
void pread_blocks(int fd, uint8_t* const* bufs, const int64_t* file_offsets, size_t n,
                  int64_t nbytes, unsigned threads, int32_t* status, uint32_t* crcs);

}  // namespace kvbm
