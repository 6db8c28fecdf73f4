// The commit record (COMMIT): what a store holds, read and written as JSON (format.hpp has the fields).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "livetrain/checkpoint/format.hpp"
#include "livetrain/dtype.hpp"

namespace livetrain::checkpoint {

struct ModelFile {
  std::string name;  // relative to the model directory
  uint64_t size = 0;
  uint64_t hash = 0;
};

struct TensorEntry {
  std::string name;
  DType dtype = DType::kU8;
  std::vector<uint64_t> shape;
  uint32_t file = 0;    // index into Commit::files
  uint64_t offset = 0;  // absolute byte offset of the tensor's data in that file
  uint64_t nbytes = 0;
};

struct Generation {
  uint64_t generation = 0;
  uint64_t parent = 0;
  int64_t time_ms = 0;  // Unix time of the save, milliseconds
  uint64_t weight_version = 0;
  std::string delta;  // file name in the store; empty for the oldest generation (the base)
  uint64_t bytes = 0;  // delta file size (+ optimizer state size)
  uint64_t changed = 0;
  uint64_t delta_hash = 0;  // XXH64 checksum trailer of the delta file
  std::string optimizer_state;  // file name in the store, or empty
};

struct Commit {
  uint64_t head = 0;
  uint64_t oldest = 0;
  uint64_t materialized = 0;
  std::vector<ModelFile> files;
  std::vector<TensorEntry> tensors;
  std::vector<Generation> generations;  // oldest..head

  const Generation* find(uint64_t generation) const;
};

std::string commit_serialize(const Commit& c);
Commit commit_parse(std::string_view text, std::string_view what);
Commit commit_read(const std::string& store_dir);
std::string delta_file_name(uint64_t generation);

}  // namespace livetrain::checkpoint
