// Internal: a CUDA stream and a CUDA event owned by scope, for the .cu files that order work on streams of
// their own (the checkpoint diff's two streams, the optimizer's side stream): created checked, destroyed
// with the scope (the runtime releases them once the work queued on them completes).
#pragma once

#ifdef LIVETRAIN_WITH_CUDA
#include <cuda_runtime_api.h>

#include "cuda/check.hpp"

namespace livetrain::cuda {

inline void destroy(cudaStream_t s) noexcept { cudaStreamDestroy(s); }
inline void destroy(cudaEvent_t e) noexcept { cudaEventDestroy(e); }

// One handle, destroyed with its owner; never copied or moved (std::vector<Event>(n) only default-constructs),
// so no handle is destroyed twice.
template <typename H>
struct Owned {
  H h = nullptr;
  Owned() = default;
  ~Owned() {
    if (h) destroy(h);
  }
  Owned(const Owned&) = delete;
  Owned& operator=(const Owned&) = delete;
};

// A non-blocking stream: it does not wait for the legacy default stream.
struct Stream : Owned<cudaStream_t> {
  Stream() { LIVETRAIN_CUDA_CHECK(cudaStreamCreateWithFlags(&h, cudaStreamNonBlocking)); }
};

// An event that only orders work (no timing, which makes it cheaper to record and wait on).
struct Event : Owned<cudaEvent_t> {
  Event() { LIVETRAIN_CUDA_CHECK(cudaEventCreateWithFlags(&h, cudaEventDisableTiming)); }
};

}  // namespace livetrain::cuda

#endif  // LIVETRAIN_WITH_CUDA
