#include "crc32c.hpp"

#include <algorithm>
#include <array>
#include <cstring>

#include "thread_pool.hpp"

#if defined(__x86_64__) || defined(__i386__)
#include <nmmintrin.h>
#define KVBM_X86 1
#endif

namespace kvbm {
namespace {

constexpr uint32_t kPoly = 0x82F63B78u;  // reflected Castagnoli polynomial

// ---- software: slicing-by-8 (Intel, Kounavis & Berry 2005) ----

using Tables = std::array<std::array<uint32_t, 256>, 8>;

constexpr Tables make_tables() {
  Tables t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ kPoly : c >> 1;
    t[0][i] = c;
  }
  // t[k][i] is the CRC of byte i followed by k zero bytes.
  for (int k = 1; k < 8; ++k)
    for (uint32_t i = 0; i < 256; ++i) t[k][i] = (t[k - 1][i] >> 8) ^ t[0][t[k - 1][i] & 0xff];
  return t;
}

constexpr Tables kTables = make_tables();

// Raw register update: no pre/post inversion.
uint32_t sw_update(uint32_t c, const uint8_t* p, size_t n) {
  const auto& t = kTables;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  for (; n >= 8; p += 8, n -= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    w ^= c;
    c = t[7][w & 0xff] ^ t[6][(w >> 8) & 0xff] ^ t[5][(w >> 16) & 0xff] ^ t[4][(w >> 24) & 0xff] ^
        t[3][(w >> 32) & 0xff] ^ t[2][(w >> 40) & 0xff] ^ t[1][(w >> 48) & 0xff] ^ t[0][w >> 56];
  }
#endif
  for (; n > 0; ++p, --n) c = (c >> 8) ^ t[0][(c ^ *p) & 0xff];
  return c;
}

#if KVBM_X86
// ---- hardware: three interleaved _mm_crc32_u64 streams ----
//
// crc32 has a 3-cycle latency but issues every cycle, so one dependent chain
// runs at a third of the possible speed. Three stripes are summed in parallel
// and joined with "shift by L zero bytes" operators (Adler's crc32c.c scheme).

constexpr size_t kLong = 8192;  // stripe length: the shift costs 4 lookups per 24 KiB
constexpr size_t kShort = 256;

// a * b modulo the polynomial, in the reflected bit order.
uint32_t multmodp(uint32_t a, uint32_t b) {
  uint32_t prod = 0;
  for (uint32_t m = 1u << 31; m != 0; m >>= 1) {
    if (a & m) prod ^= b;
    b = (b & 1) ? (b >> 1) ^ kPoly : b >> 1;
  }
  return prod;
}

// x^(8 * nbytes) modulo the polynomial: appending nbytes zeros multiplies by it.
uint32_t zeros_operator(size_t nbytes) {
  uint32_t result = 1u << 31, x8 = 1u << 23;  // x^0 and x^8, reflected
  for (size_t i = 0; i < nbytes; ++i) result = multmodp(result, x8);
  return result;
}

// Shifting a register over nbytes zeros is linear in its bits: precompute it per byte.
struct ShiftTable {
  std::array<std::array<uint32_t, 256>, 4> t;
  explicit ShiftTable(size_t nbytes) {
    uint32_t op = zeros_operator(nbytes);
    for (int k = 0; k < 4; ++k)
      for (uint32_t v = 0; v < 256; ++v) t[k][v] = multmodp(op, v << (8 * k));
  }
  uint32_t operator()(uint32_t c) const {
    return t[0][c & 0xff] ^ t[1][(c >> 8) & 0xff] ^ t[2][(c >> 16) & 0xff] ^ t[3][c >> 24];
  }
};

// Three stripes of `len` bytes summed in parallel, joined with the shift; with Copy, each word
// is also stored to dst as it is read (one pass over the source for a copy and its checksum).
// Plain stores only: streaming stores to three stripes 8 KiB apart run at a fifth of one
// stream's speed on the EPYC this was measured on (write-combining buffers thrash), so a
// streaming copy checksums a piece first and then copies it from cache (copy_blocks.cpp).
template <bool Copy>
__attribute__((target("sse4.2"))) uint64_t stripes(uint64_t c, uint8_t*& dst, const uint8_t*& src,
                                                    size_t& n, size_t len, const ShiftTable& shift) {
  uint8_t* d = dst;  // locals: through the references every store would reload them
  const uint8_t* p = src;
  for (; n >= 3 * len; p += 3 * len, n -= 3 * len) {
    uint64_t c1 = 0, c2 = 0;
    for (size_t i = 0; i < len; i += 8) {
      uint64_t w0, w1, w2;
      std::memcpy(&w0, p + i, 8);
      std::memcpy(&w1, p + len + i, 8);
      std::memcpy(&w2, p + 2 * len + i, 8);
      c = _mm_crc32_u64(c, w0);
      c1 = _mm_crc32_u64(c1, w1);
      c2 = _mm_crc32_u64(c2, w2);
      if constexpr (Copy) {
        std::memcpy(d + i, &w0, 8);
        std::memcpy(d + len + i, &w1, 8);
        std::memcpy(d + 2 * len + i, &w2, 8);
      }
    }
    if constexpr (Copy) d += 3 * len;
    c = shift(shift(static_cast<uint32_t>(c)) ^ static_cast<uint32_t>(c1)) ^ c2;
  }
  dst = d, src = p;
  return c;
}

__attribute__((target("sse4.2"))) uint32_t hw_update(uint32_t crc, const uint8_t* p, size_t n) {
  static const ShiftTable long_shift(kLong), short_shift(kShort);
  uint64_t c = crc;
  uint8_t* none = nullptr;  // no copy: the destination is never touched
  c = stripes<false>(c, none, p, n, kLong, long_shift);
  c = stripes<false>(c, none, p, n, kShort, short_shift);
  for (; n >= 8; p += 8, n -= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    c = _mm_crc32_u64(c, w);
  }
  for (; n > 0; ++p, --n) c = _mm_crc32_u8(static_cast<uint32_t>(c), *p);
  return static_cast<uint32_t>(c);
}

// ---- hardware, fused with a copy: the same stripes, each word stored as it is read ----

uint32_t hw_copy_update(uint32_t crc, uint8_t* d, const uint8_t* p, size_t n) {
  static const ShiftTable long_shift(kLong), short_shift(kShort);
  uint64_t c = stripes<true>(crc, d, p, n, kLong, long_shift);
  c = stripes<true>(c, d, p, n, kShort, short_shift);
  std::memcpy(d, p, n);  // the tail, under 768 bytes
  return hw_update(static_cast<uint32_t>(c), p, n);
}

bool have_hw() {
  static const bool yes = (__builtin_cpu_init(), __builtin_cpu_supports("sse4.2"));
  return yes;
}
#else
bool have_hw() { return false; }
uint32_t hw_update(uint32_t c, const uint8_t* p, size_t n) { return sw_update(c, p, n); }
#endif

}  // namespace

uint32_t crc32c_software(uint32_t crc, const uint8_t* data, size_t n) {
  return ~sw_update(~crc, data, n);
}

uint32_t crc32c(uint32_t crc, const uint8_t* data, size_t n) {
  return have_hw() ? ~hw_update(~crc, data, n) : crc32c_software(crc, data, n);
}

uint32_t copy_crc32c(uint8_t* dst, const uint8_t* src, size_t n, uint32_t crc) {
#if KVBM_X86
  if (have_hw()) return ~hw_copy_update(~crc, dst, src, n);
#endif
  std::memcpy(dst, src, n);
  return crc32c(crc, src, n);
}

const char* crc32c_impl() { return have_hw() ? "sse4.2" : "software"; }

void crc32c_blocks(const uint8_t* base, const int64_t* offsets, size_t n, int64_t nbytes,
                   uint32_t* out, unsigned threads) {
  threads = static_cast<unsigned>(std::min<size_t>(threads, n));
  if (threads <= 1) {
    for (size_t i = 0; i < n; ++i) out[i] = crc32c(0, base + offsets[i], nbytes);
    return;
  }
  parallel_for(threads, [&](size_t t) {
    for (size_t i = n * t / threads, end = n * (t + 1) / threads; i < end; ++i)
      out[i] = crc32c(0, base + offsets[i], nbytes);
  });
}

}  // namespace kvbm
