// Weight sharing between an engine and a trainer: the manifest format, export (POSIX shared memory for
// CPU engines, CUDA IPC for GPU engines) and attach (owner liveness and identity, single-trainer lease,
// zero-copy views).
//
// Manifest format, version 1 (docs/manifest.md is the full specification). A UTF-8 JSON file, mode 0600,
// written with fs::write_file_atomic; one object whose members are, in this order:
//
//   "magic":   "livetrain-manifest"
//   "version": 1
//   "owner":   {"pid": u64, "start_time": u64 (clock ticks after boot, /proc/<pid>/stat field 22),
//               "boot_id": string (/proc/sys/kernel/random/boot_id)}
//   "model":   {"path": string, "engine": string, "tp_rank": u32, "tp_size": u32, ["group": string,] "config": object}
//   "buffers": [{"kind": "shm", "name": "/<[A-Za-z0-9._-]{1,200}>", "size": u64}
//              | {"kind": "cuda_ipc", "handle": 128 lowercase hex digits (cudaIpcMemHandle_t),
//                 "device_uuid": "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx", "size": u64}]
//   "tensors": [{"name": string, "dtype": safetensors dtype name, "shape": [u64], "strides": [u64]
//                (in elements), "buffer": index into buffers, "offset": u64 (bytes, a multiple of the
//                element size)}]
//
// The parser is strict: every member is required, unknown and repeated keys are errors, tensor names are
// unique, and every tensor's extent (offset + ((shape-1)·strides + 1) · element size) lies inside its
// buffer, computed with overflow checks. Errors are livetrain::Error(kFormat) naming the file and field
// ("m.json: tensors[3].dtype: unknown dtype \"Q4\""). A newer version is kUnsupported.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "livetrain/dtype.hpp"
#include "livetrain/json.hpp"

namespace livetrain::sharing {

inline constexpr std::string_view kManifestMagic = "livetrain-manifest";
inline constexpr uint64_t kManifestVersion = 1;
inline constexpr size_t kIpcHandleBytes = 64;  // sizeof(cudaIpcMemHandle_t), fixed by the CUDA ABI

// ---- manifest ----

enum class BufferKind { kShm, kCudaIpc };

struct BufferDesc {
  BufferKind kind = BufferKind::kShm;
  std::string shm_name;     // kShm: the POSIX shared-memory name, "/..."
  std::string ipc_handle;   // kCudaIpc: the cudaIpcMemHandle_t as 128 lowercase hex digits
  std::string device_uuid;  // kCudaIpc: the device holding the allocation
  uint64_t size = 0;        // bytes: the segment size, or the CUDA allocation size
};

struct TensorDesc {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<uint64_t> shape;
  std::vector<uint64_t> strides;  // in elements, one per dimension
  uint32_t buffer = 0;
  uint64_t offset = 0;  // bytes from the start of the buffer
};

struct ModelDesc {
  std::string path;
  std::string engine;  // "reference", "vllm", ...
  uint32_t tp_rank = 0;
  uint32_t tp_size = 1;
  // The engine instance the ranks belong to, the same in every rank's manifest (optional, written only
  // when set): what tells the ranks of two engines of the same model apart at tensor-parallel size > 1.
  std::string group;
  json::Value config = json::Value::object();  // the model's config.json
};

struct OwnerDesc {
  uint64_t pid = 0;
  uint64_t start_time = 0;
  std::string boot_id;
};

struct Manifest {
  OwnerDesc owner;
  ModelDesc model;
  std::vector<BufferDesc> buffers;
  std::vector<TensorDesc> tensors;

  const TensorDesc* find(std::string_view name) const;
};

// The bytes a tensor spans from its offset: 0 for an empty tensor. Throws kOverflow if it does not fit.
uint64_t tensor_extent_bytes(const TensorDesc& t);
// Contiguous (row-major) strides for `shape`, in elements.
std::vector<uint64_t> contiguous_strides(const std::vector<uint64_t>& shape);

// Canonical serialization (2-space indented JSON and a final newline): what manifest_write writes.
std::string manifest_serialize(const Manifest& m);
// Strict parse; `what` names the source in error messages. Validates the manifest as a whole too.
Manifest manifest_parse(std::string_view text, std::string_view what = "manifest");
Manifest manifest_read(const std::string& path);
// Validates, then writes atomically with mode 0600 (the file names capabilities to the engine's memory).
void manifest_write(const std::string& path, const Manifest& m);
// The checks manifest_parse applies to a parsed manifest, for manifests built in memory.
void manifest_validate(const Manifest& m, std::string_view what = "manifest");

// ---- processes ----

// This machine's boot id (/proc/sys/kernel/random/boot_id), without the newline.
std::string current_boot_id();
// The start time of `pid` in clock ticks after boot (/proc/<pid>/stat field 22), or nullopt if there is
// no such process.
std::optional<uint64_t> process_start_time(uint64_t pid);
OwnerDesc current_owner();

enum class OwnerState { kAlive, kDead, kPidReused, kOtherBoot };
OwnerState owner_state(const OwnerDesc& owner, std::string* detail = nullptr);
// Throws Error(kStale), "stale manifest <path>: ...", unless the owner is alive.
void owner_check(const OwnerDesc& owner, const std::string& manifest_path);
// The real uid of a running process (the owner of /proc/<pid>), or nullopt if there is no such process.
std::optional<uint32_t> process_uid(uint64_t pid);
// Whether process `pid` maps the file (device, inode) (from /proc/<pid>/maps); nullopt when its maps
// cannot be read.
std::optional<bool> process_maps_file(uint64_t pid, uint64_t device, uint64_t inode);

// ---- lease: one trainer per engine ----

// An exclusive, non-blocking flock keyed on the memory a manifest shares, never on the manifest's path (a
// copy of the manifest elsewhere names the same memory, and must not let a second trainer in): on the
// first shared-memory segment itself, or, for CUDA IPC, on a lock object in POSIX shared memory named
// after the first buffer's IPC handle (lease_object). Released on destruction, or by the kernel when the
// holder dies; the holder is found in /proc/locks.
class Lease {
 public:
  Lease() = default;
  // Throws Error(kBusy) naming the holder's pid when another process holds the lease of `m` (read from
  // `manifest_path`, which messages name).
  static Lease acquire(const Manifest& m, const std::string& manifest_path);
  Lease(Lease&& other) noexcept;
  Lease& operator=(Lease&& other) noexcept;
  Lease(const Lease&) = delete;
  Lease& operator=(const Lease&) = delete;
  ~Lease();

  bool held() const { return fd_ >= 0; }
  // The POSIX shared-memory name the lease is keyed on.
  const std::string& object() const { return object_; }
  // (device, inode) of the locked object.
  uint64_t device() const { return device_; }
  uint64_t inode() const { return inode_; }
  void release();

 private:
  int fd_ = -1;
  std::string object_;
  bool remove_ = false;  // a lock object of our own making: unlinked on release, while still locked
  uint64_t device_ = 0, inode_ = 0;
};

// The POSIX shared-memory name the lease of `m` is keyed on: its first shm segment's name, else
// "/livetrain-lease-<16 hex digits>" from the first CUDA buffer's device and IPC handle.
std::string lease_object(const Manifest& m);
// The pid holding the lease of a manifest, found without taking the lock (from /proc/locks); nullopt when
// nobody holds it (or /proc/locks cannot be read).
std::optional<uint64_t> lease_holder(const std::string& manifest_path);

// ---- shared memory ----

// A POSIX shared-memory segment created by the engine (O_EXCL, mode 0600) and mapped read-write; the
// name is unlinked and the mapping removed on destruction. Attached trainers keep their own mappings.
class ShmSegment {
 public:
  // An empty `name` picks "/livetrain-<pid>-<n>-<random>".
  static std::unique_ptr<ShmSegment> create(uint64_t size, std::string name = "");
  ShmSegment(const ShmSegment&) = delete;
  ShmSegment& operator=(const ShmSegment&) = delete;
  ~ShmSegment();

  const std::string& name() const { return name_; }
  uint64_t size() const { return size_; }
  uint8_t* data() const { return static_cast<uint8_t*>(addr_); }
  // Removes the name now (new attaches fail; existing mappings, ours included, stay valid).
  void unlink();

 private:
  ShmSegment() = default;
  std::string name_;
  uint64_t size_ = 0;
  void* addr_ = nullptr;
  bool unlinked_ = false;
};

// A read-write mapping of an existing segment, whose size must be exactly `size`, and who owns it.
class ShmMapping {
 public:
  static std::unique_ptr<ShmMapping> open(const std::string& name, uint64_t size);
  ShmMapping(const ShmMapping&) = delete;
  ShmMapping& operator=(const ShmMapping&) = delete;
  ~ShmMapping();
  uint8_t* data() const { return static_cast<uint8_t*>(addr_); }
  uint64_t size() const { return size_; }
  // The segment's owner and identity as fstat saw them when it was opened.
  uint32_t uid() const { return uid_; }
  uint64_t device() const { return device_; }
  uint64_t inode() const { return inode_; }

 private:
  ShmMapping() = default;
  void* addr_ = nullptr;
  uint64_t size_ = 0;
  uint32_t uid_ = 0;
  uint64_t device_ = 0, inode_ = 0;
};

// ---- CUDA IPC (compiled with CUDA; without it every call throws kUnsupported) ----

struct CudaAllocation {
  uint64_t base = 0;  // device address of the allocation that holds the pointer
  uint64_t size = 0;
  int device = 0;  // ordinal in this process
  std::string device_uuid;
};

// The allocation containing device pointer `ptr`. Refuses memory that cudaIpcGetMemHandle cannot export
// (VMM allocations: PyTorch expandable segments, vLLM sleep mode) with an error saying what to change.
CudaAllocation cuda_find_allocation(uint64_t ptr);
// The IPC handle of an allocation base, as 128 hex digits.
std::string cuda_ipc_export(uint64_t base);

// A peer process's allocation opened in this one; closed on destruction.
class CudaIpcMapping {
 public:
  // Opens `handle_hex` on the device whose UUID is `device_uuid`; checks the allocation is `size` bytes.
  static std::unique_ptr<CudaIpcMapping> open(const std::string& handle_hex, const std::string& device_uuid,
                                              uint64_t size);
  CudaIpcMapping(const CudaIpcMapping&) = delete;
  CudaIpcMapping& operator=(const CudaIpcMapping&) = delete;
  ~CudaIpcMapping();
  void* data() const { return ptr_; }
  int device() const { return device_; }

 private:
  CudaIpcMapping() = default;
  void* ptr_ = nullptr;
  int device_ = 0;
};

// ---- export (engine side) ----

// What an engine shares: the buffers it owns or exports, and tensors inside them. CPU engines create
// segments with add_shm and place their weights there; GPU engines add tensors by device pointer, one IPC
// handle per underlying allocation. Destroying the Export unlinks its segments.
class Export {
 public:
  Export() = default;
  Export(const Export&) = delete;
  Export& operator=(const Export&) = delete;

  // Creates a segment of `size` bytes; returns its buffer index.
  uint32_t add_shm(uint64_t size, std::string name = "");
  const ShmSegment& shm(uint32_t buffer) const;
  // Unlinks every segment's name now, for owners whose destructor may run late or never (a Python
  // interpreter exiting while tensors still reference the segment).
  void unlink_segments();
  // Records a tensor in an existing buffer (validated against its size).
  void add_tensor(TensorDesc t);
  // Records a CUDA tensor by device pointer: its allocation becomes a buffer (once) and the offset is the
  // pointer's distance from the allocation base.
  void add_cuda_tensor(std::string name, DType dtype, std::vector<uint64_t> shape, std::vector<uint64_t> strides,
                       uint64_t device_ptr);

  // The manifest describing this process as the owner.
  Manifest manifest(const ModelDesc& model) const;
  void write_manifest(const std::string& path, const ModelDesc& model) const;
  const std::vector<BufferDesc>& buffers() const { return buffers_; }
  const std::vector<TensorDesc>& tensors() const { return tensors_; }

 private:
  std::vector<BufferDesc> buffers_;
  std::vector<std::unique_ptr<ShmSegment>> segments_;  // parallel to buffers_; null for CUDA buffers
  std::vector<uint64_t> cuda_bases_;                   // parallel to buffers_; 0 for shm buffers
  std::vector<TensorDesc> tensors_;
};

// ---- attach (trainer side) ----

struct AttachOptions {
  // Refuse a manifest whose owner is gone, is another process than the one that exported the memory (it
  // must map each shared-memory segment the manifest names), or runs as another user.
  bool check_owner = true;
  bool take_lease = true;  // hold the exclusive lease while attached
  // The user the engine and its segments must belong to; by default this process's. Set it to attach,
  // deliberately, to another user's engine (a root trainer, say).
  std::optional<uint32_t> owner_uid;
};

// A tensor of the engine as seen in this process.
struct TensorView {
  const TensorDesc* desc = nullptr;
  void* data = nullptr;  // first element
  int device = -1;       // -1: host memory; otherwise the CUDA ordinal in this process
};

// One opened buffer as seen in this process.
struct BufferView {
  void* data = nullptr;
  uint64_t size = 0;
  int device = -1;  // -1: host memory; otherwise the CUDA ordinal in this process
};

// An attached manifest: its lease, and every buffer opened once. Views are valid while it lives.
class Attachment {
 public:
  static std::shared_ptr<Attachment> open(const std::string& manifest_path, AttachOptions options = {});
  Attachment(const Attachment&) = delete;
  Attachment& operator=(const Attachment&) = delete;
  ~Attachment();

  const Manifest& manifest() const { return manifest_; }
  const std::string& path() const { return path_; }
  const std::vector<TensorView>& views() const { return views_; }
  const std::vector<BufferView>& buffers() const { return buffers_; }
  const TensorView& view(std::string_view name) const;
  bool lease_held() const { return lease_.held(); }
  // Gives the lease up early; the mappings stay until the Attachment is destroyed.
  void release_lease() { lease_.release(); }

 private:
  Attachment() = default;
  std::string path_;
  Manifest manifest_;
  Lease lease_;
  std::vector<std::unique_ptr<ShmMapping>> shm_;
  std::vector<std::unique_ptr<CudaIpcMapping>> cuda_;
  std::vector<BufferView> buffers_;  // parallel to manifest_.buffers
  std::vector<TensorView> views_;
};

}  // namespace livetrain::sharing
