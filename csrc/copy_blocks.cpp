#include "copy_blocks.hpp"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "thread_pool.hpp"

namespace kvbm {

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
  if (threads <= 1) {
    for (size_t i = 0; i < n; ++i) std::memmove(dst + dst_offsets[i], src + src_offsets[i], chunk);
    return;
  }
  // Split by bytes, not by chunks, so two huge blocks still use every thread.
  const uint64_t per_task = (total + threads - 1) / threads;
  parallel_for(threads, [&](size_t t) {
    uint64_t pos = t * per_task;
    const uint64_t end = std::min(total, pos + per_task);
    while (pos < end) {
      const uint64_t i = pos / chunk, within = pos % chunk;
      const uint64_t len = std::min(chunk - within, end - pos);
      std::memmove(dst + dst_offsets[i] + within, src + src_offsets[i] + within, len);
      pos += len;
    }
  });
}

}  // namespace kvbm
