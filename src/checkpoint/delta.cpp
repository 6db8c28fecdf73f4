// The delta codec: encodes a tensor's changed elements (positions as LEB128 gaps or a bitmap, values as
// XOR with the old bits), and parses/validates delta files record by record.
#include <algorithm>
#include <atomic>
#include <bit>
#include <cstring>
#include <limits>

#include "checkpoint/bytes.hpp"
#include "checkpoint/entropy.hpp"
#include "livetrain/checkpoint/delta.hpp"
#include "livetrain/checkpoint/hash.hpp"
#include "livetrain/error.hpp"
#include "livetrain/parallel.hpp"
#include "livetrain/tuning.hpp"

namespace livetrain::checkpoint {

// The build targets baseline x86-64, which has no POPCNT: there std::popcount is a call into libgcc
// (__popcountdi2) per word, 3.7x the time of the POPCNT clone (bench/bitmap_count.cpp), which the CPU
// picks once, at load (an ifunc), where it has the instruction (every x86-64-v2 CPU).
#if defined(__x86_64__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define LIVETRAIN_POPCNT_CLONES __attribute__((target_clones("popcnt", "default")))
#endif
#endif
#ifndef LIVETRAIN_POPCNT_CLONES
#define LIVETRAIN_POPCNT_CLONES
#endif

LIVETRAIN_POPCNT_CLONES uint64_t bytes::count_bits(const uint8_t* p, uint64_t n) {
  uint64_t c = 0, i = 0;
  for (; i + 8 <= n; i += 8) c += static_cast<uint64_t>(std::popcount(bytes::get<uint64_t>(p + i)));
  for (; i < n; ++i) c += static_cast<uint64_t>(std::popcount(p[i]));
  return c;
}

namespace {

using bytes::put;

void put_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7F) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}

inline uint64_t varint_size(uint64_t v) { return v == 0 ? 1 : (std::bit_width(v) + 6) / 7; }

Error format_error(std::string_view what, const std::string& msg) {
  return Error(ErrorCode::kFormat, std::string(what) + ": " + msg);
}

// A bounds-checked reader over outside bytes.
struct Cursor {
  const uint8_t* p;
  size_t left;
  std::string_view what;
  std::string where;

  const uint8_t* take(uint64_t n, const char* field) {
    if (n > left) throw format_error(what, where + "truncated in " + field);
    const uint8_t* r = p;
    p += n;
    left -= n;
    return r;
  }
  template <typename T>
  T get(const char* field) {
    T v;
    std::memcpy(&v, take(sizeof(T), field), sizeof(T));
    return v;
  }
};

// Scans `units` elements of T; reads `now` once per word so a concurrently written tensor still yields
// the XOR of what this read saw. Marks changes in `bitmap` and appends XOR values to `values`.
template <typename T>
uint64_t scan(uint64_t units, const uint8_t* old, const uint8_t* now, std::vector<uint8_t>& bitmap,
              std::string& values) {
  uint64_t changed = 0;
  auto hit = [&](uint64_t i, T x) {
    bitmap[i >> 3] |= static_cast<uint8_t>(1u << (i & 7));
    put(values, x);
    ++changed;
  };
  constexpr uint64_t per_word = 8 / sizeof(T);
  uint64_t words = units / per_word;
  for (uint64_t w = 0; w < words; ++w) {
    uint64_t a, b;
    std::memcpy(&a, old + w * 8, 8);
    std::memcpy(&b, now + w * 8, 8);
    uint64_t x = a ^ b;
    if (x == 0) continue;  // the common case for sparse updates: one compare per 8 bytes
    for (uint64_t k = 0; k < per_word; ++k) {
      T e;
      std::memcpy(&e, reinterpret_cast<const uint8_t*>(&x) + k * sizeof(T), sizeof(T));
      if (e != 0) hit(w * per_word + k, e);
    }
  }
  for (uint64_t i = words * per_word; i < units; ++i) {
    T a, b;
    std::memcpy(&a, old + i * sizeof(T), sizeof(T));
    std::memcpy(&b, now + i * sizeof(T), sizeof(T));
    if (a != b) hit(i, static_cast<T>(a ^ b));
  }
  return changed;
}

// Block b of a tensor: elements [b·B, min(units, (b+1)·B)); its bitmap bytes start at b·B/8 (B is a
// multiple of 64).
uint64_t block_len(uint64_t units, uint64_t block, uint64_t b) { return std::min(block, units - b * block); }

// One block of the kBlocks encoding, plus what the gap encoding of the same positions would cost.
struct EncodedBlock {
  std::string bytes;
  uint64_t changed = 0;
  uint64_t first = 0, last = 0;  // first and last changed position (when changed > 0)
  uint64_t inner_gap_bytes = 0;  // varint bytes of the gaps between this block's own positions
};

using StreamCoder = void (*)(const uint8_t*, size_t, std::string&, size_t);

// Encodes block b (`k` changed elements, values starting at `values`) with `coder` (entropy::encode or
// its reference: the same bytes); with `gaps`, also measures what the gap encoding of its positions would
// take (checkpoint.encoder <= 2: for every record with at most 1/8 of its elements changed; it cost more
// than the block's coding, bench/encode_kinds.cpp; settings 3 and 4 measure them only when they could win: 3 in
// `assemble` over the record's whole bitmap, 4 block by block in `gap_block` on the pool's threads).
void encode_block(EncodedBlock& out, uint64_t units, uint32_t unit, uint64_t b, uint64_t k, const uint8_t* bitmap,
                  const uint8_t* values, bool gaps, StreamCoder coder) {
  const uint64_t begin = b * kBlockUnits, len = block_len(units, kBlockUnits, b);
  const uint8_t* bits = bitmap + begin / 8;
  const uint64_t nbytes = (len + 7) / 8;
  out.changed = k;
  if (gaps && k) {
    uint64_t j = 0, prev = 0;
    for (uint64_t byte = 0; byte < nbytes; ++byte) {
      for (unsigned w = bits[byte]; w; w &= w - 1) {
        uint64_t i = begin + byte * 8 + static_cast<uint64_t>(std::countr_zero(w));
        if (j++ == 0) out.first = i;
        else out.inner_gap_bytes += varint_size(i - prev - 1);
        prev = i;
      }
    }
    out.last = prev;
  }
  if (k == 0) {
    put<uint64_t>(out.bytes, k);
    return;
  }
  // Room for the largest outcome (every stream raw) and the coder's slack, so that the block's streams are
  // appended without a reallocation.
  out.bytes.reserve(8 + entropy::max_encoded_bytes(nbytes) + unit * entropy::max_encoded_bytes(k) +
                    entropy::kEncodeSlack);
  put<uint64_t>(out.bytes, k);
  coder(bits, nbytes, out.bytes, 1);
  for (uint32_t p = 0; p < unit; ++p) coder(values + p, k, out.bytes, unit);
}

// The varint bytes of the gap encoding of a record's positions (bitmap of `units` elements, as its
// bytes hold them: bits past the end included, as encode_block's count saw them), a word at a time.
uint64_t gap_sizes(const uint8_t* bitmap, uint64_t units) {
  const uint64_t nbytes = (units + 7) / 8;
  uint64_t total = 0, prev = 0;
  bool first = true;
  for (uint64_t at = 0; at < nbytes; at += 8) {
    uint64_t w = 0;
    std::memcpy(&w, bitmap + at, std::min<uint64_t>(8, nbytes - at));  // little-endian host (bytes.hpp)
    for (; w; w &= w - 1) {
      const uint64_t i = at * 8 + static_cast<uint64_t>(std::countr_zero(w));
      total += varint_size(first ? i : i - prev - 1);
      prev = i;
      first = false;
    }
  }
  return total;
}

// Block strings shorter than this join the piece before them instead of being a piece of their own (a
// block with no change is its 8-byte count).
constexpr size_t kMinPiece = 4096;

// One block's share of its record's gap encoding (checkpoint.encoder 4): its first and last changed position
// and the varints of the gaps between its own positions, written on the block's thread. The gap from the
// block before (that block's last position to this one's first) is the record's to write. Before, the
// thread that assembled the record wrote every gap, scanning the record's whole bitmap alone (159 MB for a
// 1.27B-element embedding whose few changed rows make gaps the smallest encoding): serial work that left the
// pool idle (bench/RESULTS.md, first session of 2026-12-02, save29).
struct GapBlock {
  uint64_t first = 0, last = 0;
  std::string inner;
};

// Block b's GapBlock, a word of the bitmap at a time (bits past the record's end included, as gap_sizes).
void gap_block(GapBlock& out, const uint8_t* bitmap, uint64_t units, uint64_t b) {
  const uint64_t begin = b * kBlockUnits / 8, nbytes = (block_len(units, kBlockUnits, b) + 7) / 8;
  bool first = true;
  uint64_t prev = 0;
  for (uint64_t at = 0; at < nbytes; at += 8) {
    uint64_t w = 0;
    std::memcpy(&w, bitmap + begin + at, std::min<uint64_t>(8, nbytes - at));  // little-endian host (bytes.hpp)
    for (; w; w &= w - 1) {
      const uint64_t i = (begin + at) * 8 + static_cast<uint64_t>(std::countr_zero(w));
      if (first) {
        out.first = i;
        first = false;
      } else {
        put_varint(out.inner, i - prev - 1);
      }
      prev = i;
    }
  }
  out.last = prev;
}

// The blocks encoding of a record wins whatever its gaps would take: a gap takes at least a byte, so blocks
// (`blocks_bytes` in all) smaller than `changed` + the raw values and than the bitmap encoding beat the gaps.
// assemble's test, and encode_records' (encoder 4) before it measures a record's gaps block by block.
bool blocks_win_anyway(uint64_t blocks_bytes, const RecordParts& r, uint32_t unit) {
  return blocks_bytes < std::min<uint64_t>((r.units + 7) / 8, r.changed) + r.changed * unit;
}

// Record `r` from its encoded blocks, in the smallest of the three encodings, as pieces whose
// concatenation is the record: the blocks encoding hands on the blocks' own strings (the bulk of a dense
// delta) instead of copying them into one string. `measured`: the blocks carry their gap sizes (encoder
// <= 2); else, where gaps are considered, they are measured here only when the blocks encoding could lose to
// them (a gap takes at least a byte, so a blocks encoding smaller than `changed` + the raw values and than
// the bitmap encoding wins whatever the gaps take): the same choice either way.
// `gap_blocks`, when given: every block's GapBlock (those of blocks without a change unused), from which the
// gaps are measured and written instead of from the bitmap (the same bytes).
void assemble(std::vector<std::string>& pieces, const RecordParts& r, std::vector<EncodedBlock>& blocks, bool gaps,
              bool measured, bool checksum, std::vector<GapBlock>* gap_blocks = nullptr) {
  pieces.assign(1, std::string());
  std::string& out = pieces[0];
  const uint32_t unit = unit_bytes(r.dtype);
  const uint64_t bitmap_bytes = (r.units + 7) / 8;
  uint64_t gap_bytes = 0, blocks_bytes = 8, prev = 0;
  bool first = true;
  for (const auto& blk : blocks) {
    blocks_bytes += blk.bytes.size();
    if (!blk.changed || !measured) continue;  // unmeasured blocks carry no positions (measured below if needed)
    gap_bytes += varint_size(first ? blk.first : blk.first - prev - 1) + blk.inner_gap_bytes;
    prev = blk.last;
    first = false;
  }
  const uint64_t raw_values = r.changed * unit;
  if (gaps && !measured) {
    if (blocks_win_anyway(blocks_bytes, r, unit)) {
      gaps = false;
    } else if (gap_blocks) {
      first = true;
      for (size_t b = 0; b < blocks.size(); ++b) {
        if (!blocks[b].changed) continue;
        const GapBlock& g = (*gap_blocks)[b];
        gap_bytes += varint_size(first ? g.first : g.first - prev - 1) + g.inner.size();
        prev = g.last;
        first = false;
      }
    } else {
      gap_bytes = gap_sizes(r.bitmap, r.units);
    }
  }
  PositionEncoding enc = PositionEncoding::kBitmap;
  uint64_t best = bitmap_bytes + raw_values;
  if (gaps && gap_bytes + raw_values <= best) enc = PositionEncoding::kGaps, best = gap_bytes + raw_values;
  if (blocks_bytes < best) enc = PositionEncoding::kBlocks, best = blocks_bytes;

  const size_t ndim = r.region.start.size();
  out.reserve((enc == PositionEncoding::kBlocks ? 0 : best) + r.name.size() + 64 + 16 * ndim);
  put<uint32_t>(out, static_cast<uint32_t>(r.name.size()));
  out.append(r.name);
  out.push_back(static_cast<char>(r.dtype));
  out.push_back(static_cast<char>(unit));
  out.push_back(static_cast<char>(enc));
  out.push_back(static_cast<char>(ndim));  // 0: the whole tensor (all a version-2 delta may hold)
  for (uint64_t v : r.region.start) put<uint64_t>(out, v);
  for (uint64_t v : r.region.shape) put<uint64_t>(out, v);
  put<uint64_t>(out, r.units);
  put<uint64_t>(out, r.changed);
  switch (enc) {
    case PositionEncoding::kBitmap:
      put<uint64_t>(out, bitmap_bytes);
      out.append(reinterpret_cast<const char*>(r.bitmap), bitmap_bytes);
      out.append(reinterpret_cast<const char*>(r.values), raw_values);
      break;
    case PositionEncoding::kGaps: {
      put<uint64_t>(out, gap_bytes);
      if (gap_blocks) {  // each block's gaps as they were written on its thread; pieces as the blocks encoding's
        uint64_t written = 0;
        first = true;
        for (size_t b = 0; b < blocks.size(); ++b) {
          if (!blocks[b].changed) continue;
          GapBlock& g = (*gap_blocks)[b];
          std::string& last = pieces.back();
          const size_t before = last.size();
          put_varint(last, first ? g.first : g.first - prev - 1);
          written += last.size() - before + g.inner.size();
          if (g.inner.size() < kMinPiece) {
            last += g.inner;
          } else {
            pieces.push_back(std::move(g.inner));
            pieces.emplace_back();
          }
          prev = g.last;
          first = false;
        }
        if (written != gap_bytes) throw Error(ErrorCode::kInvalidArg, "checkpoint: gap size mismatch");
        pieces.back().append(reinterpret_cast<const char*>(r.values), raw_values);
        break;
      }
      size_t pos_start = out.size();
      prev = 0;
      first = true;
      for (uint64_t byte = 0; byte < bitmap_bytes; ++byte) {
        for (unsigned bits = r.bitmap[byte]; bits; bits &= bits - 1) {
          uint64_t i = byte * 8 + static_cast<uint64_t>(std::countr_zero(bits));
          put_varint(out, first ? i : i - prev - 1);
          prev = i;
          first = false;
        }
      }
      if (out.size() - pos_start != gap_bytes) throw Error(ErrorCode::kInvalidArg, "checkpoint: gap size mismatch");
      out.append(reinterpret_cast<const char*>(r.values), raw_values);
      break;
    }
    case PositionEncoding::kBlocks:
      put<uint64_t>(out, blocks_bytes);
      put<uint64_t>(out, kBlockUnits);
      for (auto& blk : blocks) {
        if (blk.bytes.size() < kMinPiece) {
          pieces.back() += blk.bytes;
          std::string().swap(blk.bytes);
        } else {
          pieces.push_back(std::move(blk.bytes));
        }
      }
      break;
  }
  if (!checksum) return;
  Xxh64Stream sum;
  for (const std::string& p : pieces) sum.update(p.data(), p.size());
  put<uint64_t>(pieces.back(), sum.digest());
}

// The changes in block b of a bitmap.
uint64_t block_count(const uint8_t* bitmap, uint64_t units, uint64_t b) {
  return bytes::count_bits(bitmap + b * kBlockUnits / 8, (block_len(units, kBlockUnits, b) + 7) / 8);
}

// value_start[b]: the rank of block b's first change; value_start[nblocks] is the total.
std::vector<uint64_t> block_value_starts(uint64_t units, const uint8_t* bitmap) {
  const uint64_t nblocks = (units + kBlockUnits - 1) / kBlockUnits;
  std::vector<uint64_t> value_start(nblocks + 1, 0);
  parallel_for(static_cast<int64_t>(nblocks), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) value_start[b + 1] = block_count(bitmap, units, b);
  });
  for (uint64_t b = 0; b < nblocks; ++b) value_start[b + 1] += value_start[b];
  return value_start;
}

}  // namespace

void encode_records(const std::vector<RecordParts>& records, std::vector<std::vector<std::string>>& outs,
                    bool checksums) {
  for (const RecordParts& r : records) {
    if (r.region.start.size() != r.region.shape.size() || r.region.start.size() > kMaxRegionDims ||
        (!r.region.start.empty() && region_units(r.region) != r.units)) {
      throw Error(ErrorCode::kInvalidArg, "checkpoint: " + std::string(r.name) + ": region " + region_string(r.region) +
                                              " does not hold " + std::to_string(r.units) + " elements");
    }
  }
  // Every block of every record in one list, so that one parallel region covers them all (tensors of a
  // few blocks would otherwise leave most threads idle).
  struct Task {
    size_t record;
    uint64_t block;
  };
  std::vector<Task> tasks;
  std::vector<size_t> first_task(records.size() + 1, 0);
  for (size_t r = 0; r < records.size(); ++r) {
    first_task[r] = tasks.size();
    if (records[r].changed == 0) continue;
    for (uint64_t b = 0; b < (records[r].units + kBlockUnits - 1) / kBlockUnits; ++b) tasks.push_back(Task{r, b});
  }
  first_task[records.size()] = tasks.size();
  // Each block's values start at the rank of its first change: count (in parallel), then rank.
  std::vector<uint64_t> count(tasks.size()), rank(tasks.size());
  parallel_for(static_cast<int64_t>(tasks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t)
      count[t] = block_count(records[tasks[t].record].bitmap, records[tasks[t].record].units, tasks[t].block);
  });
  for (size_t r = 0; r < records.size(); ++r) {
    uint64_t total = 0;
    for (size_t t = first_task[r]; t < first_task[r + 1]; ++t) {
      rank[t] = total;
      total += count[t];
    }
    if (total != records[r].changed) {
      throw Error(ErrorCode::kInvalidArg, "checkpoint: " + std::string(records[r].name) + ": bitmap holds " +
                                              std::to_string(total) + " changes, not " +
                                              std::to_string(records[r].changed));
    }
  }
  // checkpoint.encoder: 0 and 1 are the encoder before each of its two changes (same bytes), for same-run
  // comparisons.
  const int64_t encoder = tuning::get(tuning::kCheckpointEncoder);
  const StreamCoder coder = encoder >= 1 ? &entropy::encode : &entropy::encode_reference;
  const bool measured = encoder <= 2;  // the gap sizes measured per block, for every record that may take them
  std::vector<EncodedBlock> blocks(tasks.size());
  outs.assign(records.size(), {});
  // checkpoint.encoder 4: a record whose gaps must be measured (they could be its smallest encoding) is
  // assembled in a second region, where every block writes its own gaps (GapBlock), instead of by one thread
  // scanning the record's whole bitmap.
  // (3, as before: by the thread that assembles the record.)
  const bool gaps_per_block = encoder >= 4;
  std::vector<std::vector<GapBlock>> gap_blocks(records.size());
  std::vector<char> gaps_pending(records.size(), 0);
  auto gap_candidate = [&](size_t r) { return records[r].changed <= (records[r].units + 7) / 8; };
  auto assemble_record = [&](size_t r) {
    std::vector<EncodedBlock> mine(std::make_move_iterator(blocks.begin() + first_task[r]),
                                   std::make_move_iterator(blocks.begin() + first_task[r + 1]));
    assemble(outs[r], records[r], mine, gap_candidate(r), measured, checksums,
             gap_blocks[r].empty() ? nullptr : &gap_blocks[r]);
    if (encoder < 2) {  // as before: the record in one string
      std::string whole;
      for (const std::string& piece : outs[r]) whole += piece;
      outs[r].assign(1, std::move(whole));
    }
  };
  // A record is assembled by the thread that encodes its last block, inside the blocks' parallel region (no
  // second region per batch, whose end waits for its slowest thread, but for encoder 4's records whose gaps
  // must be measured: below). Its blocks' strings are visible to that thread through the count's acquire-release.
  std::vector<std::atomic<uint64_t>> left(records.size());
  for (size_t r = 0; r < records.size(); ++r) left[r].store(first_task[r + 1] - first_task[r]);
  parallel_for(static_cast<int64_t>(tasks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const RecordParts& r = records[tasks[t].record];
      const uint32_t unit = unit_bytes(r.dtype);
      // Gaps take at least a byte per change: they can only match or beat the bitmap's ceil(units / 8)
      // bytes when no more elements than that changed, so their size is only measured then.
      encode_block(blocks[t], r.units, unit, tasks[t].block, count[t], r.bitmap, r.values + rank[t] * unit,
                   measured && r.changed <= (r.units + 7) / 8, coder);
      if (left[tasks[t].record].fetch_sub(1, std::memory_order_acq_rel) != 1) continue;
      const size_t rec = tasks[t].record;
      if (gaps_per_block && gap_candidate(rec)) {
        // assemble's test (blocks_win_anyway): where it cannot tell, the record's gaps are measured block by block
        uint64_t blocks_bytes = 8;
        for (size_t k = first_task[rec]; k < first_task[rec + 1]; ++k) blocks_bytes += blocks[k].bytes.size();
        if (!blocks_win_anyway(blocks_bytes, r, unit)) {
          gaps_pending[rec] = 1;  // read after the region
          continue;
        }
      }
      assemble_record(rec);
    }
  });
  // The records whose gaps are measured: each changed block's gaps on its own thread, the record assembled by
  // the thread that does its last block.
  std::vector<Task> gap_tasks;
  for (size_t r = 0; r < records.size(); ++r) {
    if (!gaps_pending[r]) continue;
    gap_blocks[r].resize(first_task[r + 1] - first_task[r]);
    uint64_t n = 0;
    for (size_t t = first_task[r]; t < first_task[r + 1]; ++t) {
      if (count[t]) gap_tasks.push_back(tasks[t]), ++n;
    }
    left[r].store(n);
  }
  if (gap_tasks.empty()) return;
  parallel_for(static_cast<int64_t>(gap_tasks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const size_t rec = gap_tasks[t].record;
      gap_block(gap_blocks[rec][gap_tasks[t].block], records[rec].bitmap, records[rec].units, gap_tasks[t].block);
      if (left[rec].fetch_sub(1, std::memory_order_acq_rel) == 1) assemble_record(rec);
    }
  });
}

uint32_t unit_bytes(DType dtype) {
  uint32_t bits = dtype_bits(dtype);
  return bits >= 8 && bits % 8 == 0 ? bits / 8 : 1;  // packed sub-byte types are compared per byte
}

uint64_t encode_record(std::string& out, std::string_view name, DType dtype, uint64_t units, const uint8_t* old,
                       const uint8_t* now) {
  uint32_t unit = unit_bytes(dtype);
  std::vector<uint8_t> bitmap((units + 7) / 8, 0);
  std::string values;
  uint64_t changed = 0;
  switch (unit) {
    case 1: changed = scan<uint8_t>(units, old, now, bitmap, values); break;
    case 2: changed = scan<uint16_t>(units, old, now, bitmap, values); break;
    case 4: changed = scan<uint32_t>(units, old, now, bitmap, values); break;
    case 8: changed = scan<uint64_t>(units, old, now, bitmap, values); break;
    default: throw Error(ErrorCode::kUnsupported, "checkpoint: element size " + std::to_string(unit));
  }
  if (changed == 0) return 0;
  encode_record_parts(out, name, dtype, units, changed, bitmap.data(), reinterpret_cast<const uint8_t*>(values.data()));
  return changed;
}

void encode_record_parts(std::string& out, std::string_view name, DType dtype, uint64_t units, uint64_t changed,
                         const uint8_t* bitmap, const uint8_t* values) {
  if (changed == 0) return;
  std::vector<std::vector<std::string>> outs;
  encode_records({RecordParts{name, dtype, units, changed, bitmap, values, {}}}, outs);
  for (const std::string& piece : outs[0]) out += piece;
}

namespace {

// XORs `values` (consecutive elements of `unit` bytes) into the elements of `buf` whose bits are set in
// bitmap[0, nbytes), bit 0 standing for element `first`, in order.
void xor_marked(uint8_t* buf, uint64_t first, const uint8_t* bitmap, uint64_t nbytes, const uint8_t* values,
                uint32_t unit) {
  for (uint64_t byte = 0; byte < nbytes; ++byte) {
    for (unsigned bits = bitmap[byte]; bits; bits &= bits - 1) {
      uint8_t* dst = buf + (first + byte * 8 + static_cast<uint64_t>(std::countr_zero(bits))) * unit;
      for (uint32_t u = 0; u < unit; ++u) dst[u] ^= values[u];
      values += unit;
    }
  }
}

}  // namespace

void xor_diff(uint8_t* buf, uint64_t units, uint32_t unit, const uint8_t* bitmap, const uint8_t* values) {
  const std::vector<uint64_t> value_start = block_value_starts(units, bitmap);
  parallel_for(static_cast<int64_t>(value_start.size() - 1), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const uint64_t begin = b * kBlockUnits, nbytes = (block_len(units, kBlockUnits, b) + 7) / 8;
      xor_marked(buf, begin, bitmap + begin / 8, nbytes, values + value_start[b] * unit, unit);
    }
  });
}

std::string delta_file_header(uint64_t generation, uint64_t parent, uint32_t records) {
  std::string out(kDeltaMagic);
  put<uint32_t>(out, kDeltaVersion);
  put<uint32_t>(out, records);
  put<uint64_t>(out, generation);
  put<uint64_t>(out, parent);
  return out;
}

std::string part_file_header(uint64_t generation, uint64_t parent, uint32_t records, uint32_t rank, uint32_t ranks) {
  std::string out(kDeltaMagic);
  put<uint32_t>(out, kPartVersion);
  put<uint32_t>(out, records);
  put<uint64_t>(out, generation);
  put<uint64_t>(out, parent);
  put<uint32_t>(out, rank);
  put<uint32_t>(out, ranks);
  return out;
}

DeltaHeader delta_parse(const uint8_t* bytes, size_t size, std::string_view what,
                        const std::function<void(const DeltaRecord&)>& fn) {
  if (size < 40) throw format_error(what, "truncated delta file (" + std::to_string(size) + " bytes)");
  if (std::memcmp(bytes, kDeltaMagic.data(), 8) != 0)
    throw format_error(what, "not a livetrain delta file (bad magic)");
  uint64_t stored;
  std::memcpy(&stored, bytes + size - 8, 8);
  Cursor c{bytes + 8, size - 16, what, ""};
  DeltaHeader h;
  h.version = c.get<uint32_t>("version");
  if (h.version != kDeltaVersion && h.version != kPartVersion) {
    throw Error(ErrorCode::kUnsupported, std::string(what) + ": delta version " + std::to_string(h.version) +
                                             " (this build reads versions " + std::to_string(kDeltaVersion) + " and " +
                                             std::to_string(kPartVersion) + ")");
  }
  // The whole-file checksum first: a torn or corrupt file is reported as such, not as a bad field.
  if (xxh64(bytes, size - 8) != stored) throw format_error(what, "file checksum mismatch (corrupt or truncated)");
  h.records = c.get<uint32_t>("record count");
  h.generation = c.get<uint64_t>("generation");
  h.parent = c.get<uint64_t>("parent");
  if (h.version == kPartVersion) {
    h.rank = c.get<uint32_t>("rank");
    h.ranks = c.get<uint32_t>("ranks");
    if (h.ranks == 0 || h.rank >= h.ranks) {
      throw format_error(what, "rank " + std::to_string(h.rank) + " of " + std::to_string(h.ranks) + " is not a rank");
    }
  }
  for (uint32_t r = 0; r < h.records; ++r) {
    c.where = "record " + std::to_string(r) + ": ";
    const uint8_t* rec_start = c.p;
    DeltaRecord rec;
    uint32_t name_len = c.get<uint32_t>("name length");
    rec.name = std::string_view(reinterpret_cast<const char*>(c.take(name_len, "name")), name_len);
    c.where = "record " + std::to_string(r) + " (" + std::string(rec.name) + "): ";
    uint8_t dtype = c.get<uint8_t>("dtype");
    if (dtype >= kNumDTypes) throw format_error(what, c.where + "unknown dtype " + std::to_string(dtype));
    rec.dtype = static_cast<DType>(dtype);
    rec.unit = c.get<uint8_t>("unit");
    if (rec.unit != unit_bytes(rec.dtype)) throw format_error(what, c.where + "unit does not match dtype");
    uint8_t enc = c.get<uint8_t>("encoding");
    if (enc > 2) throw format_error(what, c.where + "unknown position encoding " + std::to_string(enc));
    rec.encoding = static_cast<PositionEncoding>(enc);
    const uint8_t ndim = c.get<uint8_t>("region dims");
    if (ndim != 0 && h.version == kDeltaVersion) throw format_error(what, c.where + "reserved byte is not 0");
    if (ndim > kMaxRegionDims) throw format_error(what, c.where + std::to_string(ndim) + " region dims");
    if (ndim) {
      rec.region.start.resize(ndim);
      rec.region.shape.resize(ndim);
      for (auto& v : rec.region.start) v = c.get<uint64_t>("region start");
      for (auto& v : rec.region.shape) v = c.get<uint64_t>("region shape");
      for (uint8_t d = 0; d < ndim; ++d) {
        if (rec.region.start[d] > std::numeric_limits<uint64_t>::max() - rec.region.shape[d]) {
          throw format_error(what, c.where + "region end overflows");
        }
      }
    }
    rec.units = c.get<uint64_t>("units");
    if (ndim) {
      uint64_t n = 0;
      try {
        n = region_units(rec.region);
      } catch (const Error&) {
        throw format_error(what, c.where + "region size overflows");
      }
      if (n != rec.units)
        throw format_error(what, c.where + "units do not match the region " + region_string(rec.region));
    }
    // units × unit is the tensor's byte size, which callers compare with the model's: it must not wrap,
    // or a crafted record could pass that check and then write far past the buffer.
    if (rec.units > std::numeric_limits<uint64_t>::max() / rec.unit)
      throw format_error(what, c.where + "units overflow");
    rec.changed = c.get<uint64_t>("changed");
    if (rec.changed == 0 || rec.changed > rec.units) throw format_error(what, c.where + "bad changed count");
    uint64_t plen = c.get<uint64_t>("positions length");
    rec.positions = std::string_view(reinterpret_cast<const char*>(c.take(plen, "positions")), plen);
    if (rec.changed > std::numeric_limits<uint64_t>::max() / rec.unit) throw format_error(what, c.where + "overflow");
    // kBlocks carries its values inside the positions field, coded per block.
    uint64_t vlen = rec.encoding == PositionEncoding::kBlocks ? 0 : rec.changed * rec.unit;
    rec.values = std::string_view(reinterpret_cast<const char*>(c.take(vlen, "values")), vlen);
    size_t covered = static_cast<size_t>(c.p - rec_start);
    uint64_t sum = c.get<uint64_t>("checksum");
    if (xxh64(rec_start, covered) != sum) throw format_error(what, c.where + "record checksum mismatch");
    fn(rec);
  }
  if (c.left != 0) throw format_error(what, "trailing bytes after the last record");
  return h;
}

namespace {

// A kBlocks record decoded: per block, the bitmap bytes and the XOR values (changed × unit, interleaved).
struct DecodedBlock {
  uint64_t changed = 0;
  const uint8_t* streams = nullptr;  // the block's coded streams in the record
  std::vector<uint8_t> bitmap, values;
};

void apply_blocks(const DeltaRecord& rec, uint8_t* buf, const std::string& where) {
  const uint8_t* p = reinterpret_cast<const uint8_t*>(rec.positions.data());
  const uint8_t* end = p + rec.positions.size();
  if (end - p < 8) throw Error(ErrorCode::kFormat, where + "truncated block size");
  const uint64_t block = bytes::get<uint64_t>(p);
  p += 8;
  if (block < 64 || block > (uint64_t{1} << 26) || block % 64) {
    throw Error(ErrorCode::kFormat, where + "bad block size " + std::to_string(block));
  }
  const uint64_t nblocks = rec.units / block + (rec.units % block != 0);
  if (nblocks > static_cast<uint64_t>(end - p) / 8) throw Error(ErrorCode::kFormat, where + "truncated block table");
  // Walk the block table once (sizes only), then decode the blocks in parallel and check each; nothing
  // is written until every block has decoded.
  std::vector<DecodedBlock> blocks(nblocks);
  uint64_t total = 0;
  for (uint64_t b = 0; b < nblocks; ++b) {
    if (end - p < 8) throw Error(ErrorCode::kFormat, where + "truncated block table");
    const uint64_t changed = bytes::get<uint64_t>(p);
    p += 8;
    if (changed > block_len(rec.units, block, b))
      throw Error(ErrorCode::kFormat, where + "block " + std::to_string(b) + ": bad changed count");
    total += changed;
    blocks[b].changed = changed;
    if (!changed) continue;
    blocks[b].streams = p;
    for (uint32_t s = 0; s < 1 + rec.unit; ++s) {
      if (end - p < 9) throw Error(ErrorCode::kFormat, where + "block " + std::to_string(b) + ": truncated stream");
      const uint64_t len = bytes::get<uint64_t>(p + 1);
      if (len > static_cast<uint64_t>(end - p - 9))
        throw Error(ErrorCode::kFormat, where + "block " + std::to_string(b) + ": stream longer than its record");
      p += 9 + len;
    }
  }
  if (p != end) throw Error(ErrorCode::kFormat, where + "bytes after the last block");
  if (total != rec.changed)
    throw Error(ErrorCode::kFormat,
                where + "blocks hold " + std::to_string(total) + " changes, the record " + std::to_string(rec.changed));
  const uint32_t unit = rec.unit;
  parallel_for(static_cast<int64_t>(nblocks), 1, [&](int64_t lo, int64_t hi) {
    std::vector<uint8_t> plane;
    for (int64_t b = lo; b < hi; ++b) {
      DecodedBlock& d = blocks[b];
      if (!d.changed) continue;
      const std::string at = where + "block " + std::to_string(b) + ": ";
      const uint64_t len = block_len(rec.units, block, b), nbytes = (len + 7) / 8;
      const uint8_t* q = d.streams;
      d.bitmap.resize(nbytes);
      entropy::decode(&q, end, d.bitmap.data(), nbytes, at);
      const uint64_t count = bytes::count_bits(d.bitmap.data(), nbytes);
      if (len % 8 && (d.bitmap.back() >> (len % 8))) throw Error(ErrorCode::kFormat, at + "bitmap bits past the end");
      if (count != d.changed) throw Error(ErrorCode::kFormat, at + "bitmap count does not match");
      d.values.resize(d.changed * unit);
      plane.resize(d.changed);
      for (uint32_t k = 0; k < unit; ++k) {
        entropy::decode(&q, end, plane.data(), d.changed, at);
        for (uint64_t j = 0; j < d.changed; ++j) d.values[j * unit + k] = plane[j];
      }
    }
  });
  parallel_for(static_cast<int64_t>(nblocks), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const DecodedBlock& d = blocks[b];
      xor_marked(buf, b * block, d.bitmap.data(), d.bitmap.size(), d.values.data(), unit);
    }
  });
}

}  // namespace

void apply_record(const DeltaRecord& rec, uint8_t* buf, std::string_view what) {
  const std::string where = std::string(what) + ": " + std::string(rec.name) + ": ";
  if (rec.encoding == PositionEncoding::kBlocks) {
    apply_blocks(rec, buf, where);
    return;
  }
  const uint8_t* vals = reinterpret_cast<const uint8_t*>(rec.values.data());
  const uint32_t unit = rec.unit;
  auto xor_at = [&](uint64_t pos, uint64_t k) {
    uint8_t* dst = buf + pos * unit;
    const uint8_t* src = vals + k * unit;
    for (uint32_t b = 0; b < unit; ++b) dst[b] ^= src[b];
  };
  const uint8_t* p = reinterpret_cast<const uint8_t*>(rec.positions.data());
  const uint8_t* end = p + rec.positions.size();
  if (rec.encoding == PositionEncoding::kBitmap) {
    // Not (units + 7) / 8: that wraps for units near 2^64, and an empty bitmap would then pass.
    if (rec.positions.size() != rec.units / 8 + (rec.units % 8 != 0))
      throw Error(ErrorCode::kFormat, where + "bitmap size mismatch");
    // Validate fully before writing, so a bad record changes nothing.
    const uint64_t count = bytes::count_bits(p, rec.positions.size());
    if (rec.units % 8 && (end[-1] >> (rec.units % 8)))
      throw Error(ErrorCode::kFormat, where + "bitmap bits past the end");
    if (count != rec.changed) throw Error(ErrorCode::kFormat, where + "bitmap count does not match");
    xor_marked(buf, 0, p, rec.positions.size(), vals, unit);
    return;
  }
  // Gaps: decode once to validate (bounds, count), then again to apply.
  for (int pass = 0; pass < 2; ++pass) {
    const uint8_t* q = p;
    uint64_t pos = 0, k = 0;
    while (q < end) {
      uint64_t v = 0;
      int shift = 0;
      while (true) {
        if (q >= end || shift > 63) throw Error(ErrorCode::kFormat, where + "bad varint in positions");
        uint8_t b = *q++;
        v |= static_cast<uint64_t>(b & 0x7F) << shift;
        shift += 7;
        if (!(b & 0x80)) break;
      }
      uint64_t next = k == 0 ? v : pos + 1 + v;
      if ((k > 0 && next <= pos) || next >= rec.units) throw Error(ErrorCode::kFormat, where + "position out of range");
      pos = next;
      if (k >= rec.changed) throw Error(ErrorCode::kFormat, where + "more positions than changed elements");
      if (pass == 1) xor_at(pos, k);
      ++k;
    }
    if (k != rec.changed) throw Error(ErrorCode::kFormat, where + "fewer positions than changed elements");
  }
}

}  // namespace livetrain::checkpoint
