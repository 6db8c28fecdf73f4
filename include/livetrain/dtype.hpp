// Element types, named as safetensors names them, with their sizes in bits; and how shapes print.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace livetrain {

// Declared in the order of the reference implementation's enum (safetensors 0.8 `Dtype`): that order is
// its alignment order, which decides how its writer sorts tensors, and so how ours does.
enum class DType : uint8_t {
  kBool,
  kF4,       // E2M1, two per byte
  kF6_E2M3,  // four per three bytes
  kF6_E3M2,
  kU8,
  kI8,
  kF8_E5M2,
  kF8_E4M3,
  kF8_E8M0,
  kF8_E4M3FNUZ,
  kF8_E5M2FNUZ,
  kI16,
  kU16,
  kF16,
  kBF16,
  kI32,
  kU32,
  kF32,
  kC64,
  kF64,
  kI64,
  kU64,
};

inline constexpr int kNumDTypes = 22;

std::string_view dtype_name(DType dtype);
std::optional<DType> dtype_from_name(std::string_view name);
// Size of one element in bits (4 for F4, 6 for the F6 types, 8 × bytes for the rest).
uint32_t dtype_bits(DType dtype);

// "[d0, d1, ...]", as error messages and the CLI print shapes.
std::string shape_string(const std::vector<uint64_t>& shape);

}  // namespace livetrain
