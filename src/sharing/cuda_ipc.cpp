// CUDA IPC for GPU engines: find the allocation behind a device pointer, export one handle per allocation,
// open a peer's handle on the device with the same UUID. Driver functions come through
// cudaGetDriverEntryPointByVersion because CI has no libcuda to link against.
#include <cstdio>
#include <cstring>
#include <string>

#include "cuda/check.hpp"
#include "livetrain/cuda.hpp"
#include "livetrain/error.hpp"
#include "livetrain/sharing.hpp"

#ifdef LIVETRAIN_WITH_CUDA
#include <cuda.h>  // driver types only; no symbol from libcuda is linked
#endif

namespace livetrain::sharing {

#ifdef LIVETRAIN_WITH_CUDA

namespace {

using PfnGetAddressRange = CUresult (*)(CUdeviceptr* base, size_t* size, CUdeviceptr ptr);
using PfnPointerGetAttribute = CUresult (*)(void* data, CUpointer_attribute attribute, CUdeviceptr ptr);

struct Driver {
  PfnGetAddressRange get_address_range = nullptr;
  PfnPointerGetAttribute pointer_get_attribute = nullptr;
};

// Resolved once; 12000 pins the ABI version of each symbol (cuMemGetAddressRange_v2, 64-bit pointers).
const Driver& driver() {
  static const Driver d = [] {
    Driver out;
    auto load = [](const char* name, void** fn) {
      cudaDriverEntryPointQueryResult status{};
      cudaError_t err = cudaGetDriverEntryPointByVersion(name, fn, 12000, cudaEnableDefault, &status);
      if (err != cudaSuccess || status != cudaDriverEntryPointSuccess || !*fn) {
        (void)cudaGetLastError();
        throw Error(ErrorCode::kCuda, std::string("the CUDA driver does not provide ") + name +
                                          " (driver too old, or no driver installed)");
      }
    };
    load("cuMemGetAddressRange", reinterpret_cast<void**>(&out.get_address_range));
    load("cuPointerGetAttribute", reinterpret_cast<void**>(&out.pointer_get_attribute));
    return out;
  }();
  return d;
}

void check_cu(CUresult r, const char* what, uint64_t ptr) {
  if (r != CUDA_SUCCESS) {
    char hex[32];
    std::snprintf(hex, sizeof(hex), "0x%llx", static_cast<unsigned long long>(ptr));
    throw Error(ErrorCode::kCuda, std::string(what) + " failed for device pointer " + hex + ": CUresult " +
                                      std::to_string(static_cast<int>(r)));
  }
}

std::string to_hex(const void* data, size_t size) {
  static const char kDigits[] = "0123456789abcdef";
  const auto* p = static_cast<const unsigned char*>(data);
  std::string out;
  out.reserve(2 * size);
  for (size_t i = 0; i < size; ++i) {
    out += kDigits[p[i] >> 4];
    out += kDigits[p[i] & 15];
  }
  return out;
}

int hex_digit(char c) { return c >= 'a' ? c - 'a' + 10 : c - '0'; }

std::string uuid_of(int ordinal) {
  for (const auto& d : cuda::devices()) {
    if (d.ordinal == ordinal) return d.uuid;
  }
  throw Error(ErrorCode::kCuda, "CUDA device " + std::to_string(ordinal) + " is not visible");
}

// Makes `device`'s primary context current for the driver calls (cudaSetDevice binds it to the thread
// even when the ordinal is unchanged), then restores the thread's device: PyTorch and engines rely on it
// staying what they set.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    LIVETRAIN_CUDA_CHECK(cudaGetDevice(&previous_));
    LIVETRAIN_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() { (void)cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace

CudaAllocation cuda_find_allocation(uint64_t ptr) {
  cudaPointerAttributes attr{};
  LIVETRAIN_CUDA_CHECK(cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(ptr)));
  if (attr.type != cudaMemoryTypeDevice) {
    throw Error(ErrorCode::kInvalidArg, "pointer is not CUDA device memory (cudaMemoryType " +
                                            std::to_string(static_cast<int>(attr.type)) + "); only device " +
                                            "allocations can be shared through CUDA IPC");
  }
  const Driver& drv = driver();
  DeviceGuard guard(attr.device);  // the driver calls need the allocation's context current
  int legacy_ipc = 0;
  check_cu(drv.pointer_get_attribute(&legacy_ipc, CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE,
                                     static_cast<CUdeviceptr>(ptr)),
           "cuPointerGetAttribute(IS_LEGACY_CUDA_IPC_CAPABLE)", ptr);
  if (!legacy_ipc) {
    throw Error(ErrorCode::kUnsupported,
                "the engine's weights are in virtual-memory (cuMemCreate/VMM) allocations, which "
                "cudaIpcGetMemHandle cannot export. Load the weights with plain cudaMalloc memory: unset "
                "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True in the engine's environment, and do not "
                "enable vLLM sleep mode (enable_sleep_mode), whose allocator uses VMM");
  }
  CUdeviceptr base = 0;
  size_t size = 0;
  check_cu(drv.get_address_range(&base, &size, static_cast<CUdeviceptr>(ptr)), "cuMemGetAddressRange", ptr);
  CudaAllocation a;
  a.base = static_cast<uint64_t>(base);
  a.size = static_cast<uint64_t>(size);
  a.device = attr.device;
  a.device_uuid = uuid_of(attr.device);
  return a;
}

std::string cuda_ipc_export(uint64_t base) {
  cudaPointerAttributes attr{};
  LIVETRAIN_CUDA_CHECK(cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(base)));
  DeviceGuard guard(attr.device);
  cudaIpcMemHandle_t handle{};
  static_assert(sizeof(handle) == kIpcHandleBytes, "cudaIpcMemHandle_t changed size");
  LIVETRAIN_CUDA_CHECK(cudaIpcGetMemHandle(&handle, reinterpret_cast<void*>(base)));
  return to_hex(&handle, sizeof(handle));
}

std::unique_ptr<CudaIpcMapping> CudaIpcMapping::open(const std::string& handle_hex, const std::string& device_uuid,
                                                     uint64_t size) {
  if (handle_hex.size() != 2 * kIpcHandleBytes) {
    throw Error(ErrorCode::kFormat, "CUDA IPC handle must be " + std::to_string(2 * kIpcHandleBytes) + " hex digits");
  }
  cudaIpcMemHandle_t handle{};
  auto* bytes = reinterpret_cast<unsigned char*>(&handle);
  for (size_t i = 0; i < kIpcHandleBytes; ++i) {
    bytes[i] = static_cast<unsigned char>(hex_digit(handle_hex[2 * i]) * 16 + hex_digit(handle_hex[2 * i + 1]));
  }
  std::string reason;
  auto devs = cuda::devices(&reason);
  int ordinal = -1;
  for (const auto& d : devs) {
    if (d.uuid == device_uuid) ordinal = d.ordinal;
  }
  if (ordinal < 0) {
    std::string seen;
    for (const auto& d : devs) seen += (seen.empty() ? "" : ", ") + d.uuid;
    throw Error(ErrorCode::kNotFound, "the engine's weights are on GPU " + device_uuid +
                                          ", which this process cannot see (visible: " +
                                          (seen.empty() ? "none, " + reason : seen) + "); check CUDA_VISIBLE_DEVICES");
  }
  DeviceGuard guard(ordinal);
  std::unique_ptr<CudaIpcMapping> m(new CudaIpcMapping());
  m->device_ = ordinal;
  LIVETRAIN_CUDA_CHECK(cudaIpcOpenMemHandle(&m->ptr_, handle, cudaIpcMemLazyEnablePeerAccess));
  // The opened range must be the allocation the manifest describes, or offsets would land elsewhere.
  // If the driver cannot report the range of an imported allocation, the open itself succeeded and the
  // check is skipped rather than refusing a mapping that works.
  CUdeviceptr base = 0;
  size_t actual = 0;
  CUresult r = driver().get_address_range(&base, &actual, reinterpret_cast<CUdeviceptr>(m->ptr_));
  if (r == CUDA_SUCCESS && static_cast<uint64_t>(actual) < size) {
    throw Error(ErrorCode::kFormat, "CUDA IPC allocation on " + device_uuid + " has " + std::to_string(actual) +
                                        " bytes but the manifest says " + std::to_string(size));
  }
  return m;
}

CudaIpcMapping::~CudaIpcMapping() {
  if (ptr_) {
    int previous = 0;
    bool restore = cudaGetDevice(&previous) == cudaSuccess && previous != device_;
    if (restore) (void)cudaSetDevice(device_);
    (void)cudaIpcCloseMemHandle(ptr_);
    if (restore) (void)cudaSetDevice(previous);
  }
}

#else  // no CUDA in this build

namespace {
[[noreturn]] void no_cuda() {
  throw Error(ErrorCode::kUnsupported, "this build of livetrain has no CUDA code: CUDA IPC sharing is unavailable");
}
}  // namespace

CudaAllocation cuda_find_allocation(uint64_t) { no_cuda(); }
std::string cuda_ipc_export(uint64_t) { no_cuda(); }
std::unique_ptr<CudaIpcMapping> CudaIpcMapping::open(const std::string&, const std::string&, uint64_t) { no_cuda(); }
CudaIpcMapping::~CudaIpcMapping() {}

#endif

}  // namespace livetrain::sharing
