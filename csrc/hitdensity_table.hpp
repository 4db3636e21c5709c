// hitdensity's classes, age buckets and table update (the Gittins index per class and
// bucket), shared by its compiled core: policies/hitdensity.py's _bucket/_STARTS/_WIDTH and
// policies/_gittins.py's _kernel, line for line. Included only by hitdensity_core.cpp, which
// is built with -ffp-contract=off: the same float64 operations in the same order, no fused
// multiply-add, so the tables equal the Python version's to the bit.
#pragma once

#include <cstdint>

namespace hitdensity {

constexpr int kRunOctaves = 13;
constexpr int kTail = 0, kNew = 1, kOnce = kNew + kRunOctaves, kMany = kOnce + 1;
constexpr int kClasses = kMany + 1;  // 16
constexpr int kBuckets = 64;

inline int bit_length(uint64_t x) { return x ? 64 - __builtin_clzll(x) : 0; }

inline int bucket(int64_t age) {  // _bucket
  if (age < 4) return age > 0 ? static_cast<int>(age) : 0;
  int b = bit_length(static_cast<uint64_t>(age));
  int v = 2 * b - 2 + static_cast<int>((age >> (b - 2)) & 1);
  return v < kBuckets - 1 ? v : kBuckets - 1;
}

struct Starts {
  int64_t start[kBuckets + 1];
  int64_t width[kBuckets];
  Starts() {
    for (int b = 0; b <= kBuckets; ++b) {
      if (b < 4) {
        start[b] = b;
      } else {
        int octave = (b + 2) / 2, half = (b + 2) % 2;
        start[b] = (int64_t(1) << (octave - 1)) + half * (int64_t(1) << (octave - 2));
      }
    }
    for (int b = 0; b < kBuckets; ++b) {
      int64_t w = start[b + 1] - start[b];
      width[b] = w > 1 ? w : 1;
    }
  }
};
inline const Starts kStarts;

inline int run_class(int64_t n) {
  int g = bit_length(static_cast<uint64_t>(n)) - 1;
  return kNew + (g < kRunOctaves - 1 ? g : kRunOctaves - 1);
}

// policies/_gittins.py's _kernel: recompute index (and rise[b] = index[b + 1] - index[b]) from
// the counts and the lives going on; halve the counts if decay.
inline void gittins(double (&reuses)[kClasses][kBuckets], double (&ends)[kClasses][kBuckets],
                    const int64_t (&live)[kClasses][kBuckets], double (&index)[kClasses][kBuckets],
                    double (&rise)[kClasses][kBuckets], bool decay) {
  double exposure[kBuckets];
  for (int c = 0; c < kClasses; ++c) {
    int top = -1;
    for (int b = kBuckets - 1; b >= 0; --b)
      if (ends[c][b] != 0.0 || live[c][b] != 0) {
        top = b;
        break;
      }
    double alive = 0.0;
    for (int b = top; b >= 0; --b) {
      double leaving = ends[c][b] + static_cast<double>(live[c][b]);
      alive += leaving;
      exposure[b] = (alive - leaving / 2.0) * static_cast<double>(kStarts.width[b]);
    }
    for (int b = 0; b <= top; ++b) {
      double ar = reuses[c][b], ae = exposure[b];
      double best = ar / ae;
      for (int h = b + 1; h <= top; ++h) {
        ar += reuses[c][h];
        ae += exposure[h];
        double ratio = ar / ae;
        if (ratio > best) best = ratio;
      }
      index[c][b] = best > 0.0 ? best : 0.0;
    }
    for (int b = top + 1; b < kBuckets; ++b) index[c][b] = 0.0;
    for (int b = 0; b < kBuckets - 1; ++b) rise[c][b] = index[c][b + 1] - index[c][b];
    rise[c][kBuckets - 1] = 0.0;
    if (decay)
      for (int b = 0; b <= top; ++b) {
        reuses[c][b] *= 0.5;
        ends[c][b] *= 0.5;
      }
  }
}

// policies/hitdensity.py's _floor_reused, after each table update: where once's index is 0 (no
// block reused once has been seen to return at that age or later), it becomes the new classes'
// mean index there, each weighted by its reuses; rise follows. The same operations in order.
inline void floor_reused(const double (&reuses)[kClasses][kBuckets], double (&index)[kClasses][kBuckets],
                         double (&rise)[kClasses][kBuckets]) {
  double weights[kOnce - kNew], total = 0.0;
  for (int c = kNew; c < kOnce; ++c) {
    double w = 0.0;
    for (int b = 0; b < kBuckets; ++b) w += reuses[c][b];
    weights[c - kNew] = w;
    total += w;
  }
  if (!(total > 0.0)) return;
  double* once = index[kOnce];
  for (int b = 0; b < kBuckets; ++b) {
    if (once[b] != 0.0) continue;
    double f = 0.0;
    for (int c = kNew; c < kOnce; ++c) f += weights[c - kNew] * index[c][b];
    once[b] = f / total;
  }
  for (int b = 0; b < kBuckets - 1; ++b) rise[kOnce][b] = once[b + 1] - once[b];
  rise[kOnce][kBuckets - 1] = 0.0;
}

}  // namespace hitdensity
