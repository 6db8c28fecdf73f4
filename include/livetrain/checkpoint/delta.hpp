// The delta codec: records of the elements that changed between two states of a tensor (format.hpp has
// the bytes), encoded from raw bytes or from a diff's parts, parsed with every checksum checked, applied.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "livetrain/checkpoint/format.hpp"
#include "livetrain/checkpoint/region.hpp"
#include "livetrain/dtype.hpp"

namespace livetrain::checkpoint {

// Appends to `out` the record of the elements where `now` differs from `old` (both `units × unit` bytes)
// and returns how many changed; appends nothing when none did. `now` is read exactly once per byte, so
// a tensor being written concurrently (HOGWILD training) still yields a consistent record of what was read.
uint64_t encode_record(std::string& out, std::string_view name, DType dtype, uint64_t units, const uint8_t* old,
                       const uint8_t* now);

// Appends the record of a diff already computed: `changed` elements, `bitmap` (ceil(units/8) bytes, bit i
// LSB first set when element i changed, no bits past the end) and `values` (changed × unit bytes, XOR, in
// position order). Picks the encoding like encode_record; nothing is appended when changed == 0. Every
// save encodes delta_diff_cpu's or delta_diff_cuda's output through this (in parallel over blocks).
void encode_record_parts(std::string& out, std::string_view name, DType dtype, uint64_t units, uint64_t changed,
                         const uint8_t* bitmap, const uint8_t* values);

// One record to encode from a diff's parts (as encode_record_parts takes them).
struct RecordParts {
  std::string_view name;
  DType dtype = DType::kU8;
  uint64_t units = 0;  // elements of the region (of the tensor when whole)
  uint64_t changed = 0;
  const uint8_t* bitmap = nullptr;
  const uint8_t* values = nullptr;
  // The part of the tensor the record covers (positions count its elements, row-major); an empty
  // `region.start` means the whole tensor, written as no region (the only form a version-2 delta holds).
  Region region;
};

// Encodes several records, each as encode_record_parts would, with one parallel region over all their
// blocks; outs[i] receives record i as pieces whose concatenation is the record (no piece when its
// changed == 0): a blocks-encoded record keeps its blocks' strings, so a writer takes them without a copy.
// Without `checksums` each record lacks its last 8 bytes, the XXH64 of the rest, for the caller to append (a
// writer that hashes the bytes anyway, on its own thread).
void encode_records(const std::vector<RecordParts>& records, std::vector<std::vector<std::string>>& outs,
                    bool checksums = true);

// XORs a diff's `values` (changed × unit bytes, position order) into `buf` at the positions `bitmap` marks
// (ceil(units/8) bytes, LSB first); parallel over blocks. The inverse of itself.
void xor_diff(uint8_t* buf, uint64_t units, uint32_t unit, const uint8_t* bitmap, const uint8_t* values);

// A parsed record: views into the delta file's bytes.
struct DeltaRecord {
  std::string_view name;
  DType dtype = DType::kU8;
  uint32_t unit = 1;
  PositionEncoding encoding = PositionEncoding::kGaps;
  uint64_t units = 0;
  uint64_t changed = 0;
  std::string_view positions;  // for kBlocks: the whole coded payload
  std::string_view values;     // empty for kBlocks
  Region region;               // empty `start`: the whole tensor; else `units` is the region's element count
};

struct DeltaHeader {
  uint32_t version = kDeltaVersion;
  uint64_t generation = 0;
  uint64_t parent = 0;
  uint32_t records = 0;
  uint32_t rank = 0;  // version 3: the tensor-parallel rank that wrote this part, of `ranks`
  uint32_t ranks = 1;
};

// The header of a delta file, then a record's bytes after the header, and the file checksum trailer.
// delta_file_header writes version 2 (one process's whole-tensor delta), part_file_header version 3 (one
// rank's part of a generation; its records may carry regions).
std::string delta_file_header(uint64_t generation, uint64_t parent, uint32_t records);
std::string part_file_header(uint64_t generation, uint64_t parent, uint32_t records, uint32_t rank, uint32_t ranks);

// Parses a whole delta file (version 2 or 3), checking magic, version, bounds and every checksum; calls
// `fn` for each record. Errors are kFormat naming `what` (the file), the record index and tensor name. A
// record's region is checked for overflow here; whether it lies inside its tensor is the caller's check
// (the tensor's shape is in COMMIT, not in the delta).
DeltaHeader delta_parse(const uint8_t* bytes, size_t size, std::string_view what,
                        const std::function<void(const DeltaRecord&)>& fn);

// XORs a record's values into `buf` (`rec.units × rec.unit` bytes: the record's region, row-major).
// Decodes and validates the whole record before writing anything, so a bad record changes nothing.
void apply_record(const DeltaRecord& rec, uint8_t* buf, std::string_view what);

}  // namespace livetrain::checkpoint
