#include "copy_blocks.hpp"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "crc32c.hpp"
#include "stream_copy.hpp"
#include "thread_pool.hpp"

namespace kvbm {
namespace {

constexpr uint64_t kTaskBytes = 4u << 20;  // below this a task's hand-off is no longer noise
constexpr unsigned kTasksPerThread = 16;   // so a descheduled worker holds back 1/16 of its share
constexpr size_t kPiece = 64u << 10;       // checksummed, then streamed out while still in L2

bool overlap(const uint8_t* a, const uint8_t* b, size_t len) { return a < b + len && b < a + len; }

// One chunk (or a part of one): streaming stores when asked and the ranges are disjoint.
void copy_chunk(uint8_t* d, const uint8_t* s, size_t len, bool stream) {
  if (stream && !overlap(d, s, len))
    copy_stream(d, s, len);
  else
    std::memmove(d, s, len);
}

// How many tasks `total` bytes of work on `threads` workers becomes.
size_t task_count(uint64_t total, unsigned threads) {
  const uint64_t by_size = std::max<uint64_t>(1, total / kTaskBytes);
  return static_cast<size_t>(std::max<uint64_t>(threads, std::min<uint64_t>(by_size, uint64_t(threads) * kTasksPerThread)));
}

}  // namespace

void check_ranges(const char* op, const char* name, const int64_t* offsets, size_t n,
                  int64_t nbytes, size_t size) {
  auto fail = [&](size_t i, const std::string& why) {
    throw std::invalid_argument(std::string(op) + ": " + name + "[" + std::to_string(i) +
                                "] = " + std::to_string(offsets[i]) + " " + why);
  };
  const auto limit = static_cast<int64_t>(size) - nbytes;  // last valid start
  for (size_t i = 0; i < n; ++i) {
    if (offsets[i] < 0) fail(i, "is negative");
    // Compared as "off > size - nbytes" so that off + nbytes cannot overflow.
    if (offsets[i] > limit)
      fail(i, "+ nbytes " + std::to_string(nbytes) + " runs past the end of the " +
                  std::to_string(size) + "-byte buffer");
  }
}

void copy_blocks(const uint8_t* src, const int64_t* src_offsets, uint8_t* dst,
                 const int64_t* dst_offsets, size_t n, int64_t nbytes, unsigned threads) {
  if (n == 0 || nbytes == 0) return;
  const auto chunk = static_cast<uint64_t>(nbytes);
  const uint64_t total = n * chunk;
  const bool stream = total >= kStreamAbove;
  if (threads <= 1) {
    for (size_t i = 0; i < n; ++i) copy_chunk(dst + dst_offsets[i], src + src_offsets[i], chunk, stream);
    return;
  }
  // Split by bytes, not by chunks, so two huge blocks still use every thread.
  const size_t tasks = task_count(total, threads);
  const uint64_t per_task = (total + tasks - 1) / tasks;
  parallel_for(tasks, [&](size_t t) {
    uint64_t pos = t * per_task;
    const uint64_t end = std::min(total, pos + per_task);
    while (pos < end) {
      const uint64_t i = pos / chunk, within = pos % chunk;
      const uint64_t len = std::min(chunk - within, end - pos);
      copy_chunk(dst + dst_offsets[i] + within, src + src_offsets[i] + within, len, stream);
      pos += len;
    }
  });
}

void copy_blocks_crc32c(const uint8_t* src, const int64_t* src_offsets, uint8_t* dst,
                        const int64_t* dst_offsets, size_t n, int64_t nbytes, uint32_t* crcs,
                        unsigned threads) {
  if (n == 0) return;
  const auto len = static_cast<size_t>(nbytes);
  const bool stream = uint64_t(n) * len >= kStreamAbove;
  auto one = [&](size_t i) {
    const uint8_t* s = src + src_offsets[i];
    uint8_t* d = dst + dst_offsets[i];
    if (overlap(d, s, len)) {  // the checksum is of the bytes before the copy moves them
      crcs[i] = crc32c(0, s, len);
      std::memmove(d, s, len);
      return;
    }
    if (!stream) {
      crcs[i] = copy_crc32c(d, s, len, 0);
      return;
    }
    uint32_t crc = 0;  // see crc32c.cpp: a piece is checksummed, then streamed out of cache
    for (size_t at = 0; at < len; at += kPiece) {
      const size_t piece = std::min(kPiece, len - at);
      crc = crc32c(crc, s + at, piece);
      copy_stream(d + at, s + at, piece);
    }
    crcs[i] = crc;
  };
  threads = static_cast<unsigned>(std::min<size_t>(threads, n));
  if (threads <= 1) {
    for (size_t i = 0; i < n; ++i) one(i);
    return;
  }
  const size_t tasks = std::min<size_t>(n, task_count(uint64_t(n) * len, threads));
  parallel_for(tasks, [&](size_t t) {
    for (size_t i = n * t / tasks, end = n * (t + 1) / tasks; i < end; ++i) one(i);
  });
}

void copy_bytes(uint8_t* dst, const uint8_t* src, size_t n, bool stream) {
  if (stream || overlap(dst, src, n))
    copy_chunk(dst, src, n, stream);
  else
    std::memcpy(dst, src, n);
}

}  // namespace kvbm
