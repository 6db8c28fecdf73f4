// Optimizer building blocks on the CPU: Philox known answers, bf16 rounding, projection statistics,
// argument checks, and the non-finite guard of the C++ step functions themselves.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "livetrain/error.hpp"
#include "livetrain/optim.hpp"
#include "common/bf16.hpp"
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
  for (uint32_t o = 0; o < 65536; ++o) sum += livetrain::bf16_to_f32(livetrain::f32_to_bf16_stochastic(x, static_cast<uint16_t>(o)));
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
