// APOLLO / APOLLO-Mini step on CUDA, the same function as src/optim/apollo.cpp (docs/optim.md).
//
// Stages, all on the caller's stream, none waiting for the host:
//   1. generate P from (seed, step / gap)                                   [rank × min(m, n)] floats
//   2. project: R = G·Pᵀ (tall) or Pᵀ·G (wide), ‖G_channel‖², and ‖G‖²      reads G once
//      rank 1: warp per row (tall) or column strips × row chunks (wide); the last block sums ‖G‖²
//      rank > 1: a tiled fp32 product, then a one-block sum of ‖G‖²
//   3. moments + scaling factors; the last block computes the limiter and the step scalars
//   4. update W in place (stochastic rounding), reading G and W once and writing W once
// Bytes of G and W moved: 2 + 2 + 2 + 2 = 8 per bf16 parameter (the floor of any APOLLO step: G is needed
// for R before s is known, then again for the update). Everything else is O(max(m, n)·rank).
//
// A tensor-parallel step (optim.hpp: ApolloPhase) runs the same stages as three launches of its own
// (apollo_phase_cuda): project (P sliced to the rank's indices; partial R or ‖G‖² into the first round's
// region), moments (‖G‖² from the summed first round; partial sums of the second round), update (the tail
// from the summed second round, then W with rounding offsets keyed by the full tensor's indices).
//
// Each stage is a device function of (one parameter's step, block index within that parameter, its
// number of blocks). A single step launches each stage with one parameter's grid; apollo_step_many_cuda
// launches each stage once for up to kBatch rank-1 parameters, the blocks of every parameter side by side,
// so a step over a whole model costs four launches per kBatch parameters instead of four per parameter.
// With apollo.fused_step, a single rank-1 step is one cooperative kernel that runs the four stages with
// a grid-wide barrier between them (the backward hooks step one matrix at a time: no launch gaps, and no
// stage's tail waits for a launch).
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>

#include "cuda/check.hpp"
#include "cuda/owned.hpp"
#include "livetrain/error.hpp"
#include "livetrain/tuning.hpp"
#include "optim/apollo_update.hpp"
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

// Whether this block is the last of `blocks` blocks (of one parameter) to finish (threadfence reduction); its partials
// written before the call are then visible to it. The last block resets the counter for the next step.
__device__ bool is_last_block(unsigned* counter, unsigned blocks) {
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
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

// Rank > 1: R[c, q] = Σ_k A(c, k)·B(q, k) with A = G (tall) or Gᵀ (wide) and B = P (tall) or Pᵀ (wide);
// 64×64 output tiles, 16-deep k tiles in shared memory, 4×4 outputs per thread; blocks of the first
// rank tile also produce ‖A(c, :)‖².
constexpr int kTileM = 64, kTileN = 64, kTileK = 16;

template <typename TG, bool kTall>
__global__ void __launch_bounds__(256)
    project_gemm_kernel(const TG* __restrict__ G, int64_t rows, int64_t cols, int rank, const float* __restrict__ P,
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

// One parameter's step as the kernels see it: addresses, sizes, hyperparameters, workspace regions.
struct Item {
  void* W;
  const void* G;
  int64_t rows, cols, ldw;
  float* M;
  float* V;
  float* prev_norm;
  int32_t* status;
  uint64_t* step;
  uint64_t seed;
  float* P;
  float* R;
  float* sumsq;
  float* scale;
  float* partials;
  float* scalars;
  unsigned* counters;
  int64_t K, k, chunks, rows_per_chunk;
  int32_t proj_blocks, mom_blocks, upd_blocks, gen_blocks;
  bool tall, gvec, wvec;
  ApolloHyper h;
  // A step in phases: the rank's shard, the full tensor's geometry, and the two rounds' sums.
  bool phases;
  Shard shard;
  ApolloGeometry geo;
  float* first;
  float* second;
};

// ---- stage 1: the projection ----
__device__ void gen_body(const Item& it, int block, int nblocks) {
  // Runs first: the completion counters of this parameter's later stages start from zero, whatever the
  // workspace held before (a batch's layout moves when its set of parameters changes).
  if (block == 0 && threadIdx.x < kNumCounters) it.counters[threadIdx.x] = 0;
  const uint64_t key = projection_key(it.seed, *it.step, it.h.update_proj_gap);
  const float inv = 1.0f / sqrtf(static_cast<float>(it.h.rank));  // as the CPU computes it
  const int64_t n = it.k * it.h.rank;
  for (int64_t i = block * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(nblocks) * blockDim.x) {
    // A shard's slice of P holds the full P's entries at the full tensor's indices.
    it.P[i] = projection_entry(
        key, it.phases ? projection_index(it.geo, it.shard, it.h.rank, i) : static_cast<uint64_t>(i), inv);
  }
}

// ---- stage 2, rank 1 ----
// Sixteen bytes of G as loaded (8 bf16 or 4 fp32 values per word): kept packed until used, so that many
// loads can be in flight without holding 8 floats each.
template <typename TG>
struct Raw {
  static constexpr int kWords = sizeof(TG) * 8 / 16;  // 16-byte words per 8 values
  uint4 w[kWords];
  __device__ __forceinline__ void load(const TG* p) {
#pragma unroll
    for (int i = 0; i < kWords; ++i) w[i] = reinterpret_cast<const uint4*>(p)[i];
  }
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < kWords; ++i) w[i] = make_uint4(0, 0, 0, 0);
  }
  __device__ __forceinline__ float at(int e) const;
};
template <>
__device__ __forceinline__ float Raw<uint16_t>::at(int e) const {
  const uint32_t u = (&w[0].x)[e / 2];
  return bits_f32(e % 2 ? u & 0xFFFF0000u : u << 16);
}
template <>
__device__ __forceinline__ float Raw<float>::at(int e) const {
  return __uint_as_float((&w[e / 4].x)[e % 4]);
}

// rows >= cols: one warp per kRows rows computes R[i] = G[i,:]·p and ‖G[i,:]‖² for each (the rows share
// each load of p); each lane keeps kRows × kLoads 16-byte loads in flight. Shipped: kRows 2, kLoads 2 (H100: 4)
// (apollo.tall_rows, apollo.tall_loads).
template <typename TG, int kRows, int kLoads>
__device__ void project_tall_body(const Item& it, int block, int nblocks) {
  const TG* G = static_cast<const TG*>(it.G);
  const float* p = it.P;
  const int64_t cols = it.cols;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, wpb = blockDim.x / kWarp;
  float block_sq[1] = {0.0f};
  for (int64_t row0 = (block * static_cast<int64_t>(wpb) + warp) * kRows; row0 < it.rows;
       row0 += static_cast<int64_t>(nblocks) * wpb * kRows) {
    const TG* g[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r)
      g[r] = G + (row0 + r < it.rows ? row0 + r : row0) * cols;  // past the end: reread row0
    float dot[kRows] = {}, sq[kRows] = {};
    if (it.gvec) {  // cols % 8 == 0: lane l takes the groups of 8 numbered l, l + 32, ...
      for (int64_t j = lane * 8; j < cols; j += kWarp * 8 * kLoads) {
        Raw<TG> v[kRows][kLoads];
#pragma unroll
        for (int u = 0; u < kLoads; ++u) {
          const int64_t jj = j + u * kWarp * 8;
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
            if (jj < cols) v[r][u].load(g[r] + jj);
            else v[r][u].zero();
          }
        }
#pragma unroll
        for (int u = 0; u < kLoads; ++u) {
          const int64_t jj = j + u * kWarp * 8;
          if (jj >= cols) break;
          float pv[8];
          ld8(p + jj, pv);
#pragma unroll
          for (int e = 0; e < 8; ++e) {
#pragma unroll
            for (int r = 0; r < kRows; ++r) {
              const float x = v[r][u].at(e);
              dot[r] += x * pv[e];
              sq[r] += x * x;
            }
          }
        }
      }
    } else {
      for (int64_t j = lane; j < cols; j += kWarp) {
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          const float x = ld(g[r], j);
          dot[r] += x * p[j];
          sq[r] += x * x;
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      dot[r] = warp_sum(dot[r]);
      sq[r] = warp_sum(sq[r]);
    }
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (row0 + r >= it.rows) break;
        it.R[row0 + r] = dot[r];
        it.sumsq[row0 + r] = sq[r];
        block_sq[0] += sq[r];
      }
    }
  }
  block_sum(block_sq);
  if (threadIdx.x == 0) it.partials[block] = block_sq[0];
  if (is_last_block(it.counters + kCounterProject, nblocks))
    finish_total(it.partials, nblocks, it.scalars, it.h.max_grad_norm);
}

// rows < cols: a block takes a strip of columns (8 per thread) of one chunk of rows; partial R and
// ‖G[:,j]‖² per chunk, summed per column by the moments stage. kLoads rows are in flight per thread
// (shipped: 2, H100: 4; apollo.wide_loads).
template <typename TG, int kLoads>
__device__ void project_wide_body(const Item& it, int block, int nblocks) {
  const TG* G = static_cast<const TG*>(it.G);
  const int64_t cols = it.cols;
  const int64_t strips = nblocks / it.chunks;  // blocks are [chunk][strip]
  const int64_t chunk = block / strips, strip = block % strips;
  const int64_t r0 = chunk * it.rows_per_chunk;
  const int64_t r1 = min(it.rows, r0 + it.rows_per_chunk);
  float block_sq[1] = {0.0f};
  for (int64_t j0 = (strip * static_cast<int64_t>(blockDim.x) + threadIdx.x) * 8; j0 < cols;
       j0 += strips * blockDim.x * 8) {
    float acc[8] = {}, sq[8] = {};
    const bool full = j0 + 8 <= cols;
    constexpr int kU = kLoads;  // rows whose loads are in flight together
    for (int64_t i = r0; i < r1; i += kU) {
      float v[kU][8];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const TG* g = G + (i + u) * cols + j0;
        if (i + u >= r1) {
#pragma unroll
          for (int e = 0; e < 8; ++e) v[u][e] = 0.0f;
        } else if (it.gvec && full) {
          ld8(g, v[u]);
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) v[u][e] = j0 + e < cols ? ld(g, e) : 0.0f;
        }
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const float pi = i + u < r1 ? it.P[i + u] : 0.0f;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          acc[e] += pi * v[u][e];
          sq[e] += v[u][e] * v[u][e];
        }
      }
    }
    for (int e = 0; e < 8 && j0 + e < cols; ++e) {
      it.R[chunk * cols + j0 + e] = acc[e];
      it.sumsq[chunk * cols + j0 + e] = sq[e];
      block_sq[0] += sq[e];
    }
  }
  block_sum(block_sq);
  if (threadIdx.x == 0) it.partials[block] = block_sq[0];
  if (is_last_block(it.counters + kCounterProject, nblocks))
    finish_total(it.partials, nblocks, it.scalars, it.h.max_grad_norm);
}

// The step's scalars from the sums over channels (Σ s²c²‖G_c‖², ‖R̃‖², ‖R‖²): the tensor's scaling factor,
// the limiter, the step size; the step counter advances when they are finite. One thread.
__device__ void finish_step(const Item& it, float u2, float A, float B) {
  const ApolloHyper& h = it.h;
  const float total = it.scalars[kTotalSq], clip = it.scalars[kClip];
  if (h.scaling == Scaling::kTensor) {
    float sc = sqrtf(A) / (sqrtf(B) + 1e-8f);
    it.scalars[kTensorScale] = sc;
    u2 = sc * sc * clip * clip * total;
  }
  Tail tail = apollo_tail(h, *it.step, clip, sqrtf(u2), *it.prev_norm);
  if (tail.status == kStatusOk) {
    *it.prev_norm = tail.new_prev;
    *it.step += 1;
    it.scalars[kStepSize] = tail.step_size;
    it.scalars[kMultiplier] = tail.multiplier;
  }
  *it.status = tail.status;
}

// ---- stage 3: moments, R̃ = M/(√V+ε), per-channel (or tensor) scaling factor (docs/optim.md steps 3–5) and
// ‖U‖; the last block applies the limiter and writes the step's scalars and status. Warp per channel
// when rank > 1. ----
__device__ void moments_body(const Item& it, int block, int nblocks) {
  const ApolloHyper& h = it.h;
  const float total = it.scalars[kTotalSq];
  if (!finite(total)) {
    if (block == 0 && threadIdx.x == 0) *it.status = kStatusNonFiniteGrad;
    return;
  }
  const float clip = it.scalars[kClip];
  const float beta1 = static_cast<float>(h.beta1), beta2 = static_cast<float>(h.beta2);
  const float omb1 = static_cast<float>(1.0 - h.beta1), omb2 = static_cast<float>(1.0 - h.beta2);
  const int rank = h.rank;
  const int64_t K = it.K;
  const int chunks = static_cast<int>(it.chunks);
  const bool warp_mode = rank > 1;
  const int lane = threadIdx.x % kWarp;
  const int64_t per_block = warp_mode ? blockDim.x / kWarp : blockDim.x;
  const int64_t first = block * per_block + (warp_mode ? threadIdx.x / kWarp : threadIdx.x);
  float acc[3] = {0.0f, 0.0f, 0.0f};  // Σ s²c²‖G_c‖² (channel) | Σ‖R̃‖², Σ‖R‖² (tensor)
  for (int64_t c = first; c < K; c += static_cast<int64_t>(nblocks) * per_block) {
    float na = 0.0f, nb = 0.0f, sq = 0.0f;
    for (int q = warp_mode ? lane : 0; q < rank; q += warp_mode ? kWarp : 1) {
      int64_t idx = c * rank + q;
      float r = 0.0f;
      if (rank == 1) {
        for (int ch = 0; ch < chunks; ++ch) r += it.R[ch * K + c];  // chunk partials (one chunk when tall)
      } else {
        r = it.R[idx];
      }
      float x = r * clip;
      float m = beta1 * it.M[idx] + omb1 * x;
      float v = beta2 * it.V[idx] + omb2 * x * x;
      it.M[idx] = m;
      it.V[idx] = v;
      float rt = m / (sqrtf(v) + h.eps);
      na += rt * rt;
      nb += x * x;
    }
    if (warp_mode) {
      na = warp_sum(na);
      nb = warp_sum(nb);
    }
    if (!warp_mode || lane == 0) {
      for (int ch = 0; ch < chunks; ++ch) sq += it.sumsq[ch * K + c];
      if (h.scaling == Scaling::kChannel) {
        float sc = sqrtf(na) / (sqrtf(nb) + 1e-8f);
        it.scale[c] = sc;
        acc[0] += sc * sc * clip * clip * sq;
      } else {
        acc[1] += na;
        acc[2] += nb;
      }
    }
  }
  block_sum(acc);
  if (threadIdx.x == 0) {
    it.partials[block * 4 + 0] = acc[0];
    it.partials[block * 4 + 1] = acc[1];
    it.partials[block * 4 + 2] = acc[2];
  }
  if (!is_last_block(it.counters + kCounterMoments, nblocks)) return;
  float sums[3];
  sum_partials(it.partials, nblocks, 4, sums);
  if (threadIdx.x != 0) return;
  if (it.phases) {  // the tail waits for the second round's sums over ranks (tail_kernel)
    const bool contributes = !it.geo.sharded_channels || it.shard.primary;
    for (int i = 0; i < 3; ++i) it.second[i] = contributes ? sums[i] : 0.0f;
    return;
  }
  finish_step(it, sums[0], sums[1], sums[2]);
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

// (w − base·s·g)·(1 − decay) as the CPU step computes it (apollo.cpp: update), each product and difference
// rounded on its own. Written with plain operators, ptxas may fuse a product into the following difference
// (an FFMA, one rounding fewer) or not, depending on the code around it: since the rounding-offset branch of
// a sharded step sits in this loop, the PTX of update_many_kernel<bf16> has lanes 4 and 6's product and
// difference in different blocks, and the batched step stopped matching the one-by-one step in the last bit
// of some bf16 weights (test_optim: test_cuda_batched_step_equals_one_by_one). The _rn intrinsics are never
// fused.
__device__ __forceinline__ float updated(float w, float base, float sc, float g, float decay) {
  const float x = __fsub_rn(w, __fmul_rn(__fmul_rn(base, sc), g));
  return __fsub_rn(x, __fmul_rn(decay, x));
}

// ---- stage 4: W ← (W − η·mult·s_c·G) − lr·wd·(…), one thread per 8 adjacent elements of a row (one
// Philox block of rounding bits), grid-stride. Skipped entirely unless the moments stage reported success. The
// result does not depend on the grid, the block size or kVariant's loads-first order, Mini kernel and short
// rounding; kSevenRounds changes the rounding offsets (as the CPU step does under the same knob), kProbe the
// whole result (a bandwidth probe). ----
template <typename TW, typename TG, int kVariant = 0, bool kIncremental = true>
__device__ void update_body(const Item& it, int block, int nblocks) {
  constexpr bool kPrefetch = (kVariant & kLoadsFirst) != 0;
  constexpr bool kProbeOnly = (kVariant & kProbe) != 0;
  constexpr int kRounds = (kVariant & kSevenRounds) ? 7 : 10;
  constexpr bool kMiniOnly = (kVariant & kMini) != 0;
  constexpr bool kFast = (kVariant & kFastRound) != 0;
  static_assert(!kFast || (kMiniOnly && std::is_same_v<TW, uint16_t>), "the short rounding path is Mini's, bf16's");
  static_assert(!kProbeOnly || (kPrefetch && std::is_same_v<TW, uint16_t> && std::is_same_v<TG, uint16_t>),
                "the probe is a variant of the bf16 update with its loads first");
  if (*it.status != kStatusOk) return;
  TW* W = static_cast<TW*>(it.W);
  const TG* G = static_cast<const TG*>(it.G);
  const int64_t rows = it.rows, cols = it.cols;
  const float base = it.scalars[kStepSize] * it.scalars[kMultiplier];
  const float tensor_s = it.scalars[kTensorScale];
  const bool tensor_scaling = kMiniOnly || it.h.scaling == Scaling::kTensor;
  const float decay = it.h.lr * it.h.weight_decay;  // W ← u − (lr·wd)·u: rounding 1 − lr·wd would drift
  const Rounding rounding = kMiniOnly ? Rounding::kStochastic : it.h.rounding;
  const uint64_t step = *it.step - 1;  // the moments stage advanced it
  const int64_t gpr = (cols + 7) / 8;
  const int64_t groups = rows * gpr;
  if (groups == 0) return;
  const int64_t stride = static_cast<int64_t>(nblocks) * blockDim.x;
  const bool sharded = !kMiniOnly && it.phases && it.shard.dim >= 0;
  bool bad = false;
  // Each group's row and group within the row, advanced without a division (kIncremental): a 64-bit
  // division per group costs tens of instructions, a large share of what a group may issue at the H200's
  // bandwidth. The one-kernel step divides: its 64-register cap spills the incremental indices.
  const int64_t first = block * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t advance_rows = stride / gpr, advance_groups = stride % gpr;
  int64_t row = first / gpr, in_row = first % gpr;
  auto next = [&](int64_t g0) {
    if constexpr (!kIncremental) {
      row = g0 / gpr;
      in_row = g0 % gpr;
    } else {
      row += advance_rows;
      in_row += advance_groups;
      if (in_row >= gpr) in_row -= gpr, ++row;
    }
  };
  for (int64_t g0 = first; g0 < groups; g0 += stride, next(g0)) {
    // kPrefetch (kLoadsFirst): the group's loads are issued before its rounding bits are computed (kept packed);
    // else the shipped order (bits, then the loads).
    Raw<TG> gr;
    Raw<TW> wr;
    const int64_t i = row, j0 = in_row * 8;
    if constexpr (kPrefetch) {
      if (it.wvec && j0 + 8 <= cols) {
        gr.load(G + i * cols + j0);
        wr.load(W + i * it.ldw + j0);
      }
    }
    if constexpr (kProbeOnly) {  // the same loads and stores, no step: W's words + G's words
      if (it.wvec && j0 + 8 <= cols) {
        const uint4 a = wr.w[0], b = gr.w[0];
        // One 16-byte store, as st8's: written as a uint4 assignment, the compiler split some into four.
        asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(W + i * it.ldw + j0), "r"(a.x + b.x),
                     "r"(a.y + b.y), "r"(a.z + b.z), "r"(a.w + b.w));
      }
      continue;
    }
    // A shard's elements take the offsets the full tensor's step gives them: its 8 elements are one
    // group of the full tensor when its columns start at a multiple of 8, else each finds its own.
    uint64_t group = static_cast<uint64_t>(g0);
    bool own_groups = false;
    if (sharded) {
      const int64_t last = min(j0 + 7, cols - 1);
      const RoundingSlot a = matrix_rounding_slot(it.shard, it.geo.cols_full, i, j0);
      const RoundingSlot b = matrix_rounding_slot(it.shard, it.geo.cols_full, i, last);
      group = a.group;
      own_groups = a.lane != 0 || b.group != a.group || b.lane != last - j0;
    }
    const U32x4 bits = rounding_bits<kRounds>(it.seed, step, group);
    auto offset = [&](int e) -> uint16_t {
      if (!own_groups) return rounding_offset(bits, e);
      const RoundingSlot sl = matrix_rounding_slot(it.shard, it.geo.cols_full, i, j0 + e);
      return rounding_offset(rounding_bits<kRounds>(it.seed, step, sl.group), sl.lane);
    };
    const TG* g = G + i * cols + j0;
    TW* w = W + i * it.ldw + j0;
    bool ok = true;
    if (it.wvec && j0 + 8 <= cols) {
      float gv[8], wv[8];
      TW out[8];
      if constexpr (kPrefetch) {
#pragma unroll
        for (int e = 0; e < 8; ++e) gv[e] = gr.at(e), wv[e] = wr.at(e);
      } else {
        ld8(g, gv);
        ld8(w, wv);
      }
      // The group-wide choices (scaling, rounding mode, own groups) are taken once per group, outside the
      // elements: taken per element, each element's few instructions sat between divergence barriers of
      // branches never taken (and the address arithmetic of predicated-off loads of per-channel scales),
      // and the update issued more instructions than the H200 moves its bytes in.
      float sc[8];
      if (tensor_scaling) {  // APOLLO-Mini
#pragma unroll
        for (int e = 0; e < 8; ++e) sc[e] = tensor_s;
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) sc[e] = it.scale[it.tall ? i : j0 + e];
      }
      auto apply = [&](auto stochastic, auto offset_of) {
        constexpr Rounding kMode = decltype(stochastic)::value ? Rounding::kStochastic : Rounding::kNearest;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const float nw = updated(wv[e], base, sc[e], gv[e], decay);
          out[e] = to_weight(nw, wv[e], TW{}, kMode, offset_of(e), ok);
        }
      };
      auto group_offset = [&](int e) { return rounding_offset(bits, e); };
      if constexpr (kFast) {
        // f32_to_bf16_stochastic and to_weight reduce to (u + offset) >> 16 unless a value is not finite or
        // the rounding may carry into the exponent's all-ones (Inf): both need |value| >= 2^127, exponent field
        // >= 0xFE. Such a group takes the full path (apply), so every bit is the same; a finite value below
        // 2^127 can neither overflow bf16 nor be refused.
        uint32_t big = 0;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const uint32_t u = f32_bits(updated(wv[e], base, sc[e], gv[e], decay));
          big |= static_cast<uint32_t>((u & 0x7F800000u) >= 0x7F000000u);
          out[e] = static_cast<TW>((u + group_offset(e)) >> 16);
        }
        if (big) apply(std::true_type{}, group_offset);
      } else if (rounding != Rounding::kStochastic) {
        apply(std::false_type{}, group_offset);  // offsets unused
      } else if (!own_groups) {
        apply(std::true_type{}, group_offset);
      } else {
        apply(std::true_type{}, offset);
      }
      st8(w, out);
    } else {
      for (int e = 0; e < 8 && j0 + e < cols; ++e) {
        float sc = tensor_scaling ? tensor_s : it.scale[it.tall ? i : j0 + e];
        float old = ld(w, e);
        const float nw = updated(old, base, sc, ld(g, e), decay);
        w[e] = to_weight(nw, old, TW{}, rounding, offset(e), ok);
      }
    }
    bad |= !ok;
  }
  if (bad) atomicMax(it.status, static_cast<int32_t>(kStatusNonFiniteUpdate));
}

// ---- kernels: one parameter ----
__global__ void gen_kernel(const Item it) { gen_body(it, blockIdx.x, gridDim.x); }

// At most 512 threads per block (apollo.tall_threads, apollo.update_threads): registers are capped so that
// every variant launches at every allowed block size.
constexpr int kMaxVariantThreads = 512;

template <typename TG, int kRows, int kLoads>
__global__ void __launch_bounds__(kMaxVariantThreads) project_tall_kernel(const Item it) {
  project_tall_body<TG, kRows, kLoads>(it, blockIdx.x, gridDim.x);
}

template <typename TG, int kLoads>
__global__ void project_wide_kernel(const Item it) {
  project_wide_body<TG, kLoads>(it, blockIdx.x, gridDim.x);
}

// The H100-tuned projection (apollo.split_projection=0): one kernel for tall and wide matrices (their H100
// variants), so its registers are the larger body's; split, they launch as separate kernels (the default).
template <typename TG>
__global__ void __launch_bounds__(kMaxVariantThreads) project_fused_kernel(const Item it) {
  if (it.tall) project_tall_body<TG, 2, 4>(it, blockIdx.x, gridDim.x);
  else project_wide_body<TG, 4>(it, blockIdx.x, gridDim.x);
}

__global__ void moments_kernel(const Item it) { moments_body(it, blockIdx.x, gridDim.x); }

template <typename TW, typename TG, int kVariant>
__global__ void __launch_bounds__(kMaxVariantThreads) update_kernel(const Item it) {
  update_body<TW, TG, kVariant>(it, blockIdx.x, gridDim.x);
}

// ---- kernels of a step in phases ----
// Rank 1, wide, sharded along the rows: the chunks' partial R and ‖G_c‖² summed into the first round's region.
__global__ void collapse_chunks_kernel(const Item it) {
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < it.K;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float r = 0.0f, sq = 0.0f;
    for (int64_t ch = 0; ch < it.chunks; ++ch) {
      r += it.R[ch * it.K + c];
      sq += it.sumsq[ch * it.K + c];
    }
    it.first[c] = r;
    it.first[it.K + c] = sq;
  }
}

// Sharded along the channels: this rank's ‖G‖² (which the projection summed) into the first round.
__global__ void first_total_kernel(const Item it) {
  if (threadIdx.x == 0) it.first[0] = it.shard.primary ? it.scalars[kTotalSq] : 0.0f;
}

// The step's scalars from the second round's sums over ranks (finish_step), unless ‖G‖² was not finite.
__global__ void tail_kernel(const Item it) {
  if (threadIdx.x != 0) return;
  if (!finite(it.scalars[kTotalSq])) {
    *it.status = kStatusNonFiniteGrad;
    return;
  }
  finish_step(it, it.second[0], it.second[1], it.second[2]);
}

// apollo.fused_step: one rank-1 step as one cooperative kernel. Its blocks stay resident and take the
// blocks of each stage's grid (sized by make_item for kFusedThreads per block) round-robin, with a
// grid-wide barrier between stages where the separate kernels have a launch boundary; the stage bodies,
// their partial sums and last-block reductions are the separate kernels' own. The projection variants are
// the defaults (tall rows 2 × loads 2, wide loads 2).
constexpr int kFusedThreads = kWideColsPerBlock / 8;  // the wide projection's block; every stage runs at it
constexpr int kFusedMinBlocks = 8;                    // per SM: <= 64 registers, 32 warps resident

template <typename TW, typename TG, int kVariant>
__global__ void __launch_bounds__(kFusedThreads, kFusedMinBlocks) step_fused_kernel(const Item it) {
  namespace cg = cooperative_groups;
  cg::grid_group grid = cg::this_grid();
  for (int b = blockIdx.x; b < it.gen_blocks; b += gridDim.x) gen_body(it, b, it.gen_blocks);
  grid.sync();
  for (int b = blockIdx.x; b < it.proj_blocks; b += gridDim.x) {
    if (it.tall) project_tall_body<TG, 2, 2>(it, b, it.proj_blocks);
    else project_wide_body<TG, 2>(it, b, it.proj_blocks);
  }
  grid.sync();
  for (int b = blockIdx.x; b < it.mom_blocks; b += gridDim.x) moments_body(it, b, it.mom_blocks);
  grid.sync();
  for (int b = blockIdx.x; b < it.upd_blocks; b += gridDim.x)
    update_body<TW, TG, kVariant, false>(it, b, it.upd_blocks);
}

// ---- kernels: many rank-1 parameters, each with its own run of blocks ----
constexpr int kBatch = 64;  // the most a batch holds (its kernel parameter is ~16 KB); apollo.batch may ask fewer

enum Stage : int { kGen = 0, kProject, kMoments, kUpdate, kNumStages };

struct Batch {
  int n;
  int first[kNumStages][kBatch + 1];  // first block of item i in each stage's grid; first[s][n] = grid size
  Item items[kBatch];
};
// Passed by value as a kernel argument: at most 32,764 bytes (CUDA 12.1+, Volta and later).
static_assert(sizeof(Batch) <= 32764, "apollo_step_many_cuda's batch exceeds the kernel argument limit");

// Which item block `b` of stage `s` belongs to, and its index inside that item's run.
__device__ __forceinline__ int find_item(const Batch& b, int s, int block, int* local) {
  int lo = 0, hi = b.n - 1;
  while (lo < hi) {  // the last i with first[s][i] <= block
    int mid = (lo + hi + 1) / 2;
    if (b.first[s][mid] <= block) lo = mid;
    else hi = mid - 1;
  }
  *local = block - b.first[s][lo];
  return lo;
}

__global__ void gen_many_kernel(const __grid_constant__ Batch b) {
  int local, i = find_item(b, kGen, blockIdx.x, &local);
  gen_body(b.items[i], local, b.items[i].gen_blocks);
}

template <typename TG, int kRows, int kLoads>
__global__ void __launch_bounds__(kMaxVariantThreads) project_tall_many_kernel(const __grid_constant__ Batch b) {
  int local, i = find_item(b, kProject, blockIdx.x, &local);
  project_tall_body<TG, kRows, kLoads>(b.items[i], local, b.items[i].proj_blocks);
}

template <typename TG, int kLoads>
__global__ void project_wide_many_kernel(const __grid_constant__ Batch b) {
  int local, i = find_item(b, kProject, blockIdx.x, &local);
  project_wide_body<TG, kLoads>(b.items[i], local, b.items[i].proj_blocks);
}

template <typename TG>
__global__ void __launch_bounds__(kMaxVariantThreads) project_fused_many_kernel(const __grid_constant__ Batch b) {
  int local, i = find_item(b, kProject, blockIdx.x, &local);
  const Item& it = b.items[i];
  if (it.tall) project_tall_body<TG, 2, 4>(it, local, it.proj_blocks);
  else project_wide_body<TG, 4>(it, local, it.proj_blocks);
}

__global__ void moments_many_kernel(const __grid_constant__ Batch b) {
  int local, i = find_item(b, kMoments, blockIdx.x, &local);
  moments_body(b.items[i], local, b.items[i].mom_blocks);
}

template <typename TW, typename TG, int kVariant>
__global__ void __launch_bounds__(kMaxVariantThreads) update_many_kernel(const __grid_constant__ Batch b) {
  int local, i = find_item(b, kUpdate, blockIdx.x, &local);
  update_body<TW, TG, kVariant>(b.items[i], local, b.items[i].upd_blocks);
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

// apollo.update_resident: the dynamic shared memory (unused) that lets at most `blocks` blocks of `kernel` reside
// on a multiprocessor, so that variants compare at the same occupancy whatever their registers allow; 0: none.
int resident_limit_smem(const void* kernel, int blocks) {
  if (blocks <= 0) return 0;
  static const auto limits = [] {
    int dev = 0, per_sm = 0, reserved = 0;
    LIVETRAIN_CUDA_CHECK(cudaGetDevice(&dev));
    LIVETRAIN_CUDA_CHECK(cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev));
    LIVETRAIN_CUDA_CHECK(cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, dev));
    return std::pair<int, int>(per_sm, reserved);
  }();
  // n blocks of per_sm / n bytes (their reservation included) fit; n + 1 do not.
  const int smem = limits.first / blocks - limits.second;
  LIVETRAIN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  return smem;
}

// Launch shapes of a step, read from the tuning knobs once per call (docs/tuning.md); the defaults are the
// shapes measured best on the H200 (the H100's: apollo.split_projection=0, tall_loads=4, wide_loads=4).
struct Shape {
  int tall_threads, tall_rows, tall_loads, wide_blocks, wide_loads, moments_bps, update_threads, update_bps, batch,
      streams;
  int update_rounds, update_resident;  // apollo.update_*: variants of the update
  bool update_loads_first, update_probe, update_mini, update_fast_round;
  bool split;  // tall and wide projections as separate kernels (any variant but the one-kernel projection's)
  bool fused;  // a single rank-1 step as one cooperative kernel (apollo.fused_step)
  static Shape current() {
    using tuning::get;
    Shape s{static_cast<int>(get(tuning::kApolloTallThreads)),
            static_cast<int>(get(tuning::kApolloTallRows)),
            static_cast<int>(get(tuning::kApolloTallLoads)),
            static_cast<int>(get(tuning::kApolloWideBlocks)),
            static_cast<int>(get(tuning::kApolloWideLoads)),
            static_cast<int>(get(tuning::kApolloMomentsBlocksPerSm)),
            static_cast<int>(get(tuning::kApolloUpdateThreads)),
            static_cast<int>(get(tuning::kApolloUpdateBlocksPerSm)),
            static_cast<int>(get(tuning::kApolloBatch)),
            static_cast<int>(get(tuning::kApolloStreams)),
            static_cast<int>(get(tuning::kApolloUpdateRounds)),
            static_cast<int>(get(tuning::kApolloUpdateResident)),
            get(tuning::kApolloUpdateLoadsFirst) == 1,
            get(tuning::kApolloUpdateProbe) == 1,
            get(tuning::kApolloUpdateMini) == 1,
            get(tuning::kApolloUpdateFastRound) == 1,
            get(tuning::kApolloSplitProjection) == 1,
            get(tuning::kApolloFusedStep) == 1};
    s.split = s.split || s.tall_rows != 2 || s.tall_loads != 4 || s.wide_loads != 4;
    return s;
  }
};
constexpr int kWideThreads = kWideColsPerBlock / 8;  // 8 columns per thread

template <int N>
using Int = std::integral_constant<int, N>;

// f(Int<rows>, Int<loads>) for a compiled variant of the tall projection (rows × loads <= 16 loads in flight).
template <typename F>
void tall_variant(int rows, int loads, F&& f) {
  switch (rows * 100 + loads) {
    case 102: return f(Int<1>{}, Int<2>{});
    case 104: return f(Int<1>{}, Int<4>{});
    case 108: return f(Int<1>{}, Int<8>{});
    case 202: return f(Int<2>{}, Int<2>{});
    case 204: return f(Int<2>{}, Int<4>{});
    case 208: return f(Int<2>{}, Int<8>{});
    case 402: return f(Int<4>{}, Int<2>{});
    case 404: return f(Int<4>{}, Int<4>{});
    default:
      throw Error(ErrorCode::kInvalidArg, "tuning: apollo.tall_rows " + std::to_string(rows) +
                                              " with apollo.tall_loads " + std::to_string(loads) +
                                              " is not a compiled variant (rows x loads <= 16)");
  }
}

template <typename F>
void loads_variant(int loads, F&& f) {  // 2, 4 or 8 (the knob's choices)
  if (loads == 2) f(Int<2>{});
  else if (loads == 8) f(Int<8>{});
  else f(Int<4>{});
}

// f(Int<variant>) for an update of one step or the one-kernel step: only the rounds apply there (they must
// everywhere, so that every path rounds as the CPU step does); the other apollo.update_* knobs choose among
// variants of the batched update of bf16 weights and gradients (update_many_variant).
template <typename TW, typename F>
void rounds_variant(const Shape& shape, F&& f) {
  if constexpr (std::is_same_v<TW, uint16_t>) {
    if (shape.update_rounds == 7) return f(Int<kSevenRounds>{});
  }
  f(Int<0>{});
}

// f(Int<variant>) for one compiled variant of the batched update of bf16 weights and gradients
// (update_many_kernel's kVariant; apollo_update.hpp: update_compiled says which exist).
template <typename TW, typename TG, int V, typename F>
bool try_update_variant(int v, F& f) {
  if constexpr (!update_compiled(V)) {
    return false;
  } else {
    if (v != V) return false;
    f(Int<V>{});
    return true;
  }
}

template <typename TW, typename TG, typename F, int... V>
bool update_variant_table(int v, F& f, std::integer_sequence<int, V...>) {
  return (try_update_variant<TW, TG, V>(v, f) || ...);
}

UpdateKnobs update_knobs(const Shape& shape) {
  return UpdateKnobs{shape.update_loads_first, shape.update_probe, shape.update_rounds, shape.update_mini,
                     shape.update_fast_round};
}

// f(Int<variant>) for the batched update, from the knobs. Other dtypes than bf16 weights and gradients: the
// rounds, the other apollo.update_* knobs ignored.
template <typename TW, typename TG, typename F>
void update_many_variant(const Shape& shape, bool mini, F&& f) {
  if constexpr (!(std::is_same_v<TW, uint16_t> && std::is_same_v<TG, uint16_t>)) {
    rounds_variant<TW>(shape, f);
  } else {
    // The table holds every combination update_compiled accepts, and every setting of the knobs names one.
    if (!update_variant_table<TW, TG>(update_variant_bits(update_knobs(shape), mini), f,
                                      std::make_integer_sequence<int, kNumUpdateVariants>{}))
      throw Error(ErrorCode::kUnsupported, "optimizer step: the APOLLO update variant has no kernel (a livetrain bug)");
  }
}

// The kernels' view of one step, its workspace carved per ApolloWorkspace, and each stage's grid. `phases`:
// a step in phases (apollo_phase_cuda), whose orientation is the full tensor's and whose workspace holds the
// sums over ranks.
Item make_item(const ApolloStep& s, void* workspace, const Shape& shape, bool phases = false) {
  const ApolloHyper& h = s.hyper;
  const ApolloGeometry geo = apollo_geometry(s.rows, s.cols, s.shard);
  ApolloWorkspace ws(s.rows, s.cols, h.rank, phases ? geo.tall : s.rows >= s.cols, phases);
  char* base = static_cast<char*>(workspace);
  Item it{};
  it.W = s.weight;
  it.G = s.grad;
  it.rows = s.rows;
  it.cols = s.cols;
  it.ldw = s.ld_weight;
  it.M = s.m;
  it.V = s.v;
  it.prev_norm = s.prev_norm;
  it.status = s.status;
  it.step = s.step;
  it.seed = s.seed;
  it.P = reinterpret_cast<float*>(base + ws.off_p);
  it.R = reinterpret_cast<float*>(base + ws.off_r);
  it.sumsq = reinterpret_cast<float*>(base + ws.off_sumsq);
  it.scale = reinterpret_cast<float*>(base + ws.off_scale);
  it.partials = reinterpret_cast<float*>(base + ws.off_partials);
  it.scalars = reinterpret_cast<float*>(base + ws.off_scalars);
  it.counters = reinterpret_cast<unsigned*>(base + ws.off_counters);
  it.K = ws.K;
  it.k = ws.k;
  it.chunks = ws.chunks;
  it.rows_per_chunk = ws.rows_per_chunk;
  it.tall = ws.tall;
  it.gvec = s.cols % 8 == 0 && aligned16(s.grad);
  it.wvec = it.gvec && s.ld_weight % 8 == 0 && aligned16(s.weight);
  it.h = h;
  it.phases = phases;
  it.shard = s.shard;
  it.geo = geo;
  it.first = reinterpret_cast<float*>(base + ws.off_first);
  it.second = reinterpret_cast<float*>(base + ws.off_second);
  // Sharded along the projected dimension, R and ‖G_c‖² are sums over ranks: the projection writes its
  // partial ones into the first round's region (rank-1 wide steps via their chunks: collapse_chunks_kernel).
  if (phases && geo.sharded_projected && !(ws.rank1 && !ws.tall)) {
    it.R = it.first;
    it.sumsq = it.first + ws.K * h.rank;
  }
  const int sms = sm_count();
  it.gen_blocks = static_cast<int32_t>(std::min<int64_t>((ws.k * h.rank + 255) / 256, sms * 8));
  if (ws.rank1 && ws.tall) {
    const int64_t rows_per_block = shape.tall_threads / kWarp * shape.tall_rows;
    it.proj_blocks =
        static_cast<int32_t>(std::min<int64_t>((s.rows + rows_per_block - 1) / rows_per_block, kMaxBlocks));
  } else if (ws.rank1) {
    const int64_t col_blocks = (s.cols + kWideColsPerBlock - 1) / kWideColsPerBlock;
    // Fewer row chunks than the workspace holds when apollo.wide_blocks asks for fewer blocks.
    const int64_t want = std::max<int64_t>(1, shape.wide_blocks / col_blocks);
    if (want < ws.chunks) {
      it.rows_per_chunk = (s.rows + want - 1) / want;
      it.chunks = (s.rows + it.rows_per_chunk - 1) / it.rows_per_chunk;
    }
    const int64_t strips = std::min<int64_t>(col_blocks, kMaxBlocks / it.chunks);
    it.proj_blocks = static_cast<int32_t>(strips * it.chunks);
  }
  const int64_t per_block = h.rank > 1 ? 256 / kWarp : 256;
  it.mom_blocks = static_cast<int32_t>(std::min<int64_t>(
      (ws.K + per_block - 1) / per_block, std::min<int64_t>(kMaxBlocks, int64_t{sms} * shape.moments_bps)));
  const int64_t groups = s.rows * ((s.cols + 7) / 8);
  const int64_t per_update_block = shape.update_threads;
  it.upd_blocks = static_cast<int32_t>(
      std::min<int64_t>((groups + per_update_block - 1) / per_update_block, int64_t{sms} * shape.update_bps));
  return it;
}

// The resident blocks of step_fused_kernel<TW, TG, kVariant> on this device (cooperative launches need them all
// resident at once).
template <typename TW, typename TG, int kVariant>
int fused_blocks() {
  static const int n = [] {
    int per_sm = 0;
    LIVETRAIN_CUDA_CHECK(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, step_fused_kernel<TW, TG, kVariant>, kFusedThreads, 0));
    if (per_sm < 1)
      throw Error(ErrorCode::kUnsupported,
                  "optimizer step: apollo.fused_step: its kernel cannot be resident on this device");
    return per_sm * sm_count();
  }();
  return n;
}

template <typename TW, typename TG>
void launch_fused(const ApolloStep& s, Shape shape, cudaStream_t stream) {
  // Stage grids sized for kFusedThreads-thread blocks, so every block of a stage does the work the
  // separate kernels' would at that block size.
  shape.tall_threads = shape.update_threads = kFusedThreads;
  shape.tall_rows = 2;  // the compiled variants (step_fused_kernel)
  Item it = make_item(s, s.workspace, shape);
  const int want = std::max(std::max(it.gen_blocks, it.proj_blocks), std::max(it.mom_blocks, it.upd_blocks));
  void* args[] = {&it};
  rounds_variant<TW>(shape, [&](auto v) {
    const int grid = std::max(1, std::min(want, fused_blocks<TW, TG, v()>()));
    LIVETRAIN_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(step_fused_kernel<TW, TG, v()>),
                                                     dim3(grid), dim3(kFusedThreads), args, 0, stream));
  });
}

template <typename TW, typename TG>
void launch(const ApolloStep& s, cudaStream_t stream) {
  const Shape shape = Shape::current();
  if (s.hyper.rank == 1 && shape.fused) return launch_fused<TW, TG>(s, shape, stream);
  const Item it = make_item(s, s.workspace, shape);
  gen_kernel<<<it.gen_blocks, 256, 0, stream>>>(it);
  LIVETRAIN_CUDA_CHECK(cudaGetLastError());
  if (s.hyper.rank == 1 && !shape.split) {
    project_fused_kernel<TG><<<it.proj_blocks, it.tall ? shape.tall_threads : kWideThreads, 0, stream>>>(it);
  } else if (s.hyper.rank == 1 && it.tall) {
    tall_variant(shape.tall_rows, shape.tall_loads, [&](auto rows, auto loads) {
      project_tall_kernel<TG, rows(), loads()><<<it.proj_blocks, shape.tall_threads, 0, stream>>>(it);
    });
  } else if (s.hyper.rank == 1) {
    loads_variant(shape.wide_loads, [&](auto loads) {
      project_wide_kernel<TG, loads()><<<it.proj_blocks, kWideThreads, 0, stream>>>(it);
    });
  } else {
    const TG* G = static_cast<const TG*>(s.grad);
    dim3 grid(static_cast<unsigned>((it.K + kTileM - 1) / kTileM),
              static_cast<unsigned>((s.hyper.rank + kTileN - 1) / kTileN));
    if (it.tall)
      project_gemm_kernel<TG, true><<<grid, 256, 0, stream>>>(G, s.rows, s.cols, s.hyper.rank, it.P, it.R, it.sumsq);
    else
      project_gemm_kernel<TG, false><<<grid, 256, 0, stream>>>(G, s.rows, s.cols, s.hyper.rank, it.P, it.R, it.sumsq);
    LIVETRAIN_CUDA_CHECK(cudaGetLastError());
    total_kernel<<<1, 1024, 0, stream>>>(it.sumsq, it.K, it.scalars, s.hyper.max_grad_norm);
  }
  LIVETRAIN_CUDA_CHECK(cudaGetLastError());
  moments_kernel<<<it.mom_blocks, 256, 0, stream>>>(it);
  LIVETRAIN_CUDA_CHECK(cudaGetLastError());
  rounds_variant<TW>(
      shape, [&](auto v) { update_kernel<TW, TG, v()><<<it.upd_blocks, shape.update_threads, 0, stream>>>(it); });
  LIVETRAIN_CUDA_CHECK(cudaGetLastError());
}

// Up to kBatch rank-1 steps with the same dtypes: one launch per stage, except the projection, launched
// once for the tall items and once for the wide ones (they want different block sizes).
template <typename TW, typename TG>
void launch_many(const ApolloStep* steps, int n, void* workspace, const Shape& shape, cudaStream_t stream) {
  Batch b{};
  b.n = n;
  size_t offset = 0;
  for (int i = 0; i < n; ++i) {
    b.items[i] = make_item(steps[i], static_cast<char*>(workspace) + offset, shape);
    offset += ApolloWorkspace(steps[i].rows, steps[i].cols, 1).bytes;
  }
  auto fill = [&](Stage st, auto blocks_of) {
    b.first[st][0] = 0;
    for (int i = 0; i < n; ++i) b.first[st][i + 1] = b.first[st][i] + blocks_of(b.items[i]);
    return b.first[st][n];
  };
  int g = fill(kGen, [](const Item& it) { return it.gen_blocks; });
  int m = fill(kMoments, [](const Item& it) { return it.mom_blocks; });
  int u = fill(kUpdate, [](const Item& it) { return it.upd_blocks; });
  gen_many_kernel<<<g, 256, 0, stream>>>(b);
  LIVETRAIN_CUDA_CHECK(cudaGetLastError());
  for (int want_tall = 1; want_tall >= 0; --want_tall) {
    int p =
        fill(kProject, [&](const Item& it) { return it.tall == static_cast<bool>(want_tall) ? it.proj_blocks : 0; });
    if (p == 0) continue;
    if (!shape.split) {
      project_fused_many_kernel<TG><<<p, want_tall ? shape.tall_threads : kWideThreads, 0, stream>>>(b);
    } else if (want_tall) {
      tall_variant(shape.tall_rows, shape.tall_loads, [&](auto rows, auto loads) {
        project_tall_many_kernel<TG, rows(), loads()><<<p, shape.tall_threads, 0, stream>>>(b);
      });
    } else {
      loads_variant(shape.wide_loads,
                    [&](auto loads) { project_wide_many_kernel<TG, loads()><<<p, kWideThreads, 0, stream>>>(b); });
    }
    LIVETRAIN_CUDA_CHECK(cudaGetLastError());
  }
  moments_many_kernel<<<m, 256, 0, stream>>>(b);
  LIVETRAIN_CUDA_CHECK(cudaGetLastError());
  bool mini = true;  // apollo.update_mini's kernel compiles APOLLO-Mini's choices in
  for (int i = 0; i < n; ++i)
    mini = mini && b.items[i].h.scaling == Scaling::kTensor && b.items[i].h.rounding == Rounding::kStochastic;
  update_many_variant<TW, TG>(shape, mini, [&](auto variant) {
    auto kernel = update_many_kernel<TW, TG, variant()>;
    const int smem = resident_limit_smem(reinterpret_cast<const void*>(kernel), shape.update_resident);
    kernel<<<u, shape.update_threads, smem, stream>>>(b);
  });
  LIVETRAIN_CUDA_CHECK(cudaGetLastError());
}

// One phase of a step (optim.hpp: ApolloPhase); the caller sums the rounds' regions over ranks in between.
// The launch shapes are the tuning knobs' (docs/tuning.md), as for a whole step.
template <typename TW, typename TG>
void launch_phase(const ApolloStep& s, ApolloPhase phase, cudaStream_t stream) {
  const Shape shape = Shape::current();
  Item it = make_item(s, s.workspace, shape, true);
  const ApolloGeometry& g = it.geo;
  const int rank = s.hyper.rank;
  switch (phase) {
    case ApolloPhase::kProject: {
      if (g.sharded_projected && !s.shard.primary) {  // another rank holding the same block contributes
        LIVETRAIN_CUDA_CHECK(cudaMemsetAsync(it.first, 0, sizeof(float) * (it.K * rank + it.K), stream));
        return;
      }
      gen_kernel<<<it.gen_blocks, 256, 0, stream>>>(it);
      LIVETRAIN_CUDA_CHECK(cudaGetLastError());
      if (rank == 1 && !shape.split) {
        project_fused_kernel<TG><<<it.proj_blocks, it.tall ? shape.tall_threads : kWideThreads, 0, stream>>>(it);
      } else if (rank == 1 && it.tall) {
        tall_variant(shape.tall_rows, shape.tall_loads, [&](auto rows, auto loads) {
          project_tall_kernel<TG, rows(), loads()><<<it.proj_blocks, shape.tall_threads, 0, stream>>>(it);
        });
      } else if (rank == 1) {
        loads_variant(shape.wide_loads, [&](auto loads) {
          project_wide_kernel<TG, loads()><<<it.proj_blocks, kWideThreads, 0, stream>>>(it);
        });
      } else {
        const TG* G = static_cast<const TG*>(s.grad);
        dim3 grid(static_cast<unsigned>((it.K + kTileM - 1) / kTileM),
                  static_cast<unsigned>((rank + kTileN - 1) / kTileN));
        if (it.tall)
          project_gemm_kernel<TG, true><<<grid, 256, 0, stream>>>(G, s.rows, s.cols, rank, it.P, it.R, it.sumsq);
        else project_gemm_kernel<TG, false><<<grid, 256, 0, stream>>>(G, s.rows, s.cols, rank, it.P, it.R, it.sumsq);
        LIVETRAIN_CUDA_CHECK(cudaGetLastError());
        total_kernel<<<1, 1024, 0, stream>>>(it.sumsq, it.K, it.scalars, s.hyper.max_grad_norm);
      }
      LIVETRAIN_CUDA_CHECK(cudaGetLastError());
      if (g.sharded_projected && rank == 1 && !it.tall) {
        collapse_chunks_kernel<<<static_cast<unsigned>(std::min<int64_t>((it.K + 255) / 256, 1024)), 256, 0, stream>>>(
            it);
      } else if (g.sharded_channels) {
        first_total_kernel<<<1, 32, 0, stream>>>(it);
      }
      LIVETRAIN_CUDA_CHECK(cudaGetLastError());
      return;
    }
    case ApolloPhase::kMoments: {
      if (g.sharded_projected) {  // R and ‖G_c‖² summed over ranks, in the first round's region
        it.R = it.first;
        it.sumsq = it.first + it.K * rank;
        it.chunks = 1;
        total_kernel<<<1, 1024, 0, stream>>>(it.sumsq, it.K, it.scalars, s.hyper.max_grad_norm);
      } else if (g.sharded_channels) {
        total_kernel<<<1, 1024, 0, stream>>>(it.first, 1, it.scalars, s.hyper.max_grad_norm);
      }
      LIVETRAIN_CUDA_CHECK(cudaGetLastError());
      moments_kernel<<<it.mom_blocks, 256, 0, stream>>>(it);
      LIVETRAIN_CUDA_CHECK(cudaGetLastError());
      return;
    }
    case ApolloPhase::kUpdate: {
      tail_kernel<<<1, 32, 0, stream>>>(it);
      LIVETRAIN_CUDA_CHECK(cudaGetLastError());
      rounds_variant<TW>(
          shape, [&](auto v) { update_kernel<TW, TG, v()><<<it.upd_blocks, shape.update_threads, 0, stream>>>(it); });
      LIVETRAIN_CUDA_CHECK(cudaGetLastError());
      return;
    }
  }
}

template <typename F>
void dispatch(DType w, DType g, F&& f) {
  const bool wbf = w == DType::kBF16, gbf = g == DType::kBF16;
  if (wbf && gbf) f(uint16_t{}, uint16_t{});
  else if (wbf) f(uint16_t{}, float{});
  else if (gbf) f(float{}, uint16_t{});
  else f(float{}, float{});
}

// A stream and two events owned by scope, for apollo.streams = 2: batches alternate between the caller's
// stream and this one, which starts after the work queued before the call and which the caller's stream
// waits for at the end. Batches use disjoint workspace slices, so nothing else orders them.
struct SideStream {
  cuda::Stream side;
  cuda::Event fork, join;
  explicit SideStream(cudaStream_t main) {
    LIVETRAIN_CUDA_CHECK(cudaEventRecord(fork.h, main));
    LIVETRAIN_CUDA_CHECK(cudaStreamWaitEvent(side.h, fork.h, 0));
  }
  void join_into(cudaStream_t main) {
    LIVETRAIN_CUDA_CHECK(cudaEventRecord(join.h, side.h));
    LIVETRAIN_CUDA_CHECK(cudaStreamWaitEvent(main, join.h, 0));
  }
};

}  // namespace

void apollo_step_cuda(const ApolloStep& s, void* stream) {
  validate(s);
  if (s.shard.dim >= 0) {
    throw Error(ErrorCode::kInvalidArg, "optimizer step: a shard of a tensor steps in phases (apollo_phase_cuda)");
  }
  if (!s.workspace) throw Error(ErrorCode::kInvalidArg, "optimizer step: the CUDA step needs a workspace");
  // The projection reads P with 16-byte vector loads at offsets the workspace layout keeps aligned.
  if (!aligned16(s.workspace)) throw Error(ErrorCode::kInvalidArg, "optimizer step: workspace is not 16-byte aligned");
  dispatch(s.weight_dtype, s.grad_dtype,
           [&](auto w, auto g) { launch<decltype(w), decltype(g)>(s, static_cast<cudaStream_t>(stream)); });
}

void apollo_phase_cuda(const ApolloStep& s, ApolloPhase phase, void* stream) {
  validate(s);
  if (!s.workspace) throw Error(ErrorCode::kInvalidArg, "optimizer step: the CUDA step needs a workspace");
  dispatch(s.weight_dtype, s.grad_dtype, [&](auto w, auto g) {
    launch_phase<decltype(w), decltype(g)>(s, phase, static_cast<cudaStream_t>(stream));
  });
}

void apollo_step_many_cuda(const ApolloStep* steps, int n, void* workspace, size_t workspace_bytes, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  if (apollo_many_workspace_bytes(steps, n) > workspace_bytes) {
    throw Error(ErrorCode::kInvalidArg, "optimizer step: the batch needs a workspace of " +
                                            std::to_string(apollo_many_workspace_bytes(steps, n)) + " bytes, got " +
                                            std::to_string(workspace_bytes));
  }
  for (int i = 0; i < n; ++i) {
    validate(steps[i]);
    // The batched kernels step whole tensors (their items are not in phases): a shard would be stepped as if
    // it were the whole tensor, with the wrong projection, norms and rounding offsets.
    if (steps[i].shard.dim >= 0)
      throw Error(ErrorCode::kInvalidArg, "optimizer step: step " + std::to_string(i) +
                                              " is a shard of a tensor, which steps in phases (apollo_phase_cuda)");
  }
  // Each step's slice is a whole number of 256-byte regions from here (optim/workspace.hpp), so this
  // keeps every slice's 16-byte vector loads of P aligned.
  if (n && !aligned16(workspace))
    throw Error(ErrorCode::kInvalidArg, "optimizer step: workspace is not 16-byte aligned");
  const Shape shape = Shape::current();
  std::optional<SideStream> side;
  if (shape.streams == 2) side.emplace(st);
  int batches = 0;
  auto next_stream = [&] { return side && batches++ % 2 ? side->side.h : st; };
  // Rank-1 steps with the same dtypes go in batches; anything else runs alone in its own workspace slice.
  char* ws = static_cast<char*>(workspace);
  int i = 0;
  while (i < n) {
    const size_t bytes_i = ApolloWorkspace(steps[i].rows, steps[i].cols, steps[i].hyper.rank).bytes;
    if (steps[i].hyper.rank != 1) {
      ApolloStep one = steps[i];
      one.workspace = ws;
      apollo_step_cuda(one, next_stream());
      ws += bytes_i;
      ++i;
      continue;
    }
    int j = i;
    size_t bytes = 0;
    while (j < n && j - i < std::min(kBatch, shape.batch) && steps[j].hyper.rank == 1 &&
           steps[j].weight_dtype == steps[i].weight_dtype && steps[j].grad_dtype == steps[i].grad_dtype) {
      bytes += ApolloWorkspace(steps[j].rows, steps[j].cols, 1).bytes;
      ++j;
    }
    cudaStream_t on = next_stream();
    dispatch(steps[i].weight_dtype, steps[i].grad_dtype,
             [&](auto w, auto g) { launch_many<decltype(w), decltype(g)>(steps + i, j - i, ws, shape, on); });
    ws += bytes;
    i = j;
  }
  if (side) side->join_into(st);
}

}  // namespace livetrain::optim
