// Internal: the host-side arithmetic of the GPU diff (delta_cuda.cu) — the chunk table, the groups of
// chunks whose `old` bytes are staged, the placement of each chunk's values, and where a group's values
// lie in device scratch — kept apart from the kernels so that CPU tests check it on any machine.
//
// Alignment contract (every kernel access of an element of `unit` bytes must be `unit`-aligned, or the
// GPU faults with cudaErrorMisalignedAddress):
//   - `now` and `old` of each tensor are unit-aligned (checked by diff_chunk_table);
//   - a staged segment starts at a 16-byte aligned offset of the stage and holds whole chunks of one
//     tensor, so a staged element sits at a unit-aligned offset;
//   - each tensor's values start at an 8-byte aligned offset of the output, but a group's first chunk
//     may start anywhere inside a tensor (at a multiple of that tensor's unit only), so a group's values
//     are written to device scratch from diff_value_shift(base) bytes in: device and host offsets then
//     agree modulo 16 and every later tensor of the group keeps its 8-byte alignment. (Writing them from
//     scratch + 0 put a fp32 tensor that follows a bf16 one with an odd changed count at an address
//     ≡ 2 mod 4: the 27b shapes' A_log after a split bf16 tensor.)
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "checkpoint/digest.hpp"
#include "livetrain/checkpoint/diff.hpp"
#include "livetrain/error.hpp"

namespace livetrain::checkpoint {

// One tensor as the kernels see it.
struct DiffChunkTensor {
  const uint8_t* now;  // [units × unit]
  uint8_t* old;        // [units × unit], device or pinned host memory (written when update_old)
  uint64_t units;
  uint64_t first_chunk;  // global index of the tensor's first chunk
  uint64_t bitmap_word;  // offset of its bitmap in the bitmap buffer, in 32-bit words
  uint32_t unit;
};

// Alignment of the device scratch that receives a group's values, and of a staged segment's start.
inline constexpr uint64_t kDiffScratchAlign = 16;

// Bytes into its (kDiffScratchAlign-aligned) scratch buffer at which a group's values start, for the
// group's first value at host offset `base`.
inline uint64_t diff_value_shift(uint64_t base) { return base % kDiffScratchAlign; }

// The kernels' table of `tensors`: chunks numbered across tensors, bitmap words likewise. `old` may be
// mapped page-locked host memory (the store's head copy is registered with cudaHostRegisterMapped):
// unified addressing makes the host address valid on the device.
inline std::vector<DiffChunkTensor> diff_chunk_table(const std::vector<DiffTensor>& tensors, uint64_t& chunks,
                                                     uint64_t& words) {
  const size_t n = tensors.size();
  std::vector<DiffChunkTensor> table(n);
  chunks = words = 0;
  for (size_t i = 0; i < n; ++i) {
    const DiffTensor& t = tensors[i];
    const auto now = reinterpret_cast<uintptr_t>(t.now), old = reinterpret_cast<uintptr_t>(t.old);
    if (now % t.unit || old % t.unit) {
      throw Error(ErrorCode::kInvalidArg, "delta diff: tensor " + std::to_string(i) +
                                              " is not aligned to its element size " + std::to_string(t.unit));
    }
    table[i] = DiffChunkTensor{static_cast<const uint8_t*>(t.now),
                               static_cast<uint8_t*>(const_cast<void*>(t.old)),
                               t.units,
                               chunks,
                               words,
                               t.unit};
    chunks += (t.units + kDiffChunk - 1) / kDiffChunk;
    words += (t.units + 31) / 32;
  }
  if (chunks > static_cast<uint64_t>(INT32_MAX))
    throw Error(ErrorCode::kInvalidArg, "delta diff: tensors too large for one launch");
  return table;
}

// The groups of a pass over staged `old` bytes: consecutive chunks, each group's staged bytes (and so its
// values: at most one XOR per element) within `group_bytes`; only the chunks `use` keeps are staged.
struct DiffSegment {
  uint8_t* old;
  uint64_t stage_offset, bytes;
};
struct DiffGroup {
  uint64_t c0, c1;
  std::vector<DiffSegment> segments;
  uint64_t staged = 0;      // bytes
  size_t tensors_done = 0;  // tensors whose last chunk is in this group or before
};

template <typename Use>
std::vector<DiffGroup> diff_groups(const std::vector<DiffChunkTensor>& table, uint64_t chunks, uint64_t group_bytes,
                                   std::vector<uint64_t>& stage_offsets, Use use) {
  const size_t n = table.size();
  std::vector<DiffGroup> groups;
  size_t i = 0;
  for (uint64_t c = 0; c < chunks;) {
    DiffGroup g{c, c, {}};
    bool open = false;  // the last segment may take the next chunk
    while (c < chunks) {
      while (i + 1 < n && table[i + 1].first_chunk <= c) ++i;
      const uint64_t begin = (c - table[i].first_chunk) * kDiffChunk;
      const uint64_t bytes = (std::min(begin + kDiffChunk, table[i].units) - begin) * table[i].unit;
      if (c > g.c0 && (c - g.c0) * kDiffChunk >= group_bytes) break;  // bounds the group's bitmap words too
      if (!use(c)) {                                                  // known unchanged: counted (as 0), not staged
        open = false;
        ++c;
        continue;
      }
      const bool continues = open && c != table[i].first_chunk;
      const uint64_t at =
          continues ? g.staged : (g.staged + kDiffScratchAlign - 1) / kDiffScratchAlign * kDiffScratchAlign;
      if (c > g.c0 && at + bytes > group_bytes) break;
      stage_offsets[c] = at;
      uint8_t* old = table[i].old + begin * table[i].unit;
      if (continues) g.segments.back().bytes += bytes;
      else g.segments.push_back(DiffSegment{old, at, bytes});
      g.staged = at + bytes;
      open = true;
      ++c;
    }
    g.c1 = c;
    groups.push_back(std::move(g));
  }
  // Tensors complete after each group: those whose chunks all lie before its end.
  size_t t = 0;
  for (DiffGroup& g : groups) {
    while (t < n && (t + 1 < n ? table[t + 1].first_chunk : chunks) <= g.c1) ++t;
    g.tensors_done = t;
  }
  if (!groups.empty()) groups.back().tensors_done = n;
  return groups;
}

// Where each chunk's values go, by a running prefix sum over the chunks' changed counts, group by group
// in chunk order: a few MB for a large model, and it gives the per-tensor totals the record headers need
// anyway. Each tensor's values start 8-byte aligned.
struct DiffValuePlan {
  const std::vector<DiffChunkTensor>& table;
  uint64_t* offsets;                    // [chunks] start of each chunk's values
  std::vector<uint64_t> ends;           // [chunks] end of each chunk's values
  std::vector<uint64_t>& changed;       // [tensors] out.changed
  std::vector<uint64_t>& value_offset;  // [tensors] out.value_offset
  uint64_t total = 0;
  size_t next_tensor = 0;  // the first tensor whose value offset is not set yet

  DiffValuePlan(const std::vector<DiffChunkTensor>& t, uint64_t chunks, uint64_t* offsets_out, DiffOutput& out)
      : table(t), offsets(offsets_out), ends(chunks), changed(out.changed), value_offset(out.value_offset) {}

  // Chunks [c0, c1) with `counts` indexed by the global chunk.
  void place(uint64_t c0, uint64_t c1, const uint32_t* counts) {
    const size_t n = table.size();
    for (uint64_t c = c0; c < c1; ++c) {
      while (next_tensor < n && table[next_tensor].first_chunk <= c) {
        total = (total + 7) / 8 * 8;
        value_offset[next_tensor++] = total;
      }
      const size_t i = next_tensor - 1;
      offsets[c] = total;
      total += static_cast<uint64_t>(counts[c]) * table[i].unit;
      ends[c] = total;
      changed[i] += counts[c];
    }
  }
  // Trailing tensors with no elements.
  void place_rest() {
    while (next_tensor < table.size()) {
      total = (total + 7) / 8 * 8;
      value_offset[next_tensor++] = total;
    }
  }
};

}  // namespace livetrain::checkpoint
