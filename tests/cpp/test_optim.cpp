// Optimizer building blocks on the CPU: Philox known answers, bf16 rounding, projection statistics,
// argument checks, and the non-finite guard of the C++ step functions themselves.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "common/bf16.hpp"
#include "livetrain/error.hpp"
#include "livetrain/optim.hpp"
#include "optim/common.hpp"

namespace opt = livetrain::optim;
namespace d = livetrain::optim::detail;

// Known-answer vectors of Philox4x32-10 from Random123's kat_vectors (Salmon et al., SC'11).
TEST(Optim, PhiloxKnownAnswers) {
  d::U32x4 a = d::philox({0, 0, 0, 0}, 0, 0);
  EXPECT_EQ(a.x, 0x6627e8d5u);
  EXPECT_EQ(a.y, 0xe169c58du);
  EXPECT_EQ(a.z, 0xbc57ac4cu);
  EXPECT_EQ(a.w, 0x9b00dbd8u);
  d::U32x4 b = d::philox({0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, 0xffffffffu, 0xffffffffu);
  EXPECT_EQ(b.x, 0x408f276du);
  EXPECT_EQ(b.y, 0x41c83b0eu);
  EXPECT_EQ(b.z, 0xa20bc7c6u);
  EXPECT_EQ(b.w, 0x6d5451fdu);
  d::U32x4 c = d::philox({0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, 0xa4093822u, 0x299f31d0u);
  EXPECT_EQ(c.x, 0xd16cfe09u);
  EXPECT_EQ(c.y, 0x94fdccebu);
  EXPECT_EQ(c.z, 0x5001e420u);
  EXPECT_EQ(c.w, 0x24126ea1u);
}

// Philox4x32-7 (apollo.update_rounds=7: the APOLLO update's rounding offsets), Random123's kat_vectors.
TEST(Optim, PhiloxSevenRoundsKnownAnswers) {
  d::U32x4 a = d::philox<7>({0, 0, 0, 0}, 0, 0);
  EXPECT_EQ(a.x, 0x5f6fb709u);
  EXPECT_EQ(a.y, 0x0d893f64u);
  EXPECT_EQ(a.z, 0x4f121f81u);
  EXPECT_EQ(a.w, 0x4f730a48u);
  d::U32x4 b = d::philox<7>({0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, 0xffffffffu, 0xffffffffu);
  EXPECT_EQ(b.x, 0x5207ddc2u);
  EXPECT_EQ(b.y, 0x45165e59u);
  EXPECT_EQ(b.z, 0x4d8ee751u);
  EXPECT_EQ(b.w, 0x8c52f662u);
  d::U32x4 c = d::philox<7>({0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, 0xa4093822u, 0x299f31d0u);
  EXPECT_EQ(c.x, 0x4dfccabau);
  EXPECT_EQ(c.y, 0x190a87f0u);
  EXPECT_EQ(c.z, 0xc47362bau);
  EXPECT_EQ(c.w, 0xb6b5242au);
}

// apollo.update_fast_round rounds a group as (bits + offset) >> 16 when every value's exponent field is below 0xFE:
// there the stochastic rounding can neither reach Inf (and fall back to nearest) nor give a value the update
// refuses (exponent all ones). Every exponent, both signs, mantissas and offsets at and between their extremes.
TEST(Optim, StochasticRoundingBelowTwoTo127IsAddAndShift) {
  std::mt19937 rng(7);
  const uint32_t mantissas[] = {0, 1, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFF, 0x7F0000, 0x7FFF00};
  const uint16_t offsets[] = {0, 1, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF};
  for (uint32_t exponent = 0; exponent < 0xFE; ++exponent) {
    for (uint32_t sign : {0u, 0x80000000u}) {
      for (int k = 0; k < 24; ++k) {
        const uint32_t mantissa = k < 9 ? mantissas[k] : rng() & 0x7FFFFFu;
        const uint32_t u = sign | exponent << 23 | mantissa;
        for (int j = 0; j < 8; ++j) {
          const uint16_t offset = j < 6 ? offsets[j] : static_cast<uint16_t>(rng());
          const uint16_t out = livetrain::f32_to_bf16_stochastic(livetrain::bits_f32(u), offset);
          ASSERT_EQ(out, static_cast<uint16_t>((u + offset) >> 16)) << std::hex << u << " + " << offset;
          ASSERT_NE(out & 0x7F80u, 0x7F80u) << std::hex << u << " + " << offset;
        }
      }
    }
  }
  // At 0xFE the add can carry into Inf, which the full path rounds to nearest instead.
  EXPECT_NE(livetrain::f32_to_bf16_stochastic(livetrain::bits_f32(0x7F7F7FFFu), 0xFFFF), (0x7F7F7FFFu + 0xFFFFu) >> 16);
}

TEST(Optim, Bf16Rounding) {
  // 1 + 2^-8 lies exactly between two bf16 values (1 and 1 + 2^-7): nearest-even gives 1.
  float mid = 1.0f + std::ldexp(1.0f, -8);
  EXPECT_EQ(livetrain::f32_to_bf16_nearest(mid), 0x3F80);
  // Stochastic: offset 0 truncates, the largest offset carries into the next value.
  EXPECT_EQ(livetrain::f32_to_bf16_stochastic(mid, 0), 0x3F80);
  EXPECT_EQ(livetrain::f32_to_bf16_stochastic(mid, 0xFFFF), 0x3F81);
  // Exactly representable values never move.
  EXPECT_EQ(livetrain::f32_to_bf16_stochastic(1.0f, 0xFFFF), 0x3F80);
  EXPECT_EQ(livetrain::f32_to_bf16_stochastic(-2.0f, 0xFFFF), 0xC000);
  // Just above the largest bf16 (but nearer to it than to the next power of two): stochastic rounding
  // never carries it into Inf; it falls back to nearest, which stays finite.
  float big = livetrain::bits_f32(0x7F7F7FFFu);
  EXPECT_EQ(livetrain::f32_to_bf16_stochastic(big, 0xFFFF), 0x7F7F);
  // Over all offsets, the mean of the two outcomes is the input (unbiased).
  float x = 1.0f + 0.3f * std::ldexp(1.0f, -7);
  double sum = 0;
  for (uint32_t o = 0; o < 65536; ++o)
    sum += livetrain::bf16_to_f32(livetrain::f32_to_bf16_stochastic(x, static_cast<uint16_t>(o)));
  EXPECT_NEAR(sum / 65536, x, 1e-6);
}

TEST(Optim, ProjectionIsDeterministicAndRefreshes) {
  std::vector<float> a(64 * 4), b(64 * 4), c(64 * 4);
  opt::apollo_projection(a.data(), 1000, 64, 4, 7, 0, 10);
  opt::apollo_projection(b.data(), 1000, 64, 4, 7, 9, 10);
  opt::apollo_projection(c.data(), 1000, 64, 4, 7, 10, 10);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  for (float v : a) EXPECT_TRUE(std::isfinite(v));
}

// A 3×2 fp32 step over caller-owned buffers.
struct SmallStep {
  float w[6] = {1, 2, 3, 4, 5, 6}, g[6] = {1, 1, 1, 1, 1, 1}, m[3] = {}, v[3] = {}, prev = -1;
  int32_t status = 0;
  uint64_t step = 0;
  opt::ApolloStep s;
  SmallStep() {
    s.weight = w;
    s.weight_dtype = livetrain::DType::kF32;
    s.grad = g;
    s.grad_dtype = livetrain::DType::kF32;
    s.rows = 3;
    s.cols = 2;
    s.ld_weight = 2;
    s.m = m;
    s.v = v;
    s.prev_norm = &prev;
    s.status = &status;
    s.step = &step;
  }
  SmallStep(const SmallStep&) = delete;
};

TEST(Optim, RejectsBadArguments) {
  SmallStep small;
  const opt::ApolloStep& s = small.s;
  EXPECT_NO_THROW(opt::apollo_step_cpu(s));
  auto expect_error = [&](opt::ApolloStep bad, const char* what) {
    try {
      opt::apollo_step_cpu(bad);
      ADD_FAILURE() << what;
    } catch (const livetrain::Error& e) {
      EXPECT_EQ(e.code(), livetrain::ErrorCode::kInvalidArg);
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  opt::ApolloStep r = s;
  r.hyper.rank = 3;
  expect_error(r, "rank 3 exceeds the smaller dimension of [3, 2]");
  opt::ApolloStep l = s;
  l.ld_weight = 1;
  expect_error(l, "row stride 1 is smaller than its columns");
  opt::ApolloStep t = s;
  t.weight_dtype = livetrain::DType::kF16;
  expect_error(t, "weight dtype F16 is not supported");
  opt::ApolloStep n = s;
  n.m = nullptr;
  expect_error(n, "a required pointer is null");
  opt::ApolloStep b = s;
  b.hyper.beta2 = 1.0;
  expect_error(b, "betas must be in [0, 1)");
#ifdef LIVETRAIN_WITH_CUDA
  // The CUDA step's 16-byte loads of its workspace (the alignment audit of issue #15): a misaligned
  // workspace is refused before anything reaches a device, so this runs without a GPU too.
  alignas(16) static char ws[64];
  opt::ApolloStep w = s;
  w.workspace = ws + 4;
  try {
    opt::apollo_step_cuda(w, nullptr);
    ADD_FAILURE() << "misaligned workspace accepted";
  } catch (const livetrain::Error& e) {
    EXPECT_EQ(e.code(), livetrain::ErrorCode::kInvalidArg);
    EXPECT_NE(std::string(e.what()).find("workspace is not 16-byte aligned"), std::string::npos) << e.what();
  }
  try {
    opt::apollo_step_many_cuda(&w, 1, ws + 4, opt::apollo_many_workspace_bytes(&w, 1), nullptr);
    ADD_FAILURE() << "misaligned batch workspace accepted";
  } catch (const livetrain::Error& e) {
    EXPECT_NE(std::string(e.what()).find("workspace is not 16-byte aligned"), std::string::npos) << e.what();
  }
  // A shard in the batched step, whose kernels (the generic and APOLLO-Mini's) step whole tensors: refused
  // before any launch (it stepped as if whole before); a shard steps in phases.
  opt::ApolloStep sh = s;
  sh.shard.dim = 0;
  sh.shard.full = 6;
  sh.shard.segments = 1;
  sh.shard.segment[0] = {3, 3};
  try {
    opt::apollo_step_many_cuda(&sh, 1, ws, opt::apollo_many_workspace_bytes(&sh, 1), nullptr);
    ADD_FAILURE() << "a shard accepted by the batched step";
  } catch (const livetrain::Error& e) {
    EXPECT_EQ(e.code(), livetrain::ErrorCode::kInvalidArg);
    EXPECT_NE(std::string(e.what()).find("step 0 is a shard of a tensor"), std::string::npos) << e.what();
  }
#endif
}

TEST(Optim, NonFiniteGradientLeavesEverythingUntouched) {
  SmallStep small;
  auto& [w, g, m, v, prev, status, step, s] = small;
  g[2] = NAN;
  step = 4;
  opt::apollo_step_cpu(s);
  EXPECT_EQ(status, opt::kStatusNonFiniteGrad);
  EXPECT_EQ(step, 4u);
  EXPECT_EQ(prev, -1.0f);
  for (int i = 0; i < 6; ++i) EXPECT_EQ(w[i], static_cast<float>(i + 1));
  for (int i = 0; i < 3; ++i) EXPECT_EQ(m[i], 0.0f);
  g[2] = 1.0f;
  opt::apollo_step_cpu(s);
  EXPECT_EQ(status, opt::kStatusOk);
  EXPECT_EQ(step, 5u);
  EXPECT_NE(w[0], 1.0f);
}

// ---- tensor parallelism: a shard's phases, summed over ranks, make the whole tensor's step ----

namespace {

// The indices of dim's `full` indices that rank `r` of `n` holds: `pieces` blocks per rank, rank r taking
// blocks r, r + n, ... (so a rank may hold several segments), the blocks as even as the size allows.
opt::Shard make_shard(int dim, int64_t full, int r, int n, int pieces) {
  opt::Shard sh;
  sh.dim = dim;
  sh.full = full;
  const int blocks = n * pieces;
  for (int b = r; b < blocks; b += n) {
    const int64_t start = full * b / blocks, end = full * (b + 1) / blocks;
    sh.segment[sh.segments++] = {start, end - start};
  }
  return sh;
}

struct Rank {
  opt::Shard shard;
  int64_t rows = 0, cols = 0;
  std::vector<float> w, g, m, v;
  std::vector<uint16_t> wb;  // bf16 weights
  float prev = -1;
  int32_t status = 0;
  uint64_t step = 0;
  std::vector<float> ws;
  opt::ApolloStep s;
};

// This rank's part of a full row-major [rows, cols] matrix.
std::vector<float> part_of(const std::vector<float>& full, int64_t cols, const Rank& k) {
  std::vector<float> out(static_cast<size_t>(k.rows * k.cols));
  for (int64_t i = 0; i < k.rows; ++i)
    for (int64_t j = 0; j < k.cols; ++j) {
      const int64_t gi = k.shard.dim == 0 ? opt::shard_index(k.shard, i) : i;
      const int64_t gj = k.shard.dim == 1 ? opt::shard_index(k.shard, j) : j;
      out[i * k.cols + j] = full[gi * cols + gj];
    }
  return out;
}

// Runs `steps` steps of the full tensor (fused) and of its n shards (phases, sums over ranks by hand), and
// compares the weights element by element: fp32 within `tol` relative; bf16 at most one ulp apart, on at
// most `max_diff_frac` of the elements (where the fp32 values before rounding straddle a bf16 step).
void check_sharded(int64_t rows, int64_t cols, int dim, int n, int pieces, opt::ApolloHyper h, bool bf16, int steps,
                   double tol, double max_diff_frac) {
  std::mt19937 gen(static_cast<unsigned>(rows * 31 + cols * 7 + dim * 3 + n + pieces));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> W(rows * cols), G(rows * cols);
  for (auto& x : W) x = normal(gen) * 0.02f;
  auto to_bf16 = [](const std::vector<float>& x) {
    std::vector<uint16_t> o(x.size());
    for (size_t i = 0; i < x.size(); ++i) o[i] = livetrain::f32_to_bf16_nearest(x[i]);
    return o;
  };
  const livetrain::DType dt = bf16 ? livetrain::DType::kBF16 : livetrain::DType::kF32;
  // The whole tensor, one rank.
  const int64_t K = std::max(rows, cols);
  std::vector<float> w1 = W, m1(K * h.rank), v1(K * h.rank);
  std::vector<uint16_t> w1b = to_bf16(W);
  float prev1 = -1;
  int32_t status1 = 0;
  uint64_t step1 = 0;
  opt::ApolloStep one;
  one.weight = bf16 ? static_cast<void*>(w1b.data()) : w1.data();
  one.weight_dtype = dt;
  one.ld_weight = cols;
  one.grad_dtype = livetrain::DType::kF32;
  one.rows = rows;
  one.cols = cols;
  one.m = m1.data();
  one.v = v1.data();
  one.prev_norm = &prev1;
  one.status = &status1;
  one.step = &step1;
  one.seed = 99;
  one.hyper = h;
  // The n ranks.
  std::vector<Rank> ranks(n);
  for (int r = 0; r < n; ++r) {
    Rank& k = ranks[r];
    k.shard = make_shard(dim, dim == 0 ? rows : cols, r, n, pieces);
    int64_t local = 0;
    for (int i = 0; i < k.shard.segments; ++i) local += k.shard.segment[i].length;
    k.rows = dim == 0 ? local : rows;
    k.cols = dim == 1 ? local : cols;
    k.w = part_of(W, cols, k);
    k.wb = to_bf16(k.w);
    const bool tall = rows >= cols;
    const int64_t channels = tall ? k.rows : k.cols;
    k.m.assign(channels * h.rank, 0.0f);
    k.v.assign(channels * h.rank, 0.0f);
    k.s = one;
    k.s.weight = bf16 ? static_cast<void*>(k.wb.data()) : k.w.data();
    k.s.ld_weight = k.cols;
    k.s.rows = k.rows;
    k.s.cols = k.cols;
    k.s.m = k.m.data();
    k.s.v = k.v.data();
    k.s.prev_norm = &k.prev;
    k.s.status = &k.status;
    k.s.step = &k.step;
    k.s.shard = k.shard;
    k.ws.assign(opt::apollo_phase_workspace_bytes(k.s) / sizeof(float) + 1, 0.0f);
    k.s.workspace = k.ws.data();
  }
  for (int t = 0; t < steps; ++t) {
    for (auto& x : G) x = normal(gen);
    one.grad = G.data();
    opt::apollo_step_cpu(one);
    ASSERT_EQ(status1, opt::kStatusOk);
    std::vector<std::vector<float>> gparts(n);
    for (int r = 0; r < n; ++r) {
      gparts[r] = part_of(G, cols, ranks[r]);
      ranks[r].s.grad = gparts[r].data();
    }
    const opt::ApolloReduce red = opt::apollo_reduce_layout(ranks[0].s);
    auto sum_over_ranks = [&](size_t offset, size_t count) {
      for (size_t i = 0; i < count; ++i) {
        float total = 0.0f;
        for (auto& k : ranks) total += k.ws[offset + i];
        for (auto& k : ranks) k.ws[offset + i] = total;
      }
    };
    for (auto& k : ranks) opt::apollo_phase_cpu(k.s, opt::ApolloPhase::kProject);
    sum_over_ranks(red.first_offset, red.first_count);
    for (auto& k : ranks) opt::apollo_phase_cpu(k.s, opt::ApolloPhase::kMoments);
    sum_over_ranks(red.second_offset, red.second_count);
    for (auto& k : ranks) {
      opt::apollo_phase_cpu(k.s, opt::ApolloPhase::kUpdate);
      ASSERT_EQ(k.status, opt::kStatusOk);
      ASSERT_EQ(k.step, step1);
    }
  }
  // Compare every element of every rank's part with the whole step's.
  int64_t differing = 0, total = 0;
  for (const Rank& k : ranks) {
    for (int64_t i = 0; i < k.rows; ++i)
      for (int64_t j = 0; j < k.cols; ++j) {
        const int64_t gi = dim == 0 ? opt::shard_index(k.shard, i) : i;
        const int64_t gj = dim == 1 ? opt::shard_index(k.shard, j) : j;
        ++total;
        if (bf16) {
          const uint16_t a = k.wb[i * k.cols + j], b = w1b[gi * cols + gj];
          if (a != b) {
            ++differing;
            ASSERT_LE(std::abs(static_cast<int>(a) - static_cast<int>(b)), 1) << "element " << gi << "," << gj;
          }
        } else {
          const float a = k.w[i * k.cols + j], b = w1[gi * cols + gj];
          ASSERT_NEAR(a, b, tol * (std::abs(b) + 1e-3)) << "element " << gi << "," << gj;
        }
      }
  }
  EXPECT_LE(static_cast<double>(differing) / total, max_diff_frac) << differing << " of " << total << " differ";
}

}  // namespace

TEST(Optim, ShardedStepMatchesTheWholeStepFp32) {
  opt::ApolloHyper mini = opt::apollo_mini_defaults();
  mini.lr = 1e-3f;
  opt::ApolloHyper channel;
  channel.rank = 4;
  channel.lr = 1e-3f;
  channel.max_grad_norm = 5.0f;  // clipping needs ‖G‖² of the whole tensor
  for (const opt::ApolloHyper& h : {mini, channel}) {
    // tall and wide, sharded along channels and along the projected dimension, 2-4 ranks, 1-2 segments each
    check_sharded(96, 40, 0, 2, 1, h, false, 3, 2e-5, 0.0);
    check_sharded(96, 40, 1, 4, 1, h, false, 3, 2e-5, 0.0);
    check_sharded(40, 96, 0, 2, 2, h, false, 3, 2e-5, 0.0);
    check_sharded(40, 96, 1, 3, 2, h, false, 3, 2e-5, 0.0);
  }
}

TEST(Optim, ShardedStepMatchesTheWholeStepBf16) {
  // Rounding offsets are the whole step's, element by element: weights differ only where the fp32 value
  // before rounding differs enough (sums over ranks round differently) to cross a bf16 boundary.
  opt::ApolloHyper mini = opt::apollo_mini_defaults();
  mini.lr = 1e-3f;
  check_sharded(96, 40, 0, 2, 1, mini, true, 3, 0.0, 0.01);
  check_sharded(40, 100, 1, 4, 1, mini, true, 3, 0.0, 0.01);  // column shards starting off a multiple of 8
  check_sharded(40, 96, 0, 2, 2, mini, true, 3, 0.0, 0.01);
}

TEST(Optim, ShardsAreCheckedAgainstTheirPart) {
  SmallStep small;
  opt::ApolloStep s = small.s;
  s.shard.dim = 0;
  s.shard.full = 6;
  s.shard.segments = 1;
  s.shard.segment[0] = {4, 3};  // past the end of the full dim
  std::vector<float> ws(opt::apollo_phase_workspace_bytes(s) / sizeof(float) + 1);
  s.workspace = ws.data();
  EXPECT_THROW(opt::apollo_phase_cpu(s, opt::ApolloPhase::kProject), livetrain::Error);
  s.shard.segment[0] = {0, 2};  // two indices for a part of three rows
  EXPECT_THROW(opt::apollo_phase_cpu(s, opt::ApolloPhase::kProject), livetrain::Error);
  s.shard.segment[0] = {3, 3};
  EXPECT_NO_THROW(opt::apollo_phase_cpu(s, opt::ApolloPhase::kProject));
  EXPECT_THROW(opt::apollo_step_cpu(s), livetrain::Error);  // a shard steps in phases only
}
