// Internal: bf16 ⇄ f32 conversions shared bit-for-bit by every CPU and CUDA path that reads or writes bf16
// (optimizer steps, loss passes): the same inline code compiles for the host and the device, so a CPU
// reference and its kernel round identically.
#pragma once

#include <cstdint>
#include <cstring>

// Host and device: a CPU reference and its kernel call the same functions.
#if defined(__CUDACC__)
#define LT_HD __host__ __device__ __forceinline__
#else
#define LT_HD inline
#endif

namespace livetrain {

LT_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

LT_HD float bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

LT_HD float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }

LT_HD uint16_t f32_to_bf16_nearest(float f) {
  uint32_t u = f32_bits(f);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// Stochastic rounding: add a uniform 16-bit offset below the bf16 mantissa and truncate, so the result is
// the upper neighbour with probability equal to the discarded fraction (E[round(x)] = x). A carry into
// the exponent past the largest finite bf16 would give Inf; then round to nearest instead.
LT_HD uint16_t f32_to_bf16_stochastic(float f, uint16_t offset) {
  uint32_t u = f32_bits(f);
  uint32_t r = (u + offset) >> 16;
  if ((r & 0x7F80u) == 0x7F80u && (u & 0x7F800000u) != 0x7F800000u) return f32_to_bf16_nearest(f);
  return static_cast<uint16_t>(r);
}

}  // namespace livetrain
