// Element conversions between a tensor's dtype in the model files and the dtype an engine serves it in
// (vLLM keeps Gated DeltaNet's A_log in F32 while Qwen3.5's files hold BF16): which conversions the
// checkpoint store accepts, and the conversion itself, bit for bit what torch's `copy_` does.
#pragma once

#include <cstdint>
#include <string>

#include "livetrain/dtype.hpp"

namespace livetrain::checkpoint {

// Why a tensor stored as `file` in the model files cannot be served as `served`, or "" when it can:
// widening (BF16/F16 -> F32) is exact; narrowing (F32 -> BF16/F16) is torch's round-to-nearest-even, what
// an engine does when it loads the files in a narrower dtype. Any other pair is refused (BF16 <-> F16
// rounds both ways; integer, FP8 and F64 weights are not converted by the engines livetrain serves).
std::string served_conversion_refusal(DType file, DType served);

// dst[i] = src[i] converted from `from` to `to` for n elements (a pair served_conversion_refusal
// accepts, in either direction, or from == to: a copy). F32 -> BF16/F16 rounds to nearest even; a NaN
// becomes torch's canonical NaN (BF16 0x7FC0, F16 sign | 0x7E00).
void convert_elements(const uint8_t* src, DType from, uint8_t* dst, DType to, uint64_t n);

// Whether the `served` element at `src` is exactly representable in `file` (converting it to `file` and
// back gives the same bits); always true when `file` is the wider type.
bool converts_back_exactly(const uint8_t* src, DType served, DType file);

}  // namespace livetrain::checkpoint
