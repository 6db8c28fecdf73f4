// Regions of tensors: the hyper-rectangle of a Hugging Face tensor that one tensor-parallel rank holds (a
// block of rows, a block of columns, or all of it), and the strided copies between regions that restoring
// a store written at one TP size into the shards of another needs.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace livetrain::checkpoint {

// Indices [start[d], start[d] + shape[d]) along every dim d of a tensor; `start` and `shape` have the
// tensor's rank. The region's elements are laid out row-major over `shape` wherever a region's bytes
// are stored (live memory, a head copy, a delta record).
struct Region {
  std::vector<uint64_t> start;
  std::vector<uint64_t> shape;
  bool operator==(const Region&) const = default;
};

Region whole_region(const std::vector<uint64_t>& tensor_shape);
bool is_whole(const Region& r, const std::vector<uint64_t>& tensor_shape);
// The number of elements (product of `shape`; 1 for a 0-d tensor). Throws kOverflow when it wraps.
uint64_t region_units(const Region& r);
// The elements in both (same rank), or nullopt when they share none.
std::optional<Region> region_intersect(const Region& a, const Region& b);
// Throws kInvalidArg, starting with `what`, unless `r` has the tensor's rank and lies inside it.
void check_region(const Region& r, const std::vector<uint64_t>& tensor_shape, const std::string& what);
// "[0:4, 8:16]": the region as Python slices of the full tensor.
std::string region_string(const Region& r);

// Copies (or, with `xor_into`, XORs) the elements of `part` from `src` (row-major over `src_region`) into
// `dst` (row-major over `dst_region`); `part` must lie inside both. Elements are `unit` bytes. Trailing
// dims that all three span fully are moved as one run; parallel over runs when there are many.
void region_transfer(const uint8_t* src, const Region& src_region, uint8_t* dst, const Region& dst_region,
                     const Region& part, uint32_t unit, bool xor_into);

}  // namespace livetrain::checkpoint
