#include "stream_copy.hpp"

#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#define KVBM_X86_64 1
#endif

namespace kvbm {
namespace {

#if KVBM_X86_64
// Bytes until p is aligned to a (a power of two), at most n.
size_t head_bytes(const uint8_t* p, size_t a, size_t n) {
  const size_t head = (a - (reinterpret_cast<uintptr_t>(p) & (a - 1))) & (a - 1);
  return head < n ? head : n;
}

__attribute__((target("avx2"))) void stream_avx2(uint8_t* d, const uint8_t* s, size_t n) {
  const size_t head = head_bytes(d, 32, n);
  std::memcpy(d, s, head);
  d += head, s += head, n -= head;
  for (; n >= 128; d += 128, s += 128, n -= 128) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 32));
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 64));
    const __m256i e = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 96));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d), a);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + 32), b);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + 64), c);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + 96), e);
  }
  std::memcpy(d, s, n);
  _mm_sfence();
}

void stream_sse2(uint8_t* d, const uint8_t* s, size_t n) {
  const size_t head = head_bytes(d, 16, n);
  std::memcpy(d, s, head);
  d += head, s += head, n -= head;
  for (; n >= 64; d += 64, s += 64, n -= 64) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 16));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 32));
    const __m128i e = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(d), a);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + 16), b);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + 32), c);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + 48), e);
  }
  std::memcpy(d, s, n);
  _mm_sfence();
}

bool have_avx2() {
  static const bool yes = (__builtin_cpu_init(), __builtin_cpu_supports("avx2"));
  return yes;
}
#endif

}  // namespace

void copy_stream(uint8_t* dst, const uint8_t* src, size_t n) {
#if KVBM_X86_64
  if (have_avx2())
    stream_avx2(dst, src, n);
  else
    stream_sse2(dst, src, n);
#else
  std::memcpy(dst, src, n);
#endif
}

const char* copy_stream_impl() {
#if KVBM_X86_64
  return have_avx2() ? "avx2" : "sse2";
#else
  return "memcpy";
#endif
}

}  // namespace kvbm
