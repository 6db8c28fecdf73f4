// Internal: host-side CUDA runtime calls (current device, page-locking host memory, synchronous copies) for
// core code that must compile without CUDA, such as the checkpoint store's GPU save/restore path. In builds
// without CUDA every function throws Error(kUnsupported), except unpin, which does nothing.
#pragma once

#include <cstddef>

namespace livetrain::cuda::host {

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

}  // namespace livetrain::cuda::host
