// Owner liveness: a manifest names its owner by (boot id, pid, start time) because a pid alone is reused;
// and what the kernel says about that process (its user, the files it maps) to check that it is the owner.
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>

#include "livetrain/error.hpp"
#include "livetrain/fs.hpp"
#include "livetrain/sharing.hpp"

namespace livetrain::sharing {

std::string current_boot_id() {
  std::string id = fs::read_file("/proc/sys/kernel/random/boot_id");
  while (!id.empty() && (id.back() == '\n' || id.back() == ' ')) id.pop_back();
  if (id.empty()) throw Error(ErrorCode::kIo, "/proc/sys/kernel/random/boot_id is empty");
  return id;
}

std::optional<uint64_t> process_start_time(uint64_t pid) {
  if (pid == 0 || pid > 0x7fffffff) return std::nullopt;
  std::string stat;
  try {
    stat = fs::read_file("/proc/" + std::to_string(pid) + "/stat");
  } catch (const Error& e) {
    if (e.code() == ErrorCode::kNotFound) return std::nullopt;
    throw;
  }
  // Field 2 (comm) is in parentheses and may itself contain spaces and ')': fields resume after the last ')'.
  size_t close = stat.rfind(')');
  if (close == std::string::npos) throw Error(ErrorCode::kFormat, "/proc/" + std::to_string(pid) + "/stat: no ')'");
  // After ") " come field 3 (state), 4, ...; field 22 is the 20th of them.
  size_t pos = close + 1;
  for (int field = 3; field <= 22; ++field) {
    while (pos < stat.size() && stat[pos] == ' ') ++pos;
    size_t end = stat.find(' ', pos);
    if (end == std::string::npos) end = stat.size();
    if (field == 22) {
      std::string text = stat.substr(pos, end - pos);
      char* stop = nullptr;
      errno = 0;
      unsigned long long v = std::strtoull(text.c_str(), &stop, 10);
      if (text.empty() || errno != 0 || *stop != '\0') break;
      return static_cast<uint64_t>(v);
    }
    pos = end;
  }
  throw Error(ErrorCode::kFormat, "/proc/" + std::to_string(pid) + "/stat: cannot read field 22 (starttime)");
}

std::optional<uint32_t> process_uid(uint64_t pid) {
  if (pid == 0 || pid > 0x7fffffff) return std::nullopt;
  struct stat st {};
  if (::stat(("/proc/" + std::to_string(pid)).c_str(), &st) != 0) return std::nullopt;
  return static_cast<uint32_t>(st.st_uid);
}

std::optional<bool> process_maps_file(uint64_t pid, uint64_t device, uint64_t inode) {
  std::string maps;
  try {
    maps = fs::read_file("/proc/" + std::to_string(pid) + "/maps");
  } catch (const Error&) {
    return std::nullopt;
  }
  // "7f2c1a000000-7f2c1a400000 rw-s 00000000 00:1a 1234567   /dev/shm/livetrain-..."
  std::istringstream lines(maps);
  std::string line;
  while (std::getline(lines, line)) {
    std::istringstream f(line);
    std::string range, perms, offset, dev;
    unsigned long long ino = 0;
    if (!(f >> range >> perms >> offset >> dev >> ino) || ino != inode) continue;
    unsigned maj = 0, min = 0;
    if (std::sscanf(dev.c_str(), "%x:%x", &maj, &min) == 2 && makedev(maj, min) == device) return true;
  }
  return false;
}

OwnerDesc current_owner() {
  OwnerDesc o;
  o.pid = static_cast<uint64_t>(::getpid());
  o.start_time = process_start_time(o.pid).value_or(0);
  o.boot_id = current_boot_id();
  return o;
}

OwnerState owner_state(const OwnerDesc& owner, std::string* detail) {
  std::string boot = current_boot_id();
  if (boot != owner.boot_id) {
    if (detail) *detail = "it was written before the last reboot (boot id " + owner.boot_id + ", now " + boot + ")";
    return OwnerState::kOtherBoot;
  }
  auto start = process_start_time(owner.pid);
  if (!start) {
    if (detail) *detail = "its owner, pid " + std::to_string(owner.pid) + ", is not running";
    return OwnerState::kDead;
  }
  if (*start != owner.start_time) {
    if (detail) {
      *detail = "its owner, pid " + std::to_string(owner.pid) + ", has exited and the pid now belongs to another " +
                "process (start time " + std::to_string(*start) + ", manifest says " +
                std::to_string(owner.start_time) + ")";
    }
    return OwnerState::kPidReused;
  }
  return OwnerState::kAlive;
}

void owner_check(const OwnerDesc& owner, const std::string& manifest_path) {
  std::string detail;
  if (owner_state(owner, &detail) != OwnerState::kAlive) {
    throw Error(ErrorCode::kStale,
                "stale manifest " + manifest_path + ": " + detail + "; restart the engine's export or remove the file");
  }
}

}  // namespace livetrain::sharing
