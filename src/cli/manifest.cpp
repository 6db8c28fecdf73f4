// `livetrain manifest inspect FILE`: what an engine shares (buffers, tensors), whether its owner is alive
// and who holds the trainer lease, as a table or JSON. It never takes the lease or maps any memory.
#include <algorithm>
#include <cstdio>
#include <string>

#include "cli/command_line.hpp"
#include "cli/commands.hpp"
#include "livetrain/json.hpp"
#include "livetrain/sharing.hpp"

namespace livetrain::cli {

namespace {

constexpr const char* kManifestUsage =
    "usage: livetrain manifest inspect FILE [--json]\n"
    "\n"
    "FILE is a sharing manifest written by an engine (docs/manifest.md). It is parsed strictly; the first\n"
    "problem is reported with the field it concerns, and the exit code is 1.\n"
    "\n"
    "Prints the model, the owner process and whether it is still alive (same boot, pid running with the\n"
    "same start time), the trainer lease holder, the buffers (shared memory or CUDA IPC) and one line per\n"
    "tensor (name, dtype, shape, strides, buffer, offset). Nothing is mapped and the lease is not taken.\n"
    "\n"
    "options:\n"
    "  --json            print one JSON object: path, model, owner {pid, start_time, boot_id, state},\n"
    "                    lease_holder (pid or null), buffers, tensors\n";

const char* state_name(sharing::OwnerState s) {
  switch (s) {
    case sharing::OwnerState::kAlive: return "alive";
    case sharing::OwnerState::kDead: return "dead";
    case sharing::OwnerState::kPidReused: return "pid-reused";
    case sharing::OwnerState::kOtherBoot: return "other-boot";
  }
  return "unknown";
}

std::string list_text(const std::vector<uint64_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

int run_manifest_inspect(const std::string& path, bool as_json) {
  sharing::Manifest m = sharing::manifest_read(path);
  std::string detail;
  sharing::OwnerState state = sharing::owner_state(m.owner, &detail);
  auto holder = sharing::lease_holder(path);

  if (as_json) {
    // The manifest's own JSON, plus what was found about the owner and the lease right now.
    json::Value doc = json::parse(sharing::manifest_serialize(m), path);
    json::Value root = json::Value::object();
    root.set("path", json::Value::string(path));
    for (auto& [k, v] : doc.members()) {
      if (k == "owner") {
        v.set("state", json::Value::string(state_name(state)));
        if (state != sharing::OwnerState::kAlive) v.set("detail", json::Value::string(detail));
      }
      root.set(k, std::move(v));
    }
    root.set("lease_holder", holder ? json::Value::unsigned_integer(*holder) : json::Value::null());
    std::fputs(root.dump_pretty().c_str(), stdout);
    std::fputs("\n", stdout);
    return 0;
  }

  std::printf("manifest  %s (version %llu)\n", path.c_str(),
              static_cast<unsigned long long>(sharing::kManifestVersion));
  std::printf("model     %s  engine %s  tp %u/%u\n", m.model.path.c_str(), m.model.engine.c_str(), m.model.tp_rank,
              m.model.tp_size);
  std::printf("owner     pid %llu  %s%s%s\n", static_cast<unsigned long long>(m.owner.pid), state_name(state),
              detail.empty() ? "" : ": ", detail.c_str());
  if (holder) std::printf("lease     held by pid %llu\n", static_cast<unsigned long long>(*holder));
  else std::printf("lease     free\n");
  std::printf("\n%zu buffer%s\n", m.buffers.size(), m.buffers.size() == 1 ? "" : "s");
  unsigned long long total = 0;
  for (size_t i = 0; i < m.buffers.size(); ++i) {
    const auto& b = m.buffers[i];
    total += b.size;
    if (b.kind == sharing::BufferKind::kShm) {
      std::printf("  %zu  shm       %s  %s\n", i, b.shm_name.c_str(), human_bytes(b.size).c_str());
    } else {
      std::printf("  %zu  cuda_ipc  %s  %s  handle %.16s...\n", i, b.device_uuid.c_str(), human_bytes(b.size).c_str(),
                  b.ipc_handle.c_str());
    }
  }
  size_t name_w = 4, shape_w = 5, strides_w = 7;
  for (const auto& t : m.tensors) {
    name_w = std::max(name_w, t.name.size());
    shape_w = std::max(shape_w, list_text(t.shape).size());
    strides_w = std::max(strides_w, list_text(t.strides).size());
  }
  std::printf("\n%zu tensor%s\n", m.tensors.size(), m.tensors.size() == 1 ? "" : "s");
  std::printf("  %-*s  %-11s  %-*s  %-*s  %6s  %s\n", static_cast<int>(name_w), "name", "dtype",
              static_cast<int>(shape_w), "shape", static_cast<int>(strides_w), "strides", "buffer", "offset");
  for (const auto& t : m.tensors) {
    std::printf("  %-*s  %-11s  %-*s  %-*s  %6u  %llu\n", static_cast<int>(name_w), t.name.c_str(),
                std::string(dtype_name(t.dtype)).c_str(), static_cast<int>(shape_w), list_text(t.shape).c_str(),
                static_cast<int>(strides_w), list_text(t.strides).c_str(), t.buffer,
                static_cast<unsigned long long>(t.offset));
  }
  std::printf("\n%s shared in %zu buffer%s\n", human_bytes(total).c_str(), m.buffers.size(),
              m.buffers.size() == 1 ? "" : "s");
  return 0;
}

}  // namespace

int run_manifest(const std::vector<std::string>& args) {
  std::vector<std::string> pos;  // SUBCOMMAND FILE
  bool as_json = false;
  CommandLine cmdline("manifest", kManifestUsage);
  cmdline.flag({"--json"}, as_json).positional(pos, 2, "more than one FILE given");
  if (!cmdline.parse(args)) return 0;
  const std::string sub = pos.size() > 0 ? pos[0] : "", path = pos.size() > 1 ? pos[1] : "";
  if (sub.empty()) throw UsageError("manifest: missing subcommand (see livetrain manifest --help)");
  if (sub != "inspect") throw UsageError("manifest: unknown subcommand '" + sub + "' (only 'inspect')");
  if (path.empty()) throw UsageError("manifest inspect: missing FILE (see livetrain manifest --help)");
  return run_manifest_inspect(path, as_json);
}

}  // namespace livetrain::cli
