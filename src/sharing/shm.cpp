// POSIX shared memory for CPU engines: the engine creates and owns a segment, trainers map it read-write.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <random>

#include "livetrain/error.hpp"
#include "livetrain/fs.hpp"
#include "livetrain/sharing.hpp"

namespace livetrain::sharing {

namespace {

void* map_rw(int fd, uint64_t size, const std::string& name) {
  if (size == 0) return nullptr;
  void* addr = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (addr == MAP_FAILED) throw io_error("cannot mmap shared memory " + name);
  return addr;
}

}  // namespace

std::unique_ptr<ShmSegment> ShmSegment::create(uint64_t size, std::string name) {
  static std::atomic<uint64_t> counter{0};
  if (name.empty()) {
    std::random_device rd;
    name = "/livetrain-" + std::to_string(::getpid()) + "-" + std::to_string(counter++) + "-" + std::to_string(rd());
  }
  if (size > static_cast<uint64_t>(INT64_MAX)) throw Error(ErrorCode::kInvalidArg, "shared memory size too large");
  // O_EXCL: never adopt a segment someone else created under the same name.
  fs::Fd fd(::shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
  if (!fd.valid()) throw io_error("cannot create shared memory " + name);
  std::unique_ptr<ShmSegment> seg(new ShmSegment());
  seg->name_ = name;
  try {
    if (::ftruncate(fd.get(), static_cast<off_t>(size)) != 0) {
      throw io_error("cannot size shared memory " + name + " to " + std::to_string(size) + " bytes");
    }
    seg->addr_ = map_rw(fd.get(), size, name);
    seg->size_ = size;
  } catch (...) {
    seg->unlink();
    throw;
  }
  return seg;
}

void ShmSegment::unlink() {
  if (!unlinked_) ::shm_unlink(name_.c_str());
  unlinked_ = true;
}

ShmSegment::~ShmSegment() {
  if (addr_) ::munmap(addr_, size_);
  unlink();
}

std::unique_ptr<ShmMapping> ShmMapping::open(const std::string& name, uint64_t size) {
  fs::Fd fd(::shm_open(name.c_str(), O_RDWR | O_CLOEXEC, 0));
  if (!fd.valid()) {
    int err = errno;
    if (err == ENOENT) {
      throw Error(ErrorCode::kStale,
                  "shared memory " + name + " does not exist (the engine that exported it has exited)");
    }
    throw io_error("cannot open shared memory " + name, err);
  }
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) throw io_error("cannot stat shared memory " + name);
  if (static_cast<uint64_t>(st.st_size) != size) {
    throw Error(ErrorCode::kFormat, "shared memory " + name + " has " + std::to_string(st.st_size) +
                                        " bytes but the manifest says " + std::to_string(size));
  }
  std::unique_ptr<ShmMapping> m(new ShmMapping());
  m->addr_ = map_rw(fd.get(), size, name);
  m->size_ = size;
  m->uid_ = static_cast<uint32_t>(st.st_uid);
  m->device_ = st.st_dev;
  m->inode_ = st.st_ino;
  return m;
}

ShmMapping::~ShmMapping() {
  if (addr_) ::munmap(addr_, size_);
}

}  // namespace livetrain::sharing
