// Materialization: brings the model directory's own safetensors files to a generation in place, through a
// redo journal (written and fsynced before any model byte changes, removed after the commit).
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>

#include "checkpoint/bytes.hpp"
#include "livetrain/checkpoint/hash.hpp"
#include "livetrain/checkpoint/journal.hpp"
#include "livetrain/checkpoint/store.hpp"
#include "livetrain/error.hpp"

namespace livetrain::checkpoint {

namespace {

using bytes::get;

// Byte runs closer than this are merged into one journal entry: an entry costs 32 bytes of framing.
constexpr uint64_t kMergeGap = 32;

void report(const Progress& p, std::string_view what, uint64_t done, uint64_t total) {
  if (p) p(what, done, total);
}

}  // namespace

uint64_t Store::apply_journal(const uint8_t* bytes, size_t size, const std::string& what) {
  // Check every entry before writing anything.
  std::vector<uint64_t> sizes;
  for (const auto& f : commit_.files) sizes.push_back(f.size);
  Journal j = journal_parse(bytes, size, what, sizes);
  const std::vector<JournalEntry>& entries = j.entries;
  const uint64_t to = j.to;

  std::vector<fs::Fd> fds(commit_.files.size());
  for (size_t i = 0; i < entries.size(); ++i) {
    const JournalEntry& e = entries[i];
    std::string path = fs::join(model_dir_, commit_.files[e.file].name);
    if (!fds[e.file].valid()) {
      // O_NOFOLLOW: never write through a symlink into a shared cache blob.
      fds[e.file] = fs::Fd(::open(path.c_str(), O_WRONLY | O_NOFOLLOW | O_CLOEXEC));
      if (!fds[e.file].valid()) throw io_error("open " + path + " for writing");
    }
    size_t done = 0;
    while (done < e.length) {
      ssize_t n = ::pwrite(fds[e.file].get(), e.bytes + done, e.length - done, static_cast<off_t>(e.offset + done));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) throw io_error("write " + path);
      done += static_cast<size_t>(n);
    }
    if (i == entries.size() / 2) crash_point("apply-half");
  }
  for (size_t f = 0; f < fds.size(); ++f) {
    // A failed fsync is final (the kernel may have dropped the pages): the journal stays for a redo.
    if (fds[f].valid() && ::fsync(fds[f].get()) != 0)
      throw io_error("fsync " + fs::join(model_dir_, commit_.files[f].name));
  }
  return to;
}

void Store::commit_materialized(uint64_t generation) {
  Commit c = commit_;
  c.materialized = generation;
  for (auto& f : c.files) {
    fs::Mapping m = fs::Mapping::open_readonly(fs::join(model_dir_, f.name));
    f.size = m.size();
    f.hash = content_hash(m.data(), m.size());
  }
  write_commit(c);
  commit_ = c;
}

void Store::recover_journal() {
  std::string path = fs::join(dir_, std::string(kJournalFileName));
  if (!fs::exists(path)) return;
  std::string bytes = fs::read_file(path);
  const uint8_t* p = reinterpret_cast<const uint8_t*>(bytes.data());
  if (bytes.size() < 40) throw Error(ErrorCode::kFormat, path + ": truncated journal");
  uint64_t from = get<uint64_t>(p + 16), to = get<uint64_t>(p + 24);
  if (to == commit_.materialized) {
    // The commit happened; only the journal's removal was lost.
  } else if (from == commit_.materialized) {
    apply_journal(p, bytes.size(), path);  // redo: idempotent, whatever part was applied before the crash
    crash_point("recovered-applied");
    commit_materialized(to);
  } else {
    throw Error(ErrorCode::kFormat, path + ": journal from generation " + std::to_string(from) + " to " +
                                        std::to_string(to) + " does not fit the committed materialized generation " +
                                        std::to_string(commit_.materialized));
  }
  if (::unlink(path.c_str()) != 0) throw io_error("remove " + path);
  fs::fsync_dir(dir_);
}

void Store::materialize(uint64_t generation, bool copy_symlinks, Progress progress) {
  check_usable();
  require_rank0("materialize");
  std::vector<std::vector<uint8_t>> target = state(generation);  // throws for an unknown generation
  if (generation == commit_.materialized) return;

  for (const auto& f : commit_.files) {
    std::string path = fs::join(model_dir_, f.name);
    struct stat st {};
    if (::lstat(path.c_str(), &st) != 0) throw io_error("stat " + path);
    if (!S_ISLNK(st.st_mode)) continue;
    if (!copy_symlinks) {
      char target_buf[4096] = {};
      ssize_t n = ::readlink(path.c_str(), target_buf, sizeof target_buf - 1);
      throw Error(ErrorCode::kInvalidArg,
                  "model file " + path + " is a symlink" +
                      (n > 0 ? " to " + std::string(target_buf, static_cast<size_t>(n)) : "") +
                      ": materializing would write into the file it points at (a Hugging Face cache blob is shared "
                      "by every snapshot); use --copy-symlinks to replace the link by a real copy first");
    }
    // The copy has the same bytes, so this step is safe at any instant (write_file_atomic replaces links).
    report(progress, "copy symlinked file", 0, f.size);
    fs::Mapping m = fs::Mapping::open_readonly(path);
    fs::write_file_atomic(path, std::string_view(reinterpret_cast<const char*>(m.data()), m.size()));
  }

  // The files hold `materialized`; check that nobody changed them since open, then diff against target.
  std::vector<fs::Mapping> maps;
  for (const auto& f : commit_.files) {
    std::string path = fs::join(model_dir_, f.name);
    maps.push_back(fs::Mapping::open_readonly(path));
    if (maps.back().size() != f.size || content_hash(maps.back().data(), maps.back().size()) != f.hash) {
      throw Error(ErrorCode::kFormat, "model file " + path + " changed since the checkpoint store was opened");
    }
  }
  report(progress, "build journal", 0, commit_.tensors.size());
  std::string journal = journal_header(commit_.materialized, generation);
  uint32_t count = 0;
  for (size_t i = 0; i < commit_.tensors.size(); ++i) {
    const TensorEntry& t = commit_.tensors[i];
    const uint8_t* cur = maps[t.file].data() + t.offset;
    const uint8_t* want = target[i].data();
    uint64_t k = 0;
    while (k < t.nbytes) {
      if (cur[k] == want[k]) {
        ++k;
        continue;
      }
      uint64_t start = k, last = k;
      for (++k; k < t.nbytes && k - last <= kMergeGap; ++k) {
        if (cur[k] != want[k]) last = k;
      }
      journal_append(journal, t.file, t.offset + start, want + start, last + 1 - start);
      ++count;
      k = last + 1;
    }
  }
  journal_finish(journal);
  maps.clear();

  std::string jpath = fs::join(dir_, std::string(kJournalFileName));
  report(progress, "write journal", 0, journal.size());
  fs::write_file_atomic(jpath, journal);
  crash_point("journal-written");
  report(progress, "apply", 0, count);
  apply_journal(reinterpret_cast<const uint8_t*>(journal.data()), journal.size(), jpath);
  crash_point("applied");
  commit_materialized(generation);
  crash_point("materialize-committed");
  if (::unlink(jpath.c_str()) != 0) throw io_error("remove " + jpath);
  fs::fsync_dir(dir_);
}

}  // namespace livetrain::checkpoint
