// The checkpoint store's hashes: XXH64 (seed-able, one-shot or streamed) computed by the xxHash library, and
// the "xxh64-4k" content hash of model and delta files built on it (format.hpp).
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
  // The library's XXH64_state_t, held inline (no allocation, no xxhash.h in this header); the constructor
  // checks that it fits.
  alignas(8) unsigned char state_[88];
};
// The "xxh64-4k" content hash of a byte range (parallel over blocks).
uint64_t content_hash(const uint8_t* data, size_t size);
std::string hash_hex(uint64_t h);
std::optional<uint64_t> hash_from_hex(std::string_view s);

}  // namespace livetrain::checkpoint
