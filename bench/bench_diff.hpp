// What bench/encode_kinds.cpp and bench/encode_phases.cpp share: their synthetic dense step (make_diff: a bf16
// tensor w ~ N(0, 0.02) rounded to nearest, then w + lr·N(0,1) stochastically rounded, as bench/checkpoint.py's
// random model and step, as the diff gives it to the encoder: the bitmap of changed elements and their XORs, low
// byte then high byte) and their timer (best_of).
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

namespace bench {

inline uint16_t to_bf16_sr(float x, uint32_t noise16) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return static_cast<uint16_t>((b + noise16) >> 16);
}

inline float from_bf16(uint16_t h) {
  uint32_t b = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

struct Diff {
  uint64_t units = 0, changed = 0;
  std::vector<uint8_t> bitmap, values;
};

inline Diff make_diff(uint64_t units, double lr, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  Diff d;
  d.units = units;
  d.bitmap.assign((units + 7) / 8, 0);
  d.values.reserve(units / 4);
  for (uint64_t i = 0; i < units; ++i) {
    const uint64_t r = rng();
    const uint16_t old = to_bf16_sr(0.02f * n01(rng), 0x8000);  // round to nearest (as torch's .to(bf16))
    const uint16_t now = to_bf16_sr(from_bf16(old) + static_cast<float>(lr) * n01(rng), r & 0xFFFF);
    const uint16_t x = old ^ now;
    if (x) {
      d.bitmap[i / 8] |= static_cast<uint8_t>(1u << (i % 8));
      d.values.push_back(static_cast<uint8_t>(x & 0xFF));
      d.values.push_back(static_cast<uint8_t>(x >> 8));
      ++d.changed;
    }
  }
  return d;
}

// The shortest of `reps` runs of fn, in seconds.
inline double best_of(int reps, const std::function<void()>& fn) {
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    fn();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

}  // namespace bench
