// XXH64 (Yann Collet's xxHash, spec v0.1.1) and the "xxh64-4k" content hash of model and delta files.
#include <algorithm>
#include <cstring>
#include <vector>

#include "livetrain/checkpoint/hash.hpp"
#include "livetrain/parallel.hpp"

namespace livetrain::checkpoint {

namespace {

constexpr uint64_t kP1 = 11400714785074694791ull;
constexpr uint64_t kP2 = 14029467366897019727ull;
constexpr uint64_t kP3 = 1609587929392839161ull;
constexpr uint64_t kP4 = 9650029242287828579ull;
constexpr uint64_t kP5 = 2870177450012600261ull;

inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
inline uint64_t read64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);  // little-endian hosts only (x86-64, aarch64), as everywhere in livetrain
  return v;
}
inline uint32_t read32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline uint64_t round(uint64_t acc, uint64_t input) { return rotl(acc + input * kP2, 31) * kP1; }
inline uint64_t merge(uint64_t acc, uint64_t val) { return (acc ^ round(0, val)) * kP1 + kP4; }

}  // namespace

namespace {

// The tail of XXH64: `h` (after the stripes and the length) mixed with the last < 32 bytes, avalanched.
uint64_t finish(uint64_t h, const uint8_t* p, const uint8_t* end) {
  while (p + 8 <= end) {
    h ^= round(0, read64(p));
    h = rotl(h, 27) * kP1 + kP4;
    p += 8;
  }
  if (p + 4 <= end) {
    h ^= static_cast<uint64_t>(read32(p)) * kP1;
    h = rotl(h, 23) * kP2 + kP3;
    p += 4;
  }
  while (p < end) {
    h ^= static_cast<uint64_t>(*p) * kP5;
    h = rotl(h, 11) * kP1;
    ++p;
  }
  h ^= h >> 33;
  h *= kP2;
  h ^= h >> 29;
  h *= kP3;
  h ^= h >> 32;
  return h;
}

uint64_t converge(const uint64_t v[4]) {
  uint64_t h = rotl(v[0], 1) + rotl(v[1], 7) + rotl(v[2], 12) + rotl(v[3], 18);
  for (int i = 0; i < 4; ++i) h = merge(h, v[i]);
  return h;
}

}  // namespace

uint64_t xxh64(const void* data, size_t size, uint64_t seed) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  const uint8_t* end = p + size;
  uint64_t h;
  if (size >= 32) {
    uint64_t v[4] = {seed + kP1 + kP2, seed + kP2, seed, seed - kP1};
    const uint8_t* limit = end - 32;
    do {
      v[0] = round(v[0], read64(p));
      v[1] = round(v[1], read64(p + 8));
      v[2] = round(v[2], read64(p + 16));
      v[3] = round(v[3], read64(p + 24));
      p += 32;
    } while (p <= limit);
    h = converge(v);
  } else {
    h = seed + kP5;
  }
  return finish(h + size, p, end);
}

Xxh64Stream::Xxh64Stream(uint64_t seed) : v_{seed + kP1 + kP2, seed + kP2, seed, seed - kP1}, seed_(seed) {}

void Xxh64Stream::update(const void* data, size_t size) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  const uint8_t* end = p + size;
  total_ += size;
  auto stripe = [&](const uint8_t* q) {
    for (int i = 0; i < 4; ++i) v_[i] = round(v_[i], read64(q + 8 * i));
  };
  if (buffered_) {
    size_t take = std::min<size_t>(32 - buffered_, size);
    std::memcpy(buf_ + buffered_, p, take);
    buffered_ += take;
    p += take;
    if (buffered_ < 32) return;
    stripe(buf_);
    buffered_ = 0;
  }
  for (; end - p >= 32; p += 32) stripe(p);
  std::memcpy(buf_, p, static_cast<size_t>(end - p));
  buffered_ = static_cast<size_t>(end - p);
}

uint64_t Xxh64Stream::digest() const {
  uint64_t h = total_ >= 32 ? converge(v_) : seed_ + kP5;
  return finish(h + total_, buf_, buf_ + buffered_);
}

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
