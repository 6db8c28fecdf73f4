// The checkpoint store's hashes: XXH64 from the xxHash library (third_party/xxhash, inlined here), and what
// livetrain adds around it: the parallel "xxh64-4k" content hash and the 16-hex-digit form COMMIT stores.
#include <algorithm>
#include <vector>

#include "livetrain/checkpoint/hash.hpp"
#include "livetrain/parallel.hpp"

// Private copies of the library's functions in this translation unit: no symbols exported, no link-time
// dependency, and the compiler sees the whole of XXH64 where it is called.
#define XXH_INLINE_ALL
#include "xxhash/xxhash.h"

namespace livetrain::checkpoint {

namespace {
XXH64_state_t* state(unsigned char* bytes) { return reinterpret_cast<XXH64_state_t*>(bytes); }
const XXH64_state_t* state(const unsigned char* bytes) { return reinterpret_cast<const XXH64_state_t*>(bytes); }
}  // namespace

uint64_t xxh64(const void* data, size_t size, uint64_t seed) { return XXH64(data, size, seed); }

Xxh64Stream::Xxh64Stream(uint64_t seed) {
  static_assert(sizeof(XXH64_state_t) <= sizeof(state_) && alignof(XXH64_state_t) <= 8,
                "Xxh64Stream::state_ must hold an XXH64_state_t");
  XXH64_reset(state(state_), seed);
}

void Xxh64Stream::update(const void* data, size_t size) { XXH64_update(state(state_), data, size); }

uint64_t Xxh64Stream::digest() const { return XXH64_digest(state(state_)); }

uint64_t content_hash(const uint8_t* data, size_t size) {
  if (size == 0) return xxh64(nullptr, 0);
  size_t blocks = (size + kHashBlock - 1) / kHashBlock;
  std::vector<uint64_t> hashes(blocks);
  // 256 blocks (1 MiB) per chunk keeps the pool's overhead negligible.
  parallel_for(static_cast<int64_t>(blocks), 256, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      size_t off = static_cast<size_t>(i) * kHashBlock;
      hashes[i] = xxh64(data + off, std::min(kHashBlock, size - off));
    }
  });
  return xxh64(hashes.data(), hashes.size() * 8);
}

std::string hash_hex(uint64_t h) {
  static const char* digits = "0123456789abcdef";
  std::string s(16, '0');
  for (int i = 15; i >= 0; --i, h >>= 4) s[i] = digits[h & 15];
  return s;
}

std::optional<uint64_t> hash_from_hex(std::string_view s) {
  if (s.size() != 16) return std::nullopt;
  uint64_t h = 0;
  for (char c : s) {
    int d;
    if (c >= '0' && c <= '9') d = c - '0';
    else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
    else return std::nullopt;
    h = (h << 4) | static_cast<uint64_t>(d);
  }
  return h;
}

}  // namespace livetrain::checkpoint
