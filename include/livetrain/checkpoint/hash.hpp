// The checkpoint store's hashes: XXH64 (the xxHash library, spec v0.1.1) and the "xxh64-4k" content hash of
// model and delta files (format.hpp).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace livetrain::checkpoint {

// The block size of the "xxh64-4k" content hash.
inline constexpr size_t kHashBlock = 4096;

uint64_t xxh64(const void* data, size_t size, uint64_t seed = 0);
// XXH64 of data given in pieces: digest() equals xxh64() of everything passed to update() so far.
class Xxh64Stream {
 public:
  explicit Xxh64Stream(uint64_t seed = 0);
  void update(const void* data, size_t size);
  uint64_t digest() const;

 private:
  uint64_t v_[4];
  uint64_t seed_;
  uint64_t total_ = 0;
  uint8_t buf_[32] = {};
  size_t buffered_ = 0;
};
// The "xxh64-4k" content hash of a byte range (parallel over blocks).
uint64_t content_hash(const uint8_t* data, size_t size);
std::string hash_hex(uint64_t h);
std::optional<uint64_t> hash_from_hex(std::string_view s);

}  // namespace livetrain::checkpoint
