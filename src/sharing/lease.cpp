// The single-trainer lease (DESIGN.md: only one trainer writes a given engine's weights): an exclusive flock
// on the memory itself (the first shared-memory segment) or, for CUDA IPC, on a lock object named after
// the first allocation's IPC handle. Keyed on what is shared rather than on the manifest's path, so a copy
// of a manifest elsewhere does not let a second trainer in (issue #13). The kernel drops the lock when the
// holder dies, so a crash never wedges it.
#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <sstream>

#include "livetrain/error.hpp"
#include "livetrain/fs.hpp"
#include "livetrain/sharing.hpp"

namespace livetrain::sharing {

namespace {

// The pid holding a FLOCK WRITE lock on (dev, inode), from /proc/locks, which shows the lock without us
// taking it (taking even a shared lock to test would make a trainer starting at that instant fail).
std::optional<uint64_t> flock_holder(uint64_t dev, uint64_t ino) {
  std::string text;
  try {
    text = fs::read_file("/proc/locks");
  } catch (const Error&) {
    return std::nullopt;
  }
  // "1: FLOCK  ADVISORY  WRITE 12345 08:02:1234567 0 EOF"
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    std::istringstream f(line);
    std::string id, type, mode, access, pid, file;
    if (!(f >> id >> type)) continue;
    if (type == "->") f >> type;  // a waiter's line: "1: -> FLOCK ..."
    if (!(f >> mode >> access >> pid >> file) || type != "FLOCK" || access != "WRITE") continue;
    unsigned maj = 0, min = 0;
    unsigned long long inode = 0;
    if (std::sscanf(file.c_str(), "%x:%x:%llu", &maj, &min, &inode) != 3) continue;
    if (makedev(maj, min) == dev && inode == ino) {
      long long p = std::atoll(pid.c_str());
      if (p > 0) return static_cast<uint64_t>(p);
    }
  }
  return std::nullopt;
}

// FNV-1a, 64 bits: names the CUDA lock object after the IPC handle (stable across processes and builds).
uint64_t fnv1a(const std::string& s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ull;
  return h;
}

}  // namespace

std::string lease_object(const Manifest& m) {
  if (m.buffers.empty()) throw Error(ErrorCode::kFormat, "manifest has no buffers: nothing to lease");
  const BufferDesc& b = m.buffers.front();
  if (b.kind == BufferKind::kShm) return b.shm_name;
  char hex[17];
  std::snprintf(hex, sizeof(hex), "%016llx",
                static_cast<unsigned long long>(fnv1a(b.device_uuid + "/" + b.ipc_handle)));
  return std::string("/livetrain-lease-") + hex;
}

Lease Lease::acquire(const Manifest& m, const std::string& manifest_path) {
  Lease lease;
  lease.object_ = lease_object(m);
  bool own_object = m.buffers.front().kind != BufferKind::kShm;
  for (int attempt = 0;; ++attempt) {
    // A segment is the engine's and must exist; a CUDA lock object is made by whoever comes first
    // (mode 0600, so it is someone's own; another user's is refused below).
    fs::Fd fd(::shm_open(lease.object_.c_str(), O_RDWR | O_CLOEXEC | (own_object ? O_CREAT : 0), 0600));
    if (!fd.valid()) {
      int err = errno;
      if (err == ENOENT) {
        throw Error(ErrorCode::kStale, manifest_path + ": shared memory " + lease.object_ +
                                           " does not exist (the engine that exported it has exited)");
      }
      throw io_error(manifest_path + ": cannot open " + lease.object_ + " to take the trainer lease", err);
    }
    struct stat st {};
    if (::fstat(fd.get(), &st) != 0) throw io_error("cannot stat " + lease.object_);
    if (own_object && st.st_uid != ::getuid()) {
      throw Error(ErrorCode::kBusy, manifest_path + ": the lease object " + lease.object_ + " belongs to uid " +
                                        std::to_string(st.st_uid) + ", not to this user; remove it (/dev/shm" +
                                        lease.object_ + ") if no trainer of that user runs");
    }
    if (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
      int err = errno;
      if (err != EWOULDBLOCK) throw io_error("cannot lock " + lease.object_, err);
      std::optional<uint64_t> holder = flock_holder(st.st_dev, st.st_ino);
      throw Error(ErrorCode::kBusy, "another trainer holds the lease on " + manifest_path + " (pid " +
                                        (holder ? std::to_string(*holder) : std::string("unknown")) + ", lock on " +
                                        lease.object_ + "); only one trainer may write an engine's weights at a time");
    }
    if (own_object) {
      // The previous holder unlinks the object when it lets go: make sure the name still leads to the
      // inode we locked, or a third trainer could lock a new object under the same name.
      fs::Fd again(::shm_open(lease.object_.c_str(), O_RDONLY | O_CLOEXEC, 0));
      struct stat now {};
      if (!again.valid() || ::fstat(again.get(), &now) != 0 || now.st_ino != st.st_ino || now.st_dev != st.st_dev) {
        if (attempt < 100) continue;
        throw Error(ErrorCode::kBusy,
                    "cannot take the lease on " + manifest_path + ": " + lease.object_ + " keeps being replaced");
      }
    }
    lease.remove_ = own_object;
    lease.device_ = st.st_dev;
    lease.inode_ = st.st_ino;
    lease.fd_ = fd.release();
    return lease;
  }
}

Lease::Lease(Lease&& other) noexcept
    : fd_(other.fd_),
      object_(std::move(other.object_)),
      remove_(other.remove_),
      device_(other.device_),
      inode_(other.inode_) {
  other.fd_ = -1;
}

Lease& Lease::operator=(Lease&& other) noexcept {
  if (this != &other) {
    release();
    fd_ = other.fd_;
    object_ = std::move(other.object_);
    remove_ = other.remove_;
    device_ = other.device_;
    inode_ = other.inode_;
    other.fd_ = -1;
  }
  return *this;
}

Lease::~Lease() { release(); }

void Lease::release() {
  if (fd_ < 0) return;
  // A lock object of our own goes while we still hold the lock (acquire checks the name again after
  // locking), so /dev/shm does not collect one per engine ever trained.
  if (remove_) ::shm_unlink(object_.c_str());
  ::close(fd_);  // closing the last descriptor of the open file drops the flock
  fd_ = -1;
}

std::optional<uint64_t> lease_holder(const std::string& manifest_path) {
  std::string object = lease_object(manifest_read(manifest_path));
  fs::Fd fd(::shm_open(object.c_str(), O_RDONLY | O_CLOEXEC, 0));
  if (!fd.valid()) return std::nullopt;
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return std::nullopt;
  return flock_holder(st.st_dev, st.st_ino);
}

}  // namespace livetrain::sharing
