// AdamW step on the CPU (torch.optim.AdamW's math), the reference for src/optim/adamw.cu; used for the
// parameters APOLLO does not handle (norms, biases, and by option embeddings and lm_head).
#include <atomic>
#include <cmath>

#include "livetrain/error.hpp"
#include "livetrain/parallel.hpp"
#include "optim/common.hpp"

namespace livetrain::optim {

using namespace detail;

namespace {
float load(const void* p, DType dt, int64_t i) {
  return dt == DType::kBF16 ? bf16_to_f32(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
}
}  // namespace

void adamw_sumsq_cpu(const void* grad, DType grad_dtype, int64_t numel, float* out) {
  float total = 0.0f;
  for (int64_t i = 0; i < numel; ++i) {
    float g = load(grad, grad_dtype, i);
    total += g * g;
  }
  *out = total;
}

void adamw_step_cpu(const AdamWStep& s) {
  validate(s);
  const AdamWHyper& h = s.hyper;
  float total = 0.0f;
  if (s.total_sq) {
    total = *s.total_sq;
  } else {
    adamw_sumsq_cpu(s.grad, s.grad_dtype, s.numel, &total);
  }
  if (!finite(total)) {
    *s.status = kStatusNonFiniteGrad;
    return;
  }
  const float clip = clip_factor(h.max_grad_norm, total);
  const uint64_t step = *s.step;
  const double t = static_cast<double>(step + 1);
  // Computed exactly as the CUDA step does (double, then rounded once).
  const float step_size = static_cast<float>(h.lr / (1.0 - std::pow(h.beta1, t)));
  const float bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(h.beta2, t)));
  const float decay = h.lr * h.weight_decay;
  const float beta1 = static_cast<float>(h.beta1), beta2 = static_cast<float>(h.beta2);
  const float omb1 = static_cast<float>(1.0 - h.beta1),
              omb2 = static_cast<float>(1.0 - h.beta2);  // W ← u − (lr·wd)·u: rounding 1 − lr·wd would drift
  std::atomic<int> bad{0};
  const int64_t groups = (s.numel + 7) / 8;
  parallel_for(groups, 1024, [&](int64_t b, int64_t e) {
    uint64_t group = ~uint64_t{0};
    U32x4 bits{};
    for (int64_t g = b; g < e; ++g) {
      for (int k = 0; k < 8 && g * 8 + k < s.numel; ++k) {
        int64_t i = g * 8 + k;
        const RoundingSlot slot = flat_rounding_slot(s.shard, s.inner, i);  // the full tensor's numbering
        if (slot.group != group) {
          group = slot.group;
          bits = rounding_bits(s.seed, step, group);
        }
        const int lane = slot.lane;
        float grad = load(s.grad, s.grad_dtype, i) * clip;
        float m = beta1 * s.m[i] + omb1 * grad;
        float v = beta2 * s.v[i] + omb2 * grad * grad;
        float w = load(s.weight, s.weight_dtype, i);
        float nw = (w - decay * w) - step_size * m / (std::sqrt(v) / bc2_sqrt + h.eps);
        s.m[i] = m;
        s.v[i] = v;
        if (!finite(nw)) {
          bad.store(1);
          continue;
        }
        if (s.weight_dtype == DType::kBF16) {
          uint16_t out = h.rounding == Rounding::kStochastic ? f32_to_bf16_stochastic(nw, rounding_offset(bits, lane))
                                                             : f32_to_bf16_nearest(nw);
          if ((out & 0x7F80u) == 0x7F80u) {
            bad.store(1);
            continue;
          }
          static_cast<uint16_t*>(s.weight)[i] = out;
        } else {
          static_cast<float*>(s.weight)[i] = nw;
        }
      }
    }
  });
  *s.step = step + 1;
  *s.status = bad.load() ? kStatusNonFiniteUpdate : kStatusOk;
}

}  // namespace livetrain::optim
