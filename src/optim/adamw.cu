// AdamW step on CUDA, the same function as src/optim/adamw.cpp: one launch sums ‖G‖² (the last block
// decides the status and the clipping factor), a second updates M, V and W in place, 8 elements a thread.
// adamw_sumsq_cuda is the first launch alone: a tensor-parallel rank's part of ‖G‖². adamw_step_many_cuda
// launches each stage once for up to 64 steps (a model's norms and biases), one step's blocks after another's.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cuda/check.hpp"
#include "livetrain/error.hpp"
#include "optim/common.hpp"
#include "optim/workspace.hpp"

namespace livetrain::optim {

using namespace detail;

namespace {

__device__ __forceinline__ float ldv(const uint16_t* p, int64_t i) { return bf16_to_f32(p[i]); }
__device__ __forceinline__ float ldv(const float* p, int64_t i) { return p[i]; }

// One AdamW step as the kernels see it: addresses, size, hyperparameters, its workspace's regions and its grids.
struct Item {
  void* W;
  const void* G;
  int64_t n;
  float* M;
  float* V;
  float* partials;
  float* scalars;
  unsigned* counter;
  int32_t* status;
  uint64_t* step;
  uint64_t seed;
  AdamWHyper h;
  const float* given_total;  // ‖G‖² of the full tensor (summed over tensor-parallel ranks), or null
  float* out_total;          // adamw_sumsq: ‖G‖² goes here and nothing else happens, or null
  Shard shard;
  int64_t inner;
  int32_t norm_blocks, update_blocks;
};

// ‖G‖² summed by the blocks of one step; its last block then either writes it to `out_total`
// (adamw_sumsq_cuda) or decides the step's status and scalars from it, or from `given_total` (the sum over
// tensor-parallel ranks, run with one block and nothing to read).
template <typename TG>
__device__ void norm_body(const Item& it, int block, int nblocks) {
  const TG* G = static_cast<const TG*>(it.G);
  float sq = 0.0f;
  for (int64_t i = block * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < it.n && !it.given_total;
       i += static_cast<int64_t>(nblocks) * blockDim.x) {
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
    it.partials[block] = b;
    __threadfence();
    last = atomicAdd(it.counter, 1u) == static_cast<unsigned>(nblocks) - 1;
    if (last) {
      *it.counter = 0;
      float total = 0.0f;
      const volatile float* vp = it.partials;
      for (int k = 0; k < nblocks; ++k) total += vp[k];
      if (it.given_total) total = *it.given_total;
      if (it.out_total) {
        *it.out_total = total;
        return;
      }
      const AdamWHyper& h = it.h;
      it.scalars[kTotalSq] = total;
      it.scalars[kClip] = clip_factor(h.max_grad_norm, total);
      double t = static_cast<double>(*it.step + 1);
      it.scalars[kStepSize] = static_cast<float>(h.lr / (1.0 - pow(h.beta1, t)));
      it.scalars[kTensorScale] = static_cast<float>(sqrt(1.0 - pow(h.beta2, t)));  // √bc₂
      *it.status = finite(total) ? kStatusOk : kStatusNonFiniteGrad;
      if (finite(total)) *it.step += 1;
    }
  }
}

// M, V and W of one step, 8 elements (one Philox block of rounding bits) a thread, grid-stride.
template <typename TW, typename TG>
__device__ void update_body(const Item& it, int block, int nblocks) {
  if (*it.status != kStatusOk) return;
  TW* W = static_cast<TW*>(it.W);
  const TG* G = static_cast<const TG*>(it.G);
  float* M = it.M;
  float* V = it.V;
  const AdamWHyper& h = it.h;
  const int64_t n = it.n;
  const uint64_t step = *it.step - 1;  // the norm stage advanced it
  const float clip = it.scalars[kClip];
  const float step_size = it.scalars[kStepSize];
  const float bc2_sqrt = it.scalars[kTensorScale];
  const float decay = h.lr * h.weight_decay;
  const float beta1 = static_cast<float>(h.beta1), beta2 = static_cast<float>(h.beta2);
  const float omb1 = static_cast<float>(1.0 - h.beta1),
              omb2 = static_cast<float>(1.0 - h.beta2);  // W ← u − (lr·wd)·u: rounding 1 − lr·wd would drift
  const int64_t groups = (n + 7) / 8;
  bool bad = false;
  for (int64_t gi = block * static_cast<int64_t>(blockDim.x) + threadIdx.x; gi < groups;
       gi += static_cast<int64_t>(nblocks) * blockDim.x) {
    U32x4 bits = rounding_bits(it.seed, step, static_cast<uint64_t>(gi));
    uint64_t group = static_cast<uint64_t>(gi);
    for (int e = 0; e < 8; ++e) {
      int64_t i = gi * 8 + e;
      if (i >= n) break;
      int lane = e;
      if (it.shard.dim >= 0) {  // a shard's elements take the offsets the full tensor's step gives them
        const RoundingSlot slot = flat_rounding_slot(it.shard, it.inner, i);
        if (slot.group != group) {
          group = slot.group;
          bits = rounding_bits(it.seed, step, group);
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
  if (bad) atomicMax(it.status, static_cast<int32_t>(kStatusNonFiniteUpdate));
}

// Up to kCap steps of the same dtypes per launch of each stage, the blocks of every step side by side (as
// apollo.cu's batches): a step over a model's many small tensors (norms, biases) costs two launches per batch
// instead of two per tensor. One step alone is a batch of one; both run the same bodies.
constexpr int kBatch = 64;  // the most a batch holds (its kernel parameter is ~17 KB)

template <int kCap>
struct Batch {
  int n;
  int first_norm[kCap + 1];  // first block of step i in the norm stage's grid; first_norm[n] = grid size
  int first_update[kCap + 1];
  Item items[kCap];
};
// Passed by value as a kernel argument: at most 32,764 bytes (CUDA 12.1+, Volta and later).
static_assert(sizeof(Batch<kBatch>) <= 32764, "adamw_step_many_cuda's batch exceeds the kernel argument limit");

// Which step block `block` of a stage's grid belongs to (the last i with first[i] <= block), and its index there.
template <int kCap>
__device__ __forceinline__ int find_item(const int (&first)[kCap + 1], int n, int block, int* local) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) / 2;
    if (first[mid] <= block) lo = mid;
    else hi = mid - 1;
  }
  *local = block - first[lo];
  return lo;
}

template <typename TG, int kCap>
__global__ void adamw_norm_kernel(const __grid_constant__ Batch<kCap> b) {
  int local, i = find_item<kCap>(b.first_norm, b.n, blockIdx.x, &local);
  norm_body<TG>(b.items[i], local, b.items[i].norm_blocks);
}

template <typename TW, typename TG, int kCap>
__global__ void adamw_update_kernel(const __grid_constant__ Batch<kCap> b) {
  int local, i = find_item<kCap>(b.first_update, b.n, blockIdx.x, &local);
  update_body<TW, TG>(b.items[i], local, b.items[i].update_blocks);
}

// The kernels' view of one step, in its workspace (AdamWWorkspace).
Item make_item(const AdamWStep& s, void* workspace) {
  AdamWWorkspace ws(s.numel);
  char* base = static_cast<char*>(workspace);
  Item it{};
  it.W = s.weight;
  it.G = s.grad;
  it.n = s.numel;
  it.M = s.m;
  it.V = s.v;
  it.partials = reinterpret_cast<float*>(base + ws.off_partials);
  it.scalars = reinterpret_cast<float*>(base + ws.off_scalars);
  it.counter = reinterpret_cast<unsigned*>(base + ws.off_counters) + kCounterAdamW;
  it.status = s.status;
  it.step = s.step;
  it.seed = s.seed;
  it.h = s.hyper;
  it.given_total = s.total_sq;
  it.shard = s.shard;
  it.inner = s.inner;
  it.norm_blocks = s.total_sq ? 1 : static_cast<int32_t>(std::min<int64_t>((s.numel + 255) / 256, 1024));
  it.update_blocks = static_cast<int32_t>(std::min<int64_t>(((s.numel + 7) / 8 + 255) / 256, 2048));
  return it;
}

// The two stages of the batch's steps (only the norm when `update` is false: adamw_sumsq).
template <typename TW, typename TG, int kCap>
void launch(Batch<kCap>& b, bool update, cudaStream_t stream) {
  b.first_norm[0] = b.first_update[0] = 0;
  for (int i = 0; i < b.n; ++i) {
    b.first_norm[i + 1] = b.first_norm[i] + b.items[i].norm_blocks;
    b.first_update[i + 1] = b.first_update[i] + b.items[i].update_blocks;
  }
  adamw_norm_kernel<TG, kCap><<<b.first_norm[b.n], 256, 0, stream>>>(b);
  LIVETRAIN_CUDA_CHECK(cudaGetLastError());
  if (!update) return;
  adamw_update_kernel<TW, TG, kCap><<<b.first_update[b.n], 256, 0, stream>>>(b);
  LIVETRAIN_CUDA_CHECK(cudaGetLastError());
}

template <typename F>
void dispatch(DType w, DType g, F&& f) {
  const bool wbf = w == DType::kBF16, gbf = g == DType::kBF16;
  if (wbf && gbf) f(uint16_t{}, uint16_t{});
  else if (wbf) f(uint16_t{}, float{});
  else if (gbf) f(float{}, uint16_t{});
  else f(float{}, float{});
}

}  // namespace

void adamw_sumsq_cuda(const void* grad, DType grad_dtype, int64_t numel, float* out, void* workspace, void* stream) {
  if (grad_dtype != DType::kBF16 && grad_dtype != DType::kF32) {
    throw Error(ErrorCode::kInvalidArg, "adamw_sumsq: grad dtype must be BF16 or F32");
  }
  if (numel <= 0 || !grad || !out || !workspace)
    throw Error(ErrorCode::kInvalidArg, "adamw_sumsq: empty or null argument");
  AdamWStep s;
  s.grad = grad;
  s.grad_dtype = grad_dtype;
  s.numel = numel;
  s.hyper = AdamWHyper{};
  Batch<1> b{};
  b.n = 1;
  b.items[0] = make_item(s, workspace);
  b.items[0].out_total = out;
  dispatch(DType::kF32, grad_dtype,
           [&](auto w, auto g) { launch<decltype(w), decltype(g)>(b, false, static_cast<cudaStream_t>(stream)); });
}

void adamw_step_cuda(const AdamWStep& s, void* stream) {
  validate(s);
  if (!s.workspace) throw Error(ErrorCode::kInvalidArg, "optimizer step: the CUDA step needs a workspace");
  Batch<1> b{};
  b.n = 1;
  b.items[0] = make_item(s, s.workspace);
  dispatch(s.weight_dtype, s.grad_dtype,
           [&](auto w, auto g) { launch<decltype(w), decltype(g)>(b, true, static_cast<cudaStream_t>(stream)); });
}

void adamw_step_many_cuda(const AdamWStep* steps, int n, void* workspace, size_t workspace_bytes, void* stream) {
  if (adamw_many_workspace_bytes(steps, n) > workspace_bytes) {
    throw Error(ErrorCode::kInvalidArg, "optimizer step: the AdamW batch needs a workspace of " +
                                            std::to_string(adamw_many_workspace_bytes(steps, n)) + " bytes, got " +
                                            std::to_string(workspace_bytes));
  }
  for (int i = 0; i < n; ++i) {
    validate(steps[i]);
    // A tensor-parallel part steps alone, after its sum over ranks (adamw_step_cuda with shard and total_sq).
    if (steps[i].shard.dim >= 0 || steps[i].total_sq)
      throw Error(ErrorCode::kInvalidArg, "optimizer step: AdamW step " + std::to_string(i) +
                                              " is a tensor-parallel part of a tensor, which steps alone");
  }
  if (n && !workspace) throw Error(ErrorCode::kInvalidArg, "optimizer step: the CUDA step needs a workspace");
  // Steps with the same dtypes go in batches of up to kBatch, wherever they are in the list (a model's fp32 A_log
  // sits between bf16 norms in every Gated DeltaNet layer: batching only neighbours would cut a batch at each),
  // each step in its own workspace slice (whole 256-byte regions, optim/workspace.hpp), so that their counters
  // and partial sums stay apart. The steps are independent: their order does not change any result.
  std::vector<char*> slice(n);
  char* ws = static_cast<char*>(workspace);
  for (int i = 0; i < n; ++i) {
    slice[i] = ws;
    ws += AdamWWorkspace(steps[i].numel).bytes;
  }
  auto b = std::make_unique<Batch<kBatch>>();
  auto flush = [&](DType w, DType g) {
    if (b->n)
      dispatch(w, g, [&](auto tw, auto tg) {
        launch<decltype(tw), decltype(tg)>(*b, true, static_cast<cudaStream_t>(stream));
      });
    b->n = 0;
  };
  for (DType w : {DType::kBF16, DType::kF32}) {
    for (DType g : {DType::kBF16, DType::kF32}) {
      for (int i = 0; i < n; ++i) {
        if (steps[i].weight_dtype != w || steps[i].grad_dtype != g) continue;
        b->items[b->n++] = make_item(steps[i], slice[i]);
        if (b->n == kBatch) flush(w, g);
      }
      flush(w, g);
    }
  }
}

}  // namespace livetrain::optim
