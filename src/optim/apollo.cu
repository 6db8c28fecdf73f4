// APOLLO / APOLLO-Mini step on CUDA, the same function as src/optim/apollo.cpp (docs/optim.md, Eq. 3–7).
//
// Launches per matrix, all on the caller's stream, none waiting for the host:
//   1. generate P from (seed, step / gap)                                   [rank × min(m, n)] floats
//   2. project: R = G·Pᵀ (tall) or Pᵀ·G (wide), ‖G_channel‖², and ‖G‖²      reads G once
//      rank 1: warp per row (tall) or column strips × row chunks (wide); the last block sums ‖G‖²
//      rank > 1: a tiled fp32 product, then a one-block sum of ‖G‖²
//   3. moments + scaling factors; the last block computes the limiter and the step scalars
//   4. update W in place (stochastic rounding), reading G and W once and writing W once
// Bytes of G and W moved: 2 + 2 + 2 + 2 = 8 per bf16 parameter (the floor of any APOLLO step: G is needed
// for R before s is known, then again for the update). Everything else is O(max(m, n)·rank).
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/check.hpp"
#include "livetrain/error.hpp"
#include "optim/common.hpp"
#include "optim/workspace.hpp"

namespace livetrain::optim {

using namespace detail;

namespace {

constexpr int kWarp = 32;

__device__ __forceinline__ float ld(const uint16_t* p, int64_t i) { return bf16_to_f32(p[i]); }
__device__ __forceinline__ float ld(const float* p, int64_t i) { return p[i]; }

// Eight consecutive values from a 16-byte aligned address.
__device__ __forceinline__ void ld8(const uint16_t* p, float (&out)[8]) {
  uint4 u = *reinterpret_cast<const uint4*>(p);
  uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = bits_f32(w[i] << 16);
    out[2 * i + 1] = bits_f32(w[i] & 0xFFFF0000u);
  }
}
__device__ __forceinline__ void ld8(const float* p, float (&out)[8]) {
  float4 a = *reinterpret_cast<const float4*>(p);
  float4 b = *reinterpret_cast<const float4*>(p + 4);
  out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w, out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xFFFFFFFFu, x, o);
  return x;
}

// Sum over the block of up to 4 values per thread; the result is valid in thread 0.
template <int N>
__device__ void block_sum(float (&v)[N]) {
  __shared__ float sh[N][32];
  int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = (blockDim.x + kWarp - 1) / kWarp;
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = warp_sum(v[i]);
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) sh[i][warp] = v[i];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      float s = 0.0f;
      for (int w = 0; w < warps; ++w) s += sh[i][w];
      v[i] = s;
    }
  }
  __syncthreads();
}

// Whether this block is the last of the grid to finish (threadfence reduction); its partials written
// before the call are then visible to it. The last block resets the counter for the next step.
__device__ bool is_last_block(unsigned* counter) {
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned blocks = gridDim.x * gridDim.y;
    last = atomicAdd(counter, 1u) == blocks - 1;
    if (last) *counter = 0;
  }
  __syncthreads();
  return last;
}

// The last block: sums of the grid's partials (laid out [block][stride]) in a fixed order per grid
// size, all threads taking part; the result is valid in thread 0. __ldcg: other blocks wrote them, so
// read from L2, never from this SM's L1.
template <int N>
__device__ void sum_partials(const float* partials, int nblocks, int stride, float (&out)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = 0.0f;
  for (int b = threadIdx.x; b < nblocks; b += blockDim.x) {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] += __ldcg(&partials[b * stride + i]);
  }
  block_sum(out);
}

// The last block: ‖G‖² and the clipping factor from the blocks' partials.
__device__ void finish_total(const float* partials, int nblocks, float* scalars, float max_grad_norm) {
  float total[1];
  sum_partials(partials, nblocks, 1, total);
  if (threadIdx.x == 0) {
    scalars[kTotalSq] = total[0];
    scalars[kClip] = clip_factor(max_grad_norm, total[0]);
  }
}

__global__ void gen_projection_kernel(float* __restrict__ P, int64_t n, uint64_t seed, const uint64_t* step,
                                      int32_t gap, float inv) {
  const uint64_t key = projection_key(seed, *step, gap);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    P[i] = projection_entry(key, static_cast<uint64_t>(i), inv);
  }
}

// Rank 1, rows >= cols: one warp per row computes R[i] = G[i,:]·p and ‖G[i,:]‖².
template <typename TG, bool kVec>
__global__ void project_tall_r1_kernel(const TG* __restrict__ G, int64_t rows, int64_t cols,
                                       const float* __restrict__ p, float* __restrict__ R,
                                       float* __restrict__ sumsq, float* __restrict__ partials,
                                       float* __restrict__ scalars, unsigned* counter, float max_grad_norm) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, wpb = blockDim.x / kWarp;
  float block_sq[1] = {0.0f};
  for (int64_t row = blockIdx.x * static_cast<int64_t>(wpb) + warp; row < rows;
       row += static_cast<int64_t>(gridDim.x) * wpb) {
    const TG* g = G + row * cols;
    float dot = 0.0f, sq = 0.0f;
    if (kVec) {  // cols % 8 == 0: lane l takes the groups of 8 numbered l, l + 32, ...; 4 loads in flight
      constexpr int kU = 4;
      for (int64_t j = lane * 8; j < cols; j += kWarp * 8 * kU) {
        float v[kU][8];
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          if (j + u * kWarp * 8 < cols) ld8(g + j + u * kWarp * 8, v[u]);
        }
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          const int64_t jj = j + u * kWarp * 8;
          if (jj >= cols) break;
          float pv[8];
          ld8(p + jj, pv);
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            dot += v[u][e] * pv[e];
            sq += v[u][e] * v[u][e];
          }
        }
      }
    } else {
      for (int64_t j = lane; j < cols; j += kWarp) {
        float v = ld(g, j);
        dot += v * p[j];
        sq += v * v;
      }
    }
    dot = warp_sum(dot);
    sq = warp_sum(sq);
    if (lane == 0) {
      R[row] = dot;
      sumsq[row] = sq;
      block_sq[0] += sq;
    }
  }
  block_sum(block_sq);
  if (threadIdx.x == 0) partials[blockIdx.x] = block_sq[0];
  if (is_last_block(counter)) finish_total(partials, gridDim.x, scalars, max_grad_norm);
}

// Rank 1, rows < cols: blockIdx.y takes a chunk of rows, each thread 8 adjacent columns; partial R and
// ‖G[:,j]‖² per chunk, summed per column by the moments kernel.
template <typename TG, bool kVec>
__global__ void project_wide_r1_kernel(const TG* __restrict__ G, int64_t rows, int64_t cols,
                                       int64_t rows_per_chunk, const float* __restrict__ p,
                                       float* __restrict__ Rpart, float* __restrict__ sqpart,
                                       float* __restrict__ partials, float* __restrict__ scalars,
                                       unsigned* counter, float max_grad_norm) {
  const int64_t r0 = blockIdx.y * rows_per_chunk;
  const int64_t r1 = min(rows, r0 + rows_per_chunk);
  float block_sq[1] = {0.0f};
  for (int64_t j0 = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) * 8; j0 < cols;
       j0 += static_cast<int64_t>(gridDim.x) * blockDim.x * 8) {
    float acc[8] = {}, sq[8] = {};
    const bool full = j0 + 8 <= cols;
    constexpr int kU = 4;  // rows whose loads are in flight together
    for (int64_t i = r0; i < r1; i += kU) {
      float v[kU][8];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const TG* g = G + (i + u) * cols + j0;
        if (i + u >= r1) {
#pragma unroll
          for (int e = 0; e < 8; ++e) v[u][e] = 0.0f;
        } else if (kVec && full) {
          ld8(g, v[u]);
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) v[u][e] = j0 + e < cols ? ld(g, e) : 0.0f;
        }
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const float pi = i + u < r1 ? p[i + u] : 0.0f;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          acc[e] += pi * v[u][e];
          sq[e] += v[u][e] * v[u][e];
        }
      }
    }
    for (int e = 0; e < 8 && j0 + e < cols; ++e) {
      Rpart[blockIdx.y * cols + j0 + e] = acc[e];
      sqpart[blockIdx.y * cols + j0 + e] = sq[e];
      block_sq[0] += sq[e];
    }
  }
  block_sum(block_sq);
  const int bid = blockIdx.y * gridDim.x + blockIdx.x;
  if (threadIdx.x == 0) partials[bid] = block_sq[0];
  if (is_last_block(counter)) finish_total(partials, gridDim.x * gridDim.y, scalars, max_grad_norm);
}

// Rank > 1: R[c, q] = Σ_k A(c, k)·B(q, k) with A = G (tall) or Gᵀ (wide) and B = P (tall) or Pᵀ (wide);
// 64×64 output tiles, 16-deep k tiles in shared memory, 4×4 outputs per thread; blocks of the first
// rank tile also produce ‖A(c, :)‖².
constexpr int kTileM = 64, kTileN = 64, kTileK = 16;

template <typename TG, bool kTall>
__global__ void __launch_bounds__(256) project_gemm_kernel(const TG* __restrict__ G, int64_t rows, int64_t cols,
                                                           int rank, const float* __restrict__ P,
                                                           float* __restrict__ R, float* __restrict__ sumsq) {
  __shared__ float As[kTileK][kTileM + 1];
  __shared__ float Bs[kTileK][kTileN + 1];
  __shared__ float sq_sh[256][4];
  const int64_t K = kTall ? rows : cols, k = kTall ? cols : rows;
  const int64_t c0 = blockIdx.x * static_cast<int64_t>(kTileM);
  const int q0 = blockIdx.y * kTileN;
  const int t = threadIdx.x, tx = t % 16, ty = t / 16;
  float acc[4][4] = {};
  float sq[4] = {};
  for (int64_t k0 = 0; k0 < k; k0 += kTileK) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      int idx = t * 4 + e;
      int m_local = kTall ? idx / kTileK : idx % kTileM;
      int k_local = kTall ? idx % kTileK : idx / kTileM;
      int64_t c = c0 + m_local, kk = k0 + k_local;
      float a = 0.0f;
      if (c < K && kk < k) a = kTall ? ld(G, c * cols + kk) : ld(G, kk * cols + c);
      As[k_local][m_local] = a;
      sq[e] += a * a;
      int n_local = kTall ? idx / kTileK : idx % kTileN;
      int kb_local = kTall ? idx % kTileK : idx / kTileN;
      int q = q0 + n_local;
      int64_t kb = k0 + kb_local;
      float b = 0.0f;
      if (q < rank && kb < k) b = kTall ? P[q * k + kb] : P[kb * rank + q];
      Bs[kb_local][n_local] = b;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[kk][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Bs[kk][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    int64_t c = c0 + ty * 4 + i;
    if (c >= K) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      int q = q0 + tx * 4 + j;
      if (q < rank) R[c * rank + q] = acc[i][j];
    }
  }
  if (blockIdx.y != 0) return;
  // ‖A(c, :)‖²: each thread's four squares belong to fixed channels; sum them in a fixed order.
#pragma unroll
  for (int e = 0; e < 4; ++e) sq_sh[t][e] = sq[e];
  __syncthreads();
  if (t < kTileM && c0 + t < K) {
    float s = 0.0f;
    for (int src = 0; src < 256; ++src) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        int idx = src * 4 + e;
        int m_local = kTall ? idx / kTileK : idx % kTileM;
        if (m_local == t) s += sq_sh[src][e];
      }
    }
    sumsq[c0 + t] = s;
  }
}

// One block: ‖G‖² = Σ_c ‖G_c‖² in a fixed order, and the clipping factor.
__global__ void total_kernel(const float* __restrict__ sumsq, int64_t K, float* __restrict__ scalars,
                             float max_grad_norm) {
  float v[1] = {0.0f};
  for (int64_t i = threadIdx.x; i < K; i += blockDim.x) v[0] += sumsq[i];
  block_sum(v);
  if (threadIdx.x == 0) {
    scalars[kTotalSq] = v[0];
    scalars[kClip] = clip_factor(max_grad_norm, v[0]);
  }
}

// Moments (Eq. 4–5), R̃ = M/(√V+ε), per-channel (or tensor) scaling factor (Eq. 6–7) and ‖U‖; the last
// block applies the limiter and writes the step's scalars and status. Warp per channel when rank > 1.
__global__ void moments_kernel(const float* __restrict__ R, const float* __restrict__ sumsq, int64_t K,
                               int rank, int chunks, float* __restrict__ M, float* __restrict__ V,
                               float* __restrict__ scale, float* __restrict__ partials,
                               float* __restrict__ scalars, unsigned* counter, float* __restrict__ prev_norm,
                               int32_t* __restrict__ status, ApolloHyper h, uint64_t* step) {
  const float total = scalars[kTotalSq];
  if (!finite(total)) {
    if (blockIdx.x == 0 && threadIdx.x == 0) *status = kStatusNonFiniteGrad;
    return;
  }
  const float clip = scalars[kClip];
  const float beta1 = static_cast<float>(h.beta1), beta2 = static_cast<float>(h.beta2);
  const float omb1 = static_cast<float>(1.0 - h.beta1), omb2 = static_cast<float>(1.0 - h.beta2);
  const bool warp_mode = rank > 1;
  const int lane = threadIdx.x % kWarp;
  const int64_t per_block = warp_mode ? blockDim.x / kWarp : blockDim.x;
  const int64_t first = blockIdx.x * per_block + (warp_mode ? threadIdx.x / kWarp : threadIdx.x);
  float acc[3] = {0.0f, 0.0f, 0.0f};  // Σ s²c²‖G_c‖² (channel) | Σ‖R̃‖², Σ‖R‖² (tensor)
  for (int64_t c = first; c < K; c += static_cast<int64_t>(gridDim.x) * per_block) {
    float na = 0.0f, nb = 0.0f, sq = 0.0f;
    for (int q = warp_mode ? lane : 0; q < rank; q += warp_mode ? kWarp : 1) {
      int64_t idx = c * rank + q;
      float r = 0.0f;
      if (chunks > 1 || rank == 1) {
        for (int ch = 0; ch < chunks; ++ch) r += R[ch * K + c];  // rank 1: chunk partials (1 when tall)
      } else {
        r = R[idx];
      }
      float x = r * clip;
      float m = beta1 * M[idx] + omb1 * x;
      float v = beta2 * V[idx] + omb2 * x * x;
      M[idx] = m;
      V[idx] = v;
      float rt = m / (sqrtf(v) + h.eps);
      na += rt * rt;
      nb += x * x;
    }
    if (warp_mode) {
      na = warp_sum(na);
      nb = warp_sum(nb);
    }
    if (!warp_mode || lane == 0) {
      for (int ch = 0; ch < chunks; ++ch) sq += sumsq[ch * K + c];
      if (h.scaling == Scaling::kChannel) {
        float s = sqrtf(na) / (sqrtf(nb) + 1e-8f);
        scale[c] = s;
        acc[0] += s * s * clip * clip * sq;
      } else {
        acc[1] += na;
        acc[2] += nb;
      }
    }
  }
  block_sum(acc);
  if (threadIdx.x == 0) {
    partials[blockIdx.x * 4 + 0] = acc[0];
    partials[blockIdx.x * 4 + 1] = acc[1];
    partials[blockIdx.x * 4 + 2] = acc[2];
  }
  if (!is_last_block(counter)) return;
  float sums[3];
  sum_partials(partials, gridDim.x, 4, sums);
  if (threadIdx.x != 0) return;
  float u2 = sums[0], A = sums[1], B = sums[2];
  if (h.scaling == Scaling::kTensor) {
    float s = sqrtf(A) / (sqrtf(B) + 1e-8f);
    scalars[kTensorScale] = s;
    u2 = s * s * clip * clip * total;
  }
  Tail tail = apollo_tail(h, *step, clip, sqrtf(u2), *prev_norm);
  if (tail.status == kStatusOk) {
    *prev_norm = tail.new_prev;
    *step += 1;
    scalars[kStepSize] = tail.step_size;
    scalars[kMultiplier] = tail.multiplier;
  }
  *status = tail.status;
}

// The new value in the weight's dtype, or the old one (and ok = false) when the new one is not finite
// there: nothing non-finite is ever written.
__device__ __forceinline__ uint16_t to_weight(float nw, float old, uint16_t, Rounding rounding, uint16_t offset,
                                              bool& ok) {
  uint16_t out = rounding == Rounding::kStochastic ? f32_to_bf16_stochastic(nw, offset) : f32_to_bf16_nearest(nw);
  if (!finite(nw) || (out & 0x7F80u) == 0x7F80u) {
    ok = false;
    return static_cast<uint16_t>(f32_bits(old) >> 16);  // exact: `old` was read from bf16
  }
  return out;
}
__device__ __forceinline__ float to_weight(float nw, float old, float, Rounding, uint16_t, bool& ok) {
  if (!finite(nw)) {
    ok = false;
    return old;
  }
  return nw;
}

__device__ __forceinline__ void st8(uint16_t* p, const uint16_t (&v)[8]) {
  uint4 u;
  u.x = v[0] | (static_cast<uint32_t>(v[1]) << 16);
  u.y = v[2] | (static_cast<uint32_t>(v[3]) << 16);
  u.z = v[4] | (static_cast<uint32_t>(v[5]) << 16);
  u.w = v[6] | (static_cast<uint32_t>(v[7]) << 16);
  *reinterpret_cast<uint4*>(p) = u;
}
__device__ __forceinline__ void st8(float* p, const float (&v)[8]) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  *reinterpret_cast<float4*>(p + 4) = make_float4(v[4], v[5], v[6], v[7]);
}

// W ← (W − η·mult·s_c·G)·(1 − lr·wd), one thread per 8 adjacent elements of a row (one Philox block of
// rounding bits). Skipped entirely unless the moments kernel reported success.
template <typename TW, typename TG, bool kVec>
__global__ void update_kernel(TW* __restrict__ W, int64_t ldw, const TG* __restrict__ G, int64_t rows, int64_t cols,
                              const float* __restrict__ scale, const float* __restrict__ scalars,
                              int32_t* __restrict__ status, bool tall, bool tensor_scaling, float decay,
                              Rounding rounding, uint64_t seed, const uint64_t* step_after) {
  if (*status != kStatusOk) return;
  const uint64_t step = *step_after - 1;  // the moments kernel advanced it
  const float base = scalars[kStepSize] * scalars[kMultiplier];
  const float tensor_s = scalars[kTensorScale];
  const int64_t gpr = (cols + 7) / 8;
  const int64_t groups = rows * gpr;
  bool bad = false;
  for (int64_t gi = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; gi < groups;
       gi += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = gi / gpr, j0 = (gi % gpr) * 8;
    const U32x4 bits = rounding_bits(seed, step, static_cast<uint64_t>(gi));
    const TG* g = G + i * cols + j0;
    TW* w = W + i * ldw + j0;
    bool ok = true;
    if (kVec && j0 + 8 <= cols) {
      float gv[8], wv[8];
      TW out[8];
      ld8(g, gv);
      ld8(w, wv);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        float sc = tensor_scaling ? tensor_s : scale[tall ? i : j0 + e];
        float u = wv[e] - base * sc * gv[e];
        float nw = u - decay * u;
        out[e] = to_weight(nw, wv[e], TW{}, rounding, rounding_offset(bits, e), ok);
      }
      st8(w, out);
    } else {
      for (int e = 0; e < 8 && j0 + e < cols; ++e) {
        float sc = tensor_scaling ? tensor_s : scale[tall ? i : j0 + e];
        float old = ld(w, e);
        float u = old - base * sc * ld(g, e);
        float nw = u - decay * u;
        w[e] = to_weight(nw, old, TW{}, rounding, rounding_offset(bits, e), ok);
      }
    }
    bad |= !ok;
  }
  if (bad) atomicMax(status, static_cast<int32_t>(kStatusNonFiniteUpdate));
}

int sm_count() {
  static int n = [] {
    int dev = 0, count = 0;
    LIVETRAIN_CUDA_CHECK(cudaGetDevice(&dev));
    LIVETRAIN_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, dev));
    return count;
  }();
  return n;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename TW, typename TG>
void launch(const ApolloStep& s, cudaStream_t stream) {
  const ApolloHyper& h = s.hyper;
  ApolloWorkspace ws(s.rows, s.cols, h.rank);
  char* base = static_cast<char*>(s.workspace);
  float* P = reinterpret_cast<float*>(base + ws.off_p);
  float* R = reinterpret_cast<float*>(base + ws.off_r);
  float* sumsq = reinterpret_cast<float*>(base + ws.off_sumsq);
  float* scale = reinterpret_cast<float*>(base + ws.off_scale);
  float* partials = reinterpret_cast<float*>(base + ws.off_partials);
  float* scalars = reinterpret_cast<float*>(base + ws.off_scalars);
  unsigned* counters = reinterpret_cast<unsigned*>(base + ws.off_counters);
  const TG* G = static_cast<const TG*>(s.grad);
  TW* W = static_cast<TW*>(s.weight);
  const int sms = sm_count();

  const int64_t pn = ws.k * h.rank;
  int gblocks = static_cast<int>(std::min<int64_t>((pn + 255) / 256, sms * 8));
  gen_projection_kernel<<<gblocks, 256, 0, stream>>>(P, pn, s.seed, s.step, h.update_proj_gap,
                                                     1.0f / sqrtf(static_cast<float>(h.rank)));
  LIVETRAIN_CUDA_CHECK(cudaGetLastError());

  const bool gvec = s.cols % 8 == 0 && aligned16(G);
  int chunks = 1;
  if (ws.rank1 && ws.tall) {
    int blocks = static_cast<int>(std::min<int64_t>((s.rows + 7) / 8, kMaxBlocks));
    if (gvec) {
      project_tall_r1_kernel<TG, true><<<blocks, 256, 0, stream>>>(G, s.rows, s.cols, P, R, sumsq, partials, scalars,
                                                                    counters + kCounterProject, h.max_grad_norm);
    } else {
      project_tall_r1_kernel<TG, false><<<blocks, 256, 0, stream>>>(G, s.rows, s.cols, P, R, sumsq, partials, scalars,
                                                                     counters + kCounterProject, h.max_grad_norm);
    }
  } else if (ws.rank1) {
    chunks = static_cast<int>(ws.chunks);
    int64_t col_blocks = (s.cols + kWideColsPerBlock - 1) / kWideColsPerBlock;
    dim3 grid(static_cast<unsigned>(std::min<int64_t>(col_blocks, kMaxBlocks / chunks)), static_cast<unsigned>(chunks));
    if (gvec) {
      project_wide_r1_kernel<TG, true><<<grid, 128, 0, stream>>>(G, s.rows, s.cols, ws.rows_per_chunk, P, R, sumsq,
                                                                 partials, scalars, counters + kCounterProject, h.max_grad_norm);
    } else {
      project_wide_r1_kernel<TG, false><<<grid, 128, 0, stream>>>(G, s.rows, s.cols, ws.rows_per_chunk, P, R, sumsq,
                                                                  partials, scalars, counters + kCounterProject, h.max_grad_norm);
    }
  } else {
    dim3 grid(static_cast<unsigned>((ws.K + kTileM - 1) / kTileM), static_cast<unsigned>((h.rank + kTileN - 1) / kTileN));
    if (ws.tall) {
      project_gemm_kernel<TG, true><<<grid, 256, 0, stream>>>(G, s.rows, s.cols, h.rank, P, R, sumsq);
    } else {
      project_gemm_kernel<TG, false><<<grid, 256, 0, stream>>>(G, s.rows, s.cols, h.rank, P, R, sumsq);
    }
    LIVETRAIN_CUDA_CHECK(cudaGetLastError());
    total_kernel<<<1, 1024, 0, stream>>>(sumsq, ws.K, scalars, h.max_grad_norm);
  }
  LIVETRAIN_CUDA_CHECK(cudaGetLastError());

  const int64_t per_block = h.rank > 1 ? 256 / kWarp : 256;
  int mblocks = static_cast<int>(std::min<int64_t>((ws.K + per_block - 1) / per_block, std::min(kMaxBlocks, sms * 4)));
  moments_kernel<<<mblocks, 256, 0, stream>>>(R, sumsq, ws.K, h.rank, chunks, s.m, s.v, scale, partials, scalars,
                                              counters + kCounterMoments, s.prev_norm, s.status, h, s.step);
  LIVETRAIN_CUDA_CHECK(cudaGetLastError());

  const int64_t groups = s.rows * ((s.cols + 7) / 8);
  int ublocks = static_cast<int>(std::min<int64_t>((groups + 255) / 256, static_cast<int64_t>(sms) * 16));
  const bool wvec = gvec && s.ld_weight % 8 == 0 && aligned16(W);
  const float decay = h.lr * h.weight_decay;  // W ← u − (lr·wd)·u: rounding 1 − lr·wd would drift
  const bool tensor = h.scaling == Scaling::kTensor;
  if (wvec) {
    update_kernel<TW, TG, true><<<ublocks, 256, 0, stream>>>(W, s.ld_weight, G, s.rows, s.cols, scale, scalars, s.status,
                                                            ws.tall, tensor, decay, h.rounding, s.seed, s.step);
  } else {
    update_kernel<TW, TG, false><<<ublocks, 256, 0, stream>>>(W, s.ld_weight, G, s.rows, s.cols, scale, scalars,
                                                             s.status, ws.tall, tensor, decay, h.rounding, s.seed, s.step);
  }
  LIVETRAIN_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void apollo_step_cuda(const ApolloStep& s, void* stream) {
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
