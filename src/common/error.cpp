// Error helpers shared by every subsystem.
#include "livetrain/error.hpp"

#include <cstring>

namespace livetrain {

const char* error_code_name(ErrorCode code) {
  switch (code) {
    case ErrorCode::kIo: return "io";
    case ErrorCode::kFormat: return "format";
    case ErrorCode::kInvalidArg: return "invalid-argument";
    case ErrorCode::kNotFound: return "not-found";
    case ErrorCode::kOverflow: return "overflow";
    case ErrorCode::kUnsupported: return "unsupported";
    case ErrorCode::kCuda: return "cuda";
    case ErrorCode::kStale: return "stale";
    case ErrorCode::kBusy: return "busy";
  }
  return "unknown";
}

Error io_error(std::string_view what, int err) {
  std::string message(what);
  message += ": ";
  message += std::strerror(err);
  return Error(ErrorCode::kIo, message);
}

}  // namespace livetrain
