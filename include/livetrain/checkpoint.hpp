// The delta checkpoint store: generations of the live weights as element-level XOR deltas against the
// last durable state, a commit record written last, materialization into the model's own safetensors
// files through a redo journal, restore/rollback to any generation, verify and gc.
//
// Format: commit version 1, delta version 2 (docs/checkpoint.md is the full specification). A store is a directory
// (`<model>/.livetrain-store/` unless another is given) holding:
//
//   COMMIT                 JSON, written last with fs::write_file_atomic; the only thing that says what
//                          is committed. {"magic": "livetrain-checkpoint", "version": 1, "head": g,
//                          "oldest": g, "materialized": g, "hash": "xxh64-4k",
//                          "files": [{"name", "size", "hash"}],         model files at `materialized`
//                          "tensors": [{"name", "dtype", "shape", "file", "offset", "nbytes"}],
//                          "generations": [{"generation", "parent", "time_ms", "weight_version",
//                                           "delta": file|null, "bytes", "changed", "delta_hash",
//                                           "optimizer_state": file|null}]}
//                          Hashes are 16 lowercase hex digits. Generations run oldest..head, one each.
//   gen-<20 digits>.delta  XOR of generation g against g-1 (all integers little-endian):
//                            0  "LTCKDLT1"   8 bytes
//                            8  u32 version = 2, u32 record count
//                           16  u64 generation, u64 parent
//                           32  records, in the order of the commit's tensor table:
//                                 u32 name length, name (UTF-8),
//                                 u8 dtype (livetrain::DType), u8 unit (bytes compared as one element:
//                                 the element size, 1 for sub-byte types), u8 encoding (0 = gaps,
//                                 1 = bitmap, 2 = blocks), u8 0,
//                                 u64 units (elements of the tensor), u64 changed,
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
//   gen-<20 digits>.optim  optional: a copy of the optimizer-state file saved with that generation
//   materialize.journal    only during materialize (redo journal, see below)
//
// XOR deltas are self-inverse, so from the generation the model files hold (`materialized`) any
// generation in [oldest, head] is reached by XOR-ing the deltas in between, forwards or backwards.
//
// Content hash ("xxh64-4k"): XXH64 (seed 0) of every 4 KiB block of the file (the last block may be
// shorter), then XXH64 (seed 0) of those block hashes as u64 little-endian in order. The empty file hashes
// to XXH64 of no bytes. Block hashes make it parallel; XXH64 is Yann Collet's (xxhash.h, spec v0.1.1).
//
// Journal "materialize.journal" (written with fs::write_file_atomic before any model byte changes):
//     0  "LTCKJRN1", u32 version = 1, u32 entry count, u64 from generation, u64 to generation
//    32  entries: u32 file index (into COMMIT "files"), u32 0, u64 offset, u64 length, new bytes,
//        u64 XXH64 of the entry
//   end-8  u64 XXH64 of the whole file before it
//
// Crash safety: delta and optimizer files are written with fs::write_file_atomic and then COMMIT; a
// delta that COMMIT does not name is ignored and removed on the next open. Materialize writes the
// journal, applies it in place, fsyncs the files, commits `materialized` (with the files' new hashes),
// then removes the journal; open redoes a journal whose `from` is the committed `materialized`, and
// discards one whose `to` already is.
//
// The last durable state (generation `head`) is kept in host memory, one copy of every tensor (as much
// memory as the model's weights): saves diff the live weights against it. For live weights in GPU
// memory the copy is page-locked on the first save (cudaHostRegister) and the GPU diff kernel reads it
// over PCIe; only the encoded delta's parts (bitmaps and changed values) come back to the host.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "livetrain/dtype.hpp"
#include "livetrain/fs.hpp"

namespace livetrain::checkpoint {

inline constexpr std::string_view kCommitMagic = "livetrain-checkpoint";
inline constexpr uint64_t kCommitVersion = 1;
inline constexpr std::string_view kDeltaMagic = "LTCKDLT1";
inline constexpr uint32_t kDeltaVersion = 2;
// Elements per block of the kBlocks encoding: blocks are coded and decoded in parallel.
inline constexpr uint64_t kBlockUnits = uint64_t{1} << 20;
inline constexpr std::string_view kJournalMagic = "LTCKJRN1";
inline constexpr uint32_t kJournalVersion = 1;
inline constexpr std::string_view kCommitFileName = "COMMIT";
inline constexpr std::string_view kJournalFileName = "materialize.journal";
inline constexpr std::string_view kDefaultStoreDirName = ".livetrain-store";
inline constexpr size_t kHashBlock = 4096;

// ---- hashing ----

uint64_t xxh64(const void* data, size_t size, uint64_t seed = 0);
// XXH64 of data given in pieces: digest() equals xxh64() of everything passed to update() so far.
class Xxh64Stream {
 public:
  explicit Xxh64Stream(uint64_t seed = 0);
  void update(const void* data, size_t size);
  uint64_t digest() const;

 private:
  uint64_t v_[4];
  uint64_t seed_;
  uint64_t total_ = 0;
  uint8_t buf_[32] = {};
  size_t buffered_ = 0;
};
// The "xxh64-4k" content hash of a byte range (parallel over blocks).
uint64_t content_hash(const uint8_t* data, size_t size);
std::string hash_hex(uint64_t h);
std::optional<uint64_t> hash_from_hex(std::string_view s);

// ---- delta codec ----

enum class PositionEncoding : uint8_t { kGaps = 0, kBitmap = 1, kBlocks = 2 };

// The number of bytes compared as one element of `dtype`.
uint32_t unit_bytes(DType dtype);

// Appends to `out` the record of the elements where `now` differs from `old` (both `units × unit` bytes)
// and returns how many changed; appends nothing when none did. `now` is read exactly once per byte, so
// a tensor being written concurrently (HOGWILD training) still yields a consistent record of what was read.
uint64_t encode_record(std::string& out, std::string_view name, DType dtype, uint64_t units, const uint8_t* old,
                       const uint8_t* now);

// Appends the record of a diff already computed: `changed` elements, `bitmap` (ceil(units/8) bytes, bit i
// LSB first set when element i changed, no bits past the end) and `values` (changed × unit bytes, XOR, in
// position order). Picks the encoding like encode_record; nothing is appended when changed == 0. Every
// save encodes delta_diff_cpu's or delta_diff_cuda's output through this (in parallel over blocks).
void encode_record_parts(std::string& out, std::string_view name, DType dtype, uint64_t units, uint64_t changed,
                         const uint8_t* bitmap, const uint8_t* values);

// One record to encode from a diff's parts (as encode_record_parts takes them).
struct RecordParts {
  std::string_view name;
  DType dtype = DType::kU8;
  uint64_t units = 0;
  uint64_t changed = 0;
  const uint8_t* bitmap = nullptr;
  const uint8_t* values = nullptr;
};

// Encodes several records, each as encode_record_parts would, with one parallel region over all their
// blocks; outs[i] receives record i (empty when its changed == 0).
void encode_records(const std::vector<RecordParts>& records, std::vector<std::string>& outs);

// XORs a diff's `values` (changed × unit bytes, position order) into `buf` at the positions `bitmap` marks
// (ceil(units/8) bytes, LSB first); parallel over blocks. The inverse of itself.
void xor_diff(uint8_t* buf, uint64_t units, uint32_t unit, const uint8_t* bitmap, const uint8_t* values);

// A parsed record: views into the delta file's bytes.
struct DeltaRecord {
  std::string_view name;
  DType dtype = DType::kU8;
  uint32_t unit = 1;
  PositionEncoding encoding = PositionEncoding::kGaps;
  uint64_t units = 0;
  uint64_t changed = 0;
  std::string_view positions;  // for kBlocks: the whole coded payload
  std::string_view values;     // empty for kBlocks
};

struct DeltaHeader {
  uint64_t generation = 0;
  uint64_t parent = 0;
  uint32_t records = 0;
};

// The header of a delta file, then a record's bytes after the header, and the file checksum trailer.
std::string delta_file_header(uint64_t generation, uint64_t parent, uint32_t records);

// Parses a whole delta file, checking magic, version, bounds and every checksum; calls `fn` for each
// record. Errors are kFormat naming `what` (the file), the record index and tensor name.
DeltaHeader delta_parse(const uint8_t* bytes, size_t size, std::string_view what,
                        const std::function<void(const DeltaRecord&)>& fn);

// XORs a record's values into `buf` (`rec.units × rec.unit` bytes). Decodes and validates the whole
// record before writing anything, so a bad record changes nothing.
void apply_record(const DeltaRecord& rec, uint8_t* buf, std::string_view what);

// ---- the diff of live weights against the last durable state (CPU reference and CUDA) ----

// One tensor to diff: `units` elements of `unit` bytes (1, 2, 4 or 8), compared bit for bit.
struct DiffTensor {
  const void* now = nullptr;  // [units × unit] the live weights (device memory for delta_diff_cuda)
  const void* old = nullptr;  // [units × unit] the last durable bytes (for delta_diff_cuda: device memory,
                              // or pinned host memory, which the kernel then reads over PCIe; written
                              // when delta_diff_cuda is asked to update it)
  uint64_t units = 0;
  uint32_t unit = 2;
};

// Host memory that frees itself (pinned, from cudaMallocHost, when written by delta_diff_cuda).
struct HostBytes {
  uint8_t* data = nullptr;
  size_t size = 0;
  void (*release)(uint8_t*) = nullptr;

  HostBytes() = default;
  HostBytes(HostBytes&& o) noexcept : data(o.data), size(o.size), release(o.release) { o.data = nullptr; o.size = 0; }
  HostBytes& operator=(HostBytes&& o) noexcept {
    if (this != &o) {
      reset();
      data = o.data;
      size = o.size;
      release = o.release;
      o.data = nullptr;
      o.size = 0;
    }
    return *this;
  }
  HostBytes(const HostBytes&) = delete;
  HostBytes& operator=(const HostBytes&) = delete;
  ~HostBytes() { reset(); }
  void reset() {
    if (data && release) release(data);
    data = nullptr;
    size = 0;
  }
};

// The diff of every tensor, in host memory: only the changed elements' values and the bitmaps travel.
struct DiffOutput {
  std::vector<uint64_t> changed;        // [tensors] elements whose bits differ
  std::vector<uint64_t> bitmap_offset;  // [tensors] into `bitmaps`: ceil(units / 8) bytes, LSB first
  std::vector<uint64_t> value_offset;   // [tensors] into `values`: changed × unit bytes, now XOR old
  HostBytes bitmaps;
  HostBytes values;
};

// CPU reference (multithreaded over tensors); `now` and `old` are host memory.
void delta_diff_cpu(const std::vector<DiffTensor>& tensors, DiffOutput& out);

// Page-locked, GPU-mapped host buffers for delta_diff_cuda's outputs, kept between calls and grown as
// needed (by a quarter more than asked), so that a store's saves stop allocating once sizes settle.
struct DiffWorkspace {
  HostBytes bitmaps, values;
};
// Sizes a workspace ahead of time (page-locking is slow: a store does it on its first GPU save).
void diff_workspace_reserve(DiffWorkspace& ws, size_t bitmap_bytes, size_t value_bytes);

// The same result computed on the current CUDA device: a count pass (per-warp ballots give the bitmap,
// per-block counts), a prefix sum over the block counts, then a compaction pass that places each
// changed element's XOR by its rank. The bitmaps are written straight into page-locked host memory;
// the values go through a bounded device scratch buffer (256 MiB) and are copied to page-locked host
// memory group by group. Positions come from the count pass's bitmap, so the record stays
// self-consistent while the weights are written concurrently (an element changed back in between is
// recorded with XOR 0, which applies as no change). With `workspace`, the outputs are views into it
// (valid until its next use); without, `out` owns them. With `update_old`, each `old` is afterwards
// the state the output describes (old ^ XOR at every marked position, i.e. the `now` bits read there),
// written back by whole 32-element rows that hold a change; `old` must then be writable. Synchronizes
// `stream` (a cudaStream_t) before returning. Throws Error(kUnsupported) in builds without CUDA.
void delta_diff_cuda(const std::vector<DiffTensor>& tensors, DiffOutput& out, void* stream,
                     DiffWorkspace* workspace = nullptr, bool update_old = false);

// ---- journal codec ----

// One entry of a materialize journal: `length` new bytes for file `file` at `offset`; `bytes` points into
// the journal's buffer.
struct JournalEntry {
  uint32_t file = 0;
  uint64_t offset = 0;
  uint64_t length = 0;
  const uint8_t* bytes = nullptr;
};

struct Journal {
  uint64_t from = 0;
  uint64_t to = 0;
  std::vector<JournalEntry> entries;
};

// Building a journal: the header (entry count 0), then entries (each append bumps the count in the
// header), then the checksum trailer.
std::string journal_header(uint64_t from, uint64_t to);
void journal_append(std::string& journal, uint32_t file, uint64_t offset, const uint8_t* bytes, uint64_t length);
void journal_finish(std::string& journal);

// Parses a whole journal held in memory (no file I/O), checking magic, version, every checksum, reserved
// fields, and that every entry lies inside the model file it names (`file_sizes[file]` bytes). Errors are
// kFormat naming `what` and the entry index.
Journal journal_parse(const uint8_t* bytes, size_t size, std::string_view what, const std::vector<uint64_t>& file_sizes);

// ---- commit record ----

struct ModelFile {
  std::string name;  // relative to the model directory
  uint64_t size = 0;
  uint64_t hash = 0;
};

struct TensorEntry {
  std::string name;
  DType dtype = DType::kU8;
  std::vector<uint64_t> shape;
  uint32_t file = 0;    // index into Commit::files
  uint64_t offset = 0;  // absolute byte offset of the tensor's data in that file
  uint64_t nbytes = 0;
};

struct Generation {
  uint64_t generation = 0;
  uint64_t parent = 0;
  int64_t time_ms = 0;  // Unix time of the save, milliseconds
  uint64_t weight_version = 0;
  std::string delta;  // file name in the store; empty for the oldest generation (the base)
  uint64_t bytes = 0;  // delta file size (+ optimizer state size)
  uint64_t changed = 0;
  uint64_t delta_hash = 0;  // XXH64 checksum trailer of the delta file
  std::string optimizer_state;  // file name in the store, or empty
};

struct Commit {
  uint64_t head = 0;
  uint64_t oldest = 0;
  uint64_t materialized = 0;
  std::vector<ModelFile> files;
  std::vector<TensorEntry> tensors;
  std::vector<Generation> generations;  // oldest..head

  const Generation* find(uint64_t generation) const;
};

std::string commit_serialize(const Commit& c);
Commit commit_parse(std::string_view text, std::string_view what);
Commit commit_read(const std::string& store_dir);
std::string delta_file_name(uint64_t generation);

// ---- the store ----

// A tensor of the live weights: contiguous memory holding the bytes of `dtype`/`shape`, in host memory
// (device -1) or in the memory of CUDA device `device` (this process's ordinal). All the tensors of one
// call are on the same device.
struct LiveTensor {
  std::string name;
  DType dtype = DType::kU8;
  std::vector<uint64_t> shape;
  void* data = nullptr;
  int device = -1;
};

using Progress = std::function<void(std::string_view what, uint64_t done, uint64_t total)>;

struct SaveOptions {
  uint64_t weight_version = 0;
  std::string optimizer_state;  // a file to copy into the store with this generation, or empty
  bool save_if_unchanged = false;  // write a generation even when no element changed
  Progress progress;
};

struct SaveResult {
  bool written = false;  // false: nothing changed and save_if_unchanged was not set
  uint64_t generation = 0;
  uint64_t bytes = 0;
  uint64_t changed = 0;
  uint64_t elements = 0;  // elements of the model
  uint64_t model_bytes = 0;
  // Wall time of the phases: the diff (GPU or CPU, with the copy of bitmaps and values to the host), the
  // encoding, and writing + fsync + commit + updating the head copy.
  double diff_seconds = 0, encode_seconds = 0, write_seconds = 0;
};

struct LiveDiff {
  uint64_t tensors = 0;   // tensors that differ
  uint64_t elements = 0;  // elements that differ
  std::string first;      // name of the first differing tensor
};

std::string default_store_dir(const std::string& model_dir);

class Store {
 public:
  // Creates a store for the model directory (generation 0 = the files as they are now). Fails if one
  // exists. An empty `store_dir` means default_store_dir(model_dir).
  static Store create(const std::string& model_dir, const std::string& store_dir = "");
  // Opens a store: takes its lock (kBusy if another process holds it), finishes or discards a leftover
  // journal, removes uncommitted files, checks the model files against the commit's hashes, and loads
  // the head generation into host memory.
  static Store open(const std::string& model_dir, const std::string& store_dir = "", Progress progress = {});

  Store(Store&&) = default;
  Store& operator=(Store&&) = default;

  // Releases the lock and the host copy; the object is unusable afterwards (reopen to continue).
  void close();

  const Commit& commit() const { return commit_; }
  const std::string& dir() const { return dir_; }
  const std::string& model_dir() const { return model_dir_; }

  // Writes a new generation holding the elements of `live` that differ from the head, then commits it.
  // `live` must name exactly the store's tensors with their dtypes and shapes. Host weights are diffed
  // on the CPU (delta_diff_cpu), GPU weights on their GPU (delta_diff_cuda).
  SaveResult save(const std::vector<LiveTensor>& live, const SaveOptions& options = {});
  // Sets the live weights to `generation` (any in [oldest, head]); the head does not change. GPU weights
  // are staged through host memory (a second copy of the model's bytes while it runs).
  void restore_live(uint64_t generation, const std::vector<LiveTensor>& live);
  // Writes `generation` as a new model directory (same file names and tensor split; index copied).
  void restore_to_dir(uint64_t generation, const std::string& out_dir);
  // Compares live weights with a generation.
  LiveDiff compare_live(uint64_t generation, const std::vector<LiveTensor>& live);
  // Checks every delta file's checksums and the model files' hashes; returns the problems found.
  std::vector<std::string> verify(Progress progress = {});
  // Brings the model directory's safetensors files to `generation`, crash-safe (redo journal). A model
  // file that is a symlink is refused unless `copy_symlinks`, which first replaces it by a real copy.
  void materialize(uint64_t generation, bool copy_symlinks = false, Progress progress = {});
  // Forgets the generations before `keep_from` (which becomes the oldest); materializes `keep_from` first
  // when the model files are older than it. Deletes the dropped deltas.
  void gc(uint64_t keep_from, Progress progress = {});

  // Every tensor's bytes at `generation` (commit order), for tests and restore.
  std::vector<std::vector<uint8_t>> state(uint64_t generation);

 private:
  Store() = default;
  void check_usable() const;
  void check_live(const std::vector<LiveTensor>& live) const;
  void write_commit(const Commit& c);
  // XORs the deltas of generations in (a, b] into `bufs` (direction does not matter).
  void xor_range(uint64_t a, uint64_t b, std::vector<uint8_t*>& bufs);
  void xor_generation(uint64_t g, const std::function<void(size_t tensor, const DeltaRecord&)>& fn);
  void recover_journal();
  void remove_uncommitted();
  // Parses and checks a journal, writes its entries into the model files and fsyncs them; returns `to`.
  uint64_t apply_journal(const uint8_t* bytes, size_t size, const std::string& what);
  void commit_materialized(uint64_t generation);

  std::string model_dir_;
  std::string dir_;
  fs::Fd lock_;
  Commit commit_;
  // The host copy of generation `head`: every tensor in one page-aligned anonymous mapping (one range to
  // page-lock for the GPU), at 64-byte aligned offsets, in commit order.
  class HeadCopy {
   public:
    HeadCopy() = default;
    explicit HeadCopy(const std::vector<TensorEntry>& tensors);
    HeadCopy(HeadCopy&& o) noexcept;
    HeadCopy& operator=(HeadCopy&& o) noexcept;
    HeadCopy(const HeadCopy&) = delete;
    HeadCopy& operator=(const HeadCopy&) = delete;
    ~HeadCopy();
    uint8_t* tensor(size_t i) const { return base_ + offsets_[i]; }
    // The address GPU kernels read tensor i at; page-locks the copy on first use.
    const uint8_t* gpu_tensor(size_t i);

   private:
    void release() noexcept;
    uint8_t* base_ = nullptr;
    size_t size_ = 0;
    std::vector<size_t> offsets_;
    uint8_t* gpu_base_ = nullptr;  // set once page-locked
  };

  HeadCopy head_;
  DiffWorkspace diff_workspace_;  // for GPU saves: the diff's page-locked outputs, reused
  bool broken_ = false;  // a commit step failed after the point where memory and disk may disagree
};

// Test hook: when the environment variable LIVETRAIN_CHECKPOINT_CRASH_AT equals `point`, the process kills
// itself with SIGKILL there (points: "delta-written", "journal-written", "apply-half", "applied",
// "materialize-committed", "recovered-applied").
void crash_point(std::string_view point);

}  // namespace livetrain::checkpoint
