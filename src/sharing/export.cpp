// The engine side of sharing: owns the segments it creates, records tensors, writes the manifest.
#include <cstdio>

#include "livetrain/error.hpp"
#include "livetrain/sharing.hpp"

namespace livetrain::sharing {

uint32_t Export::add_shm(uint64_t size, std::string name) {
  auto seg = ShmSegment::create(size, std::move(name));
  BufferDesc b;
  b.kind = BufferKind::kShm;
  b.shm_name = seg->name();
  b.size = size;
  buffers_.push_back(std::move(b));
  segments_.push_back(std::move(seg));
  cuda_bases_.push_back(0);
  return static_cast<uint32_t>(buffers_.size() - 1);
}

const ShmSegment& Export::shm(uint32_t buffer) const {
  if (buffer >= segments_.size() || !segments_[buffer]) {
    throw Error(ErrorCode::kInvalidArg, "buffer " + std::to_string(buffer) + " is not a shared-memory segment");
  }
  return *segments_[buffer];
}

void Export::unlink_segments() {
  for (auto& seg : segments_) {
    if (seg) seg->unlink();
  }
}

void Export::add_tensor(TensorDesc t) {
  // Validate this tensor alone against the buffers, with the same rules the parser applies.
  Manifest probe;
  probe.owner.pid = 1;
  probe.owner.boot_id = "-";
  probe.buffers = buffers_;
  probe.tensors.push_back(t);
  manifest_validate(probe, "export");
  for (const auto& existing : tensors_) {
    if (existing.name == t.name) throw Error(ErrorCode::kInvalidArg, "export: tensor \"" + t.name + "\" added twice");
  }
  tensors_.push_back(std::move(t));
}

void Export::add_cuda_tensor(std::string name, DType dtype, std::vector<uint64_t> shape, std::vector<uint64_t> strides,
                             uint64_t device_ptr) {
  CudaAllocation a = cuda_find_allocation(device_ptr);
  uint32_t index = UINT32_MAX;
  for (size_t i = 0; i < buffers_.size(); ++i) {
    if (buffers_[i].kind == BufferKind::kCudaIpc && cuda_bases_[i] == a.base) index = static_cast<uint32_t>(i);
  }
  if (index == UINT32_MAX) {
    // One handle per allocation: a process may open a given allocation only once.
    BufferDesc b;
    b.kind = BufferKind::kCudaIpc;
    b.ipc_handle = cuda_ipc_export(a.base);
    b.device_uuid = a.device_uuid;
    b.size = a.size;
    buffers_.push_back(std::move(b));
    segments_.push_back(nullptr);
    cuda_bases_.push_back(a.base);
    index = static_cast<uint32_t>(buffers_.size() - 1);
  }
  TensorDesc t;
  t.name = std::move(name);
  t.dtype = dtype;
  t.shape = std::move(shape);
  t.strides = std::move(strides);
  t.buffer = index;
  t.offset = device_ptr - a.base;
  add_tensor(std::move(t));
}

Manifest Export::manifest(const ModelDesc& model) const {
  Manifest m;
  m.owner = current_owner();
  m.model = model;
  m.buffers = buffers_;
  m.tensors = tensors_;
  return m;
}

void Export::write_manifest(const std::string& path, const ModelDesc& model) const {
  manifest_write(path, manifest(model));
}

}  // namespace livetrain::sharing
