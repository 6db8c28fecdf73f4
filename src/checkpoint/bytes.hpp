// Internal: the little-endian integer encoding of every checkpoint file (delta, journal), written once.
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

}  // namespace livetrain::checkpoint::bytes
