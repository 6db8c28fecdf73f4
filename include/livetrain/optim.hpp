// APOLLO, APOLLO-Mini and AdamW steps on one parameter, in place, with CPU and CUDA implementations of the
// same signature. The math, with the paper's equation numbers, is in docs/optim.md.
//
// APOLLO (Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance", arXiv 2412.05270) keeps AdamW's
// moments for a random projection R of the gradient G (rank r, along the smaller dimension), turns them
// into a per-channel (APOLLO) or per-tensor (APOLLO-Mini) scaling factor s = ‖R̃‖ / ‖R‖, and applies the
// scaled *full-rank* gradient: W ← (W − η·√α·(s/λ)·G)·(1 − lr·wd), with λ the norm-growth limiter.
//
// Memory: an m×n matrix with K = max(m, n) keeps M and V of K×r floats and one float for the limiter; the
// projection P (r×min(m, n)) is regenerated from (seed, step / update_proj_gap) with a counter-based
// generator (Philox4x32-10) every step and never stored.
//
// A step is a pure function of (weight, gradient, state, step counter, seed): the same inputs give the same
// result on the same device, and stochastic rounding draws its bits from Philox keyed by (seed, step,
// element), so a step is reproducible.
//
// Tensor parallelism: a rank that holds part of a parameter (a Shard) steps it in three phases, between
// which the caller sums small buffers over the ranks (ApolloReduce). Projection entries and rounding
// offsets are keyed by the full tensor's indices and the projection's direction by its full shape, so
// the N ranks together make the TP-1 step up to the rounding of those sums (docs/optim.md).
#pragma once

#include <cstddef>
#include <cstdint>

#include "livetrain/dtype.hpp"

namespace livetrain::optim {

enum class Rounding : uint8_t { kStochastic = 0, kNearest = 1 };
enum class Scaling : uint8_t { kChannel = 0, kTensor = 1 };

// Outcome of one parameter's step, written by the step itself (on the device for CUDA steps) so that
// nothing waits for the host; read it after the stream is synchronized. The step counter lives beside it
// (same device) and only a successful step advances it, so a skipped step leaves no trace at all.
enum Status : int32_t {
  kStatusOk = 0,
  kStatusNonFiniteGrad = 1,    // the gradient holds NaN or Inf: nothing was written (weight, M, V, limiter)
  kStatusNonFiniteUpdate = 2,  // the update overflowed: the weight was not written
};

// A tensor-parallel rank's part of a parameter: along dimension `dim`, the runs of the full tensor's
// indices this rank holds, concatenated in the order of the local tensor (a column-parallel weight: a block
// of rows; a row-parallel one: a block of columns; Qwen3.5's in_proj_qkv: its q, k and v row blocks).
inline constexpr int kMaxShardSegments = 4;
struct ShardSegment {
  int64_t start = 0;
  int64_t length = 0;
};
struct Shard {
  int32_t dim = -1;  // the sharded dimension; -1: the rank holds the whole tensor (TP 1, or replicated)
  int64_t full = 0;  // the full tensor's size along dim
  int32_t segments = 0;
  ShardSegment segment[kMaxShardSegments];
  // Whether this rank's values count in sums over ranks: of several ranks holding the same block (a KV
  // head shared when the TP size exceeds the KV heads), one; the others contribute zeros.
  bool primary = true;
};

// Index `local` along the sharded dimension -> the full tensor's index.
int64_t shard_index(const Shard& shard, int64_t local);

// Betas are double so that 1 − β is exact before it is rounded to float (1 − 0.999f is 1.3e-5 off 0.001).
struct ApolloHyper {
  float lr = 1e-3f;
  double beta1 = 0.9;
  double beta2 = 0.999;
  float eps = 1e-6f;
  float weight_decay = 0.0f;
  int32_t rank = 1;
  int32_t update_proj_gap = 200;
  float scale = 1.0f;  // α², the paper's scale: the update is multiplied by √scale
  Scaling scaling = Scaling::kChannel;
  bool limiter = true;         // norm-growth limiter, γ = 1.01
  float max_grad_norm = 0.0f;  // per-parameter clipping of ‖G‖ before the step; 0 = off
  Rounding rounding = Rounding::kStochastic;
};

// The APOLLO-Mini settings of the paper: rank 1, tensor-wise scaling, scale 128 (α = √128).
ApolloHyper apollo_mini_defaults();

// One APOLLO step on a matrix parameter.
struct ApolloStep {
  void* weight = nullptr;  // [rows, cols], row stride ld_weight elements; BF16 or F32; updated in place
  DType weight_dtype = DType::kBF16;
  int64_t ld_weight = 0;
  const void* grad = nullptr;  // [rows, cols], contiguous; BF16 or F32
  DType grad_dtype = DType::kBF16;
  int64_t rows = 0;
  int64_t cols = 0;
  float* m = nullptr;          // [max(rows, cols), rank] fp32, zero at the first step
  float* v = nullptr;          // [max(rows, cols), rank] fp32
  float* prev_norm = nullptr;  // [1] fp32: ‖U‖ of the previous step, < 0 before the first
  int32_t* status = nullptr;   // [1] out: a Status
  uint64_t* step = nullptr;    // [1] steps completed (t); incremented by a step that succeeds
  uint64_t seed = 0;           // the parameter's seed
  void* workspace = nullptr;   // apollo_workspace_bytes(rows, cols, rank) bytes, same device
  ApolloHyper hyper;
  Shard shard;  // rows and cols are this rank's; the default: the whole tensor
};

size_t apollo_workspace_bytes(int64_t rows, int64_t cols, int32_t rank);

// ---- a step in phases (tensor parallelism) ----
// apollo_phase(kProject) projects this rank's G (P sliced to its indices) and writes the partial sums of the
// first round; the caller sums workspace floats [first_offset, first_offset + first_count) over the ranks;
// apollo_phase(kMoments) updates M and V and writes the partial sums of the second round; the caller sums
// [second_offset, +second_count); apollo_phase(kUpdate) applies the limiter and updates W. A count of zero
// means there is nothing to sum (offsets count floats from the workspace's start):
//   sharded along the projected (smaller) dimension: R [K, rank] and the channels' ‖G_c‖² (first round);
//   sharded along the channels (the larger dimension): ‖G‖² (first), Σ s²c²‖G_c‖², ‖R̃‖², ‖R‖² (second).
// Run by one rank with shard.dim = -1 and no sums, the phases are apollo_step. Phases of one parameter run
// in order on one workspace (apollo_phase_workspace_bytes), zero-filled once, as the fused step's.
enum class ApolloPhase : uint8_t { kProject = 0, kMoments = 1, kUpdate = 2 };
struct ApolloReduce {
  size_t first_offset = 0;
  size_t first_count = 0;
  size_t second_offset = 0;
  size_t second_count = 0;
};
size_t apollo_phase_workspace_bytes(const ApolloStep& s);
ApolloReduce apollo_reduce_layout(const ApolloStep& s);
void apollo_phase_cpu(const ApolloStep& s, ApolloPhase phase);
void apollo_phase_cuda(const ApolloStep& s, ApolloPhase phase, void* stream);

// The projection for a step, as the step uses it: P is [rank, cols] when rows >= cols (R = G·Pᵀ), else
// [rows, rank] (R = Pᵀ·G), entries N(0, 1/rank), regenerated from (seed, step / update_proj_gap).
void apollo_projection(float* out, int64_t rows, int64_t cols, int32_t rank, uint64_t seed, uint64_t step,
                       int32_t update_proj_gap);

struct AdamWHyper {
  float lr = 1e-3f;
  double beta1 = 0.9;
  double beta2 = 0.999;
  float eps = 1e-8f;
  float weight_decay = 0.0f;
  float max_grad_norm = 0.0f;
  Rounding rounding = Rounding::kStochastic;
};

// One AdamW step (torch.optim.AdamW's math: decoupled decay W ← W·(1 − lr·wd) first) on any parameter.
struct AdamWStep {
  void* weight = nullptr;  // [n] contiguous, BF16 or F32
  DType weight_dtype = DType::kBF16;
  const void* grad = nullptr;  // [n] contiguous
  DType grad_dtype = DType::kBF16;
  int64_t numel = 0;
  float* m = nullptr;  // [n] fp32
  float* v = nullptr;  // [n] fp32
  int32_t* status = nullptr;
  uint64_t* step = nullptr;  // [1] steps completed; incremented by a step that succeeds
  uint64_t seed = 0;
  void* workspace = nullptr;  // adamw_workspace_bytes(numel)
  AdamWHyper hyper;
  // Tensor parallelism: the numel elements are this rank's part of a tensor sharded as `shard`, `inner`
  // elements per index of the sharded dimension (the product of the later dimensions), so that rounding
  // offsets are keyed by the full tensor's element indices. `total_sq` (same device), when set, is ‖G‖² of
  // the full tensor (adamw_sumsq summed over the ranks), used instead of this part's.
  Shard shard;
  int64_t inner = 1;
  const float* total_sq = nullptr;
};

size_t adamw_workspace_bytes(int64_t numel);

// out[0] ← ‖G‖² of `numel` contiguous values (the partial sum a rank contributes to AdamWStep::total_sq).
void adamw_sumsq_cpu(const void* grad, DType grad_dtype, int64_t numel, float* out);
void adamw_sumsq_cuda(const void* grad, DType grad_dtype, int64_t numel, float* out, void* workspace, void* stream);

// CPU implementations (multithreaded; the reference for the CUDA ones).
void apollo_step_cpu(const ApolloStep& s);
void adamw_step_cpu(const AdamWStep& s);

// CUDA implementations: every pointer is device memory of the current device; work is queued on `stream`
// (a cudaStream_t) and nothing synchronizes. Throw Error(kUnsupported) in builds without CUDA.
void apollo_step_cuda(const ApolloStep& s, void* stream);
void adamw_step_cuda(const AdamWStep& s, void* stream);

// Many APOLLO steps at once (an optimizer's whole step()): rank-1 steps with the same dtypes are launched
// together, four launches per batch of up to 64 parameters instead of four per parameter; others run one
// by one. Each step gets its own slice of `workspace` (apollo_many_workspace_bytes; zero-filled before
// first use); the steps' own `workspace` fields are ignored.
size_t apollo_many_workspace_bytes(const ApolloStep* steps, int n);
void apollo_step_many_cuda(const ApolloStep* steps, int n, void* workspace, size_t workspace_bytes, void* stream);
// The CPU reference: each step alone (apollo_step_cpu), in order; the steps' workspaces are not used.
void apollo_step_many_cpu(const ApolloStep* steps, int n);

// Many AdamW steps at once (an optimizer's norms, biases and other small tensors): steps with the same dtypes
// are launched together, two launches per batch of up to 64 parameters instead of two per parameter, with the
// same result as stepping each alone. Each step gets its own slice of `workspace` (adamw_many_workspace_bytes;
// zero-filled before first use); the steps' own `workspace` fields are ignored. Tensor-parallel parts (shard,
// total_sq) are refused: they step alone, after their sums over ranks.
size_t adamw_many_workspace_bytes(const AdamWStep* steps, int n);
void adamw_step_many_cuda(const AdamWStep* steps, int n, void* workspace, size_t workspace_bytes, void* stream);
// The CPU reference: each step alone (adamw_step_cpu), in order.
void adamw_step_many_cpu(const AdamWStep* steps, int n);

// Checks a step's arguments (dtypes, sizes, non-null pointers); throws Error(kInvalidArg) naming the field.
void validate(const ApolloStep& s);
void validate(const AdamWStep& s);

}  // namespace livetrain::optim
