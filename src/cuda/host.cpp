// Host-side CUDA runtime calls for code that must also build without CUDA (host.hpp).
#include "cuda/host.hpp"

#include <chrono>
#include <thread>

#include "livetrain/error.hpp"

#ifdef LIVETRAIN_WITH_CUDA
#include <cuda_runtime_api.h>

#include "cuda/check.hpp"

namespace livetrain::cuda::host {

void set_device(int device) { LIVETRAIN_CUDA_CHECK(cudaSetDevice(device)); }

void unpin(void* p) noexcept { cudaHostUnregister(p); }

std::vector<void*> pin_ranges(const std::vector<std::pair<void*, size_t>>& ranges) {
  std::vector<void*> done;
  try {
    for (const auto& [at, bytes] : ranges) {
      LIVETRAIN_CUDA_CHECK(cudaHostRegister(at, bytes, cudaHostRegisterPortable | cudaHostRegisterMapped));
      done.push_back(at);
      void* dev = nullptr;
      LIVETRAIN_CUDA_CHECK(cudaHostGetDevicePointer(&dev, at, 0));
      if (dev != at) {
        throw Error(ErrorCode::kUnsupported, "page-locked host memory has another address on the device");
      }
      // The registration held up every CUDA call of the process; let them in before the next one.
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  } catch (...) {
    for (void* q : done) cudaHostUnregister(q);
    (void)cudaGetLastError();  // nothing left pending on this thread
    throw;
  }
  return done;
}

void to_device(void* dst, const void* src, size_t n) {
  LIVETRAIN_CUDA_CHECK(cudaMemcpy(dst, src, n, cudaMemcpyHostToDevice));
}
void to_host(void* dst, const void* src, size_t n) {
  LIVETRAIN_CUDA_CHECK(cudaMemcpy(dst, src, n, cudaMemcpyDeviceToHost));
}

}  // namespace livetrain::cuda::host

#else

namespace livetrain::cuda::host {

namespace {
[[noreturn]] void no_cuda() {
  throw Error(ErrorCode::kUnsupported, "memory on a CUDA device, but this build of livetrain has no CUDA code");
}
}  // namespace

void set_device(int) { no_cuda(); }
void unpin(void*) noexcept {}
std::vector<void*> pin_ranges(const std::vector<std::pair<void*, size_t>>&) { no_cuda(); }
void to_device(void*, const void*, size_t) { no_cuda(); }
void to_host(void*, const void*, size_t) { no_cuda(); }

}  // namespace livetrain::cuda::host

#endif
