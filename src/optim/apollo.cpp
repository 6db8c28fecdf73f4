// APOLLO / APOLLO-Mini step on the CPU: the reference implementation of src/optim/apollo.cu, multithreaded.
// Stages (docs/optim.md, steps 1–7 of the paper's Algorithm 1): project G onto P, update the low-rank
// moments, scaling factor per channel or tensor, norm-growth limiter, in-place update of W with stochastic
// rounding. The stages are the phases of a tensor-parallel step (optim.hpp: ApolloPhase); apollo_step_cpu
// runs them in a row on one rank's whole tensor, with nothing to sum over ranks.
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "livetrain/error.hpp"
#include "livetrain/parallel.hpp"
#include "livetrain/tuning.hpp"
#include "optim/common.hpp"
#include "optim/workspace.hpp"

namespace livetrain::optim {

using namespace detail;

namespace {

float load(const void* p, DType dt, int64_t idx) {
  if (dt == DType::kBF16) return bf16_to_f32(static_cast<const uint16_t*>(p)[idx]);
  return static_cast<const float*>(p)[idx];
}

// The workspace as the CPU phases use it: P, R [K, rank] and ‖G_c‖² [K] (or, when the rank holds part of
// the projected dimension, their partial sums in the first round's region), the scaling factors, the
// step's scalars and the second round's sums.
struct Parts {
  ApolloGeometry g;
  float* P;
  float* R;
  float* sumsq;
  float* scale;
  float* scalars;
  float* first;
  float* second;
};

Parts parts_of(const ApolloStep& s) {
  Parts p{};
  p.g = apollo_geometry(s.rows, s.cols, s.shard);
  ApolloWorkspace ws(s.rows, s.cols, s.hyper.rank, p.g.tall, true);
  char* base = static_cast<char*>(s.workspace);
  p.P = reinterpret_cast<float*>(base + ws.off_p);
  p.scale = reinterpret_cast<float*>(base + ws.off_scale);
  p.scalars = reinterpret_cast<float*>(base + ws.off_scalars);
  p.first = reinterpret_cast<float*>(base + ws.off_first);
  p.second = reinterpret_cast<float*>(base + ws.off_second);
  if (p.g.sharded_projected) {  // R and ‖G_c‖² are sums over ranks: the first round's buffer holds them
    p.R = p.first;
    p.sumsq = p.first + p.g.K * s.hyper.rank;
  } else {
    p.R = reinterpret_cast<float*>(base + ws.off_r);
    p.sumsq = reinterpret_cast<float*>(base + ws.off_sumsq);
  }
  return p;
}

// Stage 1: P (this rank's slice), R and ‖G_c‖²; the first round's partial sums.
void project(const ApolloStep& s, const Parts& p) {
  const ApolloGeometry& g = p.g;
  const int r = s.hyper.rank;
  const int64_t K = g.K, k = g.k;
  if (g.sharded_projected && !s.shard.primary) {  // another rank holding the same block contributes
    std::memset(p.R, 0, sizeof(float) * static_cast<size_t>(K * r + K));
    return;
  }
  const uint64_t key = projection_key(s.seed, *s.step, s.hyper.update_proj_gap);
  const float inv = 1.0f / std::sqrt(static_cast<float>(r));
  parallel_for(k * r, 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) p.P[i] = projection_entry(key, projection_index(g, s.shard, r, i), inv);
  });
  float* R = p.R;
  float* sumsq = p.sumsq;
  if (g.tall) {
    parallel_for(K, 16, [&](int64_t b, int64_t e) {
      std::vector<float> gv(k);
      for (int64_t i = b; i < e; ++i) {
        double sq = 0.0;  // double accumulators: this is the reference the CUDA sums are checked against
        for (int64_t j = 0; j < k; ++j) {
          gv[j] = load(s.grad, s.grad_dtype, i * s.cols + j);
          sq += static_cast<double>(gv[j]) * gv[j];
        }
        sumsq[i] = static_cast<float>(sq);
        for (int q = 0; q < r; ++q) {
          const float* pq = &p.P[static_cast<size_t>(q) * k];
          double acc = 0.0;
          for (int64_t j = 0; j < k; ++j) acc += static_cast<double>(gv[j]) * pq[j];
          R[static_cast<size_t>(i) * r + q] = static_cast<float>(acc);
        }
      }
    });
  } else {
    std::vector<double> Rd(static_cast<size_t>(K) * r, 0.0), sumsqd(K, 0.0);
    parallel_for(K, 64, [&](int64_t b, int64_t e) {  // columns [b, e)
      for (int64_t i = 0; i < s.rows; ++i) {
        const float* pi = &p.P[static_cast<size_t>(i) * r];
        for (int64_t j = b; j < e; ++j) {
          double gij = load(s.grad, s.grad_dtype, i * s.cols + j);
          sumsqd[j] += gij * gij;
          double* out = &Rd[static_cast<size_t>(j) * r];
          for (int q = 0; q < r; ++q) out[q] += pi[q] * gij;
        }
      }
      for (int64_t j = b; j < e; ++j) {
        sumsq[j] = static_cast<float>(sumsqd[j]);
        for (int q = 0; q < r; ++q)
          R[static_cast<size_t>(j) * r + q] = static_cast<float>(Rd[static_cast<size_t>(j) * r + q]);
      }
    });
  }
  if (g.sharded_projected) return;  // ‖G‖² follows from the summed ‖G_c‖²
  double total = 0.0;
  for (int64_t i = 0; i < K; ++i) total += sumsq[i];
  if (g.sharded_channels) {
    p.first[0] = s.shard.primary ? static_cast<float>(total) : 0.0f;
  } else {
    p.scalars[kTotalSq] = static_cast<float>(total);
  }
}

// Stages 2–3: ‖G‖² and the clipping factor from the first round, the moments, R̃, the scaling factors, and
// the second round's partial sums. Returns false when the gradient is not finite (the status says so).
bool moments(const ApolloStep& s, const Parts& p) {
  const ApolloHyper& h = s.hyper;
  const ApolloGeometry& g = p.g;
  const int64_t K = g.K;
  const int r = h.rank;
  float total = p.scalars[kTotalSq];
  if (g.sharded_projected) {
    double t = 0.0;
    for (int64_t i = 0; i < K; ++i) t += p.sumsq[i];
    total = static_cast<float>(t);
  } else if (g.sharded_channels) {
    total = p.first[0];
  }
  p.scalars[kTotalSq] = total;
  if (!finite(total)) {
    *s.status = kStatusNonFiniteGrad;
    return false;
  }
  const float clip = clip_factor(h.max_grad_norm, total);
  p.scalars[kClip] = clip;

  // Moments, R̃ = M / (√V + ε), and the per-channel norms of R̃ and of the (clipped) R.
  std::vector<float> a2(K), b2(K);
  const float beta1 = static_cast<float>(h.beta1), beta2 = static_cast<float>(h.beta2);
  const float omb1 = static_cast<float>(1.0 - h.beta1), omb2 = static_cast<float>(1.0 - h.beta2);
  parallel_for(K, 256, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      double na = 0.0, nb = 0.0;
      for (int q = 0; q < r; ++q) {
        size_t idx = static_cast<size_t>(i) * r + q;
        float x = p.R[idx] * clip;
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

  double u2 = 0.0, A = 0.0, B = 0.0;  // Σ s_c²c²‖G_c‖² (channel) | Σ‖R̃_c‖², Σ‖R_c‖² (tensor)
  if (h.scaling == Scaling::kChannel) {
    for (int64_t i = 0; i < K; ++i) {
      p.scale[i] = std::sqrt(a2[i]) / (std::sqrt(b2[i]) + 1e-8f);
      u2 += static_cast<double>(p.scale[i]) * p.scale[i] * clip * clip * p.sumsq[i];
    }
  } else {
    for (int64_t i = 0; i < K; ++i) {
      A += a2[i];
      B += b2[i];
    }
  }
  const bool contributes = !g.sharded_channels || s.shard.primary;
  p.second[0] = contributes ? static_cast<float>(u2) : 0.0f;
  p.second[1] = contributes ? static_cast<float>(A) : 0.0f;
  p.second[2] = contributes ? static_cast<float>(B) : 0.0f;
  return true;
}

// Stages 4–5: the tensor's scaling factor and the limiter from the second round's sums, then W in place.
void update(const ApolloStep& s, const Parts& p) {
  const ApolloHyper& h = s.hyper;
  const ApolloGeometry& g = p.g;
  const float total = p.scalars[kTotalSq];
  if (!finite(total)) {  // the moments were skipped (the status says why): nothing to write
    *s.status = kStatusNonFiniteGrad;
    return;
  }
  const float clip = p.scalars[kClip];
  float u2 = p.second[0];
  float tensor_scale = 0.0f;
  if (h.scaling == Scaling::kTensor) {
    tensor_scale = std::sqrt(p.second[1]) / (std::sqrt(p.second[2]) + 1e-8f);
    u2 = static_cast<float>(static_cast<double>(tensor_scale) * tensor_scale * clip * clip * total);
  }
  const uint64_t t = *s.step;
  Tail tail = apollo_tail(h, t, clip, std::sqrt(u2), *s.prev_norm);
  if (tail.status != kStatusOk) {
    *s.status = tail.status;
    return;
  }

  const float decay = h.lr * h.weight_decay;  // W ← u − (lr·wd)·u: rounding 1 − lr·wd would drift
  // The rounding offsets' Philox rounds, as the CUDA update takes them (apollo.update_rounds, docs/tuning.md).
  const bool seven_rounds = tuning::get(tuning::kApolloUpdateRounds) == 7;
  std::atomic<int> bad{0};
  parallel_for(s.rows, 8, [&](int64_t b, int64_t e) {
    bool any_bad = false;
    for (int64_t i = b; i < e; ++i) {
      uint64_t group = ~uint64_t{0};
      U32x4 bits{};
      for (int64_t j = 0; j < s.cols; ++j) {
        const RoundingSlot slot = matrix_rounding_slot(s.shard, g.cols_full, i, j);
        if (slot.group != group) {
          group = slot.group;
          bits = seven_rounds ? rounding_bits<7>(s.seed, t, group) : rounding_bits(s.seed, t, group);
        }
        const float sc = h.scaling == Scaling::kTensor ? tensor_scale : p.scale[g.tall ? i : j];
        const float coef = tail.step_size * tail.multiplier * sc;
        const float gval = load(s.grad, s.grad_dtype, i * s.cols + j);
        const int64_t widx = i * s.ld_weight + j;
        const float w = load(s.weight, s.weight_dtype, widx);
        const float u = w - coef * gval;
        const float nw = u - decay * u;
        if (!finite(nw)) {
          any_bad = true;
          continue;  // keep the old value: nothing non-finite is ever written
        }
        if (s.weight_dtype == DType::kBF16) {
          uint16_t out = h.rounding == Rounding::kStochastic
                             ? f32_to_bf16_stochastic(nw, rounding_offset(bits, slot.lane))
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
    if (any_bad) bad.store(1);
  });
  *s.prev_norm = tail.new_prev;
  *s.step = t + 1;
  *s.status = bad.load() ? kStatusNonFiniteUpdate : kStatusOk;
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

void apollo_phase_cpu(const ApolloStep& s, ApolloPhase phase) {
  validate(s);
  if (!s.workspace) throw Error(ErrorCode::kInvalidArg, "optimizer step: a step in phases needs a workspace");
  const Parts p = parts_of(s);
  switch (phase) {
    case ApolloPhase::kProject: project(s, p); break;
    case ApolloPhase::kMoments: moments(s, p); break;
    case ApolloPhase::kUpdate: update(s, p); break;
  }
}

void apollo_step_cpu(const ApolloStep& s) {
  validate(s);
  if (s.shard.dim >= 0) {
    throw Error(ErrorCode::kInvalidArg, "optimizer step: a shard of a tensor steps in phases (apollo_phase_cpu)");
  }
  ApolloStep one = s;
  std::unique_ptr<float[]> ws(new float[(apollo_phase_workspace_bytes(s) + sizeof(float) - 1) / sizeof(float)]);
  one.workspace = ws.get();
  const Parts p = parts_of(one);
  project(one, p);
  if (moments(one, p)) update(one, p);
}

}  // namespace livetrain::optim
