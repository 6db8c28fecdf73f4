// The commit record (COMMIT): what a store holds, read and written as JSON (format.hpp has the fields).
#pragma once

#include <cstdint>
#include <optional>
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
  // The dtype the engine serves the tensor in (convert.hpp): deltas, head copies and restored bytes are in
  // it, and the files' bytes converted to it are the base. Equal to `dtype` unless set_served changed it.
  DType served = DType::kU8;
  // The tensor's size in dtype `as` (its size in the files, in units of `as`): served_nbytes in `served`, and a
  // store's own served dtype (Store::served).
  uint64_t nbytes_as(DType as) const { return as == dtype ? nbytes : nbytes / unit_bytes(dtype) * unit_bytes(as); }
  uint64_t served_nbytes() const { return nbytes_as(served); }
};

// One file of a generation's delta: the whole delta of a single-process save (rank 0 of 1), or the part
// one tensor-parallel rank wrote, with the optimizer state saved beside it.
struct Part {
  uint32_t rank = 0;
  std::string file;               // delta file name in the store
  std::optional<uint64_t> bytes;  // its size (unset in generations read from a version-1 COMMIT)
  uint64_t hash = 0;              // its XXH64 checksum trailer (= XXH64 of everything before it)
  uint64_t changed = 0;
  std::string optimizer_state;  // file name in the store, or empty
  std::optional<uint64_t> optimizer_bytes;
  std::optional<uint64_t> optimizer_hash;  // "xxh64-4k" content hash (unset when read from version 1)
};

struct Generation {
  uint64_t generation = 0;
  uint64_t parent = 0;
  int64_t time_ms = 0;  // Unix time of the save, milliseconds
  uint64_t weight_version = 0;
  uint64_t bytes = 0;       // delta files + optimizer state files
  uint64_t changed = 0;     // elements, over all parts
  uint32_t ranks = 1;       // the tensor-parallel size that wrote it
  std::vector<Part> parts;  // one per rank, by rank; empty for the oldest generation (the base)

  // The part of `rank`, or null.
  const Part* part(uint32_t rank) const;
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
// gen-<20 digits>.delta: a single-process generation's delta file.
std::string delta_file_name(uint64_t generation);
// gen-<20 digits>.rank-<r>-of-<n>.delta: rank r's part of a generation written at TP n.
std::string part_file_name(uint64_t generation, uint32_t rank, uint32_t ranks);
// The optimizer state file saved beside a delta or part file: its name with ".optim" for ".delta".
std::string optimizer_file_name(const std::string& delta_file);

}  // namespace livetrain::checkpoint
