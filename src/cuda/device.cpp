// Enumerates CUDA devices through the runtime API; compiles to "no devices" in builds without CUDA.
#include "livetrain/cuda.hpp"

#include <cstdio>

#include "cuda/check.hpp"

namespace livetrain::cuda {

bool compiled_with_cuda() {
#ifdef LIVETRAIN_WITH_CUDA
  return true;
#else
  return false;
#endif
}

int runtime_version() {
#ifdef LIVETRAIN_WITH_CUDA
  return CUDART_VERSION;
#else
  return 0;
#endif
}

#ifdef LIVETRAIN_WITH_CUDA
static std::string format_uuid(const cudaUUID_t& uuid) {
  const auto* b = reinterpret_cast<const unsigned char*>(uuid.bytes);
  char out[64];
  std::snprintf(out, sizeof(out),
                "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0], b[1], b[2],
                b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
  return out;
}
#endif

std::vector<DeviceInfo> devices(std::string* reason) {
  std::vector<DeviceInfo> out;
#ifdef LIVETRAIN_WITH_CUDA
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    // No driver or no GPU: not an error for a process that can also run on the CPU.
    if (reason) *reason = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
    (void)cudaGetLastError();
    return out;
  }
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop{};
    LIVETRAIN_CUDA_CHECK(cudaGetDeviceProperties(&prop, i));
    DeviceInfo d;
    d.ordinal = i;
    d.name = prop.name;
    d.uuid = format_uuid(prop.uuid);
    d.total_memory = prop.totalGlobalMem;
    d.compute_major = prop.major;
    d.compute_minor = prop.minor;
    d.multiprocessors = prop.multiProcessorCount;
    out.push_back(std::move(d));
  }
  if (count == 0 && reason) *reason = "no CUDA device is visible";
#else
  if (reason) *reason = "this build of livetrain has no CUDA code (nvcc was not found when it was built)";
#endif
  return out;
}

}  // namespace livetrain::cuda
