// Internal: host-side CUDA runtime calls (current device, page-locking host memory, synchronous copies) for
// core code that must compile without CUDA, such as the checkpoint store's GPU save/restore path. In builds
// without CUDA every function throws Error(kUnsupported), except unpin, which does nothing.
#pragma once

#include <cstddef>
#include <utility>
#include <vector>

namespace livetrain::cuda::host {

// Makes `device` current for this thread.
void set_device(int device);
// Undoes a registration of pin_ranges; never throws (called from destructors).
void unpin(void* p) noexcept;
// Page-locks consecutive ranges {start, bytes} (page-aligned starts, none overlapping another's pages) and maps
// them for the GPU (cudaHostRegister, portable + mapped) as one registration each, for kernels that address
// them as one range at their host addresses: returns their starts (each to unpin), or
// throws, registering nothing, when a registration fails or the device address of a range is not its host
// address (without unified addressing the ranges would not form one device range). A registration holds
// every CUDA call of the process up while it runs (measured on the H200: a GPU loop on another thread
// waited for all of a 24 GiB registration); several, with a pause of 2 ms after each, let those calls in
// between. A copy must not span two registrations: callers make each copy's source or destination lie in
// one range.
std::vector<void*> pin_ranges(const std::vector<std::pair<void*, size_t>>& ranges);
// Synchronous copies between host memory and device memory of the current device.
void to_device(void* dst, const void* src, size_t n);
void to_host(void* dst, const void* src, size_t n);

}  // namespace livetrain::cuda::host
