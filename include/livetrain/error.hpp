// The one error type of the livetrain core: every failure is a livetrain::Error naming what was wrong.
#pragma once

#include <cerrno>
#include <stdexcept>
#include <string>
#include <string_view>

namespace livetrain {

// What kind of failure this is, so callers and tests can react without parsing messages.
enum class ErrorCode {
  kIo,           // a system call on a file failed (open, read, write, fsync, rename, mmap)
  kFormat,       // bytes from outside do not follow the format (malformed file, header, manifest)
  kInvalidArg,   // the caller passed something impossible (wrong dtype, shape, size)
  kNotFound,     // a named file or tensor does not exist
  kOverflow,     // a size computed from outside input does not fit in 64 bits
  kUnsupported,  // well-formed, but livetrain does not handle it (yet or ever)
  kCuda,         // a CUDA call failed
  kStale,        // a manifest describes an owner process that is gone (dead, pid reused, or rebooted since)
  kBusy,         // an exclusive resource (a trainer lease) is held by another process
};

const char* error_code_name(ErrorCode code);

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message) : std::runtime_error(message), code_(code) {}
  ErrorCode code() const { return code_; }

 private:
  ErrorCode code_;
};

// An Error of kind kIo whose message ends with the text of errno `err`: "<what>: <strerror>".
Error io_error(std::string_view what, int err = errno);

}  // namespace livetrain
