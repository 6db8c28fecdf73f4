// Internal: argument checks shared by the CPU and CUDA live-weights diff.
#pragma once

#include <vector>

#include "livetrain/checkpoint/diff.hpp"

namespace livetrain::checkpoint {

// Throws kInvalidArg naming the tensor index for an element size other than 1, 2, 4 or 8, missing data,
// or a size whose byte count could overflow the offsets.
void delta_diff_check(const std::vector<DiffTensor>& tensors);

}  // namespace livetrain::checkpoint
