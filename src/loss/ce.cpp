// The CPU reference of include/livetrain/loss.hpp: rows in parallel, double accumulators; and the
// argument checks both implementations share.
#include <cmath>
#include <limits>
#include <string>

#include "common/bf16.hpp"
#include "livetrain/error.hpp"
#include "livetrain/loss.hpp"
#include "livetrain/parallel.hpp"

namespace livetrain::loss {

void validate(const Logits& x) {
  if (x.dtype != DType::kBF16 && x.dtype != DType::kF32)
    throw Error(ErrorCode::kInvalidArg, "loss: logits must be BF16 or F32, not " + std::string(dtype_name(x.dtype)));
  if (x.rows < 0 || x.cols < 0)
    throw Error(ErrorCode::kInvalidArg,
                "loss: negative size [" + std::to_string(x.rows) + ", " + std::to_string(x.cols) + "]");
  if (x.rows > 0 && x.ld < x.cols)
    throw Error(ErrorCode::kInvalidArg, "loss: row stride " + std::to_string(x.ld) + " is smaller than the row (" +
                                            std::to_string(x.cols) + ")");
  if (x.rows > 0 && x.cols > 0 && !x.data) throw Error(ErrorCode::kInvalidArg, "loss: logits pointer is null");
}

namespace {

double load(const Logits& x, int64_t i, int64_t j) {
  const int64_t k = i * x.ld + j;
  return x.dtype == DType::kBF16 ? bf16_to_f32(static_cast<const uint16_t*>(x.data)[k])
                                 : static_cast<const float*>(x.data)[k];
}

// log(exp(a) + exp(b)), −Inf for both −Inf, NaN if either is NaN or +Inf (see the header).
double logaddexp(double a, double b) {
  if (std::isnan(a) || std::isnan(b) || a == INFINITY || b == INFINITY) return NAN;
  if (a == -INFINITY) return b;
  if (b == -INFINITY) return a;
  const double m = a > b ? a : b;
  return m + std::log1p(std::exp(-std::fabs(a - b)));
}

}  // namespace

void logsumexp_rows_cpu(const Logits& x, float* lse) {
  validate(x);
  if (x.rows > 0 && !lse) throw Error(ErrorCode::kInvalidArg, "loss: lse pointer is null");
  parallel_for(x.rows, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      double m = -INFINITY;
      bool bad = false;
      for (int64_t j = 0; j < x.cols; ++j) {
        const double v = load(x, i, j);
        if (std::isnan(v) || v == INFINITY) bad = true;
        else if (v > m) m = v;
      }
      double block = -INFINITY;
      if (bad) {
        block = NAN;
      } else if (m != -INFINITY) {
        double s = 0.0;
        for (int64_t j = 0; j < x.cols; ++j) s += std::exp(load(x, i, j) - m);
        block = m + std::log(s);
      }
      lse[i] = static_cast<float>(logaddexp(lse[i], block));
    }
  });
}

void softmax_grad_rows_cpu(const Logits& x, const float* lse, const int64_t* target, int64_t col0, const float* scale) {
  validate(x);
  if (x.rows > 0 && (!lse || !target || !scale))
    throw Error(ErrorCode::kInvalidArg, "loss: lse, target or scale pointer is null");
  parallel_for(x.rows, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t t = target[i] - col0;
      for (int64_t j = 0; j < x.cols; ++j) {
        const double g = (std::exp(load(x, i, j) - static_cast<double>(lse[i])) - (j == t ? 1.0 : 0.0)) * scale[i];
        const int64_t k = i * x.ld + j;
        if (x.dtype == DType::kBF16) static_cast<uint16_t*>(x.data)[k] = f32_to_bf16_nearest(static_cast<float>(g));
        else static_cast<float*>(x.data)[k] = static_cast<float>(g);
      }
    }
  });
}

#ifndef LIVETRAIN_WITH_CUDA
void logsumexp_rows_cuda(const Logits&, float*, void*) {
  throw Error(ErrorCode::kUnsupported, "loss on CUDA: this build of livetrain has no CUDA code");
}
void softmax_grad_rows_cuda(const Logits&, const float*, const int64_t*, int64_t, const float*, void*) {
  throw Error(ErrorCode::kUnsupported, "loss on CUDA: this build of livetrain has no CUDA code");
}
#endif

}  // namespace livetrain::loss
