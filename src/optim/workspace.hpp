// Internal: how a CUDA optimizer step carves its workspace (sizes known on the host, offsets used by the
// kernels). The workspace must be zero-filled once before its first use; every step leaves its counters
// at zero again, so one workspace serves all parameters of a stream in turn. The counters sit at the same
// place (the first 256 bytes) in every layout, so APOLLO and AdamW steps can share one workspace.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace livetrain::optim {

inline constexpr int kMaxBlocks = 4096;         // cap of every grid whose blocks leave partial sums
inline constexpr int kWideColsPerBlock = 1024;  // rank-1 wide projection: 128 threads × 8 columns

// Scalars a step passes between its kernels.
enum Scalar : int { kTotalSq = 0, kClip, kStepSize, kMultiplier, kTensorScale, kNumScalars = 16 };

inline size_t align256(size_t x) { return (x + 255) & ~size_t{255}; }

// Completion counters of the last-block reductions, at offset 0 of every workspace.
enum Counter : int { kCounterProject = 0, kCounterMoments = 1, kCounterAdamW = 2, kNumCounters = 64 };
inline constexpr size_t kCountersBytes = 256;

struct ApolloWorkspace {
  bool tall, rank1;
  int64_t K, k;
  int64_t chunks = 1, rows_per_chunk = 0;  // rank-1 wide projection only
  size_t off_p, off_r, off_sumsq, off_scale, off_partials, off_scalars, off_counters, bytes;
  // A step in phases (optim.hpp: ApolloPhase): the sums over ranks, after everything else. First round:
  // R [K, rank] then ‖G_c‖² [K] (or ‖G‖² alone); second: Σ s²c²‖G_c‖², ‖R̃‖², ‖R‖².
  size_t off_first = 0, off_second = 0;
  static constexpr size_t kSecondFloats = 3;

  // `tall`: the full tensor's orientation (rows >= cols unless a shard says otherwise); `phases`: room for
  // the sums over ranks.
  ApolloWorkspace(int64_t rows, int64_t cols, int32_t rank) : ApolloWorkspace(rows, cols, rank, rows >= cols, false) {}
  ApolloWorkspace(int64_t rows, int64_t cols, int32_t rank, bool full_tall, bool phases) {
    tall = full_tall;
    rank1 = rank == 1;
    K = tall ? rows : cols;
    k = tall ? cols : rows;
    size_t r_elems = static_cast<size_t>(K) * rank, sq_elems = static_cast<size_t>(K);
    if (!tall && rank1) {
      int64_t col_blocks = (cols + kWideColsPerBlock - 1) / kWideColsPerBlock;
      chunks = std::min<int64_t>(64, std::max<int64_t>(1, 1024 / col_blocks));
      chunks = std::min<int64_t>(chunks, rows);
      rows_per_chunk = (rows + chunks - 1) / chunks;
      chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
      r_elems = sq_elems = static_cast<size_t>(chunks) * K;
    }
    size_t o = kCountersBytes;
    off_counters = 0;
    off_p = o;
    o += align256(sizeof(float) * static_cast<size_t>(k) * rank);
    off_r = o;
    o += align256(sizeof(float) * r_elems);
    off_sumsq = o;
    o += align256(sizeof(float) * sq_elems);
    off_scale = o;
    o += align256(sizeof(float) * static_cast<size_t>(K));
    off_partials = o;
    o += align256(sizeof(float) * kMaxBlocks * 4);
    off_scalars = o;
    o += align256(sizeof(float) * kNumScalars);
    if (phases) {
      off_first = o;
      o += align256(sizeof(float) * (static_cast<size_t>(K) * rank + static_cast<size_t>(K)));
      off_second = o;
      o += align256(sizeof(float) * kSecondFloats);
    }
    bytes = o;
  }
};

struct AdamWWorkspace {
  size_t off_partials, off_scalars, off_counters, bytes;
  explicit AdamWWorkspace(int64_t) {
    off_counters = 0;
    off_partials = kCountersBytes;
    off_scalars = off_partials + align256(sizeof(float) * kMaxBlocks);
    bytes = off_scalars + align256(sizeof(float) * kNumScalars);
  }
};

}  // namespace livetrain::optim
