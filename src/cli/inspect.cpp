// `livetrain inspect PATH`: the tensors of a safetensors file or model directory, as a table or JSON.
#include <algorithm>
#include <cstdio>
#include <map>
#include <string>

#include "cli/command_line.hpp"
#include "cli/commands.hpp"
#include "livetrain/fs.hpp"
#include "livetrain/json.hpp"
#include "livetrain/safetensors.hpp"

namespace livetrain::cli {

namespace {

constexpr const char* kInspectUsage =
    "usage: livetrain inspect PATH [--json]\n"
    "\n"
    "PATH is a .safetensors file, or a model directory holding model.safetensors or shards listed by\n"
    "model.safetensors.index.json. Every header is validated as strictly as the reference safetensors\n"
    "library (offsets contiguous and covering each file, sizes matching dtype x shape); the first problem\n"
    "found is reported with the file and tensor it concerns, and the exit code is 1.\n"
    "\n"
    "Prints one line per tensor (name, dtype, shape, bytes, file) sorted by name, then totals.\n"
    "\n"
    "options:\n"
    "  --json            print one JSON object: path, sharded, files [{name, bytes, tensors, metadata}],\n"
    "                    tensors [{name, dtype, shape, bytes, file, offset}], total_bytes\n";

}  // namespace

std::string human_bytes(unsigned long long bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024 && u < 4) {
    v /= 1024;
    ++u;
  }
  char buf[32];
  if (u == 0) std::snprintf(buf, sizeof(buf), "%llu B", bytes);
  else std::snprintf(buf, sizeof(buf), "%.2f %s", v, units[u]);
  return buf;
}

int run_inspect(const std::vector<std::string>& args) {
  std::vector<std::string> paths;
  bool as_json = false;
  CommandLine cmdline("inspect", kInspectUsage);
  cmdline.flag({"--json"}, as_json).positional(paths, 1, "more than one PATH given");
  if (!cmdline.parse(args)) return 0;
  if (paths.empty() || paths[0].empty()) throw UsageError("inspect: missing PATH (see livetrain inspect --help)");
  const std::string& path = paths[0];

  safetensors::Model model = safetensors::Model::open(path);
  auto short_name = [](const std::string& p) { return fs::basename(p); };
  std::vector<std::string> names = model.names();

  if (as_json) {
    json::Value root = json::Value::object();
    root.set("path", json::Value::string(path));
    root.set("sharded", json::Value::boolean(model.sharded()));
    json::Value files = json::Value::array();
    for (const auto& shard : model.shards()) {
      json::Value f = json::Value::object();
      f.set("name", json::Value::string(short_name(shard->path())));
      f.set("bytes", json::Value::unsigned_integer(shard->file_size()));
      f.set("tensors", json::Value::unsigned_integer(shard->tensors().size()));
      json::Value md = json::Value::object();
      if (shard->header().metadata) {
        for (const auto& [k, v] : *shard->header().metadata) md.set(k, json::Value::string(v));
      }
      f.set("metadata", std::move(md));
      files.push(std::move(f));
    }
    root.set("files", std::move(files));
    json::Value tensors = json::Value::array();
    for (const std::string& name : names) {
      const auto& e = model.tensor(name);
      json::Value t = json::Value::object();
      t.set("name", json::Value::string(name));
      t.set("dtype", json::Value::string(std::string(dtype_name(e.info->dtype))));
      json::Value shape = json::Value::array();
      for (uint64_t d : e.info->shape) shape.push(json::Value::unsigned_integer(d));
      t.set("shape", std::move(shape));
      t.set("bytes", json::Value::unsigned_integer(e.info->nbytes()));
      t.set("file", json::Value::string(short_name(e.file->path())));
      t.set("offset", json::Value::unsigned_integer(e.file->header().data_start() + e.info->begin));
      tensors.push(std::move(t));
    }
    root.set("tensors", std::move(tensors));
    root.set("total_bytes", json::Value::unsigned_integer(model.total_bytes()));
    std::fputs(root.dump_pretty().c_str(), stdout);
    return 0;
  }

  size_t name_w = 4, shape_w = 5;
  for (const std::string& name : names) {
    name_w = std::max(name_w, name.size());
    shape_w = std::max(shape_w, shape_string(model.tensor(name).info->shape).size());
  }
  std::printf("%-*s  %-11s  %-*s  %14s  %s\n", static_cast<int>(name_w), "name", "dtype", static_cast<int>(shape_w),
              "shape", "bytes", "file");
  std::map<std::string, unsigned long long> by_dtype;
  for (const std::string& name : names) {
    const auto& e = model.tensor(name);
    std::string dt(dtype_name(e.info->dtype));
    by_dtype[dt] += e.info->nbytes();
    std::printf("%-*s  %-11s  %-*s  %14llu  %s\n", static_cast<int>(name_w), name.c_str(), dt.c_str(),
                static_cast<int>(shape_w), shape_string(e.info->shape).c_str(),
                static_cast<unsigned long long>(e.info->nbytes()), short_name(e.file->path()).c_str());
  }
  unsigned long long numel = 0;
  for (const std::string& name : names) numel += model.tensor(name).info->numel();
  std::printf("\n%zu tensors, %llu elements, %s of tensor data in %zu file%s", names.size(), numel,
              human_bytes(model.total_bytes()).c_str(), model.shards().size(), model.shards().size() == 1 ? "" : "s");
  std::printf("%s\n", model.sharded() ? " (sharded, model.safetensors.index.json)" : "");
  for (const auto& [dt, bytes] : by_dtype) std::printf("  %-11s %s\n", dt.c_str(), human_bytes(bytes).c_str());
  return 0;
}

}  // namespace livetrain::cli
