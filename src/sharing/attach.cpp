// The trainer side of sharing: check the owner (alive, this user's, the process that maps the memory), open
// each buffer once, take the lease on the memory itself, expose views.
#include <unistd.h>

#include "livetrain/error.hpp"
#include "livetrain/sharing.hpp"

namespace livetrain::sharing {

namespace {

// A manifest proves nothing by itself (issue #13: any live pid passed, another user's segment was mapped
// read-write): the owner must run as the expected user, and must itself map every segment it names.
void check_identity(const Manifest& m, const std::string& path, uint32_t uid,
                    const std::vector<std::unique_ptr<ShmMapping>>& shm, bool check_owner) {
  for (size_t i = 0, s = 0; i < m.buffers.size(); ++i) {
    if (m.buffers[i].kind != BufferKind::kShm) continue;
    const ShmMapping& seg = *shm[s++];
    if (seg.uid() != uid) {
      throw Error(ErrorCode::kStale, path + ": buffers[" + std::to_string(i) + "]: shared memory " +
                                         m.buffers[i].shm_name + " belongs to uid " + std::to_string(seg.uid()) +
                                         ", not uid " + std::to_string(uid) +
                                         "; refusing to map another user's memory (set the expected owner uid "
                                         "to attach to it deliberately)");
    }
    if (!check_owner) continue;
    std::optional<bool> mapped = process_maps_file(m.owner.pid, seg.device(), seg.inode());
    if (!mapped || !*mapped) {
      throw Error(ErrorCode::kStale,
                  path + ": buffers[" + std::to_string(i) + "]: the owner, pid " + std::to_string(m.owner.pid) +
                      (mapped ? ", does not map shared memory "
                              : ", cannot be checked to map shared memory (" + std::string("/proc/") +
                                    std::to_string(m.owner.pid) + "/maps unreadable) ") +
                      m.buffers[i].shm_name + ": this manifest was not written by the engine that shares it");
    }
  }
}

}  // namespace

std::shared_ptr<Attachment> Attachment::open(const std::string& manifest_path, AttachOptions options) {
  std::shared_ptr<Attachment> a(new Attachment());
  a->path_ = manifest_path;
  a->manifest_ = manifest_read(manifest_path);
  const Manifest& m = a->manifest_;
  uint32_t uid = options.owner_uid.value_or(static_cast<uint32_t>(::getuid()));
  if (options.check_owner) {
    owner_check(m.owner, manifest_path);
    std::optional<uint32_t> owner_uid = process_uid(m.owner.pid);
    if (owner_uid && *owner_uid != uid) {
      throw Error(ErrorCode::kStale, "manifest " + manifest_path + ": its owner, pid " + std::to_string(m.owner.pid) +
                                         ", runs as uid " + std::to_string(*owner_uid) + ", not uid " +
                                         std::to_string(uid) +
                                         "; refusing another user's engine (set the expected owner uid to "
                                         "attach to it deliberately)");
    }
  }

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
  check_identity(m, manifest_path, uid, a->shm_, options.check_owner);
  if (options.take_lease) {
    a->lease_ = Lease::acquire(m, manifest_path);
    // The lease's segment must be the one just mapped, not one put under the same name in between.
    if (!a->shm_.empty() && m.buffers.front().kind == BufferKind::kShm &&
        (a->lease_.inode() != a->shm_.front()->inode() || a->lease_.device() != a->shm_.front()->device())) {
      throw Error(ErrorCode::kStale,
                  manifest_path + ": shared memory " + m.buffers.front().shm_name + " was replaced while attaching");
    }
  }
  for (size_t i = 0; i < m.buffers.size(); ++i)
    a->buffers_.push_back(BufferView{bases[i], m.buffers[i].size, devices[i]});
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
