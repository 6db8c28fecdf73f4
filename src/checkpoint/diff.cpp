// The CPU reference of the live-weights diff (delta_diff_cpu): per tensor the changed-element count,
// the bitmap and the compacted XOR values; delta_diff_cuda in delta_cuda.cu computes the same bytes.
#include <algorithm>
#include <bit>
#include <cstring>

#include "checkpoint/diff_check.hpp"
#include "checkpoint/digest.hpp"
#include "livetrain/checkpoint/diff.hpp"
#include "livetrain/error.hpp"
#include "livetrain/parallel.hpp"

namespace livetrain::checkpoint {

namespace {

void free_new(uint8_t* p) { delete[] p; }

HostBytes host_alloc(size_t n) {
  HostBytes b;
  b.data = new uint8_t[n ? n : 1]();  // one byte for empty outputs, so data is never null
  b.size = n;
  b.release = free_new;
  return b;
}

// Reads `now` once per element: a concurrently written tensor still yields the XOR of what was read.
template <typename T>
uint64_t diff_one(const uint8_t* now, const uint8_t* old, uint64_t units, uint8_t* bitmap, uint8_t* values) {
  uint64_t changed = 0;
  for (uint64_t i = 0; i < units; ++i) {
    T a, b;
    std::memcpy(&a, now + i * sizeof(T), sizeof(T));
    std::memcpy(&b, old + i * sizeof(T), sizeof(T));
    T x = static_cast<T>(a ^ b);
    if (x == 0) continue;
    bitmap[i >> 3] |= static_cast<uint8_t>(1u << (i & 7));
    if (values) std::memcpy(values + changed * sizeof(T), &x, sizeof(T));
    ++changed;
  }
  return changed;
}

uint64_t diff_dispatch(const DiffTensor& t, uint8_t* bitmap, uint8_t* values) {
  const auto* now = static_cast<const uint8_t*>(t.now);
  const auto* old = static_cast<const uint8_t*>(t.old);
  switch (t.unit) {
    case 1: return diff_one<uint8_t>(now, old, t.units, bitmap, values);
    case 2: return diff_one<uint16_t>(now, old, t.units, bitmap, values);
    case 4: return diff_one<uint32_t>(now, old, t.units, bitmap, values);
    case 8: return diff_one<uint64_t>(now, old, t.units, bitmap, values);
    default:
      throw Error(ErrorCode::kInvalidArg, "delta diff: element size " + std::to_string(t.unit) + " (1, 2, 4 or 8)");
  }
}

}  // namespace

void delta_diff_check(const std::vector<DiffTensor>& tensors) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    const DiffTensor& t = tensors[i];
    if (t.unit != 1 && t.unit != 2 && t.unit != 4 && t.unit != 8) {
      throw Error(ErrorCode::kInvalidArg, "delta diff: tensor " + std::to_string(i) + ": element size " +
                                              std::to_string(t.unit) + " (1, 2, 4 or 8)");
    }
    if (t.units && (!t.now || !t.old))
      throw Error(ErrorCode::kInvalidArg, "delta diff: tensor " + std::to_string(i) + " has no data");
    if (t.units > (uint64_t{1} << 56) / t.unit)
      throw Error(ErrorCode::kInvalidArg, "delta diff: tensor " + std::to_string(i) + " is too large");
  }
}

void delta_diff_cpu(const std::vector<DiffTensor>& tensors, DiffOutput& out) {
  delta_diff_check(tensors);
  const size_t n = tensors.size();
  out.changed.assign(n, 0);
  out.bitmap_offset.assign(n, 0);
  out.value_offset.assign(n, 0);
  uint64_t bitmap_total = 0;
  for (size_t i = 0; i < n; ++i) {
    out.bitmap_offset[i] = bitmap_total;
    bitmap_total += (tensors[i].units + 7) / 8;
  }
  out.bitmaps = host_alloc(bitmap_total);
  // Pass 1 counts (and fills the bitmaps); pass 2 writes values where pass 1 saw changes. Like the GPU
  // version, positions come from pass 1 so the output is self-consistent under concurrent writes.
  parallel_for(static_cast<int64_t>(n), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      out.changed[i] = diff_dispatch(tensors[i], out.bitmaps.data + out.bitmap_offset[i], nullptr);
  });
  uint64_t value_total = 0;
  for (size_t i = 0; i < n; ++i) {
    value_total = (value_total + 7) / 8 * 8;  // each tensor's values 8-byte aligned, as on the GPU path
    out.value_offset[i] = value_total;
    value_total += out.changed[i] * tensors[i].unit;
  }
  out.values = host_alloc(value_total);
  parallel_for(static_cast<int64_t>(n), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const DiffTensor& t = tensors[i];
      const uint8_t* bitmap = out.bitmaps.data + out.bitmap_offset[i];
      uint8_t* values = out.values.data + out.value_offset[i];
      const auto* now = static_cast<const uint8_t*>(t.now);
      const auto* old = static_cast<const uint8_t*>(t.old);
      uint64_t k = 0;
      for (uint64_t byte = 0; byte < (t.units + 7) / 8; ++byte) {
        for (unsigned bits = bitmap[byte]; bits; bits &= bits - 1) {
          uint64_t pos = byte * 8 + static_cast<uint64_t>(std::countr_zero(bits));
          for (uint32_t u = 0; u < t.unit; ++u) values[k * t.unit + u] = now[pos * t.unit + u] ^ old[pos * t.unit + u];
          ++k;
        }
      }
    }
  });
}

void chunk_digests_cpu(const std::vector<DiffTensor>& tensors, bool of_old, std::vector<uint64_t>& out) {
  delta_diff_check(tensors);
  std::vector<uint64_t> first(tensors.size() + 1, 0);
  for (size_t i = 0; i < tensors.size(); ++i)
    first[i + 1] = first[i] + (tensors[i].units + kDiffChunk - 1) / kDiffChunk;
  out.assign(first.back(), 0);
  parallel_for(static_cast<int64_t>(tensors.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const DiffTensor& t = tensors[i];
      const auto* p = static_cast<const uint8_t*>(of_old ? t.old : t.now);
      for (uint64_t c = 0; c < first[i + 1] - first[i]; ++c) {
        const uint64_t begin = c * kDiffChunk, len = std::min(kDiffChunk, t.units - begin);
        out[first[i] + c] = chunk_digest(p + begin * t.unit, len * t.unit);
      }
    }
  });
}

#ifndef LIVETRAIN_WITH_CUDA
void delta_diff_cuda(const std::vector<DiffTensor>&, DiffOutput&, void*, DiffWorkspace*, bool, const DiffReady&) {
  throw Error(ErrorCode::kUnsupported, "delta diff on CUDA: this build of livetrain has no CUDA code");
}

void chunk_digests_cuda(const std::vector<DiffTensor>&, bool, std::vector<uint64_t>&, void*) {
  throw Error(ErrorCode::kUnsupported, "chunk digests on CUDA: this build of livetrain has no CUDA code");
}

void diff_workspace_reserve(DiffWorkspace&, size_t, size_t) {
  throw Error(ErrorCode::kUnsupported, "delta diff on CUDA: this build of livetrain has no CUDA code");
}

void diff_workspace_reserve_registered(DiffWorkspace&, size_t, size_t) {
  throw Error(ErrorCode::kUnsupported, "delta diff on CUDA: this build of livetrain has no CUDA code");
}
#endif

}  // namespace livetrain::checkpoint
