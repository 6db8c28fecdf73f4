// APOLLO / APOLLO-Mini step on the CPU: the reference implementation of src/optim/apollo.cu, multithreaded.
// Stages (docs/optim.md, steps 1–7 of the paper's Algorithm 1): project G onto P, update the low-rank
// moments, scaling factor per channel or tensor, norm-growth limiter, in-place update of W with stochastic
// rounding.
#include <atomic>
#include <cmath>
#include <vector>

#include "livetrain/error.hpp"
#include "livetrain/parallel.hpp"
#include "optim/common.hpp"

namespace livetrain::optim {

using namespace detail;

namespace {

float load(const void* p, DType dt, int64_t idx) {
  if (dt == DType::kBF16) return bf16_to_f32(static_cast<const uint16_t*>(p)[idx]);
  return static_cast<const float*>(p)[idx];
}

}  // namespace

void apollo_projection(float* out, int64_t rows, int64_t cols, int32_t rank, uint64_t seed, uint64_t step,
                       int32_t update_proj_gap) {
  const int64_t k = rows >= cols ? cols : rows;
  const int64_t n = k * rank;
  const uint64_t key = projection_key(seed, step, update_proj_gap);
  const float inv = 1.0f / std::sqrt(static_cast<float>(rank));
  parallel_for(n, 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) out[i] = projection_entry(key, static_cast<uint64_t>(i), inv);
  });
}

void apollo_step_cpu(const ApolloStep& s) {
  validate(s);
  const ApolloHyper& h = s.hyper;
  const bool tall = s.rows >= s.cols;
  const int64_t K = tall ? s.rows : s.cols;  // channels
  const int64_t k = tall ? s.cols : s.rows;  // the projected dimension
  const int r = h.rank;

  // P: [r, cols] when tall, [rows, r] when wide (see apollo_projection).
  std::vector<float> P(static_cast<size_t>(k) * r);
  const uint64_t t = *s.step;
  apollo_projection(P.data(), s.rows, s.cols, r, s.seed, t, h.update_proj_gap);

  // R: [K, r] channel-major, and ‖G_channel‖².
  std::vector<float> R(static_cast<size_t>(K) * r, 0.0f), sumsq(K, 0.0f);
  std::vector<double> Rd, sumsqd;  // wide case accumulators
  if (tall) {
    parallel_for(K, 16, [&](int64_t b, int64_t e) {
      std::vector<float> g(k);
      for (int64_t i = b; i < e; ++i) {
        double sq = 0.0;  // double accumulators: this is the reference the CUDA sums are checked against
        for (int64_t j = 0; j < k; ++j) {
          g[j] = load(s.grad, s.grad_dtype, i * s.cols + j);
          sq += static_cast<double>(g[j]) * g[j];
        }
        sumsq[i] = static_cast<float>(sq);
        for (int q = 0; q < r; ++q) {
          const float* p = &P[static_cast<size_t>(q) * k];
          double acc = 0.0;
          for (int64_t j = 0; j < k; ++j) acc += static_cast<double>(g[j]) * p[j];
          R[static_cast<size_t>(i) * r + q] = static_cast<float>(acc);
        }
      }
    });
  } else {
    Rd.assign(static_cast<size_t>(K) * r, 0.0);
    sumsqd.assign(K, 0.0);
    parallel_for(K, 64, [&](int64_t b, int64_t e) {  // columns [b, e)
      for (int64_t i = 0; i < s.rows; ++i) {
        const float* p = &P[static_cast<size_t>(i) * r];
        for (int64_t j = b; j < e; ++j) {
          double g = load(s.grad, s.grad_dtype, i * s.cols + j);
          sumsqd[j] += g * g;
          double* out = &Rd[static_cast<size_t>(j) * r];
          for (int q = 0; q < r; ++q) out[q] += p[q] * g;
        }
      }
      for (int64_t j = b; j < e; ++j) {
        sumsq[j] = static_cast<float>(sumsqd[j]);
        for (int q = 0; q < r; ++q) R[static_cast<size_t>(j) * r + q] = static_cast<float>(Rd[static_cast<size_t>(j) * r + q]);
      }
    });
  }

  double total_d = 0.0;
  for (int64_t i = 0; i < K; ++i) total_d += sumsq[i];
  const float total = static_cast<float>(total_d);
  if (!finite(total)) {
    *s.status = kStatusNonFiniteGrad;
    return;
  }
  const float clip = clip_factor(h.max_grad_norm, total);

  // Moments, R̃ = M / (√V + ε), and the per-channel norms of R̃ and of the (clipped) R.
  std::vector<float> a2(K), b2(K);
  const float beta1 = static_cast<float>(h.beta1), beta2 = static_cast<float>(h.beta2);
  const float omb1 = static_cast<float>(1.0 - h.beta1), omb2 = static_cast<float>(1.0 - h.beta2);
  parallel_for(K, 256, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      double na = 0.0, nb = 0.0;
      for (int q = 0; q < r; ++q) {
        size_t idx = static_cast<size_t>(i) * r + q;
        float x = R[idx] * clip;
        float m = beta1 * s.m[idx] + omb1 * x;
        float v = beta2 * s.v[idx] + omb2 * x * x;
        s.m[idx] = m;
        s.v[idx] = v;
        float rt = m / (std::sqrt(v) + h.eps);
        na += static_cast<double>(rt) * rt;
        nb += static_cast<double>(x) * x;
      }
      a2[i] = static_cast<float>(na);
      b2[i] = static_cast<float>(nb);
    }
  });

  std::vector<float> scale(K);
  double norm_u2 = 0.0;
  if (h.scaling == Scaling::kChannel) {
    for (int64_t i = 0; i < K; ++i) {
      scale[i] = std::sqrt(a2[i]) / (std::sqrt(b2[i]) + 1e-8f);
      norm_u2 += static_cast<double>(scale[i]) * scale[i] * clip * clip * sumsq[i];
    }
  } else {
    double A = 0.0, B = 0.0;
    for (int64_t i = 0; i < K; ++i) {
      A += a2[i];
      B += b2[i];
    }
    float ts = std::sqrt(static_cast<float>(A)) / (std::sqrt(static_cast<float>(B)) + 1e-8f);
    for (int64_t i = 0; i < K; ++i) scale[i] = ts;
    norm_u2 = static_cast<double>(ts) * ts * clip * clip * total;
  }

  Tail tail = apollo_tail(h, t, clip, static_cast<float>(std::sqrt(norm_u2)), *s.prev_norm);
  if (tail.status != kStatusOk) {
    *s.status = tail.status;
    return;
  }

  const float decay = h.lr * h.weight_decay;  // W ← u − (lr·wd)·u: rounding 1 − lr·wd would drift
  const int64_t groups_per_row = (s.cols + 7) / 8;
  std::atomic<int> bad{0};
  parallel_for(s.rows, 8, [&](int64_t b, int64_t e) {
    bool any_bad = false;
    for (int64_t i = b; i < e; ++i) {
      for (int64_t g = 0; g < groups_per_row; ++g) {
        U32x4 bits = rounding_bits(s.seed, t, static_cast<uint64_t>(i * groups_per_row + g));
        for (int lane = 0; lane < 8 && g * 8 + lane < s.cols; ++lane) {
          int64_t j = g * 8 + lane;
          float coef = tail.step_size * tail.multiplier * scale[tall ? i : j];
          float gval = load(s.grad, s.grad_dtype, i * s.cols + j);
          int64_t widx = i * s.ld_weight + j;
          float w = load(s.weight, s.weight_dtype, widx);
          float u = w - coef * gval;
          float nw = u - decay * u;
          if (!finite(nw)) {
            any_bad = true;
            continue;  // keep the old value: nothing non-finite is ever written
          }
          if (s.weight_dtype == DType::kBF16) {
            uint16_t out = h.rounding == Rounding::kStochastic ? f32_to_bf16_stochastic(nw, rounding_offset(bits, lane))
                                                               : f32_to_bf16_nearest(nw);
            if ((out & 0x7F80u) == 0x7F80u) {  // beyond bf16's range
              any_bad = true;
              continue;
            }
            static_cast<uint16_t*>(s.weight)[widx] = out;
          } else {
            static_cast<float*>(s.weight)[widx] = nw;
          }
        }
      }
    }
    if (any_bad) bad.store(1);
  });
  *s.prev_norm = tail.new_prev;
  *s.step = t + 1;
  *s.status = bad.load() ? kStatusNonFiniteUpdate : kStatusOk;
}

}  // namespace livetrain::optim
