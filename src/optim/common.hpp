// Internal: arithmetic shared bit-for-bit by the CPU and CUDA optimizer steps: Philox4x32-10, the Gaussian
// projection entries, the random offsets of stochastic rounding and the scalar tail of an APOLLO step
// (the bf16 conversions themselves are common/bf16.hpp).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/bf16.hpp"
#include "livetrain/optim.hpp"

namespace livetrain::optim::detail {

// ---- Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) ----
struct U32x4 {
  uint32_t x, y, z, w;
};

LT_HD uint32_t mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
  uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

LT_HD U32x4 philox(U32x4 c, uint32_t k0, uint32_t k1) {
  for (int i = 0; i < 10; ++i) {
    uint32_t hi0, hi1;
    uint32_t lo0 = mulhilo(0xD2511F53u, c.x, &hi0);
    uint32_t lo1 = mulhilo(0xCD9E8D57u, c.z, &hi1);
    c = U32x4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c;
}

// SplitMix64 finalizer: derives independent keys from (seed, purpose, index).
LT_HD uint64_t mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Domain tags keep the projection's and the rounding's random streams apart.
constexpr uint32_t kTagProjection = 0x50524F4Au;  // "PROJ"
constexpr uint32_t kTagRounding = 0x524F554Eu;    // "ROUN"

// The key of the projection used at step `step`: a new one every `gap` steps (a refresh), as the paper's
// "new seed" at each update of P.
LT_HD uint64_t projection_key(uint64_t seed, uint64_t step, int32_t gap) {
  uint64_t refresh = step / static_cast<uint64_t>(gap > 0 ? gap : 1);
  return mix64(seed ^ mix64(refresh + 1));
}

// Entry `e` of the projection for `key`: a standard normal (Box–Muller on one Philox block) scaled by
// 1/√rank, so that E[P Pᵀ] = I·(cols/rank) as in the reference implementation's randn / √rank.
LT_HD float projection_entry(uint64_t key, uint64_t e, float inv_sqrt_rank) {
  U32x4 r = philox(U32x4{static_cast<uint32_t>(e), static_cast<uint32_t>(e >> 32), kTagProjection, 0},
                   static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32));
  // u1 in (0, 1], u2 in [0, 1): 24-bit uniforms, so logf never sees 0.
  float u1 = (static_cast<float>(r.x >> 8) + 1.0f) * (1.0f / 16777216.0f);
  float u2 = static_cast<float>(r.y >> 8) * (1.0f / 16777216.0f);
  float radius = sqrtf(-2.0f * logf(u1));
  return radius * cosf(6.2831853071795864f * u2) * inv_sqrt_rank;
}

// Eight 16-bit rounding offsets for elements [8g, 8g + 8) of a step.
LT_HD U32x4 rounding_bits(uint64_t seed, uint64_t step, uint64_t group) {
  uint64_t key = mix64(seed ^ mix64(step ^ 0x5EEDull));
  return philox(U32x4{static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32), kTagRounding, 0},
                static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32));
}

LT_HD uint16_t rounding_offset(const U32x4& bits, int lane) {  // lane in [0, 8)
  uint32_t word = lane < 2 ? bits.x : lane < 4 ? bits.y : lane < 6 ? bits.z : bits.w;
  return static_cast<uint16_t>((lane & 1) ? (word >> 16) : (word & 0xFFFFu));
}

LT_HD bool finite(float x) { return (f32_bits(x) & 0x7F800000u) != 0x7F800000u; }

// The scalar tail of an APOLLO step, from reduced sums. `norm_u_unscaled` is ‖s ⊙ G_clipped‖.
struct Tail {
  float step_size;  // η_t = lr·√(1−β₂ᵗ)/(1−β₁ᵗ)
  float multiplier; // applied to s_i·G: c·√scale/λ
  float new_prev;   // limiter state after this step
  int32_t status;
};

LT_HD Tail apollo_tail(const ApolloHyper& h, uint64_t step, float clip, float norm_u, float prev) {
  Tail t{};
  double tt = static_cast<double>(step + 1);
  double bc1 = 1.0 - pow(h.beta1, tt);
  double bc2 = 1.0 - pow(h.beta2, tt);
  t.step_size = static_cast<float>(h.lr * sqrt(bc2) / bc1);
  float lim = 1.0f;
  if (h.limiter) {
    if (prev >= 0.0f) {
      float ratio = norm_u / (prev + 1e-8f);
      lim = (ratio > 1.01f ? ratio : 1.01f) / 1.01f;
      t.new_prev = norm_u / lim;
    } else {
      t.new_prev = norm_u;
    }
  } else {
    t.new_prev = prev;
  }
  t.multiplier = clip * sqrtf(h.scale) / lim;
  t.status = (finite(norm_u) && finite(lim) && finite(t.step_size) && finite(t.multiplier)) ? kStatusOk
                                                                                           : kStatusNonFiniteUpdate;
  return t;
}

LT_HD float clip_factor(float max_norm, float total_sq) {
  if (max_norm <= 0.0f) return 1.0f;
  float norm = sqrtf(total_sq);
  return norm > max_norm ? max_norm / norm : 1.0f;
}

}  // namespace livetrain::optim::detail
