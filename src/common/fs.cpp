// RAII file handles and the crash-safe write protocol (docs/durable-writes.md).
#include "livetrain/fs.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <memory>

#include "livetrain/error.hpp"

namespace livetrain::fs {

Fd& Fd::operator=(Fd&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = other.release();
  }
  return *this;
}

Fd::~Fd() {
  if (fd_ >= 0) ::close(fd_);
}

namespace {

// `path` opened for reading, refused unless it is a regular file: O_NONBLOCK so that a FIFO put in a
// file's place (or a symlink to one) is refused instead of blocking the open until a writer comes, and
// the check so that a device (a symlink to /dev/zero) is never read without end. O_NONBLOCK does nothing
// to a regular file's reads.
Fd open_regular(const std::string& path, struct stat& st) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK));
  if (!fd.valid()) {
    int err = errno;
    if (err == ENOENT) throw Error(ErrorCode::kNotFound, path + ": no such file");
    throw io_error("cannot open " + path, err);
  }
  if (::fstat(fd.get(), &st) != 0) throw io_error("cannot stat " + path);
  if (!S_ISREG(st.st_mode)) throw Error(ErrorCode::kIo, path + ": not a regular file");
  return fd;
}

}  // namespace

Mapping Mapping::open_readonly(const std::string& path) {
  struct stat st {};
  Fd fd = open_regular(path, st);
  Mapping m;
  m.path_ = path;
  m.size_ = static_cast<size_t>(st.st_size);
  if (m.size_ > 0) {
    void* addr = ::mmap(nullptr, m.size_, PROT_READ, MAP_SHARED, fd.get(), 0);
    if (addr == MAP_FAILED) throw io_error("cannot mmap " + path);
    m.addr_ = addr;
  }
  return m;
}

Mapping::Mapping(Mapping&& other) noexcept : addr_(other.addr_), size_(other.size_), path_(std::move(other.path_)) {
  other.addr_ = nullptr;
  other.size_ = 0;
}

Mapping& Mapping::operator=(Mapping&& other) noexcept {
  if (this != &other) {
    if (addr_) ::munmap(addr_, size_);
    addr_ = other.addr_;
    size_ = other.size_;
    path_ = std::move(other.path_);
    other.addr_ = nullptr;
    other.size_ = 0;
  }
  return *this;
}

Mapping::~Mapping() {
  if (addr_) ::munmap(addr_, size_);
}

void Writer::write(const void* data, size_t size) {
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    ssize_t n = ::write(fd_, p, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw io_error("cannot write " + path_);
    }
    if (n == 0) throw Error(ErrorCode::kIo, "cannot write " + path_ + ": write returned 0");
    p += n;
    size -= static_cast<size_t>(n);
    written_ += static_cast<uint64_t>(n);
  }
#ifdef __linux__
  if (writeback_ && written_ - flushed_ >= writeback_) {
    // Errors are not lost by ignoring them here: the final fsync reports any write-back error.
    (void)::sync_file_range(fd_, static_cast<off64_t>(flushed_), static_cast<off64_t>(written_ - flushed_),
                            SYNC_FILE_RANGE_WRITE);
    flushed_ = written_;
  }
#endif
}

void Writer::write_at(uint64_t offset, const void* data, size_t size) {
  if (offset > written_ || size > written_ - offset)
    throw Error(ErrorCode::kInvalidArg, "write_at past what was written to " + path_);
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    ssize_t n = ::pwrite(fd_, p, size, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw io_error("cannot write " + path_);
    }
    if (n == 0) throw Error(ErrorCode::kIo, "cannot write " + path_ + ": pwrite returned 0");
    p += n;
    offset += static_cast<uint64_t>(n);
    size -= static_cast<size_t>(n);
  }
}

void Writer::write_zeros(size_t size) {
  static const char kZeros[4096] = {};
  while (size > 0) {
    size_t n = size < sizeof(kZeros) ? size : sizeof(kZeros);
    write(kZeros, n);
    size -= n;
  }
}

std::string dirname(const std::string& path) {
  size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

std::string basename(const std::string& path) {
  size_t slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

std::string join(const std::string& a, const std::string& b) {
  if (a.empty() || b.empty() || b.front() == '/') return a.empty() ? b : (b.empty() ? a : b);
  return a.back() == '/' ? a + b : a + "/" + b;
}

bool exists(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0;
}

bool is_directory(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

static constexpr std::string_view kTempMarker = ".livetrain-tmp.";

bool is_atomic_temp_name(std::string_view name) {
  return !name.empty() && name.front() == '.' && name.find(kTempMarker) != std::string_view::npos;
}

void fsync_dir(const std::string& dir) {
  Fd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd.valid()) throw io_error("cannot open directory " + dir + " to fsync it");
  if (::fsync(fd.get()) != 0) throw io_error("fsync of directory " + dir + " failed");
}

namespace {

// fsyncs every regular file and directory below `dir`, then `dir` itself (children first, so that a
// directory's fsync follows its entries'). Symlinks and special files are left alone.
void fsync_tree(const std::string& dir) {
  std::unique_ptr<DIR, int (*)(DIR*)> d(::opendir(dir.c_str()), ::closedir);
  if (!d) throw io_error("cannot open directory " + dir);
  while (true) {
    errno = 0;
    dirent* e = ::readdir(d.get());
    if (!e) {
      if (errno != 0) throw io_error("cannot read directory " + dir);
      break;
    }
    const std::string name = e->d_name;
    if (name == "." || name == "..") continue;
    const std::string path = join(dir, name);
    struct stat st {};
    if (::lstat(path.c_str(), &st) != 0) throw io_error("cannot stat " + path);
    if (S_ISDIR(st.st_mode)) {
      fsync_tree(path);
    } else if (S_ISREG(st.st_mode)) {
      Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
      if (!fd.valid()) throw io_error("cannot open " + path + " to fsync it");
      if (::fsync(fd.get()) != 0) throw io_error("fsync of " + path + " failed");
    }
  }
  fsync_dir(dir);
}

// rename(2) that fails with EEXIST instead of replacing an existing `to`.
int rename_noreplace(const char* from, const char* to) {
#ifdef RENAME_NOREPLACE
  if (::renameat2(AT_FDCWD, from, AT_FDCWD, to, RENAME_NOREPLACE) == 0) return 0;
  if (errno != EINVAL && errno != ENOSYS) return -1;  // EINVAL/ENOSYS: the filesystem or kernel lacks it
#endif
  struct stat st {};
  if (::lstat(to, &st) == 0) {
    errno = EEXIST;
    return -1;
  }
  return ::rename(from, to);
}

}  // namespace

void publish_directory(const std::string& tmp_dir, const std::string& final_dir) {
  if (!is_directory(tmp_dir)) {
    throw Error(exists(tmp_dir) ? ErrorCode::kIo : ErrorCode::kNotFound,
                "cannot publish " + tmp_dir + " as " + final_dir + ": " + tmp_dir + " is not a directory");
  }
  if (exists(final_dir)) {
    throw Error(ErrorCode::kIo,
                "cannot publish " + tmp_dir + " as " + final_dir + ": " + final_dir + " already exists");
  }
  fsync_tree(tmp_dir);
  if (rename_noreplace(tmp_dir.c_str(), final_dir.c_str()) != 0) {
    if (errno == EEXIST || errno == ENOTEMPTY) {
      throw Error(ErrorCode::kIo,
                  "cannot publish " + tmp_dir + " as " + final_dir + ": " + final_dir + " already exists");
    }
    throw io_error("cannot rename " + tmp_dir + " to " + final_dir);
  }
  auto parent = [](std::string p) {
    while (p.size() > 1 && p.back() == '/') p.pop_back();  // "a/b/" is "a/b", whose parent is "a"
    return dirname(p);
  };
  const std::string from_parent = parent(tmp_dir), to_parent = parent(final_dir);
  fsync_dir(to_parent);
  if (from_parent != to_parent) fsync_dir(from_parent);
}

// The process's umask, read without changing it (umask(2) can only set it, which would race with other
// threads creating files): "Umask:" of /proc/self/status (Linux 4.7+); 022 where that is unreadable.
static mode_t current_umask() {
  std::unique_ptr<FILE, int (*)(FILE*)> f(::fopen("/proc/self/status", "re"), ::fclose);
  if (!f) return 022;
  char line[256];
  while (::fgets(line, sizeof line, f.get()) != nullptr) {
    unsigned mask = 0;
    if (::sscanf(line, "Umask: %o", &mask) == 1) return static_cast<mode_t>(mask & 0777);
  }
  return 022;
}

void write_file_atomic(const std::string& path, const std::function<void(Writer&)>& fill, mode_t mode) {
  static std::atomic<uint64_t> counter{0};
  const std::string dir = dirname(path);
  const std::string tmp = join(dir, "." + basename(path) + std::string(kTempMarker) + std::to_string(::getpid()) + "." +
                                        std::to_string(counter++));
  Fd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
  if (!fd.valid()) throw io_error("cannot create temporary file " + tmp + " for " + path);
  try {
    Writer writer(fd.get(), path);
    fill(writer);
    // A failed fsync may have dropped the dirty pages: the file is abandoned, never retried.
    if (::fsync(fd.get()) != 0) throw io_error("fsync of " + path + " (temporary " + tmp + ") failed");
    // As open(2) would create it: the umask applies (livetrain's processes set 077, issue #13).
    if (::fchmod(fd.get(), mode & ~current_umask()) != 0) throw io_error("cannot set mode of " + tmp);
    if (::close(fd.release()) != 0) throw io_error("close of " + tmp + " failed");
    if (::rename(tmp.c_str(), path.c_str()) != 0) throw io_error("cannot rename " + tmp + " to " + path);
  } catch (...) {
    ::unlink(tmp.c_str());
    throw;
  }
  fsync_dir(dir);
}

void write_file_atomic(const std::string& path, std::string_view content, mode_t mode) {
  write_file_atomic(
      path, [&](Writer& w) { w.write(content); }, mode);
}

std::string read_file(const std::string& path) {
  struct stat st {};
  Fd fd = open_regular(path, st);
  std::string out;
  char buf[65536];
  while (true) {
    ssize_t n = ::read(fd.get(), buf, sizeof(buf));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw io_error("cannot read " + path);
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  return out;
}

}  // namespace livetrain::fs
