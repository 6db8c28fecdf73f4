// The loss's row-wise passes (include/livetrain/loss.hpp): the CPU reference against a direct evaluation
// of the formulas in long double on odd sizes, strided rows, blocks folded one after another, non-finite
// logits and bad arguments; the CUDA kernels against the CPU reference (skipped without a GPU).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <random>
#include <vector>

#include "common/bf16.hpp"
#include "livetrain/cuda.hpp"
#include "livetrain/error.hpp"
#include "livetrain/loss.hpp"

#ifdef LIVETRAIN_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace loss = livetrain::loss;
using livetrain::bf16_to_f32;
using livetrain::DType;
using livetrain::f32_to_bf16_nearest;

namespace {

// A [rows, cols] block with row stride ld, in bf16 or fp32 storage; values of logit size (σ = 4).
struct Block {
  DType dtype;
  int64_t rows, cols, ld;
  std::vector<uint8_t> bytes;
  size_t esize() const { return dtype == DType::kBF16 ? 2 : 4; }
  float get(int64_t i, int64_t j) const {
    const size_t k = static_cast<size_t>(i * ld + j);
    if (dtype == DType::kBF16) {
      uint16_t v;
      std::memcpy(&v, &bytes[k * 2], 2);
      return bf16_to_f32(v);
    }
    float v;
    std::memcpy(&v, &bytes[k * 4], 4);
    return v;
  }
  void set(int64_t i, int64_t j, float v) {
    const size_t k = static_cast<size_t>(i * ld + j);
    if (dtype == DType::kBF16) {
      uint16_t b = f32_to_bf16_nearest(v);
      std::memcpy(&bytes[k * 2], &b, 2);
    } else {
      std::memcpy(&bytes[k * 4], &v, 4);
    }
  }
  loss::Logits view() { return {bytes.data(), dtype, rows, cols, ld}; }
};

Block make(DType dt, int64_t rows, int64_t cols, int64_t pad, uint32_t seed) {
  Block b{dt, rows, cols, cols + pad, {}};
  b.bytes.assign(static_cast<size_t>(rows * b.ld) * b.esize() + 16, 0xAB);
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.0f, 4.0f);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) b.set(i, j, n(rng));
  return b;
}

long double direct_lse(const Block& b, int64_t i, int64_t j0, int64_t j1) {
  long double s = 0;
  for (int64_t j = j0; j < j1; ++j) s += std::exp(static_cast<long double>(b.get(i, j)));
  return std::log(s);
}

struct Shape {
  int64_t rows, cols, pad;
};
const Shape kShapes[] = {{1, 1, 0}, {3, 7, 0}, {5, 33, 3}, {2, 1000, 0}, {7, 4099, 5}, {4, 8193, 0}};

}  // namespace

TEST(LossCpu, LogSumExpMatchesDirectAndFoldsBlocks) {
  for (DType dt : {DType::kBF16, DType::kF32}) {
    for (const Shape& s : kShapes) {
      Block b = make(dt, s.rows, s.cols, s.pad, 1);
      std::vector<float> whole(s.rows, -INFINITY), folded(s.rows, -INFINITY);
      loss::logsumexp_rows_cpu(b.view(), whole.data());
      // the same columns in two blocks (the second one a view at an offset)
      const int64_t half = s.cols / 2;
      loss::Logits first = b.view(), second = b.view();
      first.cols = half;
      second.cols = s.cols - half;
      second.data = b.bytes.data() + half * b.esize();
      loss::logsumexp_rows_cpu(first, folded.data());
      loss::logsumexp_rows_cpu(second, folded.data());
      for (int64_t i = 0; i < s.rows; ++i) {
        const double want = static_cast<double>(direct_lse(b, i, 0, s.cols));
        EXPECT_NEAR(whole[i], want, 2e-6 * std::fabs(want) + 1e-6) << s.rows << "x" << s.cols << " row " << i;
        EXPECT_NEAR(folded[i], want, 4e-6 * std::fabs(want) + 1e-6) << s.rows << "x" << s.cols << " row " << i;
      }
    }
  }
}

TEST(LossCpu, SoftmaxGradMatchesDirectAndLeavesPaddingAlone) {
  for (DType dt : {DType::kBF16, DType::kF32}) {
    for (const Shape& s : kShapes) {
      Block b = make(dt, s.rows, s.cols, s.pad, 2);
      const Block before = b;
      std::vector<float> lse(s.rows, -INFINITY), scale(s.rows);
      std::vector<int64_t> target(s.rows);
      loss::logsumexp_rows_cpu(b.view(), lse.data());
      const int64_t col0 = 100;  // the block is columns [100, 100 + cols) of a vocabulary
      for (int64_t i = 0; i < s.rows; ++i) {
        scale[i] = 0.25f * static_cast<float>(i + 1);
        target[i] = i % 3 == 2 ? 5 : col0 + (i * 7919) % s.cols;  // every third row's target is in another block
      }
      loss::softmax_grad_rows_cpu(b.view(), lse.data(), target.data(), col0, scale.data());
      for (int64_t i = 0; i < s.rows; ++i) {
        for (int64_t j = 0; j < s.cols; ++j) {
          const long double p = std::exp(static_cast<long double>(before.get(i, j)) - static_cast<long double>(lse[i]));
          const float want = static_cast<float>((p - (target[i] == col0 + j ? 1 : 0)) * scale[i]);
          const float tol = dt == DType::kBF16 ? std::fabs(want) / 128 + 1e-30f : std::fabs(want) * 1e-6f + 1e-12f;
          ASSERT_NEAR(b.get(i, j), want, tol) << s.rows << "x" << s.cols << " at " << i << "," << j;
        }
        for (int64_t j = s.cols; j < b.ld; ++j)  // the row's padding is not touched
          ASSERT_EQ(
              std::memcmp(&b.bytes[(i * b.ld + j) * b.esize()], &before.bytes[(i * b.ld + j) * b.esize()], b.esize()),
              0);
      }
    }
  }
}

TEST(LossCpu, NonFiniteLogits) {
  Block b = make(DType::kF32, 4, 9, 0, 3);
  b.set(0, 4, NAN);
  b.set(1, 8, INFINITY);
  for (int64_t j = 0; j < 9; ++j) b.set(2, j, -INFINITY);  // row 2: all −Inf
  b.set(3, 1, -INFINITY);                                  // row 3: one −Inf
  std::vector<float> lse(4, -INFINITY);
  loss::logsumexp_rows_cpu(b.view(), lse.data());
  EXPECT_TRUE(std::isnan(lse[0]));
  EXPECT_TRUE(std::isnan(lse[1]));
  EXPECT_EQ(lse[2], -INFINITY);
  long double s = 0;
  for (int64_t j = 0; j < 9; ++j)
    if (j != 1) s += std::exp(static_cast<long double>(b.get(3, j)));
  EXPECT_NEAR(lse[3], static_cast<double>(std::log(s)), 1e-5);
  // a NaN running value stays NaN whatever comes next
  Block ok = make(DType::kF32, 1, 5, 0, 4);
  std::vector<float> nan_lse = {NAN};
  loss::logsumexp_rows_cpu(ok.view(), nan_lse.data());
  EXPECT_TRUE(std::isnan(nan_lse[0]));
  // gradients of the NaN rows are NaN: the optimizer refuses them
  std::vector<float> scale(4, 1.0f);
  std::vector<int64_t> target = {0, 0, 0, 0};
  loss::softmax_grad_rows_cpu(b.view(), lse.data(), target.data(), 0, scale.data());
  EXPECT_TRUE(std::isnan(b.get(0, 0)));
  EXPECT_TRUE(std::isnan(b.get(1, 0)));
  EXPECT_EQ(b.get(3, 1), 0.0f);  // exp(−Inf − lse) = 0
}

TEST(LossCpu, RejectsBadArguments) {
  Block b = make(DType::kF32, 2, 4, 0, 5);
  std::vector<float> lse(2, -INFINITY);
  auto code = [&](loss::Logits x) -> std::optional<livetrain::ErrorCode> {
    try {
      loss::logsumexp_rows_cpu(x, lse.data());
    } catch (const livetrain::Error& e) {
      return e.code();
    }
    return std::nullopt;
  };
  loss::Logits x = b.view();
  x.dtype = DType::kF16;
  EXPECT_EQ(code(x), livetrain::ErrorCode::kInvalidArg);
  x = b.view();
  x.ld = 3;
  EXPECT_EQ(code(x), livetrain::ErrorCode::kInvalidArg);
  x = b.view();
  x.data = nullptr;
  EXPECT_EQ(code(x), livetrain::ErrorCode::kInvalidArg);
  x = b.view();
  x.rows = 0;  // nothing to do: fine without pointers
  x.data = nullptr;
  EXPECT_EQ(code(x), std::nullopt);
}

#ifdef LIVETRAIN_WITH_CUDA
namespace {

struct Dev {
  void* p = nullptr;
  explicit Dev(size_t n) { EXPECT_EQ(cudaMalloc(&p, n), cudaSuccess); }
  ~Dev() { cudaFree(p); }
};

}  // namespace

// Same block through both implementations (unaligned rows and tails included): log-sum-exps within a few
// fp32 ulps, gradients within one bf16 ulp (or a few fp32 ulps) plus the cancellation of p − 1.
TEST(LossCuda, MatchesCpu) {
  if (livetrain::cuda::devices().empty()) GTEST_SKIP() << "no GPU visible";
  for (DType dt : {DType::kBF16, DType::kF32}) {
    for (const Shape& s : kShapes) {
      Block cpu = make(dt, s.rows, s.cols, s.pad, 6);
      cpu.set(0, 0, 30.0f);  // a large logit
      const size_t bytes = cpu.bytes.size();
      Dev x(bytes), lse(s.rows * 4), target(s.rows * 8), scale(s.rows * 4);
      ASSERT_EQ(cudaMemcpy(x.p, cpu.bytes.data(), bytes, cudaMemcpyHostToDevice), cudaSuccess);
      std::vector<float> l_cpu(s.rows, -INFINITY), l_gpu(s.rows), sc(s.rows);
      std::vector<int64_t> t(s.rows);
      for (int64_t i = 0; i < s.rows; ++i) {
        sc[i] = 1.0f / static_cast<float>(i + 1);
        t[i] = (i * 31) % (s.cols + 2);  // some outside the block
      }
      ASSERT_EQ(cudaMemcpy(lse.p, l_cpu.data(), s.rows * 4, cudaMemcpyHostToDevice), cudaSuccess);
      ASSERT_EQ(cudaMemcpy(target.p, t.data(), s.rows * 8, cudaMemcpyHostToDevice), cudaSuccess);
      ASSERT_EQ(cudaMemcpy(scale.p, sc.data(), s.rows * 4, cudaMemcpyHostToDevice), cudaSuccess);
      loss::Logits gx{x.p, dt, s.rows, s.cols, cpu.ld};
      loss::logsumexp_rows_cpu(cpu.view(), l_cpu.data());
      loss::logsumexp_rows_cuda(gx, static_cast<float*>(lse.p), nullptr);
      ASSERT_EQ(cudaMemcpy(l_gpu.data(), lse.p, s.rows * 4, cudaMemcpyDeviceToHost), cudaSuccess);
      for (int64_t i = 0; i < s.rows; ++i) EXPECT_NEAR(l_gpu[i], l_cpu[i], 4e-6 * std::fabs(l_cpu[i]) + 1e-6) << i;
      // the gradient pass on both, from the CPU's log-sum-exps
      ASSERT_EQ(cudaMemcpy(lse.p, l_cpu.data(), s.rows * 4, cudaMemcpyHostToDevice), cudaSuccess);
      loss::softmax_grad_rows_cpu(cpu.view(), l_cpu.data(), t.data(), 0, sc.data());
      loss::softmax_grad_rows_cuda(gx, static_cast<float*>(lse.p), static_cast<int64_t*>(target.p), 0,
                                   static_cast<float*>(scale.p), nullptr);
      Block gpu = cpu;
      ASSERT_EQ(cudaMemcpy(gpu.bytes.data(), x.p, bytes, cudaMemcpyDeviceToHost), cudaSuccess);
      for (int64_t i = 0; i < s.rows; ++i) {
        for (int64_t j = 0; j < s.cols; ++j) {
          // where p ≈ 1 (the large logit), p − 1 cancels: the fp32 kernel's p is a few ulps of 1 off the
          // double reference's, so allow that much times the scale besides the relative error
          const float want = cpu.get(i, j), got = gpu.get(i, j);
          const float cancel = 1e-6f * sc[i];
          const float tol = dt == DType::kBF16 ? std::fabs(want) / 128 + cancel : std::fabs(want) * 4e-6f + cancel;
          ASSERT_NEAR(got, want, tol) << s.rows << "x" << s.cols << " at " << i << "," << j;
        }
        for (int64_t j = s.cols; j < cpu.ld; ++j)
          ASSERT_EQ(std::memcmp(&gpu.bytes[(i * cpu.ld + j) * cpu.esize()], &cpu.bytes[(i * cpu.ld + j) * cpu.esize()],
                                cpu.esize()),
                    0);
      }
    }
  }
}

TEST(LossCuda, NonFiniteRowsGiveNaN) {
  if (livetrain::cuda::devices().empty()) GTEST_SKIP() << "no GPU visible";
  Block b = make(DType::kBF16, 3, 300, 0, 7);
  b.set(0, 100, NAN);
  b.set(1, 299, INFINITY);
  for (int64_t j = 0; j < 300; ++j) b.set(2, j, -INFINITY);
  Dev x(b.bytes.size()), lse(12);
  ASSERT_EQ(cudaMemcpy(x.p, b.bytes.data(), b.bytes.size(), cudaMemcpyHostToDevice), cudaSuccess);
  std::vector<float> l(3, -INFINITY);
  ASSERT_EQ(cudaMemcpy(lse.p, l.data(), 12, cudaMemcpyHostToDevice), cudaSuccess);
  loss::logsumexp_rows_cuda({x.p, DType::kBF16, 3, 300, 300}, static_cast<float*>(lse.p), nullptr);
  ASSERT_EQ(cudaMemcpy(l.data(), lse.p, 12, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_TRUE(std::isnan(l[0]));
  EXPECT_TRUE(std::isnan(l[1]));
  EXPECT_EQ(l[2], -INFINITY);
}
#endif
