// Entry points shared by the CPU and CUDA optimizer steps: argument checks, defaults, workspace sizes.
#include <string>

#include "livetrain/error.hpp"
#include "livetrain/optim.hpp"
#include "optim/workspace.hpp"

namespace livetrain::optim {

namespace {
[[noreturn]] void bad(const std::string& what) { throw Error(ErrorCode::kInvalidArg, "optimizer step: " + what); }

void check_dtype(DType dt, const char* field) {
  if (dt != DType::kBF16 && dt != DType::kF32) {
    bad(std::string(field) + " dtype " + std::string(dtype_name(dt)) + " is not supported (BF16 or F32)");
  }
}
}  // namespace

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
  if (s.rows <= 0 || s.cols <= 0) bad("matrix shape [" + std::to_string(s.rows) + ", " + std::to_string(s.cols) + "] is empty");
  if (s.ld_weight < s.cols) bad("weight row stride " + std::to_string(s.ld_weight) + " is smaller than its columns");
  if (!s.weight || !s.grad || !s.m || !s.v || !s.prev_norm || !s.status || !s.step) bad("a required pointer is null");
  const ApolloHyper& h = s.hyper;
  if (h.rank < 1) bad("rank must be at least 1");
  if (h.rank > (s.rows < s.cols ? s.rows : s.cols)) {
    bad("rank " + std::to_string(h.rank) + " exceeds the smaller dimension of [" + std::to_string(s.rows) + ", " +
        std::to_string(s.cols) + "]");
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
  const AdamWHyper& h = s.hyper;
  if (!(h.beta1 >= 0.0 && h.beta1 < 1.0) || !(h.beta2 >= 0.0 && h.beta2 < 1.0)) bad("betas must be in [0, 1)");
  if (!(h.lr >= 0.0f) || !(h.eps >= 0.0f) || !(h.max_grad_norm >= 0.0f)) bad("lr, eps, max_grad_norm must be >= 0");
}

size_t apollo_workspace_bytes(int64_t rows, int64_t cols, int32_t rank) {
  return ApolloWorkspace(rows, cols, rank).bytes;
}

size_t adamw_workspace_bytes(int64_t numel) { return AdamWWorkspace(numel).bytes; }

size_t apollo_many_workspace_bytes(const ApolloStep* steps, int n) {
  size_t total = 0;
  for (int i = 0; i < n; ++i) total += ApolloWorkspace(steps[i].rows, steps[i].cols, steps[i].hyper.rank).bytes;
  return total;
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
#endif

}  // namespace livetrain::optim
