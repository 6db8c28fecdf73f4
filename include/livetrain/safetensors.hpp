// safetensors files and sharded model directories: strict reading (mmap), writing, and atomic replacement.
//
// The file format, byte by byte (docs/safetensors.md has the full rules and where we differ from the
// reference implementation, huggingface/safetensors `tensor.rs`):
//
//   offset 0      u64 little-endian N: the header's length in bytes, N <= 100,000,000
//   offset 8      N bytes of UTF-8 JSON, starting with '{', possibly followed by spaces (padding):
//                   { "__metadata__": {"key": "value", ...},           (optional; strings only)
//                     "<tensor name>": { "dtype": "BF16", "shape": [d0, d1, ...],
//                                        "data_offsets": [begin, end] }, ... }
//   offset 8+N    the data buffer: each tensor's bytes (C order, little-endian) at [begin, end) relative
//                 to 8+N; sorted by offset, the ranges are contiguous, start at 0, and end exactly at the
//                 end of the file; end - begin = product(shape) × element size.
//
// Writing follows the reference writer exactly (so files are byte-identical for the same tensors and
// metadata): tensors sorted by dtype alignment (larger first) then by name; compact JSON with
// `__metadata__` first; the header padded with spaces so the data starts at a multiple of 8, or of a
// larger alignment on request (e.g. 4096, for O_DIRECT and page-aligned mappings).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "livetrain/dtype.hpp"
#include "livetrain/fs.hpp"

namespace livetrain::safetensors {

inline constexpr uint64_t kMaxHeaderSize = 100'000'000;
inline constexpr std::string_view kIndexFileName = "model.safetensors.index.json";
inline constexpr std::string_view kSingleFileName = "model.safetensors";

using Metadata = std::vector<std::pair<std::string, std::string>>;

struct TensorInfo {
  std::string name;
  DType dtype = DType::kU8;
  std::vector<uint64_t> shape;
  uint64_t begin = 0;  // data_offsets, relative to the start of the data buffer
  uint64_t end = 0;

  uint64_t numel() const;  // product of shape (1 for a 0-d tensor); validated not to overflow
  uint64_t nbytes() const { return end - begin; }
};

struct Header {
  uint64_t header_size = 0;         // N
  std::vector<TensorInfo> tensors;  // in offset order
  std::optional<Metadata> metadata;
  uint64_t data_size = 0;  // bytes of the data buffer

  uint64_t data_start() const { return 8 + header_size; }
  const TensorInfo* find(std::string_view name) const;

  std::unordered_map<std::string, size_t> index;  // name -> position in `tensors`
};

// Parses and validates the header of a whole safetensors file held in memory. `file_name` is used in
// error messages only. Throws livetrain::Error (kFormat or kOverflow) naming the file, the tensor and the
// field at fault.
Header parse_header(const uint8_t* bytes, size_t size, std::string_view file_name);

// A validated, memory-mapped safetensors file.
class File {
 public:
  static File open(const std::string& path);

  const std::string& path() const { return map_.path(); }
  uint64_t file_size() const { return map_.size(); }
  const Header& header() const { return header_; }
  const std::vector<TensorInfo>& tensors() const { return header_.tensors; }
  const TensorInfo* find(std::string_view name) const { return header_.find(name); }
  const TensorInfo& tensor(std::string_view name) const;  // throws kNotFound
  // The tensor's bytes inside the mapping (valid while this File lives).
  const uint8_t* data(const TensorInfo& info) const { return map_.data() + header_.data_start() + info.begin; }

 private:
  fs::Mapping map_;
  Header header_;
};

// A tensor to be written: its bytes in C order, little-endian, `nbytes` = numel × element size.
struct TensorRef {
  std::string name;
  DType dtype = DType::kU8;
  std::vector<uint64_t> shape;
  const void* data = nullptr;
  uint64_t nbytes = 0;
};

struct WriteOptions {
  // Written as `__metadata__`; std::nullopt writes no `__metadata__` key. The default is what
  // transformers requires of a PyTorch checkpoint.
  std::optional<Metadata> metadata = Metadata{{"format", "pt"}};
  // The data buffer starts at a multiple of this (a multiple of 8): 8 matches the reference writer.
  uint64_t data_alignment = 8;
};

// The header bytes (8-byte length + padded JSON) for these tensors, and the order in which their data
// must follow. Validates names (non-empty, unique, not `__metadata__`), shapes and byte counts.
struct Layout {
  std::string header;         // including the 8-byte length prefix
  std::vector<size_t> order;  // indices into the input, in file order
  uint64_t data_size = 0;
};
Layout plan(const std::vector<TensorRef>& tensors, const WriteOptions& options);

// Writes a safetensors file atomically (fs::write_file_atomic).
void write_file(const std::string& path, const std::vector<TensorRef>& tensors, const WriteOptions& options = {});

// A model: one safetensors file, or a directory holding `model.safetensors` or a sharded set described by
// `model.safetensors.index.json` ({"metadata": {...}, "weight_map": {tensor: shard file}}).
class Model {
 public:
  struct Entry {
    const File* file;
    const TensorInfo* info;
  };

  static Model open(const std::string& path);
  Model() = default;
  Model(Model&&) = default;
  Model& operator=(Model&&) = default;
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const std::string& path() const { return path_; }
  bool sharded() const { return sharded_; }
  const std::vector<std::unique_ptr<File>>& shards() const { return shards_; }
  std::vector<std::string> names() const;  // sorted
  const Entry* find(std::string_view name) const;
  const Entry& tensor(std::string_view name) const;  // throws kNotFound
  uint64_t total_bytes() const;                      // sum of tensor bytes
  size_t size() const { return entries_.size(); }

 private:
  std::string path_;
  bool sharded_ = false;
  std::vector<std::unique_ptr<File>> shards_;
  std::unordered_map<std::string, Entry> entries_;
};

// Writes a model directory: one `model.safetensors` if the tensors total at most `max_shard_bytes`,
// else shards `model-0000i-of-0000N.safetensors` (tensors kept in the given order, a new shard when the
// next tensor would exceed the limit) and then the index, written last so that it commits the set.
// Returns the file names written.
std::vector<std::string> write_model(const std::string& dir, const std::vector<TensorRef>& tensors,
                                     uint64_t max_shard_bytes, const WriteOptions& options = {});

}  // namespace livetrain::safetensors
