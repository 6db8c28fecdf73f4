// AdamW step on CUDA, the same function as src/optim/adamw.cpp: one launch sums ‖G‖² (the last block
// decides the status and the clipping factor), a second updates M, V and W in place, 8 elements a thread.
// adamw_sumsq_cuda is the first launch alone: a tensor-parallel rank's part of ‖G‖².
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/check.hpp"
#include "livetrain/error.hpp"
#include "optim/common.hpp"
#include "optim/workspace.hpp"

namespace livetrain::optim {

using namespace detail;

namespace {

__device__ __forceinline__ float ldv(const uint16_t* p, int64_t i) { return bf16_to_f32(p[i]); }
__device__ __forceinline__ float ldv(const float* p, int64_t i) { return p[i]; }

// ‖G‖² summed by the blocks; the last block then either writes it to `out_total` (adamw_sumsq_cuda) or
// decides the step's status and scalars from it, or from `given_total` (the sum over tensor-parallel ranks,
// launched with one block and nothing to read).
template <typename TG>
__global__ void adamw_norm_kernel(const TG* __restrict__ G, int64_t n, float* __restrict__ partials,
                                  float* __restrict__ scalars, unsigned* counter, int32_t* __restrict__ status,
                                  uint64_t* step, AdamWHyper h, const float* given_total, float* out_total) {
  float sq = 0.0f;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n && !given_total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float g = ldv(G, i);
    sq += g * g;
  }
  __shared__ float sh[32];
  for (int o = 16; o > 0; o >>= 1) sq += __shfl_xor_sync(0xFFFFFFFFu, sq, o);
  if (threadIdx.x % 32 == 0) sh[threadIdx.x / 32] = sq;
  __syncthreads();
  __shared__ bool last;
  if (threadIdx.x == 0) {
    float b = 0.0f;
    for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) b += sh[w];
    partials[blockIdx.x] = b;
    __threadfence();
    last = atomicAdd(counter, 1u) == gridDim.x - 1;
    if (last) {
      *counter = 0;
      float total = 0.0f;
      const volatile float* vp = partials;
      for (unsigned k = 0; k < gridDim.x; ++k) total += vp[k];
      if (given_total) total = *given_total;
      if (out_total) {
        *out_total = total;
        return;
      }
      scalars[kTotalSq] = total;
      scalars[kClip] = clip_factor(h.max_grad_norm, total);
      double t = static_cast<double>(*step + 1);
      scalars[kStepSize] = static_cast<float>(h.lr / (1.0 - pow(h.beta1, t)));
      scalars[kTensorScale] = static_cast<float>(sqrt(1.0 - pow(h.beta2, t)));  // √bc₂
      *status = finite(total) ? kStatusOk : kStatusNonFiniteGrad;
      if (finite(total)) *step += 1;
    }
  }
}

template <typename TW, typename TG>
__global__ void adamw_update_kernel(TW* __restrict__ W, const TG* __restrict__ G, int64_t n, float* __restrict__ M,
                                    float* __restrict__ V, const float* __restrict__ scalars,
                                    int32_t* __restrict__ status, AdamWHyper h, uint64_t seed,
                                    const uint64_t* step_after, const Shard shard, int64_t inner) {
  if (*status != kStatusOk) return;
  const uint64_t step = *step_after - 1;  // the norm kernel advanced it
  const float clip = scalars[kClip];
  const float step_size = scalars[kStepSize];
  const float bc2_sqrt = scalars[kTensorScale];
  const float decay = h.lr * h.weight_decay;
  const float beta1 = static_cast<float>(h.beta1), beta2 = static_cast<float>(h.beta2);
  const float omb1 = static_cast<float>(1.0 - h.beta1),
              omb2 = static_cast<float>(1.0 - h.beta2);  // W ← u − (lr·wd)·u: rounding 1 − lr·wd would drift
  const int64_t groups = (n + 7) / 8;
  bool bad = false;
  for (int64_t gi = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; gi < groups;
       gi += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    U32x4 bits = rounding_bits(seed, step, static_cast<uint64_t>(gi));
    uint64_t group = static_cast<uint64_t>(gi);
    for (int e = 0; e < 8; ++e) {
      int64_t i = gi * 8 + e;
      if (i >= n) break;
      int lane = e;
      if (shard.dim >= 0) {  // a shard's elements take the offsets the full tensor's step gives them
        const RoundingSlot slot = flat_rounding_slot(shard, inner, i);
        if (slot.group != group) {
          group = slot.group;
          bits = rounding_bits(seed, step, group);
        }
        lane = slot.lane;
      }
      float g = ldv(G, i) * clip;
      float m = beta1 * M[i] + omb1 * g;
      float v = beta2 * V[i] + omb2 * g * g;
      M[i] = m;
      V[i] = v;
      float w = ldv(W, i);
      float nw = (w - decay * w) - step_size * m / (sqrtf(v) / bc2_sqrt + h.eps);
      if (!finite(nw)) {
        bad = true;
        continue;
      }
      if constexpr (sizeof(TW) == 2) {
        uint16_t out = h.rounding == Rounding::kStochastic ? f32_to_bf16_stochastic(nw, rounding_offset(bits, lane))
                                                           : f32_to_bf16_nearest(nw);
        if ((out & 0x7F80u) == 0x7F80u) {
          bad = true;
          continue;
        }
        W[i] = out;
      } else {
        W[i] = nw;
      }
    }
  }
  if (bad) atomicMax(status, static_cast<int32_t>(kStatusNonFiniteUpdate));
}

template <typename TW, typename TG>
void launch(const AdamWStep& s, cudaStream_t stream) {
  AdamWWorkspace ws(s.numel);
  char* base = static_cast<char*>(s.workspace);
  float* partials = reinterpret_cast<float*>(base + ws.off_partials);
  float* scalars = reinterpret_cast<float*>(base + ws.off_scalars);
  unsigned* counter = reinterpret_cast<unsigned*>(base + ws.off_counters) + kCounterAdamW;
  int blocks = s.total_sq ? 1 : static_cast<int>(std::min<int64_t>((s.numel + 255) / 256, 1024));
  adamw_norm_kernel<TG><<<blocks, 256, 0, stream>>>(static_cast<const TG*>(s.grad), s.numel, partials, scalars, counter,
                                                    s.status, s.step, s.hyper, s.total_sq, nullptr);
  LIVETRAIN_CUDA_CHECK(cudaGetLastError());
  int ublocks = static_cast<int>(std::min<int64_t>(((s.numel + 7) / 8 + 255) / 256, 2048));
  adamw_update_kernel<TW, TG><<<ublocks, 256, 0, stream>>>(static_cast<TW*>(s.weight), static_cast<const TG*>(s.grad),
                                                           s.numel, s.m, s.v, scalars, s.status, s.hyper, s.seed,
                                                           s.step, s.shard, s.inner);
  LIVETRAIN_CUDA_CHECK(cudaGetLastError());
}

template <typename TG>
void launch_sumsq(const TG* grad, int64_t numel, float* out, void* workspace, cudaStream_t stream) {
  AdamWWorkspace ws(numel);
  char* base = static_cast<char*>(workspace);
  float* partials = reinterpret_cast<float*>(base + ws.off_partials);
  unsigned* counter = reinterpret_cast<unsigned*>(base + ws.off_counters) + kCounterAdamW;
  int blocks = static_cast<int>(std::min<int64_t>((numel + 255) / 256, 1024));
  adamw_norm_kernel<TG><<<blocks, 256, 0, stream>>>(grad, numel, partials, nullptr, counter, nullptr, nullptr,
                                                    AdamWHyper{}, nullptr, out);
  LIVETRAIN_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void adamw_sumsq_cuda(const void* grad, DType grad_dtype, int64_t numel, float* out, void* workspace, void* stream) {
  if (grad_dtype != DType::kBF16 && grad_dtype != DType::kF32) {
    throw Error(ErrorCode::kInvalidArg, "adamw_sumsq: grad dtype must be BF16 or F32");
  }
  if (numel <= 0 || !grad || !out || !workspace)
    throw Error(ErrorCode::kInvalidArg, "adamw_sumsq: empty or null argument");
  auto st = static_cast<cudaStream_t>(stream);
  if (grad_dtype == DType::kBF16) launch_sumsq(static_cast<const uint16_t*>(grad), numel, out, workspace, st);
  else launch_sumsq(static_cast<const float*>(grad), numel, out, workspace, st);
}

void adamw_step_cuda(const AdamWStep& s, void* stream) {
  validate(s);
  if (!s.workspace) throw Error(ErrorCode::kInvalidArg, "optimizer step: the CUDA step needs a workspace");
  auto st = static_cast<cudaStream_t>(stream);
  const bool wbf = s.weight_dtype == DType::kBF16, gbf = s.grad_dtype == DType::kBF16;
  if (wbf && gbf) launch<uint16_t, uint16_t>(s, st);
  else if (wbf) launch<uint16_t, float>(s, st);
  else if (gbf) launch<float, uint16_t>(s, st);
  else launch<float, float>(s, st);
}

}  // namespace livetrain::optim
