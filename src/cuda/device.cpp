// Enumerates CUDA devices through the runtime API and says which of this build's code runs on each; compiles to
// "no devices" in builds without CUDA.
#include "livetrain/cuda.hpp"

#include <cstdio>
#include <sstream>

#include "cuda/check.hpp"

// The code nvcc wrote for the kernels ("sm_80 sm_90a ... compute_100"), from CMake's LIVETRAIN_CUDA_GENCODE.
#ifndef LIVETRAIN_CUDA_CODE
#define LIVETRAIN_CUDA_CODE ""
#endif

namespace livetrain::cuda {

namespace {

// "13.0" for 13000, as cudaDriverGetVersion and CUDART_VERSION encode versions.
std::string version_text(int v) { return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10); }

// One element of compiled_code(): "sm_90a" = machine code for 9.0 with its architecture-specific features,
// "compute_100" = PTX for 10.0 and newer.
struct Code {
  int major = 0, minor = 0;
  char suffix = 0;  // 'a' (this architecture only), 'f' (its family: same major), or 0
  bool ptx = false;
};

bool parse_code(const std::string& name, Code* out) {
  std::string digits;
  if (name.rfind("sm_", 0) == 0) {
    out->ptx = false;
    digits = name.substr(3);
  } else if (name.rfind("compute_", 0) == 0) {
    out->ptx = true;
    digits = name.substr(8);
  } else {
    return false;
  }
  out->suffix = 0;
  if (!digits.empty() && (digits.back() == 'a' || digits.back() == 'f')) {
    out->suffix = digits.back();
    digits.pop_back();
  }
  if (digits.size() < 2 || digits.find_first_not_of("0123456789") != std::string::npos) return false;
  int n = std::stoi(digits);
  out->major = n / 10;
  out->minor = n % 10;
  return true;
}

}  // namespace

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

std::vector<std::string> compiled_code() {
  std::vector<std::string> out;
  std::istringstream words(LIVETRAIN_CUDA_CODE);
  for (std::string w; words >> w;) out.push_back(w);
  return out;
}

std::string support_summary() {
  if (!compiled_with_cuda()) return kNoCudaSupport;
  std::string machine, ptx;
  for (const std::string& c : compiled_code()) (c.rfind("sm_", 0) == 0 ? machine : ptx) += " " + c;
  std::string out = "CUDA " + version_text(runtime_version()) + " runtime (linked statically); kernels for" +
                    (machine.empty() ? " no GPU" : machine);
  if (!ptx.empty()) out += ", PTX" + ptx;
  return out;
}

std::string code_for(int major, int minor, const std::vector<std::string>& compiled, int driver_version,
                     int runtime_version, std::string* problem) {
  const std::string gpu = "sm_" + std::to_string(major * 10 + minor);
  std::string best_machine, best_ptx;
  Code best_m, best_p;
  for (const std::string& name : compiled) {
    Code c;
    if (!parse_code(name, &c)) continue;
    if (!c.ptx) {
      // Machine code runs within its major version on the same or a later minor one; "a" only on its own.
      bool runs = c.major == major && (c.suffix == 'a' ? c.minor == minor : c.minor <= minor);
      bool better = best_machine.empty() || c.minor > best_m.minor ||
                    (c.minor == best_m.minor && c.suffix == 'a' && best_m.suffix != 'a');
      if (runs && better) best_machine = name, best_m = c;
    } else {
      // PTX is compiled by the driver for its own and every later GPU; "a" PTX only for its own.
      bool runs = c.suffix == 'a' ? (c.major == major && c.minor == minor)
                                  : (c.major < major || (c.major == major && c.minor <= minor));
      bool better = best_ptx.empty() || c.major > best_p.major || (c.major == best_p.major && c.minor > best_p.minor);
      if (runs && better) best_ptx = name, best_p = c;
    }
  }
  if (!best_machine.empty()) return best_machine;
  std::string all;
  for (const std::string& name : compiled) all += (all.empty() ? "" : " ") + name;
  if (best_ptx.empty()) {
    if (problem) {
      *problem = "this build of livetrain has no code for a " + gpu +
                 " GPU (it has: " + (all.empty() ? std::string("none") : all) + ")";
    }
    return "";
  }
  if (driver_version < runtime_version) {
    if (problem) {
      *problem = "a " + gpu + " GPU runs this build's " + best_ptx +
                 " PTX, which the driver must compile, but the "
                 "driver supports CUDA " +
                 version_text(driver_version) + ", older than the CUDA " + version_text(runtime_version) +
                 " that wrote it: update the NVIDIA driver";
    }
    return "";
  }
  return best_ptx + " PTX";
}

#ifdef LIVETRAIN_WITH_CUDA
static std::string format_uuid(const cudaUUID_t& uuid) {
  const auto* b = reinterpret_cast<const unsigned char*>(uuid.bytes);
  char out[64];
  std::snprintf(out, sizeof(out), "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0],
                b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
  return out;
}
#endif

std::vector<DeviceInfo> devices(std::string* reason) {
  std::vector<DeviceInfo> out;
#ifdef LIVETRAIN_WITH_CUDA
  int driver = 0;
  (void)cudaDriverGetVersion(&driver);  // 0 when no driver is installed
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    // No driver, an old driver or no GPU: not an error for a process that can also run on the CPU.
    if (reason) {
      if (err == cudaErrorInsufficientDriver && driver == 0) {
        *reason = "no NVIDIA driver is installed (libcuda.so.1 was not found)";
      } else if (err == cudaErrorInsufficientDriver) {
        *reason = "the NVIDIA driver supports CUDA " + version_text(driver) + ", older than the CUDA " +
                  version_text(CUDART_VERSION) + " runtime livetrain was built with: update the driver";
      } else {
        *reason = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
      }
    }
    (void)cudaGetLastError();
    return out;
  }
  const std::vector<std::string> compiled = compiled_code();
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
    d.code = code_for(prop.major, prop.minor, compiled, driver, CUDART_VERSION, &d.code_problem);
    out.push_back(std::move(d));
  }
  if (count == 0 && reason) *reason = "no CUDA device is visible";
#else
  if (reason) *reason = kNoCudaSupport;
#endif
  return out;
}

std::string device_problem(int ordinal) {
  if (!compiled_with_cuda()) return kNoCudaSupport;
  std::string reason;
  std::vector<DeviceInfo> devs = devices(&reason);
  if (devs.empty()) return "no CUDA device: " + reason;
  if (ordinal < 0 || static_cast<size_t>(ordinal) >= devs.size()) {
    return "no CUDA device " + std::to_string(ordinal) + " (" + std::to_string(devs.size()) +
           " visible; CUDA_VISIBLE_DEVICES decides which)";
  }
  const DeviceInfo& d = devs[static_cast<size_t>(ordinal)];
  return d.code.empty() ? d.name + ": " + d.code_problem : "";
}

}  // namespace livetrain::cuda
