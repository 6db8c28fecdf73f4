// Internal: the CUDA runtime calls the store's GPU save/restore path needs, so store.cpp itself does not
// depend on CUDA. In builds without CUDA every function throws Error(kUnsupported).
#pragma once

#include <cstddef>

namespace livetrain::checkpoint::cuda_host {

// Makes `device` current for this thread.
void set_device(int device);
// Page-locks [p, p + n) and maps it for the GPU (cudaHostRegister, portable + mapped); returns the
// address kernels use for it.
void* pin(void* p, size_t n);
// Undoes pin(); never throws (called from destructors).
void unpin(void* p) noexcept;
// Synchronous copies between host memory and device memory of the current device.
void to_device(void* dst, const void* src, size_t n);
void to_host(void* dst, const void* src, size_t n);

}  // namespace livetrain::checkpoint::cuda_host
