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

// The same 64-bit product on both sides. On the device it is spelled as two 32-bit multiplies: written as a
// 64-bit product, NVVM carried the whole Philox state in 64-bit registers (64-bit multiplies, masks, shifts
// and xors), about twice the instructions per round, and the update stage draws one Philox block per 8
// weights (the H200 moves them faster than those instructions issue).
LT_HD uint32_t mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
#ifdef __CUDA_ARCH__
  *hi = __umulhi(a, b);
  return a * b;
#else
  uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
#endif
}

// kRounds 10 is Philox4x32-10, everywhere but where apollo.update_rounds asks 7 for the APOLLO update's rounding
// offsets (7 is the fewest rounds the paper's authors found to pass BigCrush; docs/optim.md).
template <int kRounds = 10>
LT_HD U32x4 philox(U32x4 c, uint32_t k0, uint32_t k1) {
  for (int i = 0; i < kRounds; ++i) {
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
template <int kRounds = 10>
LT_HD U32x4 rounding_bits(uint64_t seed, uint64_t step, uint64_t group) {
  uint64_t key = mix64(seed ^ mix64(step ^ 0x5EEDull));
  return philox<kRounds>(U32x4{static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32), kTagRounding, 0},
                         static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32));
}

LT_HD uint16_t rounding_offset(const U32x4& bits, int lane) {  // lane in [0, 8)
  uint32_t word = lane < 2 ? bits.x : lane < 4 ? bits.y : lane < 6 ? bits.z : bits.w;
  return static_cast<uint16_t>((lane & 1) ? (word >> 16) : (word & 0xFFFFu));
}

LT_HD bool finite(float x) { return (f32_bits(x) & 0x7F800000u) != 0x7F800000u; }

// The scalar tail of an APOLLO step, from reduced sums. `norm_u_unscaled` is ‖s ⊙ G_clipped‖.
struct Tail {
  float step_size;   // η_t = lr·√(1−β₂ᵗ)/(1−β₁ᵗ)
  float multiplier;  // applied to s_i·G: c·√scale/λ
  float new_prev;    // limiter state after this step
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

// ---- tensor-parallel shards (optim.hpp: Shard) ----

// Index `local` along the sharded dimension -> the full tensor's index (the identity for a whole tensor).
LT_HD int64_t shard_global(const Shard& sh, int64_t local) {
  if (sh.dim < 0) return local;
  for (int i = 0; i < sh.segments; ++i) {
    if (local < sh.segment[i].length) return sh.segment[i].start + local;
    local -= sh.segment[i].length;
  }
  return -1;  // beyond the shard: validate() refuses shards whose segments do not add up
}

// An APOLLO step's shapes in the terms of the math: the direction of the projection comes from the *full*
// tensor's shape, so that every rank projects the way the TP-1 step does.
struct ApolloGeometry {
  bool tall;  // full rows >= full cols: channels are rows, R = G·Pᵀ
  int64_t rows_full, cols_full;
  int64_t K, k;            // this rank's channels and projected indices
  int64_t k_full;          // the full projected dimension (P is [rank, k_full] or [k_full, rank])
  bool sharded_channels;   // the rank holds some channels: sums over channels are sums over ranks
  bool sharded_projected;  // the rank holds some projected indices: R itself is a sum over ranks
};

LT_HD ApolloGeometry apollo_geometry(int64_t rows, int64_t cols, const Shard& sh) {
  ApolloGeometry g{};
  g.rows_full = sh.dim == 0 ? sh.full : rows;
  g.cols_full = sh.dim == 1 ? sh.full : cols;
  g.tall = g.rows_full >= g.cols_full;
  g.K = g.tall ? rows : cols;
  g.k = g.tall ? cols : rows;
  g.k_full = g.tall ? g.cols_full : g.rows_full;
  const int channel_dim = g.tall ? 0 : 1;
  g.sharded_channels = sh.dim == channel_dim;
  g.sharded_projected = sh.dim >= 0 && sh.dim != channel_dim;
  return g;
}

// Entry `e` of this rank's slice of P ([rank, k] when tall, [k, rank] when wide) -> its index in the full P,
// whose entries projection_entry generates.
LT_HD uint64_t projection_index(const ApolloGeometry& g, const Shard& sh, int32_t rank, int64_t e) {
  if (g.tall) {
    const int64_t q = e / g.k, j = e % g.k;
    return static_cast<uint64_t>(q * g.k_full + (g.sharded_projected ? shard_global(sh, j) : j));
  }
  const int64_t i = e / rank, q = e % rank;
  return static_cast<uint64_t>((g.sharded_projected ? shard_global(sh, i) : i) * rank + q);
}

// The rounding group (one Philox block per 8 adjacent elements of a row of the full tensor) and lane of the
// element at this rank's (row, col) of a matrix, as the TP-1 step numbers them.
struct RoundingSlot {
  uint64_t group;
  int lane;
};
LT_HD RoundingSlot matrix_rounding_slot(const Shard& sh, int64_t cols_full, int64_t row, int64_t col) {
  const int64_t r = sh.dim == 0 ? shard_global(sh, row) : row;
  const int64_t c = sh.dim == 1 ? shard_global(sh, col) : col;
  return {static_cast<uint64_t>(r * ((cols_full + 7) / 8) + c / 8), static_cast<int>(c % 8)};
}

// The same for element `i` of a flat parameter (AdamW: one group per 8 elements of the full tensor).
LT_HD RoundingSlot flat_rounding_slot(const Shard& sh, int64_t inner, int64_t i) {
  if (sh.dim < 0) return {static_cast<uint64_t>(i / 8), static_cast<int>(i % 8)};
  int64_t local_dim = 0;
  for (int s = 0; s < sh.segments; ++s) local_dim += sh.segment[s].length;
  const int64_t y = i % inner, rest = i / inner;
  const int64_t x = rest % local_dim, outer = rest / local_dim;
  const int64_t full = (outer * sh.full + shard_global(sh, x)) * inner + y;
  return {static_cast<uint64_t>(full / 8), static_cast<int>(full % 8)};
}

LT_HD float clip_factor(float max_norm, float total_sq) {
  if (max_norm <= 0.0f) return 1.0f;
  float norm = sqrtf(total_sq);
  return norm > max_norm ? max_norm / norm : 1.0f;
}

}  // namespace livetrain::optim::detail
