// Regions of tensors (include/livetrain/checkpoint/region.hpp): bounds, intersections and the strided
// copy between two regions' row-major buffers.
#include "livetrain/checkpoint/region.hpp"

#include <algorithm>
#include <limits>

#include "livetrain/error.hpp"
#include "livetrain/parallel.hpp"

namespace livetrain::checkpoint {

Region whole_region(const std::vector<uint64_t>& tensor_shape) {
  return Region{std::vector<uint64_t>(tensor_shape.size(), 0), tensor_shape};
}

bool is_whole(const Region& r, const std::vector<uint64_t>& tensor_shape) {
  return r.shape == tensor_shape && std::all_of(r.start.begin(), r.start.end(), [](uint64_t s) { return s == 0; });
}

uint64_t region_units(const Region& r) {
  uint64_t n = 1;
  for (uint64_t d : r.shape) {
    if (d != 0 && n > std::numeric_limits<uint64_t>::max() / d) {
      throw Error(ErrorCode::kOverflow, "region " + region_string(r) + ": element count overflows");
    }
    n *= d;
  }
  return n;
}

std::optional<Region> region_intersect(const Region& a, const Region& b) {
  if (a.start.size() != b.start.size()) return std::nullopt;
  Region out{std::vector<uint64_t>(a.start.size()), std::vector<uint64_t>(a.start.size())};
  for (size_t d = 0; d < a.start.size(); ++d) {
    uint64_t lo = std::max(a.start[d], b.start[d]);
    uint64_t hi = std::min(a.start[d] + a.shape[d], b.start[d] + b.shape[d]);
    if (hi <= lo) return std::nullopt;
    out.start[d] = lo;
    out.shape[d] = hi - lo;
  }
  return out;
}

void check_region(const Region& r, const std::vector<uint64_t>& tensor_shape, const std::string& what) {
  if (r.start.size() != tensor_shape.size() || r.shape.size() != tensor_shape.size()) {
    throw Error(ErrorCode::kInvalidArg, what + ": region " + region_string(r) + " has " +
                                            std::to_string(r.shape.size()) + " dims; the tensor has " +
                                            std::to_string(tensor_shape.size()));
  }
  for (size_t d = 0; d < tensor_shape.size(); ++d) {
    if (r.start[d] > tensor_shape[d] || r.shape[d] > tensor_shape[d] - r.start[d]) {
      throw Error(ErrorCode::kInvalidArg, what + ": region " + region_string(r) + " lies outside the tensor (dim " +
                                              std::to_string(d) + " has " + std::to_string(tensor_shape[d]) + ")");
    }
  }
}

std::string region_string(const Region& r) {
  std::string s = "[";
  for (size_t d = 0; d < r.start.size() && d < r.shape.size(); ++d) {
    if (d) s += ", ";
    s += std::to_string(r.start[d]) + ":" + std::to_string(r.start[d] + r.shape[d]);
  }
  return s + "]";
}

void region_transfer(const uint8_t* src, const Region& src_region, uint8_t* dst, const Region& dst_region,
                     const Region& part, uint32_t unit, bool xor_into) {
  const size_t nd = part.shape.size();
  if (region_units(part) == 0) return;
  // Row-major strides (elements) of both buffers.
  std::vector<uint64_t> ss(nd, 1), ds(nd, 1);
  for (size_t d = nd; d-- > 1;) {
    ss[d - 1] = ss[d] * src_region.shape[d];
    ds[d - 1] = ds[d] * dst_region.shape[d];
  }
  // One contiguous run: the last dim, extended over the dims before it while all three regions span
  // the dims after them fully (then consecutive rows are adjacent in both buffers).
  size_t inner = nd;  // dims [inner, nd) form the run
  uint64_t run = 1;
  while (inner > 0) {
    const size_t d = inner - 1;
    run *= part.shape[d];
    inner = d;
    if (part.shape[d] != src_region.shape[d] || part.shape[d] != dst_region.shape[d]) break;
  }
  uint64_t runs = 1;
  for (size_t d = 0; d < inner; ++d) runs *= part.shape[d];
  const uint64_t run_bytes = run * unit;
  // Offsets of the part's first element in each buffer.
  uint64_t src0 = 0, dst0 = 0;
  for (size_t d = 0; d < nd; ++d) {
    src0 += (part.start[d] - src_region.start[d]) * ss[d];
    dst0 += (part.start[d] - dst_region.start[d]) * ds[d];
  }
  auto move = [&](int64_t lo, int64_t hi) {
    std::vector<uint64_t> idx(inner);
    for (int64_t k = lo; k < hi; ++k) {
      uint64_t rem = static_cast<uint64_t>(k), so = src0, dof = dst0;
      for (size_t d = inner; d-- > 0;) {
        idx[d] = rem % part.shape[d];
        rem /= part.shape[d];
        so += idx[d] * ss[d];
        dof += idx[d] * ds[d];
      }
      const uint8_t* s = src + so * unit;
      uint8_t* t = dst + dof * unit;
      if (!xor_into) {
        std::copy(s, s + run_bytes, t);
      } else {
        for (uint64_t b = 0; b < run_bytes; ++b) t[b] ^= s[b];
      }
    }
  };
  // Enough bytes per task that the pool's overhead does not dominate.
  const int64_t grain =
      static_cast<int64_t>(std::max<uint64_t>(1, (uint64_t{1} << 20) / std::max<uint64_t>(run_bytes, 1)));
  parallel_for(static_cast<int64_t>(runs), grain, move);
}

}  // namespace livetrain::checkpoint
