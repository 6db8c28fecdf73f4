// The checkpoint store: create/open (lock, recovery, loading the head into host memory), save, restore,
// compare, verify and gc. Materialization and its journal are in materialize.cpp.
#include <dirent.h>
#include <sys/mman.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <optional>
#include <thread>
#include <cstdlib>
#include <cstring>
#include <set>
#include <unordered_map>

#include "cuda/host.hpp"
#include "livetrain/checkpoint/commit.hpp"
#include "livetrain/checkpoint/delta.hpp"
#include "livetrain/checkpoint/diff.hpp"
#include "livetrain/checkpoint/hash.hpp"
#include "livetrain/checkpoint/store.hpp"
#include "livetrain/error.hpp"
#include "livetrain/parallel.hpp"
#include "livetrain/safetensors.hpp"
#include "livetrain/tuning.hpp"

namespace livetrain::checkpoint {

namespace {

int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

void report(const Progress& p, std::string_view what, uint64_t done, uint64_t total) {
  if (p) p(what, done, total);
}

// A queue of byte strings from the encoding thread to the writer thread of a save.
class PartQueue {
 public:
  void push(std::string part) {
    std::lock_guard<std::mutex> lock(mu_);
    parts_.push_back(std::move(part));
    cv_.notify_one();
  }
  // The next part; nullopt once closed and drained, or aborted.
  std::optional<std::string> pop() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return aborted_ || closed_ || !parts_.empty(); });
    if (aborted_ || parts_.empty()) return std::nullopt;
    std::string part = std::move(parts_.front());
    parts_.pop_front();
    return part;
  }
  void close() {
    std::lock_guard<std::mutex> lock(mu_);
    closed_ = true;
    cv_.notify_one();
  }
  void abort() {
    std::lock_guard<std::mutex> lock(mu_);
    aborted_ = true;
    cv_.notify_one();
  }
  bool aborted() {
    std::lock_guard<std::mutex> lock(mu_);
    return aborted_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::string> parts_;
  bool closed_ = false, aborted_ = false;
};

// Encodes a save's records on its own thread, in tensor order, as the diff completes tensors (all at once
// unless checkpoint.pipeline); finished records wait in `records` for the writer. Records are encoded in
// batches of whole tensors with enough blocks between them to keep every CPU thread busy, or fewer when
// the diff has not completed more.
class RecordEncoder {
 public:
  RecordEncoder(const std::vector<TensorEntry>& tensors, const std::vector<DiffTensor>& diff, const DiffOutput& d,
                const Progress& progress)
      : tensors_(tensors), diff_(diff), d_(d), progress_(progress),
        batch_blocks_(static_cast<uint64_t>(tuning::get(tuning::kCheckpointEncodeBatch)) * num_threads()),
        thread_([this] { run(); }) {}
  ~RecordEncoder() {
    if (thread_.joinable()) {
      abort();
      thread_.join();
    }
  }
  RecordEncoder(const RecordEncoder&) = delete;
  RecordEncoder& operator=(const RecordEncoder&) = delete;

  // Tensors [0, done) are complete, their bitmaps and values at these bases (from the diff's thread).
  void ready(size_t done, const uint8_t* bitmaps, const uint8_t* values) {
    std::lock_guard<std::mutex> lock(mu_);
    done_ = std::max(done_, done);
    bitmaps_ = bitmaps;
    values_ = values;
    cv_.notify_one();
  }
  // No more tensors will become ready (the diff returned, or failed).
  void end_of_input() {
    std::lock_guard<std::mutex> lock(mu_);
    input_over_ = true;
    cv_.notify_one();
  }
  void abort() {
    records.abort();
    std::lock_guard<std::mutex> lock(mu_);
    aborted_ = true;
    cv_.notify_one();
  }
  // Waits for the thread; rethrows what the encoding threw. Returns the seconds spent encoding.
  double join() {
    end_of_input();
    thread_.join();
    if (error_) std::rethrow_exception(error_);
    return busy_seconds_;
  }

  PartQueue records;
  std::chrono::steady_clock::time_point finished_at;  // when the last record was encoded (valid after join)

 private:
  void run() {
    try {
      size_t next = 0;
      while (true) {
        size_t done;
        const uint8_t *bitmaps, *values;
        {
          std::unique_lock<std::mutex> lock(mu_);
          cv_.wait(lock, [&] { return aborted_ || input_over_ || done_ > next; });
          if (aborted_ || done_ <= next) break;  // aborted, or the input is over and all of it encoded
          done = done_;
          bitmaps = bitmaps_;
          values = values_;
        }
        const auto t0 = std::chrono::steady_clock::now();
        encode(next, done, bitmaps, values);
        busy_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        next = done;
      }
      finished_at = std::chrono::steady_clock::now();
      records.close();
    } catch (...) {
      error_ = std::current_exception();
      records.abort();
    }
  }

  void encode(size_t begin, size_t end, const uint8_t* bitmaps, const uint8_t* values) {
    std::vector<RecordParts> batch;
    uint64_t blocks = 0;
    for (size_t i = begin; i < end && !records.aborted(); ++i) {
      if (d_.changed[i]) {
        const TensorEntry& t = tensors_[i];
        batch.push_back(RecordParts{t.name, t.dtype, diff_[i].units, d_.changed[i], bitmaps + d_.bitmap_offset[i],
                                    values + d_.value_offset[i]});
        blocks += (diff_[i].units + kBlockUnits - 1) / kBlockUnits;
      }
      if (!batch.empty() && (blocks >= batch_blocks_ || i + 1 == end)) {
        report(progress_, "encode and write", i + 1, tensors_.size());
        std::vector<std::string> recs;
        encode_records(batch, recs);
        for (auto& rec : recs) records.push(std::move(rec));
        batch.clear();
        blocks = 0;
      }
    }
  }

  const std::vector<TensorEntry>& tensors_;
  const std::vector<DiffTensor>& diff_;
  const DiffOutput& d_;
  const Progress& progress_;
  const uint64_t batch_blocks_;
  std::mutex mu_;
  std::condition_variable cv_;
  size_t done_ = 0;
  const uint8_t* bitmaps_ = nullptr;
  const uint8_t* values_ = nullptr;
  bool input_over_ = false, aborted_ = false;
  std::exception_ptr error_;
  double busy_seconds_ = 0;
  std::thread thread_;  // last: starts once everything above is initialized
};

// The one device of a call's live tensors (-1: host memory); mixing is refused.
int live_device(const std::vector<LiveTensor>& live) {
  int device = live.empty() ? -1 : live.front().device;
  for (const auto& t : live) {
    if (t.device != device) {
      throw Error(ErrorCode::kInvalidArg, "live tensors \"" + live.front().name + "\" and \"" + t.name +
                                              "\" are on different devices; pass the weights of one device");
    }
  }
  return device;
}

}  // namespace

Store::HeadCopy::HeadCopy(const std::vector<TensorEntry>& tensors) {
  for (const auto& t : tensors) {
    size_ = (size_ + 63) / 64 * 64;
    offsets_.push_back(size_);
    size_ += t.nbytes;
  }
  if (size_ == 0) return;
  void* p = ::mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw io_error("allocate " + std::to_string(size_) + " bytes for the checkpoint store's head copy");
  ::madvise(p, size_, MADV_HUGEPAGE);  // fewer TLB misses on scans; a hint only
  base_ = static_cast<uint8_t*>(p);
}

Store::HeadCopy::HeadCopy(HeadCopy&& o) noexcept
    : base_(o.base_), size_(o.size_), offsets_(std::move(o.offsets_)), gpu_base_(o.gpu_base_) {
  o.base_ = o.gpu_base_ = nullptr;
  o.size_ = 0;
}

Store::HeadCopy& Store::HeadCopy::operator=(HeadCopy&& o) noexcept {
  if (this != &o) {
    release();
    base_ = o.base_;
    size_ = o.size_;
    offsets_ = std::move(o.offsets_);
    gpu_base_ = o.gpu_base_;
    o.base_ = o.gpu_base_ = nullptr;
    o.size_ = 0;
  }
  return *this;
}

Store::HeadCopy::~HeadCopy() { release(); }

void Store::HeadCopy::release() noexcept {
  if (gpu_base_) cuda::host::unpin(base_);
  if (base_) ::munmap(base_, size_);
  base_ = gpu_base_ = nullptr;
  size_ = 0;
}

const uint8_t* Store::HeadCopy::gpu_tensor(size_t i) {
  if (!gpu_base_ && base_) gpu_base_ = static_cast<uint8_t*>(cuda::host::pin(base_, size_));
  return (gpu_base_ ? gpu_base_ : base_) + offsets_[i];
}

void crash_point(std::string_view point) {
  const char* at = std::getenv("LIVETRAIN_CHECKPOINT_CRASH_AT");  // read each time: set after fork in tests
  if (at && point == at) ::kill(::getpid(), SIGKILL);
}

std::string default_store_dir(const std::string& model_dir) {
  return fs::join(model_dir, std::string(kDefaultStoreDirName));
}

Store Store::create(const std::string& model_dir, const std::string& store_dir) {
  std::string dir = store_dir.empty() ? default_store_dir(model_dir) : store_dir;
  if (fs::exists(fs::join(dir, std::string(kCommitFileName)))) {
    throw Error(ErrorCode::kInvalidArg, "a checkpoint store already exists at " + dir);
  }
  if (!fs::is_directory(model_dir)) {
    throw Error(ErrorCode::kNotFound, "model directory " + model_dir + " does not exist or is not a directory");
  }
  safetensors::Model model = safetensors::Model::open(model_dir);
  Commit c;
  std::unordered_map<const safetensors::File*, uint32_t> file_index;
  for (const auto& shard : model.shards()) {
    if (fs::dirname(shard->path()) != fs::dirname(fs::join(model_dir, "x"))) {
      throw Error(ErrorCode::kUnsupported, shard->path() + ": model files must be inside " + model_dir);
    }
    file_index[shard.get()] = static_cast<uint32_t>(c.files.size());
    fs::Mapping map = fs::Mapping::open_readonly(shard->path());
    c.files.push_back(ModelFile{fs::basename(shard->path()), map.size(), content_hash(map.data(), map.size())});
  }
  for (const std::string& name : model.names()) {
    const auto& e = model.tensor(name);
    c.tensors.push_back(TensorEntry{name, e.info->dtype, e.info->shape, file_index.at(e.file),
                                    e.file->header().data_start() + e.info->begin, e.info->nbytes()});
  }
  Generation g0;
  g0.time_ms = now_ms();
  c.generations.push_back(g0);
  if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) throw io_error("create store directory " + dir);
  fs::fsync_dir(fs::dirname(dir));
  fs::write_file_atomic(fs::join(dir, std::string(kCommitFileName)), commit_serialize(c));
  return open(model_dir, dir);
}

Store Store::open(const std::string& model_dir, const std::string& store_dir, Progress progress) {
  Store s;
  s.model_dir_ = model_dir;
  s.dir_ = store_dir.empty() ? default_store_dir(model_dir) : store_dir;
  s.commit_ = commit_read(s.dir_);  // before the lock file is created: a missing store stays missing
  std::string lock_path = fs::join(s.dir_, "LOCK");
  s.lock_ = fs::Fd(::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644));
  if (!s.lock_.valid()) throw io_error("open " + lock_path);
  if (::flock(s.lock_.get(), LOCK_EX | LOCK_NB) != 0) {
    if (errno == EWOULDBLOCK) throw Error(ErrorCode::kBusy, "checkpoint store " + s.dir_ + " is in use by another process");
    throw io_error("lock " + lock_path);
  }
  s.commit_ = commit_read(s.dir_);  // again, under the lock
  s.recover_journal();
  s.remove_uncommitted();

  // Generation `materialized` from the model files, checked against the commit's hashes.
  const Commit& c = s.commit_;
  std::vector<fs::Mapping> maps;
  for (size_t i = 0; i < c.files.size(); ++i) {
    std::string path = fs::join(model_dir, c.files[i].name);
    if (!fs::exists(path)) throw Error(ErrorCode::kNotFound, "model file " + path + " named by the store is missing");
    maps.push_back(fs::Mapping::open_readonly(path));
    report(progress, "hash model files", i, c.files.size());
    uint64_t h = content_hash(maps.back().data(), maps.back().size());
    if (maps.back().size() != c.files[i].size || h != c.files[i].hash) {
      throw Error(ErrorCode::kFormat, "model file " + path + " does not match the checkpoint store (size " +
                                          std::to_string(maps.back().size()) + ", hash " + hash_hex(h) + "; expected " +
                                          std::to_string(c.files[i].size) + ", " + hash_hex(c.files[i].hash) +
                                          "): it was changed outside livetrain, or this is another model");
    }
  }
  s.head_ = HeadCopy(c.tensors);
  parallel_for(static_cast<int64_t>(c.tensors.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const TensorEntry& t = c.tensors[i];
      std::memcpy(s.head_.tensor(i), maps[t.file].data() + t.offset, t.nbytes);
    }
  });
  report(progress, "replay deltas", 0, c.head - c.materialized);
  std::vector<uint8_t*> ptrs;
  for (size_t i = 0; i < c.tensors.size(); ++i) ptrs.push_back(s.head_.tensor(i));
  s.xor_range(c.materialized, c.head, ptrs);
  return s;
}

void Store::close() {
  lock_ = fs::Fd();
  head_ = HeadCopy();
  diff_workspace_ = DiffWorkspace();  // the GPU diff's page-locked outputs
  broken_ = true;
}

void Store::check_usable() const {
  if (broken_) {
    throw Error(ErrorCode::kIo, "checkpoint store " + dir_ + ": an earlier commit failed part-way; reopen the store");
  }
}

void Store::check_live(const std::vector<LiveTensor>& live) const {
  std::unordered_map<std::string_view, const LiveTensor*> by_name;
  for (const auto& t : live) {
    if (!by_name.emplace(t.name, &t).second) throw Error(ErrorCode::kInvalidArg, "live tensor \"" + t.name + "\" given twice");
  }
  for (const auto& t : commit_.tensors) {
    auto it = by_name.find(t.name);
    if (it == by_name.end()) {
      throw Error(ErrorCode::kInvalidArg, "live weights have no tensor \"" + t.name + "\" (the store's model has it)");
    }
    const LiveTensor& l = *it->second;
    if (l.dtype != t.dtype || l.shape != t.shape) {
      throw Error(ErrorCode::kInvalidArg, "live tensor \"" + t.name + "\" is " + std::string(dtype_name(l.dtype)) + " " +
                                              shape_string(l.shape) + "; the store has " + std::string(dtype_name(t.dtype)) +
                                              " " + shape_string(t.shape));
    }
    if (!l.data && t.nbytes) throw Error(ErrorCode::kInvalidArg, "live tensor \"" + t.name + "\" has no data");
  }
  if (live.size() != commit_.tensors.size()) {
    for (const auto& l : live) {
      bool known = std::any_of(commit_.tensors.begin(), commit_.tensors.end(), [&](const auto& t) { return t.name == l.name; });
      if (!known) throw Error(ErrorCode::kInvalidArg, "live tensor \"" + l.name + "\" is not in the store's model");
    }
  }
}

// Live tensors in the order of the commit's tensor table.
static std::vector<uint8_t*> live_pointers(const Commit& c, const std::vector<LiveTensor>& live) {
  std::unordered_map<std::string_view, void*> by_name;
  for (const auto& l : live) by_name[l.name] = l.data;
  std::vector<uint8_t*> out;
  for (const auto& t : c.tensors) out.push_back(static_cast<uint8_t*>(by_name.at(t.name)));
  return out;
}

void Store::xor_generation(uint64_t g, const std::function<void(size_t, const DeltaRecord&)>& fn) {
  const Generation* gen = commit_.find(g);
  std::string path = fs::join(dir_, gen->delta);
  if (!fs::exists(path)) throw Error(ErrorCode::kNotFound, "delta file " + path + " of generation " + std::to_string(g) + " is missing");
  fs::Mapping map = fs::Mapping::open_readonly(path);
  if (map.size() < 8) throw Error(ErrorCode::kFormat, path + ": truncated delta file");
  uint64_t trailer;
  std::memcpy(&trailer, map.data() + map.size() - 8, 8);
  if (trailer != gen->delta_hash) {
    throw Error(ErrorCode::kFormat, path + ": checksum " + hash_hex(trailer) + " is not the committed " + hash_hex(gen->delta_hash));
  }
  std::unordered_map<std::string_view, size_t> index;
  for (size_t i = 0; i < commit_.tensors.size(); ++i) index[commit_.tensors[i].name] = i;
  // Parse (and so check every checksum) before changing anything, then apply.
  std::vector<std::pair<size_t, DeltaRecord>> recs;
  DeltaHeader h = delta_parse(map.data(), map.size(), path, [&](const DeltaRecord& r) {
    auto it = index.find(r.name);
    if (it == index.end()) throw Error(ErrorCode::kFormat, path + ": tensor \"" + std::string(r.name) + "\" is not in the store's model");
    const TensorEntry& t = commit_.tensors[it->second];
    if (r.dtype != t.dtype || r.units * r.unit != t.nbytes) {
      throw Error(ErrorCode::kFormat, path + ": tensor \"" + t.name + "\": record dtype/size does not match the model");
    }
    recs.emplace_back(it->second, r);
  });
  if (h.generation != g) throw Error(ErrorCode::kFormat, path + ": holds generation " + std::to_string(h.generation) + ", expected " + std::to_string(g));
  for (const auto& [i, r] : recs) fn(i, r);
}

void Store::xor_range(uint64_t a, uint64_t b, std::vector<uint8_t*>& bufs) {
  if (a > b) std::swap(a, b);
  for (uint64_t g = a + 1; g <= b; ++g) {
    xor_generation(g, [&](size_t i, const DeltaRecord& r) { apply_record(r, bufs[i], commit_.tensors[i].name); });
  }
}

std::vector<std::vector<uint8_t>> Store::state(uint64_t generation) {
  check_usable();
  if (!commit_.find(generation)) {
    throw Error(ErrorCode::kNotFound, "generation " + std::to_string(generation) + " is not in the store (it holds " +
                                          std::to_string(commit_.oldest) + ".." + std::to_string(commit_.head) + ")");
  }
  std::vector<std::vector<uint8_t>> bufs(commit_.tensors.size());
  std::vector<uint8_t*> ptrs;
  for (size_t i = 0; i < bufs.size(); ++i) {
    bufs[i].assign(head_.tensor(i), head_.tensor(i) + commit_.tensors[i].nbytes);
    ptrs.push_back(bufs[i].data());
  }
  xor_range(generation, commit_.head, ptrs);
  return bufs;
}

void Store::write_commit(const Commit& c) {
  std::string path = fs::join(dir_, std::string(kCommitFileName));
  try {
    fs::write_file_atomic(path, commit_serialize(c));
  } catch (...) {
    // If the rename happened (only the directory fsync failed), disk and memory now disagree.
    try {
      if (commit_read(dir_).head != commit_.head || commit_read(dir_).materialized != commit_.materialized) broken_ = true;
    } catch (...) {
      broken_ = true;
    }
    throw;
  }
}

SaveResult Store::save(const std::vector<LiveTensor>& live, const SaveOptions& options) {
  check_usable();
  check_live(live);
  const int device = live_device(live);
  std::vector<uint8_t*> now = live_pointers(commit_, live);
  const size_t n = commit_.tensors.size();
  SaveResult res;
  std::vector<DiffTensor> diff(n);
  if (device >= 0) cuda::host::set_device(device);
  for (size_t i = 0; i < n; ++i) {
    const TensorEntry& t = commit_.tensors[i];
    const uint32_t unit = unit_bytes(t.dtype);
    res.elements += t.nbytes / unit;
    res.model_bytes += t.nbytes;
    diff[i] = DiffTensor{now[i], device >= 0 ? head_.gpu_tensor(i) : head_.tensor(i), t.nbytes / unit, unit};
  }
  // The diff: bitmaps and the changed elements' XOR values, in host memory either way. The encoder runs
  // beside it (checkpoint.pipeline: it starts on the tensors the GPU diff has completed) or after it.
  report(options.progress, device >= 0 ? "diff on the GPU" : "diff", 0, n);
  using clock = std::chrono::steady_clock;
  auto seconds_since = [](clock::time_point t) { return std::chrono::duration<double>(clock::now() - t).count(); };
  auto t0 = clock::now();
  DiffOutput d;
  const bool pipeline = device >= 0 && tuning::get(tuning::kCheckpointPipeline) == 1;
  std::optional<RecordEncoder> encoder;
  if (pipeline) encoder.emplace(commit_.tensors, diff, d, options.progress);
  bool head_moved = false;  // the head copy already holds what this save records
  // The head copy follows the delta being written: the same bitmaps and values the file is encoded
  // from. It is updated by the GPU diff, or (CPU path) once encoded, and XORed back (deltas are
  // self-inverse) if the generation does not commit. Changed that way, it no longer matches the GPU
  // diff's digests of it.
  auto move_head = [&] {
    for (size_t i = 0; i < n; ++i) {
      if (d.changed[i]) xor_diff(head_.tensor(i), diff[i].units, diff[i].unit, d.bitmaps.data + d.bitmap_offset[i], d.values.data + d.value_offset[i]);
    }
    diff_workspace_.digests.reset();
    head_moved = !head_moved;
  };
  if (device >= 0) {
    if (!diff_workspace_.bitmaps.data) {
      // Page-lock the diff's outputs once, sized for a step that changes a quarter of the bytes.
      uint64_t bitmap_bytes = 0;
      for (const auto& t : diff) bitmap_bytes += (t.units + 31) / 32 * 4;
      diff_workspace_reserve(diff_workspace_, bitmap_bytes, res.model_bytes / 4);
    }
    // The kernel also moves the head copy to the recorded state (whole rows over PCIe, no CPU pass).
    try {
      delta_diff_cuda(diff, d, nullptr, &diff_workspace_, true, [&](size_t done, const uint8_t* b, const uint8_t* v) {
        if (encoder) encoder->ready(done, b, v);
      });
    } catch (...) {
      // Part of the head copy may have moved: it matches no generation any more.
      broken_ = true;
      diff_workspace_.digests.reset();
      throw;
    }
    head_moved = true;
  } else {
    delta_diff_cpu(diff, d);
  }
  res.diff_seconds = seconds_since(t0);
  uint32_t count = 0;
  for (size_t i = 0; i < n; ++i) {
    res.changed += d.changed[i];
    count += d.changed[i] ? 1 : 0;
  }
  if (res.changed == 0 && !options.save_if_unchanged) {
    if (encoder) res.encode_seconds = encoder->join();  // it had nothing to encode
    res.generation = commit_.head;
    return res;  // nothing changed: the head copy was not touched either
  }
  if (!encoder) {
    encoder.emplace(commit_.tensors, diff, d, options.progress);
    encoder->ready(n, d.bitmaps.data, d.values.data);
  }
  encoder->end_of_input();  // the diff is over: the encoder stops once it has encoded every tensor
  t0 = clock::now();
  const uint64_t g = commit_.head + 1;
  Generation gen;
  gen.generation = g;
  gen.parent = commit_.head;
  gen.time_ms = now_ms();
  gen.weight_version = options.weight_version;
  gen.delta = delta_file_name(g);
  gen.changed = res.changed;
  const std::string delta_path = fs::join(dir_, gen.delta);
  std::string optim_path;

  try {
    // Encoding and writing overlap: the encoder's thread encodes the records in order (each batch in
    // parallel over its blocks), this thread appends each finished record to the temporary file and
    // hashes it.
    fs::write_file_atomic(delta_path, [&](fs::Writer& w) {
      Xxh64Stream hash;
      try {
        const std::string header = delta_file_header(g, commit_.head, count);
        hash.update(header.data(), header.size());
        w.write(header);
        while (std::optional<std::string> part = encoder->records.pop()) {
          hash.update(part->data(), part->size());
          w.write(*part);
        }
      } catch (...) {
        encoder->abort();
        try {
          (void)encoder->join();
        } catch (...) {  // its own error, if any, is secondary to this one
        }
        throw;
      }
      res.encode_seconds = encoder->join();  // rethrows an encoding error (the records stopped early)
      t0 = encoder->finished_at;
      if (!head_moved) move_head();
      gen.delta_hash = hash.digest();
      w.write(&gen.delta_hash, 8);
      gen.bytes = w.bytes_written();
    });
  } catch (...) {
    encoder.reset();
    if (head_moved) move_head();
    throw;
  }
  crash_point("delta-written");
  try {
    if (!options.optimizer_state.empty()) {
      fs::Mapping m = fs::Mapping::open_readonly(options.optimizer_state);
      gen.optimizer_state = gen.delta.substr(0, gen.delta.size() - 6) + ".optim";
      optim_path = fs::join(dir_, gen.optimizer_state);
      fs::write_file_atomic(optim_path, std::string_view(reinterpret_cast<const char*>(m.data()), m.size()));
      gen.bytes += m.size();
    }
    Commit c = commit_;
    c.head = g;
    c.generations.push_back(gen);
    write_commit(c);
  } catch (...) {
    if (!broken_) {  // the commit did not happen: the new files are garbage, the head goes back
      ::unlink(delta_path.c_str());
      if (!optim_path.empty()) ::unlink(optim_path.c_str());
      move_head();
    }
    throw;
  }
  commit_.head = g;
  commit_.generations.push_back(gen);
  res.write_seconds = seconds_since(t0);
  res.written = true;
  res.generation = g;
  res.bytes = gen.bytes;
  return res;
}

void Store::restore_live(uint64_t generation, const std::vector<LiveTensor>& live) {
  check_usable();
  check_live(live);
  if (!commit_.find(generation)) (void)state(generation);  // throws the not-found error
  // Validate every delta on the way before touching the live weights.
  for (uint64_t g = std::min(generation, commit_.head) + 1; g <= commit_.head; ++g) xor_generation(g, [](size_t, const DeltaRecord&) {});
  std::vector<uint8_t*> ptrs = live_pointers(commit_, live);
  if (const int device = live_device(live); device >= 0) {
    // Staged in host memory (state() checks every delta on the way), then copied tensor by tensor.
    std::vector<std::vector<uint8_t>> bufs = state(generation);
    cuda::host::set_device(device);
    for (size_t i = 0; i < ptrs.size(); ++i) cuda::host::to_device(ptrs[i], bufs[i].data(), bufs[i].size());
    return;
  }
  for (size_t i = 0; i < ptrs.size(); ++i) std::memcpy(ptrs[i], head_.tensor(i), commit_.tensors[i].nbytes);
  xor_range(generation, commit_.head, ptrs);
}

LiveDiff Store::compare_live(uint64_t generation, const std::vector<LiveTensor>& live) {
  check_live(live);
  const int device = live_device(live);
  std::vector<std::vector<uint8_t>> other;
  if (generation != commit_.head) other = state(generation);
  std::vector<uint8_t*> ptrs = live_pointers(commit_, live);
  if (device >= 0) cuda::host::set_device(device);
  std::vector<uint8_t> staged;
  LiveDiff d;
  for (size_t i = 0; i < ptrs.size(); ++i) {
    const auto& t = commit_.tensors[i];
    const uint8_t* a = other.empty() ? head_.tensor(i) : other[i].data();
    const uint8_t* b = ptrs[i];
    if (device >= 0) {
      staged.resize(t.nbytes);
      cuda::host::to_host(staged.data(), ptrs[i], t.nbytes);
      b = staged.data();
    }
    if (std::memcmp(a, b, t.nbytes) == 0) continue;
    uint32_t u = unit_bytes(t.dtype);
    uint64_t diff = 0;
    for (uint64_t k = 0; k < t.nbytes / u; ++k) diff += std::memcmp(a + k * u, b + k * u, u) != 0;
    if (d.tensors++ == 0) d.first = t.name;
    d.elements += diff;
  }
  return d;
}

void Store::restore_to_dir(uint64_t generation, const std::string& out_dir) {
  std::vector<std::vector<uint8_t>> bufs = state(generation);
  if (::mkdir(out_dir.c_str(), 0755) != 0 && errno != EEXIST) throw io_error("create directory " + out_dir);
  for (uint32_t f = 0; f < commit_.files.size(); ++f) {
    const std::string& name = commit_.files[f].name;
    safetensors::File orig = safetensors::File::open(fs::join(model_dir_, name));
    std::vector<safetensors::TensorRef> refs;
    for (size_t i = 0; i < commit_.tensors.size(); ++i) {
      const TensorEntry& t = commit_.tensors[i];
      if (t.file == f) refs.push_back(safetensors::TensorRef{t.name, t.dtype, t.shape, bufs[i].data(), t.nbytes});
    }
    safetensors::WriteOptions opt;
    opt.metadata = orig.header().metadata;
    safetensors::write_file(fs::join(out_dir, name), refs, opt);
  }
  // The index (if any) last: it commits the set, as in safetensors::write_model.
  std::string index = fs::join(model_dir_, std::string(safetensors::kIndexFileName));
  if (fs::exists(index)) fs::write_file_atomic(fs::join(out_dir, std::string(safetensors::kIndexFileName)), fs::read_file(index));
}

std::vector<std::string> Store::verify(Progress progress) {
  std::vector<std::string> problems;
  for (uint64_t g = commit_.oldest + 1; g <= commit_.head; ++g) {
    report(progress, "check deltas", g - commit_.oldest, commit_.head - commit_.oldest);
    try {
      xor_generation(g, [](size_t, const DeltaRecord&) {});
    } catch (const Error& e) {
      problems.push_back(e.what());
    }
    const Generation* gen = commit_.find(g);
    if (!gen->optimizer_state.empty() && !fs::exists(fs::join(dir_, gen->optimizer_state))) {
      problems.push_back("optimizer state " + fs::join(dir_, gen->optimizer_state) + " is missing");
    }
  }
  for (size_t i = 0; i < commit_.files.size(); ++i) {
    report(progress, "hash model files", i, commit_.files.size());
    std::string path = fs::join(model_dir_, commit_.files[i].name);
    try {
      fs::Mapping m = fs::Mapping::open_readonly(path);
      uint64_t h = content_hash(m.data(), m.size());
      if (h != commit_.files[i].hash || m.size() != commit_.files[i].size) {
        problems.push_back("model file " + path + " does not match the store (hash " + hash_hex(h) + ", expected " +
                           hash_hex(commit_.files[i].hash) + ")");
      }
    } catch (const Error& e) {
      problems.push_back(e.what());
    }
  }
  return problems;
}

void Store::remove_uncommitted() {
  std::set<std::string> named = {std::string(kCommitFileName), "LOCK", std::string(kJournalFileName)};
  for (const auto& g : commit_.generations) {
    if (!g.delta.empty()) named.insert(g.delta);
    if (!g.optimizer_state.empty()) named.insert(g.optimizer_state);
  }
  DIR* d = ::opendir(dir_.c_str());
  if (!d) throw io_error("open directory " + dir_);
  std::vector<std::string> doomed;
  while (dirent* e = ::readdir(d)) {
    std::string name = e->d_name;
    bool ours = fs::is_atomic_temp_name(name) || name.rfind("gen-", 0) == 0;
    if (ours && !named.count(name)) doomed.push_back(name);
  }
  ::closedir(d);
  for (const auto& name : doomed) ::unlink(fs::join(dir_, name).c_str());
  if (!doomed.empty()) fs::fsync_dir(dir_);
}

void Store::gc(uint64_t keep_from, Progress progress) {
  check_usable();
  if (!commit_.find(keep_from)) (void)state(keep_from);  // throws the not-found error
  if (keep_from == commit_.oldest) return;
  if (commit_.materialized < keep_from) materialize(keep_from, false, progress);
  Commit c = commit_;
  std::vector<std::string> dropped;
  for (const auto& g : c.generations) {
    if (g.generation <= keep_from && !g.delta.empty()) dropped.push_back(g.delta);
    if (g.generation < keep_from && !g.optimizer_state.empty()) dropped.push_back(g.optimizer_state);
  }
  c.generations.erase(c.generations.begin(), c.generations.begin() + static_cast<long>(keep_from - c.oldest));
  c.generations.front().delta.clear();  // the new base: reached through the model files, not a delta
  c.oldest = keep_from;
  write_commit(c);
  commit_ = c;
  for (const auto& name : dropped) ::unlink(fs::join(dir_, name).c_str());
  fs::fsync_dir(dir_);
}

}  // namespace livetrain::checkpoint
