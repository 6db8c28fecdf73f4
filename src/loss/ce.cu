// CUDA implementation of include/livetrain/loss.hpp: one block of 256 threads per row; 16-byte loads
// (8 bf16 or 4 fp32) where the row is 16-byte aligned, single elements otherwise and for the tail.
// logsumexp: each thread keeps a running (max, sum of exp(x − max)) pair, merged across the block.
#include <cuda_runtime.h>

#include <cstdint>

#include "common/bf16.hpp"
#include "cuda/check.hpp"
#include "livetrain/error.hpp"
#include "livetrain/loss.hpp"

namespace livetrain::loss {

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float to_f32(uint16_t v) { return bf16_to_f32(v); }
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ void store(uint16_t* p, float v) { *p = f32_to_bf16_nearest(v); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }

// Running log-sum-exp of one thread: max m and s = Σ exp(x − m); bad once a NaN or +Inf was seen.
struct Acc {
  float m = -INFINITY;
  float s = 0.0f;
  bool bad = false;
  __device__ __forceinline__ void add(float x) {
    if (isnan(x) || x == INFINITY) {
      bad = true;
    } else if (x > m) {
      s = s * expf(m - x) + 1.0f;  // m = −Inf at first: expf(−Inf) = 0
      m = x;
    } else if (x != -INFINITY) {
      s += expf(x - m);
    }
  }
  __device__ __forceinline__ void merge(float om, float os, bool obad) {
    bad = bad || obad;
    if (om == -INFINITY) return;
    if (m == -INFINITY) {
      m = om;
      s = os;
    } else if (om > m) {
      s = s * expf(m - om) + os;
      m = om;
    } else {
      s += os * expf(om - m);
    }
  }
};

template <typename T>
__global__ void logsumexp_kernel(const T* __restrict__ x, int64_t cols, int64_t ld, float* __restrict__ lse) {
  const int64_t row = blockIdx.x;
  const T* r = x + row * ld;
  Acc acc;
  constexpr int kVec = 16 / sizeof(T);
  int64_t start = 0;
  if ((reinterpret_cast<uintptr_t>(r) & 15) == 0) {
    const int64_t nvec = cols / kVec;
    const uint4* rv = reinterpret_cast<const uint4*>(r);
    for (int64_t v = threadIdx.x; v < nvec; v += kThreads) {
      uint4 q = rv[v];
      const T* e = reinterpret_cast<const T*>(&q);
#pragma unroll
      for (int k = 0; k < kVec; ++k) acc.add(to_f32(e[k]));
    }
    start = nvec * kVec;
  }
  for (int64_t j = start + threadIdx.x; j < cols; j += kThreads) acc.add(to_f32(r[j]));

  for (int o = 16; o > 0; o >>= 1) {
    float om = __shfl_xor_sync(0xFFFFFFFFu, acc.m, o);
    float os = __shfl_xor_sync(0xFFFFFFFFu, acc.s, o);
    bool ob = __shfl_xor_sync(0xFFFFFFFFu, static_cast<int>(acc.bad), o) != 0;
    acc.merge(om, os, ob);
  }
  __shared__ float sm[kThreads / 32], ss[kThreads / 32];
  __shared__ int sb[kThreads / 32];
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) {
    sm[warp] = acc.m;
    ss[warp] = acc.s;
    sb[warp] = acc.bad;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    Acc total;
    for (int w = 0; w < kThreads / 32; ++w) total.merge(sm[w], ss[w], sb[w] != 0);
    float block = total.bad ? NAN : (total.m == -INFINITY ? -INFINITY : total.m + logf(total.s));
    float prev = lse[row];
    float out;
    if (isnan(prev) || isnan(block) || prev == INFINITY || block == INFINITY) out = NAN;
    else if (prev == -INFINITY) out = block;
    else if (block == -INFINITY) out = prev;
    else out = fmaxf(prev, block) + log1pf(expf(-fabsf(prev - block)));
    lse[row] = out;
  }
}

template <typename T>
__global__ void softmax_grad_kernel(T* __restrict__ x, int64_t cols, int64_t ld, const float* __restrict__ lse,
                                    const int64_t* __restrict__ target, int64_t col0, const float* __restrict__ scale) {
  const int64_t row = blockIdx.x;
  T* r = x + row * ld;
  const float l = lse[row], sc = scale[row];
  const int64_t t = target[row] - col0;
  constexpr int kVec = 16 / sizeof(T);
  int64_t start = 0;
  if ((reinterpret_cast<uintptr_t>(r) & 15) == 0) {
    const int64_t nvec = cols / kVec;
    uint4* rv = reinterpret_cast<uint4*>(r);
    for (int64_t v = threadIdx.x; v < nvec; v += kThreads) {
      uint4 q = rv[v];
      T* e = reinterpret_cast<T*>(&q);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const int64_t j = v * kVec + k;
        store(&e[k], (expf(to_f32(e[k]) - l) - (j == t ? 1.0f : 0.0f)) * sc);
      }
      rv[v] = q;
    }
    start = nvec * kVec;
  }
  for (int64_t j = start + threadIdx.x; j < cols; j += kThreads)
    store(&r[j], (expf(to_f32(r[j]) - l) - (j == t ? 1.0f : 0.0f)) * sc);
}

void check_rows(const Logits& x) {
  if (x.rows > 0x7FFFFFFF) throw Error(ErrorCode::kInvalidArg, "loss on CUDA: more than 2^31 − 1 rows in one block");
}

}  // namespace

void logsumexp_rows_cuda(const Logits& x, float* lse, void* stream) {
  validate(x);
  check_rows(x);
  if (x.rows == 0) return;
  if (!lse) throw Error(ErrorCode::kInvalidArg, "loss: lse pointer is null");
  auto st = static_cast<cudaStream_t>(stream);
  const unsigned grid = static_cast<unsigned>(x.rows);
  if (x.dtype == DType::kBF16)
    logsumexp_kernel<uint16_t><<<grid, kThreads, 0, st>>>(static_cast<const uint16_t*>(x.data), x.cols, x.ld, lse);
  else logsumexp_kernel<float><<<grid, kThreads, 0, st>>>(static_cast<const float*>(x.data), x.cols, x.ld, lse);
  LIVETRAIN_CUDA_CHECK(cudaGetLastError());
}

void softmax_grad_rows_cuda(const Logits& x, const float* lse, const int64_t* target, int64_t col0, const float* scale,
                            void* stream) {
  validate(x);
  check_rows(x);
  if (x.rows == 0 || x.cols == 0) return;
  if (!lse || !target || !scale) throw Error(ErrorCode::kInvalidArg, "loss: lse, target or scale pointer is null");
  auto st = static_cast<cudaStream_t>(stream);
  const unsigned grid = static_cast<unsigned>(x.rows);
  if (x.dtype == DType::kBF16)
    softmax_grad_kernel<uint16_t>
        <<<grid, kThreads, 0, st>>>(static_cast<uint16_t*>(x.data), x.cols, x.ld, lse, target, col0, scale);
  else
    softmax_grad_kernel<float>
        <<<grid, kThreads, 0, st>>>(static_cast<float*>(x.data), x.cols, x.ld, lse, target, col0, scale);
  LIVETRAIN_CUDA_CHECK(cudaGetLastError());
}

}  // namespace livetrain::loss
