// The single-trainer lease: an exclusive flock on "<manifest>.lease" (DESIGN.md: only one trainer writes
// a given engine's weights). The kernel drops the lock when the holder dies, so a crash never wedges it.
#include <fcntl.h>
#include <sys/file.h>
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

// The pid recorded in a lease file, if it holds a plain number.
std::optional<uint64_t> recorded_pid(int fd) {
  char buf[32] = {};
  ssize_t n = ::pread(fd, buf, sizeof(buf) - 1, 0);
  if (n <= 0) return std::nullopt;
  char* stop = nullptr;
  unsigned long long v = std::strtoull(buf, &stop, 10);
  if (stop == buf || v == 0) return std::nullopt;
  return v;
}

// The pid holding a FLOCK WRITE lock on (dev, inode), from /proc/locks, which shows the lock without us
// taking it (taking even a shared lock to test would make a trainer starting at that instant fail).
std::optional<uint64_t> flock_holder(dev_t dev, ino_t ino) {
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

}  // namespace

std::string lease_path(const std::string& manifest_path) { return manifest_path + ".lease"; }

Lease Lease::acquire(const std::string& manifest_path) {
  Lease lease;
  lease.path_ = lease_path(manifest_path);
  // Not write_file_atomic: the lock lives on the inode, and renaming a fresh file over it would let a
  // second trainer lock a different inode under the same name. The file is created once and kept.
  fs::Fd fd(::open(lease.path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600));
  if (!fd.valid()) throw io_error("cannot open lease file " + lease.path_);
  if (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
    int err = errno;
    if (err != EWOULDBLOCK) throw io_error("cannot lock " + lease.path_, err);
    struct stat st {};
    std::optional<uint64_t> holder;
    if (::fstat(fd.get(), &st) == 0) holder = flock_holder(st.st_dev, st.st_ino);
    if (!holder) holder = recorded_pid(fd.get());
    throw Error(ErrorCode::kBusy, "another trainer holds the lease on " + manifest_path + " (pid " +
                                      (holder ? std::to_string(*holder) : std::string("unknown")) +
                                      "); only one trainer may write an engine's weights at a time");
  }
  std::string pid = std::to_string(::getpid()) + "\n";
  if (::ftruncate(fd.get(), 0) != 0 || ::pwrite(fd.get(), pid.data(), pid.size(), 0) != static_cast<ssize_t>(pid.size())) {
    throw io_error("cannot record the holder's pid in " + lease.path_);
  }
  lease.fd_ = fd.release();
  return lease;
}

Lease::Lease(Lease&& other) noexcept : fd_(other.fd_), path_(std::move(other.path_)) { other.fd_ = -1; }

Lease& Lease::operator=(Lease&& other) noexcept {
  if (this != &other) {
    release();
    fd_ = other.fd_;
    path_ = std::move(other.path_);
    other.fd_ = -1;
  }
  return *this;
}

Lease::~Lease() { release(); }

void Lease::release() {
  if (fd_ < 0) return;
  // Clear the recorded pid first, while still holding the lock, so the file never names a stale holder.
  if (::ftruncate(fd_, 0) != 0) {
    // Harmless: the next holder overwrites it, and lease_holder trusts /proc/locks first.
  }
  ::close(fd_);  // closing the last descriptor of the open file drops the flock
  fd_ = -1;
}

std::optional<uint64_t> lease_holder(const std::string& manifest_path) {
  std::string path = lease_path(manifest_path);
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return std::nullopt;
  if (auto pid = flock_holder(st.st_dev, st.st_ino)) return pid;
  // /proc/locks may be unreadable (some sandboxes); fall back to the recorded pid if that process lives.
  fs::Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
  if (!fd.valid()) return std::nullopt;
  auto pid = recorded_pid(fd.get());
  if (pid && process_start_time(*pid)) return pid;
  return std::nullopt;
}

}  // namespace livetrain::sharing
