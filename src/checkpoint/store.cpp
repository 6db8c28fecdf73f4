// The checkpoint store: create/open (lock, recovery, loading the head into host memory), save, restore,
// compare, verify and gc. Materialization and its journal are in materialize.cpp.
#include <dirent.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <filesystem>
#include <future>
#include <mutex>
#include <optional>
#include <set>
#include <system_error>
#include <thread>
#include <unordered_map>

#include "cuda/host.hpp"
#include "livetrain/checkpoint/commit.hpp"
#include "livetrain/checkpoint/convert.hpp"
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

// Whether `name` is one the store writes for a generation: gen-<20 digits>.delta or .optim, or
// gen-<20 digits>.rank-<r>-of-<n>.delta or .optim. Only those (and livetrain's temporaries) are removed as
// uncommitted: a store opened in a directory that holds other files (--store DIR) leaves them alone.
bool generation_file_name(std::string_view name) {
  auto digits = [&name](size_t min, size_t max) {
    size_t n = 0;
    while (n < name.size() && n < max && name[n] >= '0' && name[n] <= '9') ++n;
    if (n < min) return false;
    name.remove_prefix(n);
    return true;
  };
  auto literal = [&name](std::string_view s) {
    if (name.substr(0, s.size()) != s) return false;
    name.remove_prefix(s.size());
    return true;
  };
  if (!literal("gen-") || !digits(20, 20)) return false;
  if (literal(".rank-") && !(digits(1, 10) && literal("-of-") && digits(1, 10))) return false;
  return name == ".delta" || name == ".optim";
}

// Files leave the store (gc, uncommitted files, parts not committed) only by remove_generation_file, and only
// under names the store writes for generations or its temporaries: anything else (COMMIT, LOCK, a model file,
// a user's file beside a --store DIR) is refused naming it, whatever COMMIT or a descriptor says.
void check_removable(const std::string& dir, const std::string& name) {
  if (!generation_file_name(name) && !fs::is_atomic_temp_name(name)) {
    throw Error(ErrorCode::kInvalidArg, "checkpoint store " + dir + ": refusing to remove \"" + name +
                                            "\": not a file the store writes (gen-<20 digits>[.rank-<r>-of-<n>]" +
                                            ".delta or .optim)");
  }
}

void remove_generation_file(const std::string& dir, const std::string& name) {
  check_removable(dir, name);
  ::unlink(fs::join(dir, name).c_str());
}

int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// The dtypes COMMIT records each tensor's generations in (commit order).
std::vector<DType> recorded_dtypes(const Commit& c) {
  std::vector<DType> out;
  for (const TensorEntry& t : c.tensors) out.push_back(t.served);
  return out;
}

// C's tensors by name: their index in commit order (the keys are C's names: C outlives the map).
std::unordered_map<std::string_view, size_t> tensor_index(const Commit& c) {
  std::unordered_map<std::string_view, size_t> index;
  for (size_t i = 0; i < c.tensors.size(); ++i) index[c.tensors[i].name] = i;
  return index;
}

// The index (in commit order; INDEX is tensor_index(C)) of the tensor NAME that WHO (the engine, a rank)
// serves as DTYPE, checked: a tensor of the store DIR's model whose files' dtype converts to DTYPE
// (served_conversion_refusal). Every served dtype a store takes (set_served, OpenOptions::served and
// serve_as, a rank's part) passes here.
size_t served_tensor(const std::unordered_map<std::string_view, size_t>& index, const Commit& c,
                     const std::string& name, DType dtype, const std::string& dir, const std::string& who) {
  auto it = index.find(name);
  if (it == index.end()) {
    throw Error(ErrorCode::kInvalidArg, "tensor \"" + name + "\", served by " + who +
                                            ", is not in the checkpoint store's model (" + dir +
                                            "): the store was made from other files, or " + who +
                                            " names its tensors differently from the model files");
  }
  const TensorEntry& t = c.tensors[it->second];
  if (std::string why = served_conversion_refusal(t.dtype, dtype); !why.empty()) {
    throw Error(ErrorCode::kUnsupported, "tensor \"" + name + "\" is " + std::string(dtype_name(t.dtype)) +
                                             " in the model files and served as " + std::string(dtype_name(dtype)) +
                                             " by " + who + "; the checkpoint store " + dir +
                                             " cannot keep it: " + why);
  }
  return it->second;
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
// unless checkpoint.pipeline); finished records wait in `records` for the writer. `kinds` holds one record
// per diffed tensor or region (name, dtype, units, region) for the encoder to complete with the diff's
// counts, bitmaps and values: a save's whole tensors and a save_part's regions go the same way. Records are encoded in
// batches of whole tensors with enough blocks between them to keep every CPU thread busy, or fewer when
// the diff has not completed more.
class RecordEncoder {
 public:
  RecordEncoder(std::vector<RecordParts> kinds, const DiffOutput& d, const Progress& progress)
      : sums_in_writer(tuning::get(tuning::kCheckpointEncoder) >= 2),
        kinds_(std::move(kinds)),
        d_(d),
        progress_(progress),
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
  // After join: the time the thread waited for the diff's tensors, and what its chunks used.
  double wait_seconds() const { return wait_seconds_; }
  Usage usage() const { return account_.total(); }

  PartQueue records;
  std::chrono::steady_clock::time_point finished_at;  // when the last record was encoded (valid after join)
  // checkpoint.encoder >= 2: the records come without their checksums, each followed by an empty part where
  // the writer puts it (RecordSums): it hashes every byte anyway, on its own thread, while this one goes on
  // with the next batch instead of hashing each record with one thread per record.
  const bool sums_in_writer;

 private:
  void run() {
    name_this_thread("lt-encode");
    const auto started = std::chrono::steady_clock::now();
    UsageScope scope(&account_);
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
      wait_seconds_ = std::chrono::duration<double>(finished_at - started).count() - busy_seconds_;
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
        RecordParts r = kinds_[i];
        r.changed = d_.changed[i];
        r.bitmap = bitmaps + d_.bitmap_offset[i];
        r.values = values + d_.value_offset[i];
        batch.push_back(std::move(r));
        blocks += (kinds_[i].units + kBlockUnits - 1) / kBlockUnits;
      }
      if (!batch.empty() && (blocks >= batch_blocks_ || i + 1 == end)) {
        report(progress_, "encode and write", i + 1, kinds_.size());
        std::vector<std::vector<std::string>> recs;
        encode_records(batch, recs, !sums_in_writer);
        for (auto& rec : recs) {
          for (auto& piece : rec) records.push(std::move(piece));
          if (sums_in_writer && !rec.empty()) records.push(std::string());
        }
        batch.clear();
        blocks = 0;
      }
    }
  }

  const std::vector<RecordParts> kinds_;
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
  double busy_seconds_ = 0, wait_seconds_ = 0;
  UsageAccount account_;
  std::thread thread_;  // last: starts once everything above is initialized
};

// The bytes a writer appends for each part of the encoder's: the part itself, or in place of an end-of-record
// mark (an empty part, RecordEncoder::sums_in_writer) the record's checksum, the XXH64 of its parts.
class RecordSums {
 public:
  explicit RecordSums(bool active) : active_(active) {}
  std::string bytes(std::string part) {
    if (!active_) return part;
    if (!part.empty()) {
      sum_.update(part.data(), part.size());
      return part;
    }
    const uint64_t s = sum_.digest();
    sum_ = Xxh64Stream();
    return std::string(reinterpret_cast<const char*>(&s), 8);  // little-endian host (bytes.hpp)
  }

 private:
  const bool active_;
  Xxh64Stream sum_;
};

// checkpoint.early_writer: writes a save's delta file on its own thread from the first encoded record on,
// while the diff may still run. The records go to the file as they come; the file's hash starts with the
// header and so with the record count, which the diff gives only when it is over: the records written
// before are held (the encoder made them anyway) and hashed as they come behind the header of a guessed
// count, `guess` (every tensor changed: a dense step); if the count turns out to be another, they are hashed
// again behind the right header once it is known (what all of them took before the guess: the whole delta,
// ~0.06 s per 700 MB on one thread, after the diff). The later ones are hashed as they come. The header is
// written last over a placeholder of its size. No record at all: no file.
class EarlyWriter {
 public:
  EarlyWriter(std::string path, const std::function<std::string(uint32_t)>& header, uint32_t guess)
      : path_(std::move(path)),
        header_(header),
        guess_(guess),
        count_(count_promise_.get_future().share()),
        verdict_(verdict_promise_.get_future().share()) {}
  ~EarlyWriter() {
    if (thread_.joinable())
      cancel(encoder_, std::make_exception_ptr(Error(ErrorCode::kIo, "checkpoint: save abandoned")));
  }
  EarlyWriter(const EarlyWriter&) = delete;
  EarlyWriter& operator=(const EarlyWriter&) = delete;

  void start(RecordEncoder& encoder) {
    encoder_ = &encoder;
    thread_ = std::thread([this, &encoder] {
      name_this_thread("lt-write");
      run(encoder);
    });
  }
  // The diff is over with `count` records: waits for the encoder, then for the file (durable on return
  // when wrote()). Rethrows the encoding's error, else the writer's.
  void finish(RecordEncoder& encoder, uint32_t count) {
    count_promise_.set_value(count);
    count_set_ = true;
    try {
      encode_seconds = encoder.join();
      encoded_at = encoder.finished_at;
    } catch (...) {
      settle(std::current_exception());
      thread_.join();
      throw;
    }
    verdict_promise_.set_value();
    verdict_set_ = true;
    thread_.join();
    if (error_) std::rethrow_exception(error_);
  }
  // The diff failed: stops the encoder (when there is one) and the writer, whose temporary file goes.
  void cancel(RecordEncoder* encoder, std::exception_ptr why) {
    if (encoder) encoder->abort();
    settle(why);
    if (thread_.joinable()) thread_.join();
  }
  bool wrote() const { return wrote_; }

  uint64_t hash = 0, bytes = 0;
  double encode_seconds = 0;
  std::chrono::steady_clock::time_point encoded_at, filled_at;

 private:
  void settle(std::exception_ptr why) {
    if (!count_set_) count_promise_.set_exception(why);
    if (!verdict_set_) verdict_promise_.set_exception(why);
    count_set_ = verdict_set_ = true;
  }
  void run(RecordEncoder& encoder) {
    try {
      std::optional<std::string> first = encoder.records.pop();
      if (!first) return;  // nothing changed, or the save failed before any record
      fs::write_file_atomic(path_, [&](fs::Writer& fw) {
        fw.set_writeback(static_cast<uint64_t>(tuning::get(tuning::kCheckpointWritebackMib)) << 20);
        fw.write_zeros(header_(0).size());  // the header's size does not depend on the count
        Xxh64Stream sum, guessed;           // the file's hash once the count is known; the hash were it `guess_`
        const std::string guessed_head = header_(guess_);
        guessed.update(guessed_head.data(), guessed_head.size());
        std::string head;
        std::vector<std::string> held;
        auto hash_from_head = [&](uint32_t count) {
          head = header_(count);
          if (count == guess_) {
            sum = guessed;
          } else {
            sum.update(head.data(), head.size());
            for (const std::string& p : held) sum.update(p.data(), p.size());
          }
          held.clear();
        };
        auto take = [&](std::string part) {
          fw.write(part);
          if (head.empty() && count_.wait_for(std::chrono::seconds(0)) == std::future_status::ready)
            hash_from_head(count_.get());
          if (head.empty()) {
            guessed.update(part.data(), part.size());
            held.push_back(std::move(part));
          } else {
            sum.update(part.data(), part.size());
          }
        };
        RecordSums sums(encoder.sums_in_writer);
        take(sums.bytes(std::move(*first)));
        while (std::optional<std::string> part = encoder.records.pop()) take(sums.bytes(std::move(*part)));
        verdict_.get();  // the encoding's error, if any: the file is abandoned
        if (head.empty()) hash_from_head(count_.get());
        fw.write_at(0, head.data(), head.size());
        hash = sum.digest();
        fw.write(&hash, 8);
        bytes = fw.bytes_written();
        filled_at = std::chrono::steady_clock::now();
      });
      wrote_ = true;
    } catch (...) {
      error_ = std::current_exception();
      encoder.abort();  // no one takes its records any more
    }
  }

  const std::string path_;
  const std::function<std::string(uint32_t)>& header_;
  const uint32_t guess_;
  std::promise<uint32_t> count_promise_;
  std::promise<void> verdict_promise_;
  std::shared_future<uint32_t> count_;
  std::shared_future<void> verdict_;
  bool count_set_ = false, verdict_set_ = false;  // the calling thread's
  bool wrote_ = false;
  std::exception_ptr error_;
  RecordEncoder* encoder_ = nullptr;
  std::thread thread_;
};

// The GPU diff's page-locked outputs, as the first GPU save reserves them (prepare_gpu ahead of it, or the save
// itself): a tensor's bitmap in 32-bit words, and values for a step that changes a quarter of the bytes.
uint64_t diff_bitmap_bytes(uint64_t units) { return (units + 31) / 32 * 4; }
uint64_t diff_values_bytes(uint64_t model_bytes) { return model_bytes / 4; }

}  // namespace

Store::HeadCopy::HeadCopy(const std::vector<uint64_t>& sizes) {
  // Each entry starts on a page, so that prepare_gpu can page-lock the copy in registrations of whole entries
  // (a DMA copy of the GPU diff lies in one entry, and so in one registration).
  const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  for (uint64_t n : sizes) {
    size_ = (size_ + page - 1) / page * page;
    offsets_.push_back(size_);
    size_ += n;
  }
  if (size_ == 0) return;
  void* p = ::mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED)
    throw io_error("allocate " + std::to_string(size_) + " bytes for the checkpoint store's head copy");
  ::madvise(p, size_, MADV_HUGEPAGE);  // fewer TLB misses on scans; a hint only
  base_ = static_cast<uint8_t*>(p);
}

// A move carries a pin_async thread along: it works on the mapping, whose address does not move.
Store::HeadCopy::HeadCopy(HeadCopy&& o) noexcept
    : base_(o.base_),
      size_(o.size_),
      offsets_(std::move(o.offsets_)),
      chunks_(std::move(o.chunks_)),
      pinning_(std::move(o.pinning_)),
      pin_running_(std::move(o.pin_running_)),
      reserved_(std::move(o.reserved_)) {
  o.base_ = nullptr;
  o.size_ = 0;
}

Store::HeadCopy& Store::HeadCopy::operator=(HeadCopy&& o) noexcept {
  if (this != &o) {
    release();
    base_ = o.base_;
    size_ = o.size_;
    offsets_ = std::move(o.offsets_);
    chunks_ = std::move(o.chunks_);
    pinning_ = std::move(o.pinning_);
    pin_running_ = std::move(o.pin_running_);
    reserved_ = std::move(o.reserved_);
    o.base_ = nullptr;
    o.size_ = 0;
  }
  return *this;
}

Store::HeadCopy::~HeadCopy() { release(); }

void Store::HeadCopy::settle() noexcept {
  if (!pinning_.valid()) return;
  try {
    Pinned p = pinning_.get();
    chunks_ = std::move(p.chunks);
    reserved_ = std::move(p.reserved);
  } catch (...) {  // nothing page-locked: gpu_tensor does it (and reports what fails)
  }
}

void Store::HeadCopy::release() noexcept {
  settle();  // before the copy it page-locks goes
  reserved_ = DiffWorkspace();
  for (void* c : chunks_) cuda::host::unpin(c);
  chunks_.clear();
  if (base_) ::munmap(base_, size_);
  base_ = nullptr;
  size_ = 0;
}

void Store::HeadCopy::pin_async(int device, size_t chunk, size_t bitmap_bytes, size_t value_bytes) {
  if (!chunks_.empty() || pinning_.valid() || !base_) return;
  uint8_t* const base = base_;
  // Registrations of whole entries, each of at least `chunk` bytes unless it is the last.
  std::vector<std::pair<void*, size_t>> ranges;
  size_t start = 0;
  for (size_t i = 1; i <= offsets_.size(); ++i) {
    const size_t end = i < offsets_.size() ? offsets_[i] : size_;
    if (end - start >= chunk || i == offsets_.size()) {
      if (end > start) ranges.emplace_back(base + start, end - start);
      start = end;
    }
  }
  auto running = std::make_shared<std::atomic<bool>>(true);
  pinning_ = std::async(std::launch::async, [=] {
    struct Ended {  // however the thread ends
      std::atomic<bool>& running;
      ~Ended() { running.store(false, std::memory_order_release); }
    } ended{*running};
    cuda::host::set_device(device);
    Pinned p;
    p.chunks = cuda::host::pin_ranges(ranges);
    try {
      diff_workspace_reserve_registered(p.reserved, bitmap_bytes, value_bytes);
    } catch (...) {  // the copy stays page-locked; the first save reserves the outputs itself
      p.reserved = DiffWorkspace();
    }
    return p;
  });
  pin_running_ = std::move(running);  // not before: a thread that did not start would never clear it
}

const uint8_t* Store::HeadCopy::gpu_tensor(size_t i) {
  settle();
  if (chunks_.empty() && base_) chunks_ = cuda::host::pin_ranges({{base_, size_}});
  return base_ + offsets_[i];
}

void crash_point(std::string_view point) {
  const char* at = std::getenv("LIVETRAIN_CHECKPOINT_CRASH_AT");  // read each time: set after fork in tests
  if (at && point == at) ::kill(::getpid(), SIGKILL);
}

std::string default_store_dir(const std::string& model_dir) {
  return fs::join(model_dir, std::string(kDefaultStoreDirName));
}

Store Store::create(const std::string& model_dir, const std::string& store_dir) {
  return create(model_dir, store_dir, OpenOptions{});
}

namespace {

std::string lock_file_name(uint32_t rank) { return rank == 0 ? "LOCK" : "LOCK-rank-" + std::to_string(rank); }

// The store's lock file for `rank`, flock()ed exclusively: held by whoever writes the store (rank 0's LOCK
// also while the store is created), so that one process at a time does.
fs::Fd lock_store(const std::string& dir, uint32_t rank) {
  std::string lock_path = fs::join(dir, lock_file_name(rank));
  fs::Fd lock(::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644));
  if (!lock.valid() && (errno == EROFS || errno == EACCES)) {
    // A store this process may only read (read-only media, another user's): its LOCK, when there, still
    // keeps a writer out (flock needs no write access); whatever would write fails later, naming its file.
    const int err = errno;
    lock = fs::Fd(::open(lock_path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!lock.valid()) throw io_error("open " + lock_path, err);
  }
  if (!lock.valid()) throw io_error("open " + lock_path);
  if (::flock(lock.get(), LOCK_EX | LOCK_NB) != 0) {
    if (errno == EWOULDBLOCK) {
      throw Error(ErrorCode::kBusy, "checkpoint store " + dir + " is in use by another process" +
                                        (rank ? " as rank " + std::to_string(rank) : std::string()));
    }
    throw io_error("lock " + lock_path);
  }
  return lock;
}

}  // namespace

Store Store::create(const std::string& model_dir, const std::string& store_dir, const OpenOptions& options) {
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
                                    e.file->header().data_start() + e.info->begin, e.info->nbytes(), e.info->dtype});
  }
  Generation g0;
  g0.time_ms = now_ms();
  c.generations.push_back(g0);
  if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) throw io_error("create store directory " + dir);
  fs::fsync_dir(fs::dirname(dir));
  {
    // Under the LOCK: of two processes creating the store at once (two first saves), one writes COMMIT and
    // the other finds it there, instead of replacing a COMMIT that may already name generation 1.
    fs::Fd lock = lock_store(dir, 0);
    if (fs::exists(fs::join(dir, std::string(kCommitFileName)))) {
      throw Error(ErrorCode::kInvalidArg, "a checkpoint store already exists at " + dir);
    }
    fs::write_file_atomic(fs::join(dir, std::string(kCommitFileName)), commit_serialize(c));
  }  // released: open takes it again (a lock of another open file, which this one's would block)
  return open(model_dir, dir, options);
}

namespace {

// How the model files' tensor table differs from the one the store was created from: the first tensor
// that differs (name, dtype, shape or place), or an empty string when the tables agree.
std::string first_differing_tensor(const std::string& model_dir, const Commit& c) {
  try {
    safetensors::Model m = safetensors::Model::open(model_dir);
    std::vector<std::string> names = m.names();
    for (size_t i = 0; i < c.tensors.size() || i < names.size(); ++i) {
      if (i >= names.size()) return "tensor \"" + c.tensors[i].name + "\" is in the store but not in the model files";
      const auto& e = m.tensor(names[i]);
      if (i >= c.tensors.size() || names[i] != c.tensors[i].name) {
        return "tensor \"" + names[i] + "\" is in the model files but not in the store" +
               (i < c.tensors.size() ? " (which has \"" + c.tensors[i].name + "\" there)" : std::string());
      }
      const TensorEntry& t = c.tensors[i];
      if (e.info->dtype != t.dtype || e.info->shape != t.shape) {
        return "tensor \"" + t.name + "\" is " + std::string(dtype_name(e.info->dtype)) + " " +
               shape_string(e.info->shape) + " in the model files, " + std::string(dtype_name(t.dtype)) + " " +
               shape_string(t.shape) + " in the store";
      }
    }
    for (const TensorEntry& t : c.tensors) {  // same tensors: did one move to another file or offset?
      const auto& e = m.tensor(t.name);
      if (fs::basename(e.file->path()) != c.files[t.file].name ||
          e.file->header().data_start() + e.info->begin != t.offset) {
        return "tensor \"" + t.name + "\" moved within the model files";
      }
    }
  } catch (const Error& e) {
    return std::string("the model files do not load: ") + e.what();
  }
  return "";
}

// The number of the generation a save writes after `c`'s head.
uint64_t next_generation(const Commit& c, const std::string& dir) {
  if (c.head >= kMaxGeneration) {
    throw Error(ErrorCode::kOverflow, "checkpoint store " + dir + ": its head is generation " + std::to_string(c.head) +
                                          ", the largest there can be; nothing more can be saved");
  }
  return c.head + 1;
}

// Region `r` of a tensor of `shape`, normalized (an empty start means the whole tensor).
Region normalized(const Region& r, const std::vector<uint64_t>& shape) {
  return r.start.empty() && r.shape.empty() ? whole_region(shape) : r;
}

}  // namespace

Store Store::open(const std::string& model_dir, const std::string& store_dir, Progress progress) {
  OpenOptions o;
  o.progress = std::move(progress);
  return open(model_dir, store_dir, o);
}

Store Store::open(const std::string& model_dir, const std::string& store_dir, const OpenOptions& o) {
  if (o.ranks == 0 || o.ranks > kMaxRanks || o.rank >= o.ranks) {
    throw Error(ErrorCode::kInvalidArg,
                "checkpoint store: rank " + std::to_string(o.rank) + " of " + std::to_string(o.ranks) +
                    " is not a tensor-parallel rank (need rank < ranks <= " + std::to_string(kMaxRanks) + ")");
  }
  Store s;
  s.model_dir_ = model_dir;
  s.dir_ = store_dir.empty() ? default_store_dir(model_dir) : store_dir;
  s.rank_ = o.rank;
  s.ranks_ = o.ranks;
  s.group_ = o.group;
  s.commit_ = commit_read(s.dir_);  // before the lock file is created: a missing store stays missing
  s.lock_ = lock_store(s.dir_, o.rank);
  const std::string journal = fs::join(s.dir_, std::string(kJournalFileName));
  // Generation `materialized` from the model files, checked against the commit's hashes. Rank 0 owns
  // recovery; another rank waits until no journal is left, and rereads COMMIT if it changed meanwhile.
  std::vector<fs::Mapping> maps;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  const std::string commit_path = fs::join(s.dir_, std::string(kCommitFileName));
  for (;;) {
    const std::string text = fs::read_file(commit_path);  // again, under the lock
    s.commit_ = commit_parse(text, commit_path);
    if (o.rank == 0) {
      s.recover_journal();
      s.remove_uncommitted();
    } else if (fs::exists(journal)) {
      if (std::chrono::steady_clock::now() > deadline) {
        throw Error(ErrorCode::kBusy, "checkpoint store " + s.dir_ +
                                          ": a materialize journal is pending; rank 0 finishes it "
                                          "when it opens the store (open rank 0 first)");
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      continue;
    }
    const Commit& c = s.commit_;
    maps.clear();
    std::string mismatch;
    for (size_t i = 0; i < c.files.size() && mismatch.empty(); ++i) {
      std::string path = fs::join(model_dir, c.files[i].name);
      if (!fs::exists(path)) throw Error(ErrorCode::kNotFound, "model file " + path + " named by the store is missing");
      maps.push_back(fs::Mapping::open_readonly(path));
      report(o.progress, "hash model files", i, c.files.size());
      uint64_t h = content_hash(maps.back().data(), maps.back().size());
      if (maps.back().size() != c.files[i].size || h != c.files[i].hash) {
        mismatch = "model file " + path + " does not match the checkpoint store (size " +
                   std::to_string(maps.back().size()) + ", hash " + hash_hex(h) + "; expected " +
                   std::to_string(c.files[i].size) + ", " + hash_hex(c.files[i].hash) +
                   "): it was changed outside livetrain, or this is another model";
      }
    }
    if (mismatch.empty()) break;
    if (o.rank != 0 && std::chrono::steady_clock::now() < deadline &&
        (fs::exists(journal) || fs::read_file(commit_path) != text)) {
      continue;  // rank 0 is finishing a materialize: read again once it is done
    }
    std::string first = first_differing_tensor(model_dir, c);
    throw Error(ErrorCode::kFormat, mismatch + (first.empty() ? "" : "; " + first));
  }

  const Commit& c = s.commit_;
  s.served_options_ = o.served;
  s.set_served_dtypes();
  // The held regions, in commit order; overlapping ones would be saved twice.
  const auto index = tensor_index(c);
  if (!o.held) {
    for (size_t i = 0; i < c.tensors.size(); ++i)
      s.held_.push_back(Held{i, whole_region(c.tensors[i].shape), s.served_nbytes(i)});
  } else {
    for (const HeldRegion& h : *o.held) {
      auto it = index.find(h.name);
      if (it == index.end()) {
        throw Error(ErrorCode::kInvalidArg,
                    "held tensor \"" + h.name + "\" is not in the checkpoint store's model (" + s.dir_ + ")");
      }
      const TensorEntry& t = c.tensors[it->second];
      Region r = normalized(h.region, t.shape);
      check_region(r, t.shape, "held tensor \"" + h.name + "\"");
      for (const Held& other : s.held_) {
        if (other.tensor == it->second && region_intersect(other.region, r)) {
          throw Error(ErrorCode::kInvalidArg, "held tensor \"" + h.name + "\": regions " + region_string(other.region) +
                                                  " and " + region_string(r) + " overlap");
        }
      }
      s.held_.push_back(Held{it->second, r, region_units(r) * unit_bytes(s.served_[it->second])});
    }
    std::stable_sort(s.held_.begin(), s.held_.end(), [](const Held& a, const Held& b) {
      return a.tensor != b.tensor ? a.tensor < b.tensor : a.region.start < b.region.start;
    });
  }
  std::vector<uint64_t> sizes;
  for (const Held& h : s.held_) sizes.push_back(h.nbytes);
  s.head_ = HeadCopy(sizes);
  std::vector<Target> targets;
  for (size_t i = 0; i < s.held_.size(); ++i)
    targets.push_back(Target{s.held_[i].tensor, s.held_[i].region, s.head_.tensor(i)});
  report(o.progress, "replay deltas", 0, c.head - c.materialized);
  s.fill(c.head, targets);  // from the model files: the head copy is not valid yet
  s.head_generation_ = c.head;
  s.head_valid_ = true;
  return s;
}

void Store::prepare_gpu(int device) {
  if (device < 0)
    throw Error(ErrorCode::kInvalidArg, "checkpoint: prepare_gpu: no CUDA device " + std::to_string(device));
  // The outputs the first GPU save would reserve (write_delta), for every held tensor.
  uint64_t bitmap_bytes = 0, model_bytes = 0;
  for (const Held& h : held_) {
    bitmap_bytes += diff_bitmap_bytes(h.nbytes / unit_bytes(served_[h.tensor]));
    model_bytes += h.nbytes;
  }
  head_.pin_async(device, static_cast<size_t>(tuning::get(tuning::kCheckpointPinChunkMib)) << 20, bitmap_bytes,
                  diff_values_bytes(model_bytes));
}

void Store::close() {
  lock_ = fs::Fd();
  head_ = HeadCopy();
  diff_workspace_ = DiffWorkspace();  // the GPU diff's page-locked outputs
  pending_.reset();
  broken_ = true;
}

void Store::discard_new(bool remove_dir) {
  require_rank0("discard_new");
  if (commit_.head != 0 || commit_.oldest != 0 || !commit_.generations[0].parts.empty()) {
    throw Error(ErrorCode::kInvalidArg, "checkpoint store " + dir_ + " holds generations up to " +
                                            std::to_string(commit_.head) + ": it is not removed");
  }
  const std::string commit = fs::join(dir_, std::string(kCommitFileName));
  if (::unlink(commit.c_str()) != 0) throw io_error("remove " + commit);
  fs::fsync_dir(dir_);
  ::unlink(fs::join(dir_, lock_file_name(0)).c_str());
  close();
  if (remove_dir) ::rmdir(dir_.c_str());  // fails, keeping it, when anything else is in it
}

void Store::check_usable() const {
  if (broken_) {
    throw Error(ErrorCode::kIo, "checkpoint store " + dir_ + ": an earlier commit failed part-way; reopen the store");
  }
}

long Store::held_index(size_t tensor, const Region& region) const {
  // held_ is sorted by tensor: binary search for the tensor's first entry.
  auto it = std::lower_bound(held_.begin(), held_.end(), tensor, [](const Held& h, size_t t) { return h.tensor < t; });
  for (; it != held_.end() && it->tensor == tensor; ++it) {
    if (it->region == region) return static_cast<long>(it - held_.begin());
  }
  return -1;
}

std::vector<Store::Checked> Store::check_live(const std::vector<LiveTensor>& live, bool for_save) const {
  const auto index = tensor_index(commit_);
  std::vector<Checked> out;
  for (const auto& l : live) {
    auto it = index.find(l.name);
    if (it == index.end()) {
      throw Error(ErrorCode::kInvalidArg, "live tensor \"" + l.name + "\" is not in the checkpoint store's model (" +
                                              dir_ +
                                              "): the store was made from other files, or the engine names its "
                                              "tensors differently");
    }
    const TensorEntry& t = commit_.tensors[it->second];
    const DType served = served_[it->second];
    Region r = l.start.empty() ? whole_region(l.shape) : Region{l.start, l.shape};
    if (l.dtype != served || (l.start.empty() && l.shape != t.shape)) {
      throw Error(ErrorCode::kInvalidArg,
                  "live tensor \"" + l.name + "\" is " + std::string(dtype_name(l.dtype)) + " " +
                      shape_string(l.shape) + "; the store has " + std::string(dtype_name(served)) + " " +
                      shape_string(t.shape) +
                      (served != t.dtype ? " (served as " + std::string(dtype_name(served)) + ", " +
                                               std::string(dtype_name(t.dtype)) + " in the files)"
                                         : std::string()) +
                      (l.dtype != served && served_conversion_refusal(t.dtype, l.dtype).empty()
                           ? "; declare the dtype the engine serves it in when opening the store (OpenOptions::served, "
                             "Python served=)"
                           : std::string()));
    }
    check_region(r, t.shape, "live tensor \"" + l.name + "\"");
    const uint64_t nbytes = region_units(r) * unit_bytes(served);
    if (!l.data && nbytes) throw Error(ErrorCode::kInvalidArg, "live tensor \"" + l.name + "\" has no data");
    if (for_save && held_index(it->second, r) < 0) {
      throw Error(ErrorCode::kInvalidArg,
                  "live tensor \"" + l.name + "\" " + region_string(r) +
                      " is not a region this process keeps a head copy of (see OpenOptions::held)");
    }
    out.push_back(Checked{&l, it->second, r, nbytes});
  }
  // Commit order (records follow it), and no element given twice.
  std::sort(out.begin(), out.end(), [](const Checked& a, const Checked& b) {
    return a.tensor != b.tensor ? a.tensor < b.tensor : a.region.start < b.region.start;
  });
  for (size_t i = 1; i < out.size(); ++i) {
    for (size_t j = i; j-- > 0 && out[j].tensor == out[i].tensor;) {
      if (region_intersect(out[j].region, out[i].region)) {
        throw Error(ErrorCode::kInvalidArg, "live tensor \"" + out[i].live->name + "\" given twice (regions " +
                                                region_string(out[j].region) + " and " + region_string(out[i].region) +
                                                ")");
      }
    }
  }
  return out;
}

void Store::check_part_file(uint64_t generation, uint32_t ranks, const Part& part, const fs::Mapping& map,
                            const std::vector<DType>& dtypes,
                            const std::function<void(size_t, const DeltaRecord&, const Region&)>& fn) const {
  const std::string path = fs::join(dir_, part.file);
  if (part.bytes && map.size() != *part.bytes) {
    throw Error(ErrorCode::kFormat,
                path + ": " + std::to_string(map.size()) + " bytes; the commit says " + std::to_string(*part.bytes));
  }
  if (map.size() < 8) throw Error(ErrorCode::kFormat, path + ": truncated delta file");
  uint64_t trailer;
  std::memcpy(&trailer, map.data() + map.size() - 8, 8);
  if (trailer != part.hash) {
    throw Error(ErrorCode::kFormat,
                path + ": checksum " + hash_hex(trailer) + " is not the committed " + hash_hex(part.hash));
  }
  const auto index = tensor_index(commit_);
  DeltaHeader h = delta_parse(map.data(), map.size(), path, [&](const DeltaRecord& r) {
    auto it = index.find(r.name);
    if (it == index.end())
      throw Error(ErrorCode::kFormat, path + ": tensor \"" + std::string(r.name) + "\" is not in the store's model");
    const TensorEntry& t = commit_.tensors[it->second];
    Region region = normalized(r.region, t.shape);
    try {
      check_region(region, t.shape, path + ": tensor \"" + t.name + "\"");
    } catch (const Error& e) {
      throw Error(ErrorCode::kFormat, e.what());
    }
    const DType want = dtypes[it->second];
    if (r.dtype != want && r.units * r.unit == region_units(region) * unit_bytes(r.dtype) &&
        served_conversion_refusal(t.dtype, r.dtype).empty()) {
      // A tensor saved in one dtype and read (or committed) in another: name both, so that the fix is clear.
      throw Error(ErrorCode::kInvalidArg, path + ": tensor \"" + t.name + "\" is saved as " +
                                              std::string(dtype_name(r.dtype)) + " in this generation, but is " +
                                              (&dtypes == &served_ ? "served" : "recorded") + " as " +
                                              std::string(dtype_name(want)) + " (" + std::string(dtype_name(t.dtype)) +
                                              " in the model files): serve it as " + std::string(dtype_name(r.dtype)) +
                                              ", or materialize and start a new store");
    }
    if (r.dtype != want || r.units * r.unit != region_units(region) * unit_bytes(want)) {
      throw Error(ErrorCode::kFormat, path + ": tensor \"" + t.name + "\": record dtype/size does not match the model");
    }
    fn(it->second, r, region);
  });
  if (h.generation != generation) {
    throw Error(ErrorCode::kFormat, path + ": holds generation " + std::to_string(h.generation) + ", expected " +
                                        std::to_string(generation));
  }
  if (h.version == kPartVersion && (h.rank != part.rank || h.ranks != ranks)) {
    throw Error(ErrorCode::kFormat, path + ": holds rank " + std::to_string(h.rank) + " of " + std::to_string(h.ranks) +
                                        ", expected " + std::to_string(part.rank) + " of " + std::to_string(ranks));
  }
}

Store::Collected Store::collect(uint64_t a, uint64_t b, const std::vector<DType>* dtypes) const {
  if (a > b) std::swap(a, b);
  const std::vector<DType>& want = dtypes ? *dtypes : served_;
  Collected out;
  for (uint64_t g = a + 1; g <= b; ++g) {
    const Generation* gen = commit_.find(g);
    for (const Part& part : gen->parts) {
      std::string path = fs::join(dir_, part.file);
      if (!fs::exists(path)) {
        throw Error(ErrorCode::kNotFound, "delta file " + path + " of generation " + std::to_string(g) + " is missing");
      }
      out.maps.push_back(fs::Mapping::open_readonly(path));
      check_part_file(g, gen->ranks, part, out.maps.back(), want,
                      [&](size_t tensor, const DeltaRecord& r, const Region& region) {
                        out.records.push_back(Collected::Record{tensor, r, region, path});
                      });
    }
  }
  return out;
}

void Store::apply(const Collected& records, const std::vector<Target>& targets) const {
  std::unordered_map<size_t, std::vector<size_t>> by_tensor;
  for (size_t i = 0; i < targets.size(); ++i) by_tensor[targets[i].tensor].push_back(i);
  std::vector<uint8_t> scratch;
  for (const auto& rec : records.records) {
    auto it = by_tensor.find(rec.tensor);
    if (it == by_tensor.end()) continue;
    const uint32_t unit = rec.record.unit;
    bool decoded = false;
    for (size_t ti : it->second) {
      const Target& t = targets[ti];
      if (t.region == rec.region) {
        apply_record(rec.record, t.buf, rec.what);
        continue;
      }
      std::optional<Region> part = region_intersect(rec.region, t.region);
      if (!part) continue;
      // The record covers another region than the target (a store written at another TP size): decode it
      // once into a buffer of its own region, then XOR the common part across.
      if (!decoded) {
        scratch.assign(rec.record.units * unit, 0);
        apply_record(rec.record, scratch.data(), rec.what);
        decoded = true;
      }
      region_transfer(scratch.data(), rec.region, t.buf, t.region, *part, unit, true);
    }
  }
}

void Store::xor_generations(uint64_t a, uint64_t b, const std::vector<Target>& targets) {
  apply(collect(a, b), targets);
}

Store::Filling Store::prepare_fill(uint64_t generation, const std::vector<Target>& targets) const {
  Filling f;
  for (const Target& t : targets) {
    long h = head_valid_ ? held_index(t.tensor, t.region) : -1;
    if (h >= 0) {
      f.from_head.push_back(t);
      f.head_index.push_back(h);
    } else {
      f.from_files.push_back(t);
    }
  }
  if (!f.from_head.empty()) f.head_records = collect(generation, head_generation_);
  if (!f.from_files.empty()) {
    f.file_records = collect(generation, commit_.materialized);
    for (const auto& file : commit_.files) {
      std::string path = fs::join(model_dir_, file.name);
      f.model_files.push_back(fs::Mapping::open_readonly(path));
      if (f.model_files.back().size() != file.size) {
        throw Error(ErrorCode::kFormat, "model file " + path + " changed since the checkpoint store was opened");
      }
    }
  }
  return f;
}

void Store::fill(uint64_t generation, const std::vector<Target>& targets) {
  const Filling f = prepare_fill(generation, targets);  // every check before any target is written
  for (size_t i = 0; i < f.from_head.size(); ++i) {
    std::memcpy(f.from_head[i].buf, head_.tensor(static_cast<size_t>(f.head_index[i])), held_[f.head_index[i]].nbytes);
  }
  if (!f.from_files.empty()) {
    parallel_for(static_cast<int64_t>(f.from_files.size()), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const Target& t = f.from_files[i];
        const TensorEntry& e = commit_.tensors[t.tensor];
        const DType served = served_[t.tensor];
        const uint8_t* bytes = f.model_files[e.file].data() + e.offset;
        std::vector<uint8_t> converted;  // the base of a tensor served in another dtype: the files' values in it
        if (served != e.dtype) {
          converted.resize(served_nbytes(t.tensor));
          convert_elements(bytes, e.dtype, converted.data(), served, e.nbytes / unit_bytes(e.dtype));
          bytes = converted.data();
        }
        region_transfer(bytes, whole_region(e.shape), t.buf, t.region, t.region, unit_bytes(served), false);
      }
    });
  }
  apply(f.head_records, f.from_head);
  apply(f.file_records, f.from_files);
}

std::vector<std::vector<uint8_t>> Store::state(uint64_t generation) {
  check_usable();
  sync();
  if (!commit_.find(generation)) {
    throw Error(ErrorCode::kNotFound, "generation " + std::to_string(generation) + " is not in the store (it holds " +
                                          std::to_string(commit_.oldest) + ".." + std::to_string(commit_.head) + ")");
  }
  std::vector<std::vector<uint8_t>> bufs(commit_.tensors.size());
  std::vector<Target> targets;
  for (size_t i = 0; i < bufs.size(); ++i) {
    bufs[i].resize(served_nbytes(i));
    targets.push_back(Target{i, whole_region(commit_.tensors[i].shape), bufs[i].data()});
  }
  fill(generation, targets);
  return bufs;
}

void Store::write_commit(const Commit& c) {
  std::string path = fs::join(dir_, std::string(kCommitFileName));
  try {
    fs::write_file_atomic(path, commit_serialize(c));
  } catch (...) {
    // If the rename happened (only the directory fsync failed), disk and memory now disagree.
    try {
      if (commit_read(dir_).head != commit_.head || commit_read(dir_).materialized != commit_.materialized)
        broken_ = true;
    } catch (...) {
      broken_ = true;
    }
    throw;
  }
}

void Store::move_head(Written& w) {
  for (size_t i = 0; i < w.diff.size(); ++i) {
    if (w.out.changed[i]) {
      xor_diff(head_.tensor(w.held[i]), w.diff[i].units, w.diff[i].unit, w.out.bitmaps.data + w.out.bitmap_offset[i],
               w.out.values.data + w.out.value_offset[i]);
    }
  }
  diff_workspace_.digests.reset();  // the head copy changed outside the GPU diff: its digests are stale
  w.head_moved = !w.head_moved;
}

bool Store::write_delta(const std::vector<Checked>& live, const std::string& path,
                        const std::function<std::string(uint32_t)>& header, bool write_if_unchanged,
                        const Progress& progress, Written& w) {
  const int device = live.empty() ? -1 : live.front().live->device;
  for (const Checked& c : live) {
    if (c.live->device != device) {
      throw Error(ErrorCode::kInvalidArg, "live tensors \"" + live.front().live->name + "\" and \"" + c.live->name +
                                              "\" are on different devices; pass the weights of one device");
    }
  }
  const size_t n = live.size();
  w.diff.resize(n);
  w.held.resize(n);
  if (device >= 0) cuda::host::set_device(device);
  for (size_t i = 0; i < n; ++i) {
    const uint32_t unit = unit_bytes(served_[live[i].tensor]);
    w.held[i] = static_cast<size_t>(held_index(live[i].tensor, live[i].region));
    w.elements += live[i].nbytes / unit;
    w.model_bytes += live[i].nbytes;
    w.diff[i] = DiffTensor{live[i].live->data, device >= 0 ? head_.gpu_tensor(w.held[i]) : head_.tensor(w.held[i]),
                           live[i].nbytes / unit, unit};
  }
  // The diff: bitmaps and the changed elements' XOR values, in host memory either way. The encoder runs
  // beside it (checkpoint.pipeline: it starts on the tensors the GPU diff has completed) or after it.
  report(progress, device >= 0 ? "diff on the GPU" : "diff", 0, n);
  using clock = std::chrono::steady_clock;
  auto seconds_since = [](clock::time_point t) { return std::chrono::duration<double>(clock::now() - t).count(); };
  auto t0 = clock::now();
  // Once the encoder is joined: what it used (SaveUsage; the process's is the caller's to take).
  auto account = [&](const RecordEncoder& e) {
    w.usage.encode_wait_seconds = e.wait_seconds();
    w.usage.encode = e.usage();
  };
  std::vector<RecordParts> kinds(n);
  for (size_t i = 0; i < n; ++i) {
    const TensorEntry& t = commit_.tensors[live[i].tensor];
    kinds[i].name = t.name;
    kinds[i].dtype = served_[live[i].tensor];
    kinds[i].units = w.diff[i].units;
    if (!is_whole(live[i].region, t.shape)) kinds[i].region = live[i].region;
  }
  const bool pipeline = device >= 0 && tuning::get(tuning::kCheckpointPipeline) == 1;
  std::optional<RecordEncoder> encoder;
  if (pipeline) encoder.emplace(kinds, w.out, progress);
  // checkpoint.early_writer: the file is written from the first encoded record on, by its own thread, instead
  // of once the diff is over (its header holds the record count, known only then).
  std::optional<EarlyWriter> early;
  if (tuning::get(tuning::kCheckpointEarlyWriter) == 1) early.emplace(path, header, static_cast<uint32_t>(n));
  if (early && encoder) early->start(*encoder);
  try {
    if (device >= 0) {
      if (!diff_workspace_.bitmaps.data) {
        DiffWorkspace reserved = head_.take_reserved();  // prepare_gpu's, when it ran
        diff_workspace_.bitmaps = std::move(reserved.bitmaps);
        diff_workspace_.values = std::move(reserved.values);
      }
      if (!diff_workspace_.bitmaps.data) {
        // Page-lock the diff's outputs once (prepare_gpu did not).
        uint64_t bitmap_bytes = 0;
        for (const auto& t : w.diff) bitmap_bytes += diff_bitmap_bytes(t.units);
        diff_workspace_reserve(diff_workspace_, bitmap_bytes, diff_values_bytes(w.model_bytes));
      }
      // The kernel also moves the head copy to the recorded state (whole rows over PCIe, no CPU pass).
      try {
        delta_diff_cuda(w.diff, w.out, nullptr, &diff_workspace_, true,
                        [&](size_t done, const uint8_t* b, const uint8_t* v) {
                          if (encoder) encoder->ready(done, b, v);
                        });
      } catch (...) {
        // Part of the head copy may have moved: it matches no generation any more.
        broken_ = true;
        diff_workspace_.digests.reset();
        throw;
      }
      w.head_moved = true;
    } else {
      delta_diff_cpu(w.diff, w.out);
    }
  } catch (...) {
    if (early) early->cancel(encoder ? &*encoder : nullptr, std::current_exception());
    throw;
  }
  w.diff_seconds = seconds_since(t0);
  uint32_t count = 0;
  for (size_t i = 0; i < n; ++i) {
    w.changed += w.out.changed[i];
    count += w.out.changed[i] ? 1 : 0;
  }
  if (early) {
    if (!encoder) {
      encoder.emplace(std::move(kinds), w.out, progress);
      encoder->ready(n, w.out.bitmaps.data, w.out.values.data);
      early->start(*encoder);
    }
    encoder->end_of_input();
    t0 = clock::now();
    try {
      early->finish(*encoder, count);
    } catch (...) {
      if (w.head_moved) move_head(w);  // the GPU diff moved it: back to the recorded state
      throw;
    }
    w.encode_seconds = early->encode_seconds;
    account(*encoder);
    if (early->wrote()) {
      if (!w.head_moved) move_head(w);
      w.hash = early->hash;
      w.bytes = early->bytes;
      w.write_seconds = seconds_since(early->encoded_at);
      w.sync_seconds = seconds_since(early->filled_at);
      return true;
    }
    // No record came: nothing changed. A part is written all the same (a header and no record).
    if (!write_if_unchanged) return false;
    fs::write_file_atomic(path, [&](fs::Writer& fw) {
      const std::string head = header(0);
      fw.write(head);
      w.hash = xxh64(head.data(), head.size());
      fw.write(&w.hash, 8);
      w.bytes = fw.bytes_written();
    });
    w.write_seconds = seconds_since(t0);
    return true;
  }
  if (w.changed == 0 && !write_if_unchanged) {
    if (encoder) {
      w.encode_seconds = encoder->join();  // it had nothing to encode
      account(*encoder);
    }
    return false;  // nothing changed: the head copy was not touched either
  }
  if (!encoder) {
    encoder.emplace(std::move(kinds), w.out, progress);
    encoder->ready(n, w.out.bitmaps.data, w.out.values.data);
  }
  encoder->end_of_input();  // the diff is over: the encoder stops once it has encoded every tensor
  t0 = clock::now();
  // The head copy follows the delta being written: the same bitmaps and values the file is encoded
  // from. It is updated by the GPU diff, or (CPU path) once encoded, and XORed back (deltas are
  // self-inverse) if the file is not written.
  clock::time_point filled;
  try {
    // Encoding and writing overlap: the encoder's thread encodes the records in order (each batch in
    // parallel over its blocks), this thread appends each finished record to the temporary file and
    // hashes it.
    fs::write_file_atomic(path, [&](fs::Writer& fw) {
      // The disk starts on the records as they come instead of at the fsync, so writing overlaps the
      // encoding still under way (checkpoint.writeback_mib).
      fw.set_writeback(static_cast<uint64_t>(tuning::get(tuning::kCheckpointWritebackMib)) << 20);
      Xxh64Stream hash;
      try {
        const std::string head = header(count);
        hash.update(head.data(), head.size());
        fw.write(head);
        RecordSums sums(encoder->sums_in_writer);
        while (std::optional<std::string> part = encoder->records.pop()) {
          const std::string bytes = sums.bytes(std::move(*part));
          hash.update(bytes.data(), bytes.size());
          fw.write(bytes);
        }
      } catch (...) {
        encoder->abort();
        try {
          (void)encoder->join();
        } catch (...) {  // its own error, if any, is secondary to this one
        }
        throw;
      }
      w.encode_seconds = encoder->join();  // rethrows an encoding error (the records stopped early)
      t0 = encoder->finished_at;
      account(*encoder);
      if (!w.head_moved) move_head(w);
      w.hash = hash.digest();
      fw.write(&w.hash, 8);
      w.bytes = fw.bytes_written();
      filled = clock::now();
    });
  } catch (...) {
    encoder.reset();
    if (w.head_moved) move_head(w);
    throw;
  }
  w.write_seconds = seconds_since(t0);
  w.sync_seconds = seconds_since(filled);
  return true;
}

std::pair<uint64_t, uint64_t> Store::copy_optimizer_state(const std::string& from, const std::string& name) {
  fs::Mapping m = fs::Mapping::open_readonly(from);
  fs::write_file_atomic(fs::join(dir_, name), std::string_view(reinterpret_cast<const char*>(m.data()), m.size()));
  return {m.size(), content_hash(m.data(), m.size())};
}

SaveResult Store::save(const std::vector<LiveTensor>& live, const SaveOptions& options) {
  check_usable();
  if (ranks_ != 1) {
    throw Error(ErrorCode::kInvalidArg, "checkpoint store " + dir_ + " is open as rank " + std::to_string(rank_) +
                                            " of " + std::to_string(ranks_) +
                                            ": save parts with save_part and commit_parts");
  }
  sync();
  std::vector<Checked> checked = check_live(live, true);
  for (const Checked& c : checked) {
    if (!is_whole(c.region, commit_.tensors[c.tensor].shape)) {
      throw Error(ErrorCode::kInvalidArg, "live tensor \"" + c.live->name + "\" is the region " +
                                              region_string(c.region) +
                                              ": save() takes whole tensors (regions are saved with save_part)");
    }
  }
  SaveResult res;
  const uint64_t g = next_generation(commit_, dir_), parent = commit_.head;
  Generation gen;
  gen.generation = g;
  gen.parent = parent;
  gen.weight_version = options.weight_version;
  Part part;
  part.file = delta_file_name(g);
  const std::string delta_path = fs::join(dir_, part.file);
  Written w;
  const Usage before = usage_now(true);
  const bool written = write_delta(
      checked, delta_path, [&](uint32_t count) { return delta_file_header(g, parent, count); },
      options.save_if_unchanged, options.progress, w);
  w.usage.process = usage_now(true) - before;
  res.elements = w.elements;
  res.model_bytes = w.model_bytes;
  res.changed = w.changed;
  res.diff_seconds = w.diff_seconds;
  res.usage = w.usage;
  if (!written) {
    res.generation = commit_.head;
    return res;
  }
  crash_point("delta-written");
  auto t0 = std::chrono::steady_clock::now();
  std::string optim_path;
  try {
    part.bytes = w.bytes;
    part.hash = w.hash;
    part.changed = w.changed;
    gen.bytes = w.bytes;
    if (!options.optimizer_state.empty()) {
      part.optimizer_state = optimizer_file_name(part.file);
      optim_path = fs::join(dir_, part.optimizer_state);
      auto [bytes, hash] = copy_optimizer_state(options.optimizer_state, part.optimizer_state);
      part.optimizer_bytes = bytes;
      part.optimizer_hash = hash;
      gen.bytes += bytes;
    }
    gen.changed = w.changed;
    gen.time_ms = now_ms();
    gen.parts.push_back(part);
    Commit c = commit_;
    for (const Checked& ch : checked) c.tensors[ch.tensor].served = served_[ch.tensor];
    check_served_change(c, "this process");
    c.head = g;
    c.generations.push_back(gen);
    write_commit(c);
  } catch (...) {
    if (!broken_) {  // the commit did not happen: the new files are garbage, the head goes back
      ::unlink(delta_path.c_str());
      if (!optim_path.empty()) ::unlink(optim_path.c_str());
      move_head(w);
    }
    throw;
  }
  for (const Checked& ch : checked) commit_.tensors[ch.tensor].served = served_[ch.tensor];
  commit_.head = g;
  commit_.generations.push_back(gen);
  head_generation_ = g;
  res.encode_seconds = w.encode_seconds;
  res.write_seconds = w.write_seconds + std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  res.sync_seconds = w.sync_seconds;
  res.written = true;
  res.generation = g;
  res.bytes = gen.bytes;
  return res;
}

PartDescriptor Store::save_part(const std::vector<LiveTensor>& live, const SaveOptions& options) {
  check_usable();
  sync();  // a part of an earlier generation is confirmed or put back first
  std::vector<Checked> checked = check_live(live, true);
  PartDescriptor d;
  d.generation = next_generation(commit_, dir_);
  d.parent = commit_.head;
  d.ranks = ranks_;
  d.group = group_;
  for (const Checked& c : checked) {
    const TensorEntry& t = commit_.tensors[c.tensor];
    if (served_[c.tensor] != t.dtype && (d.served.empty() || d.served.back().first != t.name))
      d.served.emplace_back(t.name, served_[c.tensor]);  // checked is in commit order: one entry per tensor
  }
  Part& part = d.part;
  part.rank = rank_;
  part.file = part_file_name(d.generation, rank_, ranks_);
  const std::string path = fs::join(dir_, part.file);
  Written w;
  const Usage before = usage_now(true);
  write_delta(
      checked, path, [&](uint32_t count) { return part_file_header(d.generation, d.parent, count, rank_, ranks_); },
      true, options.progress, w);
  w.usage.process = usage_now(true) - before;
  auto t0 = std::chrono::steady_clock::now();
  if (!options.optimizer_state.empty()) {
    part.optimizer_state = optimizer_file_name(part.file);
    try {
      std::tie(part.optimizer_bytes, part.optimizer_hash) =
          copy_optimizer_state(options.optimizer_state, part.optimizer_state);
    } catch (...) {
      ::unlink(path.c_str());
      move_head(w);
      throw;
    }
  }
  crash_point("part-written");
  part.bytes = w.bytes;
  part.hash = w.hash;
  part.changed = w.changed;
  d.elements = w.elements;
  d.model_bytes = w.model_bytes;
  d.diff_seconds = w.diff_seconds;
  d.encode_seconds = w.encode_seconds;
  d.write_seconds = w.write_seconds + std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  d.sync_seconds = w.sync_seconds;
  d.usage = w.usage;
  pending_ = Pending{d, std::move(w)};
  return d;
}

SaveResult Store::commit_parts(const std::vector<PartDescriptor>& parts, uint64_t weight_version,
                               bool save_if_unchanged) {
  check_usable();
  if (rank_ != 0) {
    throw Error(ErrorCode::kInvalidArg,
                "checkpoint store " + dir_ + ": rank " + std::to_string(rank_) +
                    " cannot commit; rank 0 (which holds the store's LOCK) commits every rank's part");
  }
  const uint64_t g = next_generation(commit_, dir_);
  auto rank_name = [](const PartDescriptor& p) { return "rank " + std::to_string(p.part.rank); };
  std::vector<const PartDescriptor*> by_rank(ranks_, nullptr);
  for (const PartDescriptor& p : parts) {
    if (p.ranks != ranks_ || p.part.rank >= ranks_) {
      throw Error(ErrorCode::kInvalidArg, rank_name(p) + "'s part was written at tensor-parallel size " +
                                              std::to_string(p.ranks) + "; this store is open at size " +
                                              std::to_string(ranks_) + " (rank 0)");
    }
    if (by_rank[p.part.rank]) throw Error(ErrorCode::kInvalidArg, rank_name(p) + "'s part is given twice");
    if (p.group != group_) {
      throw Error(ErrorCode::kInvalidArg, rank_name(p) + "'s part comes from \"" + p.group + "\", rank 0's from \"" +
                                              group_ + "\": the ranks serve different engines");
    }
    if (p.generation != g || p.parent != commit_.head) {
      throw Error(ErrorCode::kInvalidArg, rank_name(p) + "'s part is for generation " + std::to_string(p.generation) +
                                              " (parent " + std::to_string(p.parent) + "); the next generation is " +
                                              std::to_string(g) + " (parent " + std::to_string(commit_.head) + ")");
    }
    const std::string want = part_file_name(g, p.part.rank, ranks_);
    if (p.part.file != want ||
        (!p.part.optimizer_state.empty() && p.part.optimizer_state != optimizer_file_name(want))) {
      throw Error(ErrorCode::kInvalidArg, rank_name(p) + "'s part names the files \"" + p.part.file + "\" and \"" +
                                              p.part.optimizer_state + "\"; the store gives them \"" + want +
                                              "\" and \"" + optimizer_file_name(want) + "\"");
    }
    by_rank[p.part.rank] = &p;
  }
  std::string missing;
  for (uint32_t r = 0; r < ranks_; ++r) {
    if (!by_rank[r]) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
  }
  if (!missing.empty()) {
    throw Error(ErrorCode::kInvalidArg, "the parts of rank(s) " + missing + " are missing (tensor-parallel size " +
                                            std::to_string(ranks_) + ")");
  }
  if (!pending_ || pending_->part.part.file != by_rank[0]->part.file ||
      pending_->part.part.hash != by_rank[0]->part.hash) {
    throw Error(ErrorCode::kInvalidArg,
                "rank 0's part " + by_rank[0]->part.file + " is not the part this process wrote with save_part");
  }
  // The dtypes the parts' records are in: what COMMIT records, or what the ranks declare they serve (every
  // rank its own; they must agree).
  Commit c = commit_;
  {
    const auto index = tensor_index(c);
    std::vector<long> declared_by(c.tensors.size(), -1);
    for (const PartDescriptor* p : by_rank) {
      for (const auto& [name, dtype] : p->served) {
        const size_t i = served_tensor(index, c, name, dtype, dir_, rank_name(*p) + "'s part");
        TensorEntry& t = c.tensors[i];
        long& first = declared_by[i];
        if (first >= 0 && t.served != dtype) {
          throw Error(ErrorCode::kInvalidArg, "tensor \"" + name + "\" is served as " +
                                                  std::string(dtype_name(t.served)) + " by rank " +
                                                  std::to_string(first) + " and as " + std::string(dtype_name(dtype)) +
                                                  " by " + rank_name(*p) + ": the ranks serve different engines");
        }
        first = p->part.rank;
        t.served = dtype;
      }
    }
  }
  const std::vector<DType> part_dtypes = recorded_dtypes(c);
  // Every part read back: size, checksum, records; optimizer files: size, hash. Then regions disjoint.
  struct Seen {
    uint32_t rank;
    size_t tensor;
    Region region;
  };
  std::vector<std::vector<Seen>> seen(ranks_);
  std::vector<std::string> errors(ranks_);
  parallel_for(static_cast<int64_t>(ranks_), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const Part& p = by_rank[r]->part;
      try {
        std::string path = fs::join(dir_, p.file);
        if (!fs::exists(path)) throw Error(ErrorCode::kNotFound, "part file " + path + " is missing");
        fs::Mapping map = fs::Mapping::open_readonly(path);
        uint64_t changed = 0;
        check_part_file(g, ranks_, p, map, part_dtypes,
                        [&](size_t tensor, const DeltaRecord& rec, const Region& region) {
                          seen[r].push_back(Seen{p.rank, tensor, region});
                          changed += rec.changed;
                        });
        if (changed != p.changed) {
          throw Error(ErrorCode::kFormat, path + ": holds " + std::to_string(changed) +
                                              " changes; the descriptor says " + std::to_string(p.changed));
        }
        if (!p.optimizer_state.empty()) {
          std::string opath = fs::join(dir_, p.optimizer_state);
          if (!fs::exists(opath)) throw Error(ErrorCode::kNotFound, "optimizer state " + opath + " is missing");
          fs::Mapping m = fs::Mapping::open_readonly(opath);
          if (m.size() != p.optimizer_bytes.value_or(~uint64_t{0}) ||
              content_hash(m.data(), m.size()) != p.optimizer_hash.value_or(0)) {
            throw Error(ErrorCode::kFormat,
                        "optimizer state " + opath + " does not match its descriptor (size or hash)");
          }
        }
      } catch (const std::exception& e) {
        errors[r] = e.what();
      }
    }
  });
  for (uint32_t r = 0; r < ranks_; ++r) {
    if (!errors[r].empty()) throw Error(ErrorCode::kFormat, "rank " + std::to_string(r) + "'s part: " + errors[r]);
  }
  std::vector<Seen> all;
  for (auto& v : seen) all.insert(all.end(), v.begin(), v.end());
  std::sort(all.begin(), all.end(), [](const Seen& a, const Seen& b) { return a.tensor < b.tensor; });
  for (size_t i = 0; i < all.size(); ++i) {
    for (size_t j = i + 1; j < all.size() && all[j].tensor == all[i].tensor; ++j) {
      if (region_intersect(all[i].region, all[j].region)) {
        throw Error(ErrorCode::kInvalidArg,
                    "tensor \"" + commit_.tensors[all[i].tensor].name + "\": rank " + std::to_string(all[i].rank) +
                        "'s region " + region_string(all[i].region) + " and rank " + std::to_string(all[j].rank) +
                        "'s region " + region_string(all[j].region) +
                        " overlap (a replicated tensor is saved by rank 0 only)");
      }
    }
  }
  SaveResult res;
  for (const PartDescriptor* p : by_rank) {
    res.changed += p->part.changed;
    res.elements += p->elements;
    res.model_bytes += p->model_bytes;
    res.bytes += p->part.bytes.value_or(0) + p->part.optimizer_bytes.value_or(0);
    res.diff_seconds = std::max(res.diff_seconds, p->diff_seconds);
    res.encode_seconds = std::max(res.encode_seconds, p->encode_seconds);
    res.write_seconds = std::max(res.write_seconds, p->write_seconds);
    res.sync_seconds = std::max(res.sync_seconds, p->sync_seconds);
    res.usage.encode_wait_seconds = std::max(res.usage.encode_wait_seconds, p->usage.encode_wait_seconds);
    res.usage.encode += p->usage.encode;
    res.usage.process += p->usage.process;
  }
  if (res.changed == 0 && !save_if_unchanged) {
    // Nothing to commit: the parts are garbage (each rank's refresh puts its head copy back, a no-op).
    for (const PartDescriptor* p : by_rank) {
      remove_generation_file(dir_, p->part.file);
      if (!p->part.optimizer_state.empty()) remove_generation_file(dir_, p->part.optimizer_state);
    }
    move_head(pending_->written);
    pending_.reset();
    res.generation = commit_.head;
    res.bytes = 0;
    return res;
  }
  crash_point("parts-verified");
  Generation gen;
  gen.generation = g;
  gen.parent = commit_.head;
  gen.time_ms = now_ms();
  gen.weight_version = weight_version;
  gen.bytes = res.bytes;
  gen.changed = res.changed;
  gen.ranks = ranks_;
  for (const PartDescriptor* p : by_rank) gen.parts.push_back(p->part);
  check_served_change(c, "the ranks");
  c.head = g;
  c.generations.push_back(gen);
  write_commit(c);  // on failure the pending part stays; sync() puts the head copy back
  commit_ = std::move(c);
  head_generation_ = g;
  pending_.reset();
  res.written = true;
  res.generation = g;
  return res;
}

void Store::sync() {
  if (ranks_ == 1 && !pending_) return;  // a single process: COMMIT changes only through this object
  Commit c = commit_read(dir_);
  if (pending_) {
    const Generation* gen = c.find(pending_->part.generation);
    const Part* p = gen ? gen->part(rank_) : nullptr;
    if (p && p->file == pending_->part.part.file && p->hash == pending_->part.part.hash) {
      head_generation_ = pending_->part.generation;
    } else {
      move_head(pending_->written);  // not committed (yet): if it is later, the replay below brings it in
    }
    pending_.reset();
  }
  if (c.head < head_generation_) {
    broken_ = true;
    throw Error(ErrorCode::kFormat, "checkpoint store " + dir_ + ": COMMIT went back from generation " +
                                        std::to_string(head_generation_) + " to " + std::to_string(c.head) +
                                        " (another process rewrote the store); reopen it");
  }
  const uint64_t from = head_generation_;
  commit_ = std::move(c);
  if (from == commit_.head) return;
  diff_workspace_.digests.reset();  // the head copy moves to generations other ranks committed
  std::vector<Target> targets;
  for (size_t i = 0; i < held_.size(); ++i)
    targets.push_back(Target{held_[i].tensor, held_[i].region, head_.tensor(i)});
  if (from >= commit_.oldest) {
    xor_generations(from, commit_.head, targets);
  } else {  // the generations in between were collected: rebuild from the model files
    head_valid_ = false;
    fill(commit_.head, targets);
    head_valid_ = true;
  }
  head_generation_ = commit_.head;
}

uint64_t Store::refresh() {
  check_usable();
  sync();
  return commit_.head;
}

namespace {

// A part's optimizer-state file against COMMIT: there, its size and content hash (what verify and a
// rollback's check_restore read).
void check_optimizer_state(const std::string& dir, const Part& part) {
  const std::string path = fs::join(dir, part.optimizer_state);
  if (!fs::exists(path)) throw Error(ErrorCode::kNotFound, "optimizer state " + path + " is missing");
  fs::Mapping m = fs::Mapping::open_readonly(path);
  if (part.optimizer_bytes && m.size() != *part.optimizer_bytes) {
    throw Error(ErrorCode::kFormat, "optimizer state " + path + " has " + std::to_string(m.size()) +
                                        " bytes; the commit says " + std::to_string(*part.optimizer_bytes) +
                                        " (truncated or replaced)");
  }
  if (part.optimizer_hash) {
    const uint64_t h = content_hash(m.data(), m.size());
    if (h != *part.optimizer_hash) {
      throw Error(ErrorCode::kFormat, "optimizer state " + path + " has hash " + hash_hex(h) + "; the commit says " +
                                          hash_hex(*part.optimizer_hash) + " (corrupt or replaced)");
    }
  }
}

// Live tensors on a GPU: their memory staged through host buffers.
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

void Store::restore_live(uint64_t generation, const std::vector<LiveTensor>& live) {
  check_usable();
  sync();
  std::vector<Checked> checked = check_live(live, false);
  if (!commit_.find(generation)) (void)state(generation);  // throws the not-found error
  const int device = live_device(live);
  std::vector<Target> targets;
  std::vector<std::vector<uint8_t>> staged(device >= 0 ? checked.size() : 0);
  for (size_t i = 0; i < checked.size(); ++i) {
    uint8_t* buf = static_cast<uint8_t*>(checked[i].live->data);
    if (device >= 0) {  // staged in host memory, then copied tensor by tensor
      staged[i].resize(checked[i].nbytes);
      buf = staged[i].data();
    }
    targets.push_back(Target{checked[i].tensor, checked[i].region, buf});
  }
  fill(generation, targets);  // checks every delta on the way before writing any target
  if (device >= 0) {
    cuda::host::set_device(device);
    for (size_t i = 0; i < checked.size(); ++i)
      cuda::host::to_device(checked[i].live->data, staged[i].data(), staged[i].size());
  }
}

void Store::check_restore(uint64_t generation, const std::vector<LiveTensor>& live) {
  check_usable();
  sync();
  std::vector<Checked> checked = check_live(live, false);
  (void)live_device(live);  // restore_live's own refusal: tensors on different devices
  const Generation* gen = commit_.find(generation);
  if (!gen) (void)state(generation);  // throws the not-found error
  std::vector<Target> targets;        // no buffers: prepare_fill reads and checks, nothing is written
  for (const Checked& c : checked) targets.push_back(Target{c.tensor, c.region, nullptr});
  (void)prepare_fill(generation, targets);
  // The optimizer state this rank loads with the generation: its own part's at this TP size, else every part's.
  for (const Part& p : gen->parts) {
    if (p.optimizer_state.empty() || (gen->ranks == ranks_ && ranks_ > 1 && p.rank != rank_)) continue;
    check_optimizer_state(dir_, p);
  }
}

LiveDiff Store::compare_live(uint64_t generation, const std::vector<LiveTensor>& live) {
  check_usable();
  sync();
  std::vector<Checked> checked = check_live(live, false);
  if (!commit_.find(generation)) (void)state(generation);  // throws the not-found error
  const int device = live_device(live);
  // The expected bytes: the head copy itself where it holds the region at this generation, else filled.
  std::vector<const uint8_t*> expected(checked.size());
  std::vector<std::vector<uint8_t>> bufs(checked.size());
  std::vector<Target> targets;
  for (size_t i = 0; i < checked.size(); ++i) {
    long h = generation == head_generation_ ? held_index(checked[i].tensor, checked[i].region) : -1;
    if (h >= 0) {
      expected[i] = head_.tensor(static_cast<size_t>(h));
    } else {
      bufs[i].resize(checked[i].nbytes);
      expected[i] = bufs[i].data();
      targets.push_back(Target{checked[i].tensor, checked[i].region, bufs[i].data()});
    }
  }
  fill(generation, targets);
  if (device >= 0) cuda::host::set_device(device);
  std::vector<uint8_t> staged;
  LiveDiff d;
  for (size_t i = 0; i < checked.size(); ++i) {
    const auto& t = commit_.tensors[checked[i].tensor];
    const uint64_t nbytes = checked[i].nbytes;
    const uint8_t* a = expected[i];
    const uint8_t* b = static_cast<const uint8_t*>(checked[i].live->data);
    if (device >= 0) {
      staged.resize(nbytes);
      cuda::host::to_host(staged.data(), b, nbytes);
      b = staged.data();
    }
    if (std::memcmp(a, b, nbytes) == 0) continue;
    uint32_t u = unit_bytes(served_[checked[i].tensor]);
    uint64_t diff = 0;
    for (uint64_t k = 0; k < nbytes / u; ++k) diff += std::memcmp(a + k * u, b + k * u, u) != 0;
    if (d.tensors++ == 0) d.first = t.name;
    d.elements += diff;
  }
  return d;
}

namespace {

// Whether a file of a model directory holds weights in another format than the store's safetensors files
// (what restore --out leaves out: they hold the weights as they were, not as the generation has them).
bool other_weights_file(std::string_view name) {
  for (std::string_view ext :
       {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".npz"}) {
    if (name.size() >= ext.size() && name.substr(name.size() - ext.size()) == ext) return true;
  }
  return false;
}

// The model directory's top-level files that restore --out copies: regular files (or symlinks to one, as in
// a Hugging Face cache snapshot), not hidden, not the index (written from the generation's files), not weights.
std::vector<std::string> non_weight_files(const std::string& model_dir) {
  std::vector<std::string> names;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(model_dir, ec)) {
    const std::string name = e.path().filename().string();
    if (name.empty() || name[0] == '.' || name == safetensors::kIndexFileName || other_weights_file(name)) continue;
    std::error_code ec2;
    if (std::filesystem::is_regular_file(e.path(), ec2)) names.push_back(name);
  }
  if (ec) throw Error(ErrorCode::kIo, "cannot list " + model_dir + ": " + ec.message());
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace

std::vector<std::string> Store::restore_to_dir(uint64_t generation, const std::string& out_dir,
                                               std::vector<std::string>* copied) {
  // Into a new (or empty) directory only: another may be the model's own (whose files the store names:
  // they would be replaced behind its back, and every later open refused), the store, or another model's.
  std::string final_dir = out_dir;
  while (final_dir.size() > 1 && final_dir.back() == '/') final_dir.pop_back();
  if (final_dir.empty()) throw Error(ErrorCode::kInvalidArg, "restore: no output directory given");
  bool empty_dir = false;
  if (fs::exists(final_dir)) {
    std::error_code ec;
    empty_dir = fs::is_directory(final_dir) && std::filesystem::is_empty(final_dir, ec) && !ec;
    if (!empty_dir) {
      throw Error(ErrorCode::kInvalidArg, "cannot write generation " + std::to_string(generation) + " to " + out_dir +
                                              ": it already exists (the output must be a new or empty directory)");
    }
  }
  std::vector<std::vector<uint8_t>> bufs = state(generation);
  // A tensor served in another dtype goes out in the files' dtype when every value converts back exactly
  // (always when the served dtype is the narrower), else in the served dtype: nothing is rounded.
  std::vector<DType> out_dtype(commit_.tensors.size());
  std::vector<std::string> as_served;
  for (size_t i = 0; i < commit_.tensors.size(); ++i) {
    const TensorEntry& t = commit_.tensors[i];
    const DType served = served_[i];
    out_dtype[i] = t.dtype;
    if (served == t.dtype) continue;
    const uint32_t u = unit_bytes(served);
    bool exact = true;
    for (uint64_t k = 0; exact && k < bufs[i].size() / u; ++k)
      exact = converts_back_exactly(bufs[i].data() + k * u, served, t.dtype);
    if (!exact) {
      out_dtype[i] = served;
      as_served.push_back(t.name);
      continue;
    }
    std::vector<uint8_t> file_bytes(t.nbytes);
    convert_elements(bufs[i].data(), served, file_bytes.data(), t.dtype, bufs[i].size() / u);
    bufs[i] = std::move(file_bytes);
  }
  // Filled under a temporary name beside it, then published whole: after a failure or a crash the
  // directory is complete or absent.
  const std::string tmp =
      fs::join(fs::dirname(final_dir), "." + fs::basename(final_dir) + ".livetrain-tmp." + std::to_string(::getpid()));
  // Created before the try: a directory of that name already there (another thread's, a crashed run's) is
  // never this call's to remove.
  if (::mkdir(tmp.c_str(), 0755) != 0) {
    const Error e = io_error("create directory " + tmp);
    throw Error(e.code(), "writing generation " + std::to_string(generation) + " to " + out_dir + ": " + e.what());
  }
  try {
    for (uint32_t f = 0; f < commit_.files.size(); ++f) {
      const std::string& name = commit_.files[f].name;
      safetensors::File orig = safetensors::File::open(fs::join(model_dir_, name));
      std::vector<safetensors::TensorRef> refs;
      for (size_t i = 0; i < commit_.tensors.size(); ++i) {
        const TensorEntry& t = commit_.tensors[i];
        if (t.file == f)
          refs.push_back(safetensors::TensorRef{t.name, out_dtype[i], t.shape, bufs[i].data(), bufs[i].size()});
      }
      safetensors::WriteOptions opt;
      opt.metadata = orig.header().metadata;
      safetensors::write_file(fs::join(tmp, name), refs, opt);
    }
    std::string index = fs::join(model_dir_, std::string(safetensors::kIndexFileName));
    if (fs::exists(index))
      fs::write_file_atomic(fs::join(tmp, std::string(safetensors::kIndexFileName)), fs::read_file(index));
    // Without config.json and the tokenizer's files the directory would not load as a model.
    const std::vector<std::string> others = non_weight_files(model_dir_);
    for (const std::string& name : others)
      fs::write_file_atomic(fs::join(tmp, name), fs::read_file(fs::join(model_dir_, name)));
    // An empty directory given (tempfile.mkdtemp) makes way; publish refuses whatever appears there meanwhile.
    if (empty_dir && ::rmdir(final_dir.c_str()) != 0) throw io_error("remove the empty directory " + final_dir);
    fs::publish_directory(tmp, final_dir);
    if (copied) *copied = others;
  } catch (const Error& e) {
    std::error_code ignored;
    std::filesystem::remove_all(tmp, ignored);
    throw Error(e.code(), "writing generation " + std::to_string(generation) + " to " + out_dir + ": " + e.what());
  } catch (...) {
    std::error_code ignored;
    std::filesystem::remove_all(tmp, ignored);
    throw;
  }
  return as_served;
}

void Store::set_served(const std::vector<std::pair<std::string, DType>>& served) {
  check_usable();
  require_rank0("setting the served dtype");
  sync();
  const auto index = tensor_index(commit_);
  Commit c = commit_;
  std::set<size_t> changed;
  for (const auto& [name, dtype] : served) {
    const size_t i = served_tensor(index, c, name, dtype, dir_, "the engine");
    if (c.tensors[i].served == dtype) continue;
    c.tensors[i].served = dtype;
    changed.insert(i);
  }
  if (changed.empty()) return;
  for (const Held& h : held_) {
    if (changed.count(h.tensor)) {
      throw Error(ErrorCode::kInvalidArg, "checkpoint store " + dir_ + ": the served dtype of \"" +
                                              c.tensors[h.tensor].name +
                                              "\" changes only in a store opened without a head copy of it (held=[])");
    }
  }
  check_served_change(c, "the engine");
  write_commit(c);
  commit_ = c;
  set_served_dtypes();
}

void Store::serve_as(const std::vector<std::pair<std::string, DType>>& served) {
  check_usable();
  const std::vector<std::pair<std::string, DType>> before = served_options_;
  const std::vector<DType> old = served_;
  served_options_.insert(served_options_.end(), served.begin(), served.end());
  try {
    set_served_dtypes();
    for (const Held& h : held_) {
      if (served_[h.tensor] != old[h.tensor]) {
        throw Error(ErrorCode::kInvalidArg, "checkpoint store " + dir_ + ": tensor \"" +
                                                commit_.tensors[h.tensor].name + "\" has a head copy in " +
                                                std::string(dtype_name(old[h.tensor])) +
                                                "; declare its served dtype when opening the store (served=)");
      }
    }
  } catch (...) {
    served_options_ = before;
    served_ = old;
    throw;
  }
}

void Store::set_served_dtypes() {
  served_ = recorded_dtypes(commit_);
  const auto index = tensor_index(commit_);
  for (const auto& [name, dtype] : served_options_) {
    served_[served_tensor(index, commit_, name, dtype, dir_, "the engine")] = dtype;
  }
}

uint64_t Store::served_nbytes(size_t tensor) const { return commit_.tensors[tensor].nbytes_as(served_[tensor]); }

void Store::check_served_change(const Commit& next, const std::string& who) const {
  std::set<size_t> changed;
  for (size_t i = 0; i < next.tensors.size(); ++i) {
    if (next.tensors[i].served != commit_.tensors[i].served) changed.insert(i);
  }
  if (changed.empty()) return;
  // Saved generations hold such a tensor's changes in the dtype it was served in then: they would not
  // apply to the other one.
  const std::vector<DType> recorded = recorded_dtypes(commit_);
  for (const auto& rec : collect(commit_.oldest, commit_.head, &recorded).records) {
    if (changed.count(rec.tensor)) {
      const TensorEntry& t = commit_.tensors[rec.tensor];
      throw Error(ErrorCode::kInvalidArg,
                  "tensor \"" + t.name + "\" is served as " + std::string(dtype_name(next.tensors[rec.tensor].served)) +
                      " by " + who + " but the checkpoint store " + dir_ + " has generations of it saved as " +
                      std::string(dtype_name(t.served)) + " (" + rec.what + "): serve it as " +
                      std::string(dtype_name(t.served)) + ", or materialize and start a new store");
    }
  }
}

std::vector<std::string> Store::verify(Progress progress) {
  std::vector<std::string> problems;
  const std::vector<DType> recorded = recorded_dtypes(commit_);
  for (uint64_t g = commit_.oldest; g <= commit_.head; ++g) {
    report(progress, "check deltas", g - commit_.oldest, commit_.head - commit_.oldest);
    const Generation* gen = commit_.find(g);
    for (const Part& part : gen->parts) {
      if (!part.file.empty()) {
        std::string path = fs::join(dir_, part.file);
        try {
          if (!fs::exists(path))
            throw Error(ErrorCode::kNotFound,
                        "delta file " + path + " of generation " + std::to_string(g) + " is missing");
          fs::Mapping map = fs::Mapping::open_readonly(path);
          check_part_file(g, gen->ranks, part, map, recorded, [](size_t, const DeltaRecord&, const Region&) {});
        } catch (const Error& e) {
          problems.push_back(e.what());
        }
      }
      if (part.optimizer_state.empty()) continue;
      try {
        check_optimizer_state(dir_, part);
      } catch (const Error& e) {
        problems.push_back(e.what());
      }
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
  std::set<std::string> named = {std::string(kCommitFileName), std::string(kJournalFileName)};
  for (const auto& g : commit_.generations) {
    for (const Part& p : g.parts) {
      if (!p.file.empty()) named.insert(p.file);
      if (!p.optimizer_state.empty()) named.insert(p.optimizer_state);
    }
  }
  DIR* d = ::opendir(dir_.c_str());
  if (!d) throw io_error("open directory " + dir_);
  std::vector<std::string> doomed;
  while (dirent* e = ::readdir(d)) {
    std::string name = e->d_name;
    bool ours = fs::is_atomic_temp_name(name) || generation_file_name(name);
    if (ours && !named.count(name)) doomed.push_back(name);
  }
  ::closedir(d);
  for (const auto& name : doomed) remove_generation_file(dir_, name);
  if (!doomed.empty()) fs::fsync_dir(dir_);
}

void Store::require_rank0(const char* what) const {
  if (rank_ != 0) {
    throw Error(ErrorCode::kInvalidArg, std::string("checkpoint store ") + dir_ + ": " + what +
                                            " is rank 0's (it holds the LOCK); this is rank " + std::to_string(rank_));
  }
}

void Store::gc(uint64_t keep_from, Progress progress, bool copy_symlinks) {
  check_usable();
  require_rank0("gc");
  sync();
  if (!commit_.find(keep_from)) (void)state(keep_from);  // throws the not-found error
  if (keep_from == commit_.oldest) return;
  if (commit_.materialized < keep_from) materialize(keep_from, copy_symlinks, progress);
  Commit c = commit_;
  std::vector<std::string> dropped;
  for (const auto& g : c.generations) {
    for (const Part& p : g.parts) {
      if (g.generation <= keep_from && !p.file.empty()) dropped.push_back(p.file);
      if (g.generation < keep_from && !p.optimizer_state.empty()) dropped.push_back(p.optimizer_state);
    }
  }
  for (const auto& name : dropped) check_removable(dir_, name);  // before COMMIT changes (commit_parse admits no other)
  c.generations.erase(c.generations.begin(), c.generations.begin() + static_cast<long>(keep_from - c.oldest));
  // The new base is reached through the model files, not deltas; its optimizer states stay.
  Generation& base = c.generations.front();
  std::vector<Part> kept;
  for (Part& p : base.parts) {
    if (p.optimizer_state.empty()) continue;
    p.file.clear();
    p.bytes.reset();
    p.hash = 0;
    kept.push_back(p);
  }
  base.parts = kept;
  c.oldest = keep_from;
  write_commit(c);
  commit_ = c;
  for (const auto& name : dropped) remove_generation_file(dir_, name);
  fs::fsync_dir(dir_);
}

}  // namespace livetrain::checkpoint
