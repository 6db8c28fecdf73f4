// The CUDA devices this process can see, identified by UUID (ordinals differ between processes that
// have different CUDA_VISIBLE_DEVICES; UUIDs do not). Works in builds without CUDA: no devices.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace livetrain::cuda {

struct DeviceInfo {
  int ordinal = 0;
  std::string name;
  std::string uuid;  // "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx", as nvidia-smi prints it
  uint64_t total_memory = 0;
  int compute_major = 0;
  int compute_minor = 0;
  int multiprocessors = 0;
};

// Whether this build of livetrain contains CUDA code.
bool compiled_with_cuda();

// The CUDA runtime version this build was compiled against (e.g. 13000), 0 without CUDA.
int runtime_version();

// The devices visible to this process. Empty when the build has no CUDA, no driver is installed or no
// GPU is visible; then `reason`, if given, says which.
std::vector<DeviceInfo> devices(std::string* reason = nullptr);

}  // namespace livetrain::cuda
