// Entry points shared by the CPU and CUDA optimizer steps: argument checks, defaults, workspace sizes.
#include <string>

#include "livetrain/error.hpp"
#include "livetrain/optim.hpp"
#include "optim/common.hpp"
#include "optim/workspace.hpp"

namespace livetrain::optim {

namespace {
[[noreturn]] void bad(const std::string& what) { throw Error(ErrorCode::kInvalidArg, "optimizer step: " + what); }

void check_dtype(DType dt, const char* field) {
  if (dt != DType::kBF16 && dt != DType::kF32) {
    bad(std::string(field) + " dtype " + std::string(dtype_name(dt)) + " is not supported (BF16 or F32)");
  }
}

// A shard whose segments lie inside the full tensor and add up to the part's size along its dim (`local`).
void check_shard(const Shard& sh, int ndim, int64_t local) {
  if (sh.dim < 0) return;
  if (sh.dim >= ndim) bad("shard dim " + std::to_string(sh.dim) + " is not a dimension of the parameter");
  if (sh.segments < 1 || sh.segments > kMaxShardSegments) {
    bad("a shard has 1 to " + std::to_string(kMaxShardSegments) + " segments, not " + std::to_string(sh.segments));
  }
  int64_t sum = 0;
  for (int i = 0; i < sh.segments; ++i) {
    const ShardSegment& seg = sh.segment[i];
    if (seg.start < 0 || seg.length < 1 || seg.start > sh.full - seg.length) {
      bad("shard segment " + std::to_string(i) + " [" + std::to_string(seg.start) + ", +" + std::to_string(seg.length) +
          ") is not inside the full size " + std::to_string(sh.full) + " of dim " + std::to_string(sh.dim));
    }
    sum += seg.length;
  }
  if (sum != local) {
    bad("the shard's segments hold " + std::to_string(sum) + " indices of dim " + std::to_string(sh.dim) +
        ", the part has " + std::to_string(local));
  }
}
}  // namespace

int64_t shard_index(const Shard& shard, int64_t local) { return detail::shard_global(shard, local); }

ApolloHyper apollo_mini_defaults() {
  ApolloHyper h;
  h.rank = 1;
  h.scaling = Scaling::kTensor;
  h.scale = 128.0f;
  return h;
}

void validate(const ApolloStep& s) {
  check_dtype(s.weight_dtype, "weight");
  check_dtype(s.grad_dtype, "grad");
  if (s.rows <= 0 || s.cols <= 0)
    bad("matrix shape [" + std::to_string(s.rows) + ", " + std::to_string(s.cols) + "] is empty");
  if (s.ld_weight < s.cols) bad("weight row stride " + std::to_string(s.ld_weight) + " is smaller than its columns");
  if (!s.weight || !s.grad || !s.m || !s.v || !s.prev_norm || !s.status || !s.step) bad("a required pointer is null");
  check_shard(s.shard, 2, s.shard.dim == 0 ? s.rows : s.cols);
  const ApolloHyper& h = s.hyper;
  // The rank is checked against the full tensor: that is the matrix the step projects.
  const detail::ApolloGeometry g = detail::apollo_geometry(s.rows, s.cols, s.shard);
  if (h.rank < 1) bad("rank must be at least 1");
  if (h.rank > (g.rows_full < g.cols_full ? g.rows_full : g.cols_full)) {
    bad("rank " + std::to_string(h.rank) + " exceeds the smaller dimension of [" + std::to_string(g.rows_full) + ", " +
        std::to_string(g.cols_full) + "]");
  }
  if (h.update_proj_gap < 1) bad("update_proj_gap must be at least 1");
  if (!(h.beta1 >= 0.0 && h.beta1 < 1.0) || !(h.beta2 >= 0.0 && h.beta2 < 1.0)) bad("betas must be in [0, 1)");
  if (!(h.lr >= 0.0f) || !(h.eps >= 0.0f) || !(h.scale > 0.0f) || !(h.max_grad_norm >= 0.0f)) {
    bad("lr, eps, max_grad_norm must be >= 0 and scale > 0");
  }
}

void validate(const AdamWStep& s) {
  check_dtype(s.weight_dtype, "weight");
  check_dtype(s.grad_dtype, "grad");
  if (s.numel <= 0) bad("empty parameter");
  if (!s.weight || !s.grad || !s.m || !s.v || !s.status || !s.step) bad("a required pointer is null");
  if (s.shard.dim >= 0) {
    if (s.inner < 1 || s.numel % s.inner != 0)
      bad("inner " + std::to_string(s.inner) + " does not divide the part's size");
    int64_t local = 0;
    for (int i = 0; i < s.shard.segments && i < kMaxShardSegments; ++i) local += s.shard.segment[i].length;
    check_shard(s.shard, s.shard.dim + 1, local);
    if (local < 1 || (s.numel / s.inner) % local != 0) bad("the shard's segments do not divide the part's size");
  }
  const AdamWHyper& h = s.hyper;
  if (!(h.beta1 >= 0.0 && h.beta1 < 1.0) || !(h.beta2 >= 0.0 && h.beta2 < 1.0)) bad("betas must be in [0, 1)");
  if (!(h.lr >= 0.0f) || !(h.eps >= 0.0f) || !(h.max_grad_norm >= 0.0f)) bad("lr, eps, max_grad_norm must be >= 0");
}

size_t apollo_workspace_bytes(int64_t rows, int64_t cols, int32_t rank) {
  return ApolloWorkspace(rows, cols, rank).bytes;
}

size_t apollo_phase_workspace_bytes(const ApolloStep& s) {
  const detail::ApolloGeometry g = detail::apollo_geometry(s.rows, s.cols, s.shard);
  return ApolloWorkspace(s.rows, s.cols, s.hyper.rank, g.tall, true).bytes;
}

ApolloReduce apollo_reduce_layout(const ApolloStep& s) {
  const detail::ApolloGeometry g = detail::apollo_geometry(s.rows, s.cols, s.shard);
  const ApolloWorkspace ws(s.rows, s.cols, s.hyper.rank, g.tall, true);
  ApolloReduce r;
  r.first_offset = ws.off_first / sizeof(float);
  r.second_offset = ws.off_second / sizeof(float);
  if (g.sharded_projected) r.first_count = static_cast<size_t>(g.K) * (s.hyper.rank + 1);
  if (g.sharded_channels) {
    r.first_count = 1;
    r.second_count = ApolloWorkspace::kSecondFloats;
  }
  return r;
}

size_t adamw_workspace_bytes(int64_t numel) { return AdamWWorkspace(numel).bytes; }

size_t apollo_many_workspace_bytes(const ApolloStep* steps, int n) {
  size_t total = 0;
  for (int i = 0; i < n; ++i) total += ApolloWorkspace(steps[i].rows, steps[i].cols, steps[i].hyper.rank).bytes;
  return total;
}

size_t adamw_many_workspace_bytes(const AdamWStep* steps, int n) {
  size_t total = 0;
  for (int i = 0; i < n; ++i) total += AdamWWorkspace(steps[i].numel).bytes;
  return total;
}

void apollo_step_many_cpu(const ApolloStep* steps, int n) {
  for (int i = 0; i < n; ++i) apollo_step_cpu(steps[i]);
}

void adamw_step_many_cpu(const AdamWStep* steps, int n) {
  for (int i = 0; i < n; ++i) adamw_step_cpu(steps[i]);
}

#ifndef LIVETRAIN_WITH_CUDA
void apollo_step_cuda(const ApolloStep&, void*) {
  throw Error(ErrorCode::kUnsupported, "optimizer step on CUDA: this build of livetrain has no CUDA code");
}
void adamw_step_cuda(const AdamWStep&, void*) {
  throw Error(ErrorCode::kUnsupported, "optimizer step on CUDA: this build of livetrain has no CUDA code");
}
void apollo_step_many_cuda(const ApolloStep*, int, void*, size_t, void*) {
  throw Error(ErrorCode::kUnsupported, "optimizer step on CUDA: this build of livetrain has no CUDA code");
}
void apollo_phase_cuda(const ApolloStep&, ApolloPhase, void*) {
  throw Error(ErrorCode::kUnsupported, "optimizer step on CUDA: this build of livetrain has no CUDA code");
}
void adamw_sumsq_cuda(const void*, DType, int64_t, float*, void*, void*) {
  throw Error(ErrorCode::kUnsupported, "optimizer step on CUDA: this build of livetrain has no CUDA code");
}
void adamw_step_many_cuda(const AdamWStep*, int, void*, size_t, void*) {
  throw Error(ErrorCode::kUnsupported, "optimizer step on CUDA: this build of livetrain has no CUDA code");
}
#endif

}  // namespace livetrain::optim
