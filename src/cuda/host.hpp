// Internal: host-side CUDA runtime calls (current device, page-locking host memory, synchronous copies) for
// core code that must compile without CUDA, such as the checkpoint store's GPU save/restore path. In builds
// without CUDA every function throws Error(kUnsupported), except unpin, which does nothing.
#pragma once

#include <cstddef>
#include <vector>

namespace livetrain::cuda::host {

// Makes `device` current for this thread.
void set_device(int device);
// Page-locks [p, p + n) and maps it for the GPU (cudaHostRegister, portable + mapped); returns the
// address kernels use for it.
void* pin(void* p, size_t n);
// Undoes pin(); never throws (called from destructors).
void unpin(void* p) noexcept;
// Page-locks [p, p + n) as registrations of at most `chunk` bytes each (p and chunk page multiples), for
// kernels that address the range as one: returns the registrations' starts (each to unpin), or throws,
// registering nothing, when a registration fails or the device address of a chunk is not its host address
// (without unified addressing the chunks would not form one device range). A registration holds the
// driver's lock while it runs; chunks let other threads' CUDA calls in between.
std::vector<void*> pin_chunks(void* p, size_t n, size_t chunk);
// Synchronous copies between host memory and device memory of the current device.
void to_device(void* dst, const void* src, size_t n);
void to_host(void* dst, const void* src, size_t n);

}  // namespace livetrain::cuda::host
