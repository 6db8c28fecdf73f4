// Internal: the little-endian integer encoding of every checkpoint file (delta, journal), written once, and
// the bit count of a positions bitmap.
#pragma once

#include <bit>
#include <cstdint>
#include <cstring>
#include <string>

namespace livetrain::checkpoint::bytes {

// The formats are little-endian; these copy native integers, which is only right on a little-endian host.
static_assert(std::endian::native == std::endian::little, "checkpoint formats assume a little-endian host");

template <typename T>
void put(std::string& out, T v) {
  out.append(reinterpret_cast<const char*>(&v), sizeof(T));
}

template <typename T>
T get(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

// The set bits of p[0], ..., p[n - 1] (a positions bitmap's changes), eight bytes at a time. On x86-64 with
// the POPCNT instruction when the CPU has it, chosen once at load (delta.cpp).
uint64_t count_bits(const uint8_t* p, uint64_t n);

}  // namespace livetrain::checkpoint::bytes
