// Internal: the GPU diff's chunks and their 64-bit digests (knob checkpoint.digests, docs/tuning.md).
//
// The GPU diff works on chunks of kDiffChunk elements of a tensor (the last may be shorter). With digests
// on, a store keeps one digest per chunk of its head copy in device memory; a save hashes the live
// weights at device bandwidth and reads over PCIe only the chunks whose digest differs, so a save after
// no change costs a pass over device memory instead of one over the head copy in host memory.
//
// Digest of n bytes: the bytes as 64-bit little-endian words w_j (the last one zero-padded), then
//   d = mix(Σ_j mix(w_j ⊕ (j + 1)·φ) ⊕ mix(n))   (sum mod 2^64; mix = SplitMix64's finalizer, φ = 0x9E37...)
// mix is a bijection, so any change confined to one word always changes the digest; other changes go
// unseen with probability about 2^-64 per chunk and save. A sum commutes, so threads may add the terms in
// any order and the CPU and GPU agree bit for bit. Digests never leave the process (no format).
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "livetrain/checkpoint/diff.hpp"

#ifndef LT_HD
#if defined(__CUDACC__)
#define LT_HD __host__ __device__ __forceinline__
#else
#define LT_HD inline
#endif
#endif

namespace livetrain::checkpoint {

// Elements per chunk of the GPU diff: a multiple of its block's 256 threads (so a warp's 32 elements are
// one 32-bit bitmap word), and kBlockUnits is a multiple of it.
inline constexpr uint64_t kDiffChunk = 8192;

LT_HD uint64_t digest_mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
LT_HD uint64_t digest_term(uint64_t word, uint64_t j) { return digest_mix(word ^ ((j + 1) * 0x9E3779B97F4A7C15ull)); }
LT_HD uint64_t digest_finish(uint64_t sum, uint64_t nbytes) { return digest_mix(sum ^ digest_mix(nbytes)); }

// The CPU reference of one chunk's digest.
inline uint64_t chunk_digest(const uint8_t* p, uint64_t nbytes) {
  uint64_t sum = 0;
  for (uint64_t j = 0; j * 8 < nbytes; ++j) {
    uint64_t w = 0;
    std::memcpy(&w, p + j * 8, nbytes - j * 8 >= 8 ? 8 : nbytes - j * 8);  // little-endian host (bytes.hpp)
    sum += digest_term(w, j);
  }
  return digest_finish(sum, nbytes);
}

// Digests of every chunk of every tensor's `now` (or `old`), in order: tensor 0's chunks, then tensor 1's.
void chunk_digests_cpu(const std::vector<DiffTensor>& tensors, bool of_old, std::vector<uint64_t>& out);
// The same on the current CUDA device (`now`/`old` in device or mapped page-locked host memory).
void chunk_digests_cuda(const std::vector<DiffTensor>& tensors, bool of_old, std::vector<uint64_t>& out, void* stream);

}  // namespace livetrain::checkpoint
