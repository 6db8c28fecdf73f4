// The delta checkpoint store: generations of the live weights as element-level XOR deltas against the
// last durable state, a commit record written last, materialization into the model's own safetensors
// files through a redo journal, restore/rollback to any generation, verify and gc. The bytes on disk are
// in format.hpp.
//
// The last durable state (generation `head`) is kept in host memory, one copy of every tensor (as much
// memory as the model's weights): saves diff the live weights against it. For live weights in GPU
// memory the copy is page-locked on the first save (cudaHostRegister) and the GPU diff kernel reads it
// over PCIe; only the encoded delta's parts (bitmaps and changed values) come back to the host.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "livetrain/checkpoint/commit.hpp"
#include "livetrain/checkpoint/delta.hpp"
#include "livetrain/checkpoint/diff.hpp"
#include "livetrain/dtype.hpp"
#include "livetrain/fs.hpp"

namespace livetrain::checkpoint {

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
  Progress progress;  // called from the save's encoding thread too
};

struct SaveResult {
  bool written = false;  // false: nothing changed and save_if_unchanged was not set
  uint64_t generation = 0;
  uint64_t bytes = 0;
  uint64_t changed = 0;
  uint64_t elements = 0;  // elements of the model
  uint64_t model_bytes = 0;
  // Time of the phases: the diff (wall time, GPU or CPU, with the copy of bitmaps and values to the host),
  // the encoding (time the encoder spent; with checkpoint.pipeline it overlaps the diff), and from the
  // last encoded record to the commit (the writes still queued, fsync, commit, updating the head copy).
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
