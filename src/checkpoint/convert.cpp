// Element conversions between the model files' dtype and the served dtype (convert.hpp says why). Plain
// bit manipulation, so that the result does not depend on the compiler's float16 support: BF16 is the
// upper half of an F32; F16 follows IEEE 754 binary16 with round-to-nearest-even, as torch's c10 does.
#include "livetrain/checkpoint/convert.hpp"

#include <cstring>

#include "livetrain/error.hpp"

namespace livetrain::checkpoint {
namespace {

bool is_half(DType d) { return d == DType::kBF16 || d == DType::kF16; }

uint32_t get_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
uint16_t get_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
void put_u32(uint8_t* p, uint32_t v) { std::memcpy(p, &v, 4); }
void put_u16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, 2); }

uint32_t bf16_to_f32(uint16_t h) { return static_cast<uint32_t>(h) << 16; }

uint16_t f32_to_bf16(uint32_t f) {
  if ((f & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;  // NaN: c10::BFloat16's canonical NaN (sign dropped)
  const uint32_t rounding_bias = 0x7FFFu + ((f >> 16) & 1u);
  return static_cast<uint16_t>((f + rounding_bias) >> 16);
}

uint32_t f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  if (exp == 0x1F) return sign | 0x7F800000u | (mant << 13);  // inf, NaN (payload kept)
  if (exp == 0) {
    if (mant == 0) return sign;
    // Subnormal: normalise (the value is mant * 2^-24).
    int e = -1;
    do {
      mant <<= 1;
      ++e;
    } while ((mant & 0x400u) == 0);
    mant &= 0x3FFu;
    return sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | (mant << 13);
  }
  return sign | ((exp + 127 - 15) << 23) | (mant << 13);
}

uint16_t f32_to_f16(uint32_t f) {
  const uint16_t sign = static_cast<uint16_t>((f >> 16) & 0x8000u);
  const uint32_t a = f & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return sign | 0x7E00u;   // NaN: c10's canonical F16 NaN
  if (a >= 0x477FF000u) return sign | 0x7C00u;  // >= 65520 rounds to infinity
  const uint32_t exp = a >> 23;
  if (exp < 113) {               // below the smallest normal F16 (2^-14): a subnormal or zero, rounded to nearest even
    if (exp < 102) return sign;  // below half the smallest subnormal (2^-25): rounds to zero
    const uint32_t mant = (a & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126 - exp;  // value = mant * 2^(exp-150); F16 subnormal unit 2^-24
    uint32_t q = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return sign | static_cast<uint16_t>(q);
  }
  uint32_t r = ((exp - 112) << 10) | ((a >> 13) & 0x3FFu);
  const uint32_t rem = a & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;  // a carry into the exponent is still right
  return sign | static_cast<uint16_t>(r);
}

uint32_t half_to_f32(uint16_t h, DType d) { return d == DType::kBF16 ? bf16_to_f32(h) : f16_to_f32(h); }
uint16_t f32_to_half(uint32_t f, DType d) { return d == DType::kBF16 ? f32_to_bf16(f) : f32_to_f16(f); }

}  // namespace

std::string served_conversion_refusal(DType file, DType served) {
  if (file == served) return "";
  if ((is_half(file) && served == DType::kF32) || (file == DType::kF32 && is_half(served))) return "";
  std::string f(dtype_name(file)), s(dtype_name(served));
  if (is_half(file) && is_half(served))
    return f + " and " + s + " each round the other's values, so neither holds the other exactly";
  return "livetrain converts only between F32 and BF16/F16 (the engines load other dtypes as they are), not " + f +
         " to " + s;
}

void convert_elements(const uint8_t* src, DType from, uint8_t* dst, DType to, uint64_t n) {
  if (from == to) {
    std::memcpy(dst, src, n * (dtype_bits(from) / 8));
    return;
  }
  if (is_half(from) && to == DType::kF32) {
    for (uint64_t i = 0; i < n; ++i) put_u32(dst + 4 * i, half_to_f32(get_u16(src + 2 * i), from));
  } else if (from == DType::kF32 && is_half(to)) {
    for (uint64_t i = 0; i < n; ++i) put_u16(dst + 2 * i, f32_to_half(get_u32(src + 4 * i), to));
  } else {
    throw Error(ErrorCode::kUnsupported, "convert " + std::string(dtype_name(from)) + " to " +
                                             std::string(dtype_name(to)) + ": " + served_conversion_refusal(from, to));
  }
}

bool converts_back_exactly(const uint8_t* src, DType served, DType file) {
  if (served == file || (is_half(served) && file == DType::kF32)) return true;
  if (served != DType::kF32 || !is_half(file)) return false;
  const uint32_t f = get_u32(src);
  return half_to_f32(f32_to_half(f, file), file) == f;
}

}  // namespace livetrain::checkpoint
