// Cross-entropy over a large vocabulary without full logits: the two row-wise passes that
// python/livetrain/loss.py runs on each block of logits it makes (a chunk of tokens × the vocabulary, or
// all tokens × a slice of it), fused so that each reads the block once (and the second writes it once)
// instead of the half-dozen fp32 passes the same math takes as torch operations. CPU and CUDA
// implementations of the same signature; the CPU one is the reference (double accumulators).
//
// Non-finite logits: a row holding NaN or +Inf gets a NaN log-sum-exp, and then NaN gradients, which the
// optimizer's steps refuse (kStatusNonFiniteGrad); −Inf logits count as probability zero.
#pragma once

#include <cstdint>

#include "livetrain/dtype.hpp"

namespace livetrain::loss {

// A block of logits: [rows, cols], row stride ld elements (>= cols), BF16 or F32.
struct Logits {
  void* data = nullptr;
  DType dtype = DType::kBF16;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t ld = 0;
};

// lse[i] ← log(exp(lse[i]) + Σ_j exp(x[i, j])): folds a block of columns into running log-sum-exps
// (start them at −Inf). lse: [rows] fp32.
void logsumexp_rows_cpu(const Logits& x, float* lse);
void logsumexp_rows_cuda(const Logits& x, float* lse, void* stream);

// x[i, j] ← (exp(x[i, j] − lse[i]) − [target[i] == col0 + j]) · scale[i], in place: the gradient of
// Σ_i scale[i] · CE_i with respect to the block, computed in fp32 and rounded once (to nearest) into
// x's dtype. lse, scale: [rows] fp32; target: [rows] int64 (any value: outside [col0, col0 + cols)
// nothing is subtracted in this block).
void softmax_grad_rows_cpu(const Logits& x, const float* lse, const int64_t* target, int64_t col0, const float* scale);
void softmax_grad_rows_cuda(const Logits& x, const float* lse, const int64_t* target, int64_t col0, const float* scale,
                            void* stream);

// Throws Error(kInvalidArg) naming what is wrong (dtype, sizes, stride, null pointer).
void validate(const Logits& x);

}  // namespace livetrain::loss
