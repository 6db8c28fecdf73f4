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
  // Which of this build's code runs on the device (code_for): "sm_90a" (machine code built for it) or
  // "compute_100 PTX" (compiled by the driver at first use); empty when none does, and then
  // `code_problem` says why (and every kernel launch on the device would fail).
  std::string code;
  std::string code_problem;
};

// Whether this build of livetrain contains CUDA code.
bool compiled_with_cuda();

// The CUDA runtime version this build was compiled against (e.g. 13000), 0 without CUDA.
int runtime_version();

// The code this build's kernels were compiled to, as nvcc names it: "sm_80", "sm_90a", ... (machine code)
// and "compute_100" (PTX). Empty without CUDA.
std::vector<std::string> compiled_code();

// One line on this build's CUDA support, for `livetrain --version`, `livetrain devices` and the start-up
// logs: "CUDA 13.0 runtime (static); kernels for sm_80 sm_90a sm_100, PTX compute_100", or, in a build
// without CUDA, kNoCudaSupport.
std::string support_summary();

// Why a build without CUDA has no devices (the reason devices() gives there).
inline constexpr const char* kNoCudaSupport =
    "livetrain was built without CUDA support (its core was compiled without nvcc, or with LIVETRAIN_CUDA=OFF)";

// Which of `compiled` runs on a device of compute capability major.minor, by CUDA's compatibility rules:
// machine code sm_XY runs on X.Z for Z >= Y, and sm_XYa (architecture-specific) only on X.Y, the newest such
// preferred; else PTX compute_XY (not "a") is compiled by the driver for any X.Y or newer GPU, which needs a
// driver at least as new as the toolkit that wrote the PTX (driver_version >= runtime_version, as
// cudaDriverGetVersion and CUDART_VERSION give them, e.g. 13000). Returns the code ("sm_90a", "compute_100
// PTX"), or "" with `problem` saying why none runs. Pure: tested without a GPU.
std::string code_for(int major, int minor, const std::vector<std::string>& compiled, int driver_version,
                     int runtime_version, std::string* problem);

// Why this build cannot run its kernels on CUDA device `ordinal` ("" when it can): the build has no CUDA
// support (kNoCudaSupport), no such device is visible (with devices()' reason when there is none), or this
// build has no code for that GPU (its name and code_problem). What `--device cuda:N` and the vLLM plugin check
// before they load anything.
std::string device_problem(int ordinal);

// The devices visible to this process, each with the code of this build that runs on it (code_for). Empty
// when the build has no CUDA, no driver is installed, the driver is older than this build's CUDA runtime, or
// no GPU is visible; then `reason`, if given, says which. Creates no CUDA context.
std::vector<DeviceInfo> devices(std::string* reason = nullptr);

}  // namespace livetrain::cuda
