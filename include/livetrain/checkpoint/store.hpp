// The delta checkpoint store: generations of the live weights as element-level XOR deltas against the
// last durable state, a commit record written last, materialization into the model's own safetensors
// files through a redo journal, restore/rollback to any generation, verify and gc. The bytes on disk are
// in format.hpp.
//
// The last durable state (generation `head`) is kept in host memory, one copy of every tensor this
// process saves (as much memory as those weights): saves diff the live weights against it. For live
// weights in GPU memory the copy is page-locked on the first save (cudaHostRegister) and the GPU diff
// kernel reads it over PCIe; only the encoded delta's parts (bitmaps and changed values) come back.
//
// Served subsets. The store holds every tensor of the model files; a process may save, restore and compare
// any subset of them (the tensors its engine serves: a multimodal checkpoint's text model). Tensors no
// save names keep the files' bytes in every generation (they have no records), so restore and materialize
// leave them bit-exact.
//
// Generations written by several processes (tensor parallelism). At TP size N, rank r's engine holds a
// region of each Hugging Face tensor (region.hpp: a block of rows or columns, or all of it when the tensor
// is replicated). One process per rank opens the store with OpenOptions{rank, ranks = N, held = its
// regions}; rank 0 takes LOCK, rank r > 0 takes LOCK-rank-<r>, so two groups (or a single-process store
// and a group) never write at once. Rank 0 opens first: it finishes a leftover materialize journal and
// removes uncommitted files; a rank r > 0 waits while a journal exists and never removes anything.
// Replicated tensors are saved by rank 0 only (the other ranks' copies are the same weights; writing them
// once keeps records disjoint, and restore gives every rank the same bytes). Generation g = head + 1:
//   1. every rank: save_part() diffs its held regions against its head copy (which then holds g), writes
//      gen-<g>.rank-<r>-of-<N>.delta (and its optimizer state, if given) with fs::write_file_atomic, so the
//      part is durable when save_part returns, and returns a PartDescriptor (file, size, XXH64, changes);
//   2. the caller gathers the descriptors on rank 0 (torch.distributed in the trainer);
//   3. rank 0: commit_parts() checks one part per rank 0..N-1, all for generation g, from the same TP
//      size and group (refusing with the ranks named), reads every part file back (size, checksum equal to
//      the descriptor's, every record's checksum, regions inside their tensors and disjoint across parts)
//      and every optimizer file (size, hash), then writes COMMIT naming all parts: the commit point;
//   4. every rank, after rank 0's commit (a barrier): refresh() confirms its part when COMMIT names it,
//      else XORs its head copy back to the head (a later refresh replays any generation committed since).
// A crash before a part's rename leaves a temporary file; after it, an unnamed part file; before
// COMMIT's rename, COMMIT still names g - 1. Either way no generation g exists, and rank 0's next open
// removes the files. After COMMIT's rename, g exists and every part it names was durable before step 3.
// A reader trusts COMMIT alone: a generation exists if and only if COMMIT lists it, with all its parts.
// Restore, compare, materialize and gc read whichever parts a generation has, so a store written at one
// TP size restores at another: each record's region is XORed into the part of it a target region holds.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <future>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "livetrain/checkpoint/commit.hpp"
#include "livetrain/checkpoint/delta.hpp"
#include "livetrain/checkpoint/diff.hpp"
#include "livetrain/checkpoint/journal.hpp"
#include "livetrain/checkpoint/region.hpp"
#include "livetrain/dtype.hpp"
#include "livetrain/fs.hpp"
#include "livetrain/parallel.hpp"

namespace livetrain::checkpoint {

// A tensor of the live weights, or a region of one: contiguous memory holding the bytes of `dtype`/
// `shape`, in host memory (device -1) or in the memory of CUDA device `device` (this process's ordinal).
// All the tensors of one call are on the same device.
struct LiveTensor {
  std::string name;
  DType dtype = DType::kU8;
  std::vector<uint64_t> shape;  // the tensor's shape; with `start`, the region's
  void* data = nullptr;
  int device = -1;
  // Empty: the memory is the whole tensor. Else the region of the tensor it holds starts here along
  // every dim (and has `shape`); its elements are row-major over the region.
  std::vector<uint64_t> start;
};

// A region of a tensor that a process keeps a head copy of (and saves).
struct HeldRegion {
  std::string name;
  Region region;  // an empty `start` means the whole tensor
};

using Progress = std::function<void(std::string_view what, uint64_t done, uint64_t total)>;

struct OpenOptions {
  uint32_t rank = 0;  // this process's tensor-parallel rank, of `ranks`
  uint32_t ranks = 1;
  // The regions this process keeps a head copy of, and so may save. Unset: every tensor, whole (a
  // single-process store). Empty: none, and no host copy of the weights (a process that only restores,
  // compares, verifies or materializes, such as an engine restoring at start).
  std::optional<std::vector<HeldRegion>> held;
  // Who the ranks serve (e.g. the engine's instance id): commit_parts refuses parts of another group.
  std::string group;
  // The dtypes this process's engine serves tensors in ({files' name, dtype}), where they may differ from
  // what COMMIT records (convert.hpp's conversions only): head copies, restore, compare and saves use them.
  // Every rank declares its own, so a rank never waits for another to record one; a save or commit_parts
  // records them in COMMIT with the first generation holding such a tensor (refused, naming the tensor,
  // while generations hold it in another dtype).
  std::vector<std::pair<std::string, DType>> served;
  Progress progress;
};

// What a save's threads used (getrusage), to tell where its time went: the encoder's chunks on every thread
// of parallel_for's pool, and the whole process over the save (the diff's, encoder's and writer's threads,
// and whatever else the process ran meanwhile).
struct SaveUsage {
  // The encoder's thread waiting for the diff's next tensors (checkpoint.pipeline), between its start and
  // its last record: encode_seconds is the rest.
  double encode_wait_seconds = 0;
  // The encoder's chunks: wall_seconds summed over the threads that ran them, against the CPU time they got
  // (user + system; less means descheduled or blocked), their page faults and involuntary switches.
  Usage encode;
  // RUSAGE_SELF over the save's diff, encode and write (wall_seconds: that span's wall time).
  Usage process;
};

struct SaveOptions {
  uint64_t weight_version = 0;     // save(); for parts, commit_parts takes it
  std::string optimizer_state;     // a file to copy into the store with this generation (or part), or empty
  bool save_if_unchanged = false;  // save(): write a generation even when no element changed
  Progress progress;               // called from the save's encoding thread too
};

// What save_part wrote: rank 0 passes every rank's descriptor to commit_parts, which commits `part` as it
// is (after reading its files back).
struct PartDescriptor {
  uint64_t generation = 0;
  uint64_t parent = 0;
  uint32_t ranks = 1;
  std::string group;
  Part part;              // rank, file, bytes, hash (the file's XXH64 trailer), changed, optimizer state, size and hash
  uint64_t elements = 0;  // elements this rank diffed
  uint64_t model_bytes = 0;  // their bytes
  double diff_seconds = 0, encode_seconds = 0, write_seconds = 0;
  double sync_seconds = 0;  // of write_seconds: the delta file's fsync, rename and directory fsync
  SaveUsage usage;          // this rank's process
  // The dtypes this rank served its part's tensors in, where they differ from the model files' (its records
  // are in them); commit_parts records them in COMMIT.
  std::vector<std::pair<std::string, DType>> served;
};

struct SaveResult {
  bool written = false;  // false: nothing changed and save_if_unchanged was not set
  uint64_t generation = 0;
  uint64_t bytes = 0;
  uint64_t changed = 0;
  uint64_t elements = 0;     // elements diffed (of the live tensors; of every part, for commit_parts)
  uint64_t model_bytes = 0;  // their bytes
  // Time of the phases: the diff (wall time, GPU or CPU, with the copy of bitmaps and values to the host),
  // the encoding (time the encoder spent; with checkpoint.pipeline it overlaps the diff), and from the
  // last encoded record to the commit (the writes still queued, fsync, commit, updating the head copy);
  // sync_seconds, part of the last: the wait for the delta file to be durable (its fsync, rename and
  // directory fsync), what checkpoint.writeback_mib shortens.
  double diff_seconds = 0, encode_seconds = 0, write_seconds = 0, sync_seconds = 0;
  SaveUsage usage;  // commit_parts: summed over the parts (encode_wait_seconds: the longest)
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
  // The same, then opened with `options` (e.g. without a head copy: held = {}).
  static Store create(const std::string& model_dir, const std::string& store_dir, const OpenOptions& options);
  // Opens a store: takes its lock (kBusy if another process holds it), finishes or discards a leftover
  // journal, removes uncommitted files, checks the model files against the commit's hashes, and loads
  // the head generation into host memory.
  static Store open(const std::string& model_dir, const std::string& store_dir = "", Progress progress = {});
  // The same with a rank, held regions and a group (see the top of this header); a rank r > 0 takes
  // LOCK-rank-<r>, waits (up to 60 s) while a materialize journal exists, and removes nothing.
  static Store open(const std::string& model_dir, const std::string& store_dir, const OpenOptions& options);

  Store(Store&&) = default;
  Store& operator=(Store&&) = default;

  // Releases the lock and the host copy; the object is unusable afterwards (reopen to continue).
  void close();
  // Removes a store that holds nothing but generation 0 (what a first save that failed leaves, so that the
  // model files are not tied to a store nobody saved in): COMMIT first (no store from then on), its LOCK,
  // and the directory when `remove_dir` and nothing else is in it; then closes. Rank 0; refused (kInvalidArg)
  // once any generation was saved.
  void discard_new(bool remove_dir);
  // Starts, on a thread of its own, what the first save of GPU weights on CUDA device `device` would
  // otherwise do first: page-locking the head copy (cudaHostRegister; most of the 15.7 s first save of the
  // 27B model's 50 GiB on the H200), in registrations of whole entries of at least checkpoint.pin_chunk_mib
  // with a pause between them: a registration holds up every CUDA call of the process while it runs (one of
  // 24 GiB stalled a GPU loop for 10.6 s on the H200). Returns at once; a save (and close) waits for what is
  // still running. A failure there is not reported here: the save then page-locks as before (and reports
  // what fails). Then the diff's page-locked outputs, from pages written first and one registration each
  // (cudaHostAlloc of them held the process's CUDA calls up ~5 s at 24 GiB). Once per open; a no-op when the
  // copy is page-locked already or there is none.
  void prepare_gpu(int device);
  // Whether nothing of prepare_gpu's is left running (it finished, failed, or never started).
  bool gpu_prepared() const { return head_.pin_finished(); }

  const Commit& commit() const { return commit_; }
  const std::string& dir() const { return dir_; }
  const std::string& model_dir() const { return model_dir_; }
  uint32_t rank() const { return rank_; }
  uint32_t ranks() const { return ranks_; }
  // The dtype this process serves tensor i (commit order) in: OpenOptions::served, else COMMIT's record.
  DType served(size_t tensor) const { return served_[tensor]; }

  // Writes a new generation holding the elements of `live` that differ from the head, then commits it
  // (a single-process store: ranks 1). `live` names whole tensors of the store with their dtypes and
  // shapes; tensors it leaves out are unchanged in the new generation. Host weights are diffed on the
  // CPU (delta_diff_cpu), GPU weights on their GPU (delta_diff_cuda).
  SaveResult save(const std::vector<LiveTensor>& live, const SaveOptions& options = {});
  // Step 1 of a generation written by several ranks: writes this rank's part of generation head + 1
  // (every region of `live` must be a held region; a part is written even when nothing changed) and
  // returns its descriptor; the head copy holds the new state until refresh() or commit_parts() settle it.
  PartDescriptor save_part(const std::vector<LiveTensor>& live, const SaveOptions& options = {});
  // Step 3, rank 0 only: checks and commits the parts of every rank (this one's included) as generation
  // head + 1. Nothing is committed when no part changed anything, unless `save_if_unchanged`.
  SaveResult commit_parts(const std::vector<PartDescriptor>& parts, uint64_t weight_version = 0,
                          bool save_if_unchanged = false);
  // Step 4: rereads COMMIT; confirms this rank's pending part, or puts the head copy back, and replays
  // generations committed since. Returns the head. Every other call does this first when needed.
  uint64_t refresh();
  // Sets the live weights (whole tensors or regions, any subset of the store's tensors) to
  // `generation` (any in [oldest, head]); the head does not change. GPU weights are staged through
  // host memory (a second copy of their bytes while it runs).
  void restore_live(uint64_t generation, const std::vector<LiveTensor>& live);
  // Checks, writing nothing, what restore_live(generation, live) reads: the live tensors against the
  // store, every delta file on the way (size, committed checksum, header, every record's checksum), the
  // model files' sizes where a region comes from them, and the optimizer-state files this rank would
  // load (size and hash against COMMIT: its own part's at the store's TP size, else every part's). Throws
  // what restore_live (or the state's load) would; a rollback under tensor parallelism has every rank
  // check before any rank writes.
  void check_restore(uint64_t generation, const std::vector<LiveTensor>& live);
  // Writes `generation` as a new model directory (same file names and tensor split; index copied) that
  // loads as the model does: the model directory's other top-level files (config.json, tokenizer files,
  // generation_config.json, ...: a generation changes only weights) are copied as they are now, except hidden
  // files and files of other weight formats (.bin, .pt, .pth, .ckpt, .gguf, .h5, .msgpack, .onnx, .npz and
  // safetensors files the store does not name: they hold other weights); their names go to `copied`. A
  // tensor served in another dtype than its files' is written in the files' dtype when all its values
  // convert back exactly, else in the served dtype; returns the names of those written in the served dtype.
  std::vector<std::string> restore_to_dir(uint64_t generation, const std::string& out_dir,
                                          std::vector<std::string>* copied = nullptr);
  // Records the dtype the engine serves tensors in ({files' name, dtype}), where it differs from the model
  // files' (vLLM keeps Qwen3.5's A_log in F32; an engine may load F32 files as BF16): from then on deltas,
  // head copies, restore and compare use it, and the base is the files' values converted to it
  // (convert.hpp: exact widening, or round-to-nearest-even narrowing). Refused, naming the tensor and both
  // dtypes, for a conversion convert.hpp does not accept, or when saved generations hold the tensor in its
  // previous served dtype. Rank 0, in a store holding no head copy of the tensors (held = {}); a no-op for
  // tensors already served so. Writes COMMIT (version 3 while a served dtype differs from the files').
  void set_served(const std::vector<std::pair<std::string, DType>>& served);
  // Declares, after open, dtypes this process serves tensors in (as OpenOptions::served does; nothing is
  // written). Refused for a tensor this process keeps a head copy of in another dtype.
  void serve_as(const std::vector<std::pair<std::string, DType>>& served);
  // Compares live weights (whole tensors or regions) with a generation.
  LiveDiff compare_live(uint64_t generation, const std::vector<LiveTensor>& live);
  // Checks every file each generation names (delta and part files: size, committed checksum, every
  // record's checksum; optimizer state files: size and hash) and the model files' hashes; returns the
  // problems found.
  std::vector<std::string> verify(Progress progress = {});
  // Brings the model directory's safetensors files to `generation`, crash-safe (redo journal). A model
  // file that is a symlink or has other hard links is refused unless `copy_symlinks`, which first replaces
  // it by a real copy. A
  // tensor served in another dtype whose values the files' dtype cannot hold (a trained F32 A_log over
  // BF16 files) is written in the served dtype: its file is rewritten whole (prepared beside it, renamed over
  // it through the journal) and COMMIT's tensor table follows the new header. Returns those tensors' names.
  // With `round_to_file_dtype` such values are rounded to the files' dtype instead (round to nearest even:
  // lossy): the rounded weights are first saved as a new generation (head + 1, so that the files hold a
  // generation of the store), which is then materialized in place; returns the rounded tensors' names. Needs a
  // single-process store holding a head copy of every tensor (the default open).
  std::vector<std::string> materialize(uint64_t generation, bool copy_symlinks = false, Progress progress = {},
                                       bool round_to_file_dtype = false);
  // Forgets the generations before `keep_from` (which becomes the oldest); materializes `keep_from` first
  // when the model files are older than it (`copy_symlinks` as for materialize). Deletes the dropped deltas.
  void gc(uint64_t keep_from, Progress progress = {}, bool copy_symlinks = false);

  // Every tensor's bytes at `generation` (commit order), for tests and restore.
  std::vector<std::vector<uint8_t>> state(uint64_t generation);

 private:
  Store() = default;
  // A region this process keeps in its head copy.
  struct Held {
    size_t tensor = 0;  // index into commit_.tensors
    Region region;      // normalized: start and shape of the tensor's rank
    uint64_t nbytes = 0;
  };
  // Where the bytes of a region of generation g go (a head copy region, live memory, a staging buffer).
  struct Target {
    size_t tensor = 0;
    Region region;
    uint8_t* buf = nullptr;
  };
  // A live tensor checked against the commit: its tensor index and normalized region.
  struct Checked {
    const LiveTensor* live = nullptr;
    size_t tensor = 0;
    Region region;
    uint64_t nbytes = 0;
  };
  // The diff of a save, encoded and written; the head copy holds its state until moved back.
  struct Written {
    std::vector<size_t> held;  // held index of each diffed tensor
    std::vector<DiffTensor> diff;
    DiffOutput out;
    bool head_moved = false;
    uint64_t changed = 0, elements = 0, model_bytes = 0, bytes = 0, hash = 0;
    double diff_seconds = 0, encode_seconds = 0, write_seconds = 0, sync_seconds = 0;
    SaveUsage usage;
  };
  // This rank's part written by save_part and not yet confirmed in COMMIT.
  struct Pending {
    PartDescriptor part;
    Written written;
  };

  void check_usable() const;
  std::vector<Checked> check_live(const std::vector<LiveTensor>& live, bool for_save) const;
  // The held entry of exactly this region, or -1.
  long held_index(size_t tensor, const Region& region) const;
  void write_commit(const Commit& c);
  // Diffs `live` (held regions) against the head copy; unless nothing changed and !write_if_unchanged,
  // writes the records after `header(record count)` to `path` durably, with the head copy moved to the
  // recorded state. Returns false (nothing written, head copy unchanged) when nothing changed.
  bool write_delta(const std::vector<Checked>& live, const std::string& path,
                   const std::function<std::string(uint32_t)>& header, bool write_if_unchanged,
                   const Progress& progress, Written& w);
  void move_head(Written& w);  // XORs a written diff into (or back out of) the head copy
  // Copies an optimizer state file into the store as `name`; returns (bytes, hash).
  std::pair<uint64_t, uint64_t> copy_optimizer_state(const std::string& from, const std::string& name);
  // The records of a range of generations, parsed and checked, with the mappings they point into.
  struct Collected {
    struct Record {
      size_t tensor = 0;
      DeltaRecord record;
      Region region;     // normalized
      std::string what;  // the file
    };
    std::vector<fs::Mapping> maps;
    std::vector<Record> records;
  };
  // Checks a delta or part file of `generation` against its commit entry (size, committed checksum,
  // header, every record: tensor, dtype, region inside the tensor) and calls `fn` for each record.
  // Records must be in `dtypes` (per tensor, commit order).
  void check_part_file(uint64_t generation, uint32_t ranks, const Part& part, const fs::Mapping& map,
                       const std::vector<DType>& dtypes,
                       const std::function<void(size_t tensor, const DeltaRecord&, const Region&)>& fn) const;
  // Generations in (a, b], either order; their records in `dtypes` (default: served_, what this process
  // reads them into).
  Collected collect(uint64_t a, uint64_t b, const std::vector<DType>* dtypes = nullptr) const;
  // XORs every collected record into the part of each target it intersects.
  void apply(const Collected& records, const std::vector<Target>& targets) const;
  // What fill reads, checked: the targets split into held regions (from the head copy) and the others
  // (from the model files), the deltas from each to `generation`, and the model files mapped.
  struct Filling {
    std::vector<Target> from_head, from_files;
    std::vector<long> head_index;
    Collected head_records, file_records;
    std::vector<fs::Mapping> model_files;
  };
  Filling prepare_fill(uint64_t generation, const std::vector<Target>& targets) const;
  // Fills every target with its region at `generation`: from the head copy for held regions, else from
  // the model files; every delta on the way and the model files' sizes are checked before any target is
  // written (prepare_fill).
  void fill(uint64_t generation, const std::vector<Target>& targets);
  // XORs into the targets every record of generations in (a, b] that intersects them (either order).
  void xor_generations(uint64_t a, uint64_t b, const std::vector<Target>& targets);
  void require_rank0(const char* what) const;
  // served_ from COMMIT's records and this process's OpenOptions::served (checked: convert.hpp's conversions).
  void set_served_dtypes();
  uint64_t served_nbytes(size_t tensor) const;
  // Before a commit that records served dtypes other than COMMIT's: refused, naming the tensor, when
  // generations hold records of such a tensor in its previous dtype (they would not apply to the new one).
  void check_served_change(const Commit& next, const std::string& who) const;
  // Resolves a pending part and catches the head copy up with COMMIT (refresh without the result).
  void sync();
  // What to do about a journal that cannot be redone (corrupt, or not this COMMIT's), given the model files.
  std::string unusable_journal_advice(const std::string& path) const;
  void recover_journal();
  void remove_uncommitted();
  // Parses and checks a journal against COMMIT's model files (journal_parse with their sizes).
  Journal parse_journal(const uint8_t* bytes, size_t size, const std::string& what) const;
  // Writes a parsed journal's entries into the model files and fsyncs them.
  void apply_journal(const Journal& j, const std::string& what);
  void commit_materialized(uint64_t generation);

  std::string model_dir_;
  std::string dir_;
  fs::Fd lock_;
  Commit commit_;
  uint32_t rank_ = 0, ranks_ = 1;
  std::string group_;
  std::vector<Held> held_;        // in head copy order
  uint64_t head_generation_ = 0;  // the generation the head copy holds
  bool head_valid_ = false;       // false while open() fills it
  std::optional<Pending> pending_;

  std::vector<std::pair<std::string, DType>> served_options_;  // OpenOptions::served
  std::vector<DType> served_;                                  // per tensor (commit order): see served()
  // The host copy of generation `head_generation_`: every held region in one page-aligned anonymous
  // mapping (one range to page-lock for the GPU, or several of whole regions: prepare_gpu), each region
  // starting on a page, in held order.
  class HeadCopy {
   public:
    HeadCopy() = default;
    explicit HeadCopy(const std::vector<uint64_t>& sizes);
    HeadCopy(HeadCopy&& o) noexcept;
    HeadCopy& operator=(HeadCopy&& o) noexcept;
    HeadCopy(const HeadCopy&) = delete;
    HeadCopy& operator=(const HeadCopy&) = delete;
    ~HeadCopy();
    uint8_t* tensor(size_t i) const { return base_ + offsets_[i]; }
    // The address GPU kernels read entry i at; page-locks the copy on first use (or waits for pin_async's).
    const uint8_t* gpu_tensor(size_t i);
    // Page-locks the copy on a thread of its own for device `device`, in registrations of whole entries of
    // at least `chunk` bytes, then reserves page-locked diff outputs of these sizes (a workspace the first
    // save takes: take_reserved). Nothing when pinned or pinning.
    void pin_async(int device, size_t chunk, size_t bitmap_bytes, size_t value_bytes);
    // Polled from any thread, also while a save waits for that thread on another (settle): reads only the
    // flag pin_async's thread clears as it ends, never the future, whose get() is not safe alongside.
    bool pin_finished() const { return !pin_running_ || !pin_running_->load(std::memory_order_acquire); }
    // The workspace pin_async reserved, once (after gpu_tensor waited for it); empty buffers otherwise.
    DiffWorkspace take_reserved() { return std::move(reserved_); }

   private:
    struct Pinned {
      std::vector<void*> chunks;  // pin_async's registrations
      DiffWorkspace reserved;
    };
    void settle() noexcept;  // waits for pin_async's thread; keeps what it did, drops a failure
    void release() noexcept;
    uint8_t* base_ = nullptr;
    size_t size_ = 0;
    std::vector<size_t> offsets_;
    // The registrations that page-lock the copy (pin_async's, or gpu_tensor's one of it all); empty: not
    // page-locked. Kernels read the copy at its host address (pin_ranges checks that they can).
    std::vector<void*> chunks_;
    std::future<Pinned> pinning_;  // pin_async's, until settled
    // pin_async's thread is running; shared with that thread (a move of the copy carries the thread along).
    std::shared_ptr<std::atomic<bool>> pin_running_;
    DiffWorkspace reserved_;
  };

  HeadCopy head_;
  DiffWorkspace diff_workspace_;  // for GPU saves: the diff's page-locked outputs, reused
  bool broken_ = false;           // a commit step failed after the point where memory and disk may disagree
};

// Test hook: when the environment variable LIVETRAIN_CHECKPOINT_CRASH_AT equals `point`, the process kills
// itself with SIGKILL there (points: "delta-written", "part-written", "parts-verified", "journal-written",
// "rewritten-prepared", "apply-half", "applied", "materialize-committed", "recovered-applied").
void crash_point(std::string_view point);

}  // namespace livetrain::checkpoint
