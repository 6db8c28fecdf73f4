// Model directories: a single model.safetensors or shards named by model.safetensors.index.json.
#include <algorithm>
#include <cstdio>
#include <string>

#include "livetrain/error.hpp"
#include "livetrain/json.hpp"
#include "livetrain/safetensors.hpp"

namespace livetrain::safetensors {

namespace {

// A shard named by an index must be a plain file name inside the model directory.
bool is_plain_file_name(std::string_view name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string_view::npos &&
         name.find('\0') == std::string_view::npos;
}

}  // namespace

Model Model::open(const std::string& path) {
  Model m;
  m.path_ = path;
  if (!fs::is_directory(path)) {
    m.shards_.push_back(std::make_unique<File>(File::open(path)));
    for (const TensorInfo& t : m.shards_[0]->tensors()) m.entries_.emplace(t.name, Entry{m.shards_[0].get(), &t});
    return m;
  }

  const std::string index_path = fs::join(path, std::string(kIndexFileName));
  if (!fs::exists(index_path)) {
    const std::string single = fs::join(path, std::string(kSingleFileName));
    if (!fs::exists(single)) {
      throw Error(ErrorCode::kNotFound, path + ": neither " + std::string(kSingleFileName) + " nor " +
                                            std::string(kIndexFileName) + " is in this directory");
    }
    Model one = open(single);
    one.path_ = path;
    return one;
  }

  m.sharded_ = true;
  json::Value root = json::parse(fs::read_file(index_path), index_path);
  if (!root.is_object()) throw Error(ErrorCode::kFormat, index_path + ": not a JSON object");
  const json::Value* weight_map = root.find("weight_map");
  if (!weight_map || !weight_map->is_object()) {
    throw Error(ErrorCode::kFormat, index_path + ": missing object \"weight_map\"");
  }
  if (auto dup = weight_map->find_duplicate_key()) {
    throw Error(ErrorCode::kFormat, index_path + ": weight_map lists tensor " + json::quoted(*dup) + " twice");
  }
  std::unordered_map<std::string, File*> by_name;
  for (const auto& [tensor, file] : weight_map->members()) {
    if (!file.is_string() || !is_plain_file_name(file.as_string())) {
      throw Error(ErrorCode::kFormat, index_path + ": weight_map entry for tensor " + json::quoted(tensor) +
                                          " is not a file name inside the model directory");
    }
    const std::string& shard_name = file.as_string();
    auto it = by_name.find(shard_name);
    if (it == by_name.end()) {
      m.shards_.push_back(std::make_unique<File>(File::open(fs::join(path, shard_name))));
      it = by_name.emplace(shard_name, m.shards_.back().get()).first;
    }
    const TensorInfo* info = it->second->find(tensor);
    if (!info) {
      throw Error(ErrorCode::kFormat, index_path + ": tensor " + json::quoted(tensor) + " is mapped to " + shard_name +
                                          ", which does not contain it");
    }
    m.entries_.emplace(tensor, Entry{it->second, info});
  }
  return m;
}

std::vector<std::string> Model::names() const {
  std::vector<std::string> out;
  out.reserve(entries_.size());
  for (const auto& [name, entry] : entries_) out.push_back(name);
  std::sort(out.begin(), out.end());
  return out;
}

const Model::Entry* Model::find(std::string_view name) const {
  auto it = entries_.find(std::string(name));
  return it == entries_.end() ? nullptr : &it->second;
}

const Model::Entry& Model::tensor(std::string_view name) const {
  const Entry* e = find(name);
  if (!e) throw Error(ErrorCode::kNotFound, path_ + ": no tensor " + json::quoted(name));
  return *e;
}

uint64_t Model::total_bytes() const {
  uint64_t total = 0;
  for (const auto& [name, entry] : entries_) total += entry.info->nbytes();
  return total;
}

std::vector<std::string> write_model(const std::string& dir, const std::vector<TensorRef>& tensors,
                                     uint64_t max_shard_bytes, const WriteOptions& options) {
  if (!fs::is_directory(dir)) throw Error(ErrorCode::kNotFound, dir + ": not a directory");
  uint64_t total = 0;
  for (const TensorRef& t : tensors) total += t.nbytes;
  if (total <= max_shard_bytes) {
    write_file(fs::join(dir, std::string(kSingleFileName)), tensors, options);
    return {std::string(kSingleFileName)};
  }

  std::vector<std::vector<TensorRef>> shards(1);
  uint64_t in_shard = 0;
  for (const TensorRef& t : tensors) {
    if (!shards.back().empty() && in_shard + t.nbytes > max_shard_bytes) {
      shards.emplace_back();
      in_shard = 0;
    }
    shards.back().push_back(t);
    in_shard += t.nbytes;
  }
  std::vector<std::string> names;
  json::Value weight_map = json::Value::object();
  for (size_t i = 0; i < shards.size(); ++i) {
    char name[64];
    std::snprintf(name, sizeof(name), "model-%05zu-of-%05zu.safetensors", i + 1, shards.size());
    write_file(fs::join(dir, name), shards[i], options);
    names.emplace_back(name);
    for (const TensorRef& t : shards[i]) weight_map.set(t.name, json::Value::string(name));
  }
  // Sorted by tensor name, as transformers writes it, so diffs between saves stay readable.
  std::sort(weight_map.members().begin(), weight_map.members().end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  json::Value index = json::Value::object();
  json::Value meta = json::Value::object();
  meta.set("total_size", json::Value::unsigned_integer(total));
  index.set("metadata", std::move(meta));
  index.set("weight_map", std::move(weight_map));
  fs::write_file_atomic(fs::join(dir, std::string(kIndexFileName)), index.dump_pretty());
  names.emplace_back(kIndexFileName);
  return names;
}

}  // namespace livetrain::safetensors
