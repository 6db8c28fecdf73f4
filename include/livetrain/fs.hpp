// Files owned by RAII (descriptors, read-only mappings) and the one crash-safe write protocol that every
// livetrain file goes through: write a temporary file beside the target, fsync it, rename it over the
// target, fsync the directory. docs/durable-writes.md states the protocol and what it guarantees.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>

namespace livetrain::fs {

// An owned file descriptor; closed on destruction.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(Fd&& other) noexcept : fd_(other.release()) {}
  Fd& operator=(Fd&& other) noexcept;
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd();

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  int release() {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }

 private:
  int fd_ = -1;
};

// A read-only, shared mapping of a whole file (size 0 is allowed and maps nothing).
class Mapping {
 public:
  Mapping() = default;
  static Mapping open_readonly(const std::string& path);
  Mapping(Mapping&& other) noexcept;
  Mapping& operator=(Mapping&& other) noexcept;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping();

  const uint8_t* data() const { return static_cast<const uint8_t*>(addr_); }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  void* addr_ = nullptr;
  size_t size_ = 0;
  std::string path_;
};

// Sequential writer over a descriptor: retries short writes and EINTR, counts bytes.
class Writer {
 public:
  Writer(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}
  void write(const void* data, size_t size);
  void write(std::string_view s) { write(s.data(), s.size()); }
  void write_zeros(size_t size);
  // Writes `size` bytes at `offset`, inside what was written already (a header whose content is known last).
  void write_at(uint64_t offset, const void* data, size_t size);
  uint64_t bytes_written() const { return written_; }
  const std::string& path() const { return path_; }
  // Starts the disk writing each further `bytes` written as soon as they are written (Linux:
  // sync_file_range(SYNC_FILE_RANGE_WRITE), which does not wait), instead of leaving them dirty in the page
  // cache until the final fsync; 0 turns it off. A hint for a file written while its producer is still busy (a
  // checkpoint's delta): the fsync that makes the file durable then has only the tail left to wait for.
  // Durability is unchanged: only that fsync reports errors and makes the bytes durable.
  void set_writeback(uint64_t bytes) { writeback_ = bytes; }

 private:
  int fd_;
  std::string path_;
  uint64_t written_ = 0;
  uint64_t writeback_ = 0;  // 0: off
  uint64_t flushed_ = 0;    // bytes [0, flushed_) have had their writeback started
};

// Replaces `path` by a file whose bytes `fill` writes, so that after a crash at any instant `path` is
// either its old content (or absent, if it was) or the complete new content; never a mix. The protocol:
// create `.<name>.livetrain-tmp.<pid>.<n>` in the same directory (mode 0600), fill it, fsync it, set
// `mode` less the process's umask (as open(2) would), rename it over `path`, fsync the directory. If anything fails the
// temporary file is removed, `path` is untouched, and the error names the step and the file. A symlink at `path` is
// replaced by a regular file, never written through.
void write_file_atomic(const std::string& path, const std::function<void(Writer&)>& fill, mode_t mode = 0644);
void write_file_atomic(const std::string& path, std::string_view content, mode_t mode = 0644);

// fsync of a directory, so that a rename or create inside it is durable.
void fsync_dir(const std::string& dir);

// Makes a directory that was filled under a temporary name appear under its final name, complete and
// durable, in one step (the directory form of write_file_atomic): fsyncs every regular file below
// `tmp_dir` and every directory there (tmp_dir included; symlinks are not followed), renames tmp_dir to
// `final_dir`, and fsyncs the parent directory of each (one, when they share it). Never replaces
// anything: when `final_dir` exists (a file, or a directory even if empty) it throws kIo naming
// final_dir and renames nothing. The refusal is atomic where renameat2(RENAME_NOREPLACE) works (Linux
// ext4, xfs, btrfs, tmpfs, ...); elsewhere it is a check followed by rename, so a final_dir created by
// another process in between could still be replaced if it is an empty directory. The two paths must be
// on one filesystem.
void publish_directory(const std::string& tmp_dir, const std::string& final_dir);

// The whole content of a (small) regular file; anything else (a directory, a FIFO, a device such as
// /dev/zero, or a symlink to one) is refused with kIo "PATH: not a regular file", without blocking.
std::string read_file(const std::string& path);

bool exists(const std::string& path);
bool is_directory(const std::string& path);
std::string dirname(const std::string& path);
std::string basename(const std::string& path);
std::string join(const std::string& a, const std::string& b);

// Whether `name` is one of the temporary files write_file_atomic leaves behind after a crash.
bool is_atomic_temp_name(std::string_view name);

}  // namespace livetrain::fs
