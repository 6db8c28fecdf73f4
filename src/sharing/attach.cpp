// The trainer side of sharing: check the owner, take the lease, open each buffer once, expose views.
#include "livetrain/error.hpp"
#include "livetrain/sharing.hpp"

namespace livetrain::sharing {

std::shared_ptr<Attachment> Attachment::open(const std::string& manifest_path, AttachOptions options) {
  std::shared_ptr<Attachment> a(new Attachment());
  a->path_ = manifest_path;
  a->manifest_ = manifest_read(manifest_path);
  const Manifest& m = a->manifest_;
  if (options.check_owner) owner_check(m.owner, manifest_path);
  if (options.take_lease) a->lease_ = Lease::acquire(manifest_path);

  std::vector<uint8_t*> bases(m.buffers.size(), nullptr);
  std::vector<int> devices(m.buffers.size(), -1);
  for (size_t i = 0; i < m.buffers.size(); ++i) {
    const BufferDesc& b = m.buffers[i];
    try {
      if (b.kind == BufferKind::kShm) {
        a->shm_.push_back(ShmMapping::open(b.shm_name, b.size));
        bases[i] = a->shm_.back()->data();
      } else {
        a->cuda_.push_back(CudaIpcMapping::open(b.ipc_handle, b.device_uuid, b.size));
        bases[i] = static_cast<uint8_t*>(a->cuda_.back()->data());
        devices[i] = a->cuda_.back()->device();
      }
    } catch (const Error& e) {
      throw Error(e.code(), manifest_path + ": buffers[" + std::to_string(i) + "]: " + e.what());
    }
  }
  for (size_t i = 0; i < m.buffers.size(); ++i) a->buffers_.push_back(BufferView{bases[i], m.buffers[i].size, devices[i]});
  a->views_.reserve(m.tensors.size());
  for (const TensorDesc& t : m.tensors) {
    TensorView v;
    v.desc = &t;
    v.data = bases[t.buffer] ? bases[t.buffer] + t.offset : nullptr;
    v.device = devices[t.buffer];
    a->views_.push_back(v);
  }
  return a;
}

Attachment::~Attachment() {
  // Views point into the mappings: drop them first, then the mappings, and the lease last so that no
  // other trainer can attach while this one still has the memory mapped.
  views_.clear();
  buffers_.clear();
  cuda_.clear();
  shm_.clear();
}

const TensorView& Attachment::view(std::string_view name) const {
  for (const TensorView& v : views_) {
    if (v.desc->name == name) return v;
  }
  throw Error(ErrorCode::kNotFound, path_ + ": no tensor named \"" + std::string(name) + "\"");
}

}  // namespace livetrain::sharing
