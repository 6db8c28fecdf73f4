// The file formats of the delta checkpoint store, byte by byte, and their constants; the codecs are
// delta.hpp, journal.hpp, commit.hpp and hash.hpp beside this header.
//
// Format: commit version 2, or 3 when a tensor is served in another dtype (version 1 is read), delta version 2
// (single-process deltas) and 3 (parts of a tensor-parallel generation); docs/checkpoint.md is the full specification.
// A store is a directory
// (`<model>/.livetrain-store/` unless another is given) holding:
//
//   COMMIT                 JSON, written last with fs::write_file_atomic; the only thing that says what
//                          is committed. {"magic": "livetrain-checkpoint", "version": 2, "head": g,
//                          "oldest": g, "materialized": g, "hash": "xxh64-4k",
//                          "files": [{"name", "size", "hash"}],         model files at `materialized`
//                          "tensors": [{"name", "dtype", "shape", "file", "offset", "nbytes",
//                                       "served" (version 3, only when the engine serves the tensor in
//                                       another dtype: deltas are in it; base = files converted to it)}],
//                          "generations": [{"generation", "parent", "time_ms", "weight_version",
//                                           "bytes", "changed", "ranks",
//                                           "parts": [{"rank", "file", "bytes", "hash", "changed",
//                                                      "optimizer_state": file|null, "optimizer_bytes",
//                                                      "optimizer_hash"}]}]}
//                          Hashes are 16 lowercase hex digits. Generations run oldest..head, one each;
//                          a generation has one part per rank 0..ranks-1, listed by rank (the oldest
//                          generation, the base, has none). A part's "hash" is its file's XXH64 trailer,
//                          "optimizer_hash" the optimizer file's xxh64-4k content hash; "bytes",
//                          "optimizer_bytes" and "optimizer_hash" are null only in generations carried
//                          over from a version-1 COMMIT, whose generations were {"generation", "parent",
//                          "time_ms", "weight_version", "delta": file|null, "bytes", "changed",
//                          "delta_hash", "optimizer_state": file|null} (read as one part of rank 0).
//   gen-<20 digits>.delta  XOR of generation g against g-1, written by one process (all integers
//                          little-endian):
//                            0  "LTCKDLT1"   8 bytes
//                            8  u32 version = 2, u32 record count
//                           16  u64 generation, u64 parent
//                           32  records, in the order of the commit's tensor table:
//                                 u32 name length, name (UTF-8),
//                                 u8 dtype (livetrain::DType), u8 unit (bytes compared as one element:
//                                 the element size, 1 for sub-byte types), u8 encoding (0 = gaps,
//                                 1 = bitmap, 2 = blocks), u8 region dims D (0 in version 2),
//                                 version 3 with D > 0: D × u64 region start, D × u64 region length,
//                                 u64 units (elements of the tensor, or of the region), u64 changed,
//                                 u64 positions length P, P bytes of positions,
//                                 for gaps and bitmap: changed × unit bytes, new bits XOR old bits, in
//                                 position order (blocks carry their values inside P),
//                                 u64 XXH64 of the record from its name length to here
//                           end-8  u64 XXH64 of the whole file before it
//                          Positions, gaps: LEB128 varints, the first position, then each next position
//                          minus the previous minus 1. Bitmap: ceil(units / 8) bytes, bit i of byte
//                          i/8 (LSB first) set when element i changed. Blocks: u64 block size B (a
//                          multiple of 64, at most 2^26; the writer uses kBlockUnits), then per block of
//                          B elements (the last may be shorter): u64 changed in the block, and when that
//                          is not 0, 1 + unit coded streams: the block's bitmap bytes, then byte plane k
//                          (byte k of every changed element's XOR, in position order) for k < unit. A
//                          coded stream is raw, one repeated byte, or canonical Huffman (src/checkpoint/
//                          entropy.hpp), so the mostly-zero high bytes of small updates cost little.
//                          The smallest of the three encodings is written (gaps, then bitmap, on a
//                          tie). Tensors with no change have no record.
//   gen-<20 digits>.rank-<r>-of-<n>.delta
//                          rank r's part of generation g written at tensor-parallel size n: the same
//                          layout with version = 3 and, after the parent, u32 rank r, u32 ranks n
//                          (records start at byte 40). A record with D > 0 covers the region
//                          [start[d], start[d] + length[d]) of its tensor along every dim d (D = the
//                          tensor's rank; units = the product of the lengths), and its positions count
//                          the region's elements row-major: a column-parallel shard is a block of rows,
//                          a row-parallel one a block of columns. D = 0: the whole tensor. The regions of
//                          one generation's records of a tensor are disjoint, whichever part holds them.
//   gen-<20 digits>[.rank-<r>-of-<n>].optim
//                          optional: a copy of the optimizer-state file saved with that delta or part
//   materialize.journal    only during materialize (redo journal, see below)
//
// XOR deltas are self-inverse, so from the generation the model files hold (`materialized`) any
// generation in [oldest, head] is reached by XOR-ing the deltas in between, forwards or backwards.
//
// Content hash ("xxh64-4k"): XXH64 (seed 0) of every 4 KiB block of the file (the last block may be
// shorter), then XXH64 (seed 0) of those block hashes as u64 little-endian in order. The empty file hashes
// to XXH64 of no bytes. Block hashes make it parallel; XXH64 is Yann Collet's (spec v0.1.1; the
// xxHash library in third_party/xxhash computes it).
//
// Journal "materialize.journal" (written with fs::write_file_atomic before any model byte changes):
//     0  "LTCKJRN1", u32 version (1; 2 when an entry has kind 1), u32 entry count, u64 from generation,
//        u64 to generation
//    32  entries: u32 file index (into COMMIT "files"), u32 kind, u64 offset, u64 length, new bytes,
//        u64 XXH64 of the entry
//        kind 0: write the bytes at offset; kind 1 (version 2): the file is replaced whole by
//        ".<file name>.livetrain-materialize" beside it (written durably before the journal): offset = its
//        size, length 8, the bytes = its xxh64-4k content hash (u64); a file has entries of one kind only
//   end-8  u64 XXH64 of the whole file before it
//
// Crash safety: delta and optimizer files are written with fs::write_file_atomic and then COMMIT; a
// delta or part that COMMIT does not name is ignored and removed on the next open (store.hpp gives the
// protocol of a generation written by several processes). Materialize writes the
// journal, applies it in place, fsyncs the files, commits `materialized` (with the files' new hashes),
// then removes the journal; open redoes a journal whose `from` is the committed `materialized`, and
// discards one whose `to` already is.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "livetrain/dtype.hpp"

namespace livetrain::checkpoint {

inline constexpr std::string_view kCommitMagic = "livetrain-checkpoint";
inline constexpr uint64_t kCommitVersion = 2;
// Written instead of 2 when a tensor is served in another dtype than its files' ("served" in its entry).
inline constexpr uint64_t kCommitVersionServed = 3;
inline constexpr std::string_view kDeltaMagic = "LTCKDLT1";
inline constexpr uint32_t kDeltaVersion = 2;  // a single process's delta of whole tensors
inline constexpr uint32_t kPartVersion = 3;   // one rank's part: a rank header, records with regions
// Bounds a parser enforces on outside input: region dims of a record, ranks of a generation.
inline constexpr uint32_t kMaxRegionDims = 8;
inline constexpr uint32_t kMaxRanks = 4096;
// The largest generation number a COMMIT may hold (2^63 - 1: a signed 64-bit integer in any reader); a
// save past it is refused. Loops over oldest..head then never wrap around.
inline constexpr uint64_t kMaxGeneration = (uint64_t{1} << 63) - 1;
// Elements per block of the kBlocks encoding: blocks are coded and decoded in parallel.
inline constexpr uint64_t kBlockUnits = uint64_t{1} << 20;
inline constexpr std::string_view kJournalMagic = "LTCKJRN1";
inline constexpr uint32_t kJournalVersion = 1;
// Written instead of 1 when the journal replaces a model file whole (an entry of kind 1, below).
inline constexpr uint32_t kJournalVersionReplace = 2;
inline constexpr std::string_view kCommitFileName = "COMMIT";
inline constexpr std::string_view kJournalFileName = "materialize.journal";
inline constexpr std::string_view kDefaultStoreDirName = ".livetrain-store";

// How a delta record stores its positions (see above).
enum class PositionEncoding : uint8_t { kGaps = 0, kBitmap = 1, kBlocks = 2 };

// The number of bytes compared as one element of `dtype`: its size, 1 for sub-byte types.
uint32_t unit_bytes(DType dtype);

}  // namespace livetrain::checkpoint
