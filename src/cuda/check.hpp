// Internal: CUDA runtime calls checked with file:line, thrown as livetrain::Error(kCuda).
#pragma once

#ifdef LIVETRAIN_WITH_CUDA
#include <cuda_runtime_api.h>

#include <string>

#include "livetrain/error.hpp"

namespace livetrain::cuda {

[[noreturn]] inline void throw_cuda(cudaError_t err, const char* expr, const char* file, int line) {
  throw Error(ErrorCode::kCuda, std::string(file) + ":" + std::to_string(line) + ": " + expr +
                                    " failed: " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
}

}  // namespace livetrain::cuda

#define LIVETRAIN_CUDA_CHECK(expr)                                              \
  do {                                                                          \
    cudaError_t livetrain_err_ = (expr);                                        \
    if (livetrain_err_ != cudaSuccess) {                                        \
      ::livetrain::cuda::throw_cuda(livetrain_err_, #expr, __FILE__, __LINE__); \
    }                                                                           \
  } while (0)

#endif  // LIVETRAIN_WITH_CUDA
