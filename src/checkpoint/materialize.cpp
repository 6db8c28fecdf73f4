// Materialization: brings the model directory's own safetensors files to a generation in place, through a
// redo journal (written and fsynced before any model byte changes, removed after the commit). A file holding
// a tensor whose served values its dtype cannot hold (a trained F32 A_log over BF16 files) is rewritten
// whole with that tensor in the served dtype: prepared beside it, renamed over it by the journal's redo.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>

#include "checkpoint/bytes.hpp"
#include "livetrain/checkpoint/convert.hpp"
#include "livetrain/checkpoint/hash.hpp"
#include "livetrain/checkpoint/journal.hpp"
#include "livetrain/checkpoint/store.hpp"
#include "livetrain/error.hpp"
#include "livetrain/safetensors.hpp"

namespace livetrain::checkpoint {

namespace {

using bytes::get;

// Byte runs closer than this are merged into one journal entry: an entry costs 32 bytes of framing.
constexpr uint64_t kMergeGap = 32;

void report(const Progress& p, std::string_view what, uint64_t done, uint64_t total) {
  if (p) p(what, done, total);
}

// Where the new version of a model file that materialize rewrites is prepared: beside it (the rename that
// replaces it must not cross filesystems), hidden.
std::string prepared_path(const std::string& model_dir, const std::string& name) {
  return fs::join(model_dir, "." + name + ".livetrain-materialize");
}

}  // namespace

Journal Store::parse_journal(const uint8_t* bytes, size_t size, const std::string& what) const {
  std::vector<uint64_t> sizes;
  for (const auto& f : commit_.files) sizes.push_back(f.size);
  return journal_parse(bytes, size, what, sizes);
}

void Store::apply_journal(const Journal& j, const std::string& what) {
  const std::vector<JournalEntry>& entries = j.entries;

  // Files replaced whole first: the prepared copy is renamed over the file; if it is gone, the rename happened
  // before a crash, and the file must be that copy.
  bool renamed = false;
  for (const JournalEntry& e : entries) {
    if (e.kind != JournalEntry::kReplace) continue;
    const std::string path = fs::join(model_dir_, commit_.files[e.file].name);
    const std::string prepared = prepared_path(model_dir_, commit_.files[e.file].name);
    if (fs::exists(prepared)) {
      fs::Mapping m = fs::Mapping::open_readonly(prepared);
      if (m.size() != e.offset || content_hash(m.data(), m.size()) != e.hash) {
        throw Error(ErrorCode::kFormat,
                    what + ": the rewritten model file " + prepared + " does not match the journal (size or hash)");
      }
      if (::rename(prepared.c_str(), path.c_str()) != 0) throw io_error("rename " + prepared + " to " + path);
      renamed = true;
    } else {
      fs::Mapping m = fs::Mapping::open_readonly(path);
      if (m.size() != e.offset || content_hash(m.data(), m.size()) != e.hash) {
        throw Error(ErrorCode::kFormat, what + ": model file " + path + " is neither as the store had it nor the " +
                                            "rewritten copy the journal names, and that copy (" + prepared +
                                            ") is missing");
      }
    }
  }
  if (renamed) fs::fsync_dir(model_dir_);
  std::vector<fs::Fd> fds(commit_.files.size());
  for (size_t i = 0; i < entries.size(); ++i) {
    const JournalEntry& e = entries[i];
    if (e.kind == JournalEntry::kReplace) {  // renamed above
      if (i == entries.size() / 2) crash_point("apply-half");
      continue;
    }
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
}

void Store::commit_materialized(uint64_t generation) {
  Commit c = commit_;
  c.materialized = generation;
  for (auto& f : c.files) {
    fs::Mapping m = fs::Mapping::open_readonly(fs::join(model_dir_, f.name));
    f.size = m.size();
    f.hash = content_hash(m.data(), m.size());
  }
  // A rewritten file has a new header: its tensors' dtypes and places come from it (same names and shapes).
  safetensors::Model model = safetensors::Model::open(model_dir_);
  for (TensorEntry& t : c.tensors) {
    const auto& e = model.tensor(t.name);
    if (e.info->shape != t.shape || fs::basename(e.file->path()) != c.files[t.file].name) {
      throw Error(ErrorCode::kFormat, "model file " + c.files[t.file].name + ": tensor \"" + t.name +
                                          "\" changed its shape or file during materialize");
    }
    t.dtype = e.info->dtype;
    t.offset = e.file->header().data_start() + e.info->begin;
    t.nbytes = e.info->nbytes();
  }
  write_commit(c);
  commit_ = c;
}

void Store::recover_journal() {
  std::string path = fs::join(dir_, std::string(kJournalFileName));
  if (!fs::exists(path)) {
    // A crash after preparing a rewritten model file but before its journal: the copy is garbage.
    for (const auto& f : commit_.files) ::unlink(prepared_path(model_dir_, f.name).c_str());
    return;
  }
  // Mapped, not read onto the heap: a journal holds every changed byte (about the model's size after a dense step).
  const fs::Mapping bytes = fs::Mapping::open_readonly(path);
  Journal j;  // its entries point into `bytes`
  try {
    j = parse_journal(bytes.data(), bytes.size(), path);
    if (j.to != commit_.materialized && j.from != commit_.materialized) {
      throw Error(ErrorCode::kFormat,
                  path + ": journal from generation " + std::to_string(j.from) + " to " + std::to_string(j.to) +
                      " does not fit the committed materialized generation " + std::to_string(commit_.materialized));
    }
  } catch (const Error& e) {
    throw Error(e.code(), std::string(e.what()) + "; " + unusable_journal_advice(path));
  }
  if (j.to == commit_.materialized) {
    // The commit happened; only the journal's removal was lost.
  } else {
    try {
      apply_journal(j, path);  // redo: idempotent, whatever part was applied before the crash
    } catch (const Error& e) {
      throw Error(e.code(), "finishing the interrupted materialize of generation " + std::to_string(j.from) + " to " +
                                std::to_string(j.to) + " failed: " + e.what() + "; the model files in " + model_dir_ +
                                " may be partly at generation " + std::to_string(j.to) +
                                " (every file loadable): every open of the store tries again (e.g. " +
                                "`livetrain checkpoint verify " + model_dir_ + "`), so fix the cause and open it");
    }
    crash_point("recovered-applied");
    commit_materialized(j.to);
  }
  if (::unlink(path.c_str()) != 0) throw io_error("remove " + path);
  fs::fsync_dir(dir_);
}

std::string Store::unusable_journal_advice(const std::string& path) const {
  // Whether materialize had written anything: the model files against COMMIT's sizes and hashes.
  for (const auto& f : commit_.files) {
    const std::string file = fs::join(model_dir_, f.name);
    bool same = false;
    try {
      fs::Mapping m = fs::Mapping::open_readonly(file);
      same = m.size() == f.size && content_hash(m.data(), m.size()) == f.hash;
    } catch (const Error&) {
    }
    if (!same) {
      return "the model file " + file + " no longer holds generation " + std::to_string(commit_.materialized) +
             " (the materialize had written it) and this journal cannot finish it; the store's deltas need the " +
             "model files of generation " + std::to_string(commit_.materialized) +
             " as their base: put back a copy of them, then remove " + path;
    }
  }
  return "the model files still hold generation " + std::to_string(commit_.materialized) +
         " (their sizes and hashes match COMMIT: the materialize had not written them), so nothing is lost: " +
         "remove " + path + " to use the store again";
}

std::vector<std::string> Store::materialize(uint64_t generation, bool copy_symlinks, Progress progress,
                                            bool round_to_file_dtype) {
  check_usable();
  require_rank0("materialize");
  std::vector<std::vector<uint8_t>> target = state(generation);  // throws for an unknown generation
  std::vector<std::string> rounded;
  if (round_to_file_dtype) {
    // Every value of a tensor served in another dtype, through the files' dtype and back: what the files
    // can hold. When that changes anything, the rounded weights become a generation of their own first.
    for (size_t i = 0; i < commit_.tensors.size(); ++i) {
      const TensorEntry& t = commit_.tensors[i];
      if (served_[i] == t.dtype) continue;
      const uint32_t us = unit_bytes(served_[i]);
      std::vector<uint8_t> file(t.nbytes), back(target[i].size());
      convert_elements(target[i].data(), served_[i], file.data(), t.dtype, target[i].size() / us);
      convert_elements(file.data(), t.dtype, back.data(), served_[i], target[i].size() / us);
      if (back == target[i]) continue;
      target[i] = std::move(back);
      rounded.push_back(t.name);
    }
    if (!rounded.empty()) {
      bool every_tensor = ranks_ == 1 && held_.size() == commit_.tensors.size();
      for (const Held& h : held_) every_tensor = every_tensor && is_whole(h.region, commit_.tensors[h.tensor].shape);
      if (!every_tensor) {
        throw Error(ErrorCode::kInvalidArg, "materialize generation " + std::to_string(generation) +
                                                " rounded to the files' dtype saves the rounded weights as a new "
                                                "generation first: open the store as one process with a head copy "
                                                "of every tensor (the default; not held=[] or a rank's regions)");
      }
      std::vector<LiveTensor> live;
      for (size_t i = 0; i < commit_.tensors.size(); ++i) {
        const TensorEntry& t = commit_.tensors[i];
        live.push_back(LiveTensor{t.name, served_[i], t.shape, target[i].data(), -1, {}});
      }
      SaveOptions options;
      options.weight_version = commit_.find(generation)->weight_version;
      options.save_if_unchanged = true;
      // `target` is now that generation's state, every value of which fits the files' dtype: materialized
      // in place below.
      generation = save(live, options).generation;
    }
  }
  if (generation == commit_.materialized) return {};

  for (const auto& f : commit_.files) {
    std::string path = fs::join(model_dir_, f.name);
    struct stat st {};
    if (::lstat(path.c_str(), &st) != 0) throw io_error("stat " + path);
    // A hard link is the same hazard as a symlink: writing in place changes the file under its other names
    // too (a copy made with `cp -l`, a deduplicating backup or cache).
    const bool hard_link = S_ISREG(st.st_mode) && st.st_nlink > 1;
    if (!S_ISLNK(st.st_mode) && !hard_link) continue;
    if (!copy_symlinks && hard_link) {
      throw Error(ErrorCode::kInvalidArg,
                  "model file " + path + " has " + std::to_string(st.st_nlink) +
                      " hard links: materializing in place would change it under its other names too; use "
                      "--copy-symlinks to replace it by a real copy first");
    }
    if (!copy_symlinks) {
      char target_buf[4096] = {};
      ssize_t n = ::readlink(path.c_str(), target_buf, sizeof target_buf - 1);
      throw Error(ErrorCode::kInvalidArg,
                  "model file " + path + " is a symlink" +
                      (n > 0 ? " to " + std::string(target_buf, static_cast<size_t>(n)) : "") +
                      ": materializing would write into the file it points at (a Hugging Face cache blob is shared "
                      "by every snapshot); use --copy-symlinks to replace the link by a real copy first");
    }
    // The copy has the same bytes, so this step is safe at any instant (write_file_atomic replaces links,
    // and a hard link's name by a file of its own).
    report(progress, "copy linked file", 0, f.size);
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
  // Each tensor's bytes as the files hold generation `generation`, in the dtype they are written in. The files
  // hold a generation when their values converted to the served dtype are its values: an element whose served
  // value did not change keeps the file's bits (an F32 file keeps its precision under a BF16 engine); a
  // changed one is written converted back when that is exact. A tensor with a value the files' dtype cannot
  // hold is written in the served dtype instead, and its file rewritten whole (a new header).
  std::vector<DType> out_dtype(commit_.tensors.size());
  std::vector<std::vector<uint8_t>> file_bytes(commit_.tensors.size());
  std::vector<bool> rewrite(commit_.files.size(), false);
  std::vector<std::string> widened;
  for (size_t i = 0; i < commit_.tensors.size(); ++i) {
    const TensorEntry& t = commit_.tensors[i];
    const DType served = served_[i];
    out_dtype[i] = t.dtype;
    if (served == t.dtype) continue;
    const uint8_t* cur = maps[t.file].data() + t.offset;
    const uint8_t* want = target[i].data();
    const uint32_t uf = unit_bytes(t.dtype), us = unit_bytes(served);
    std::vector<uint8_t>& fb = file_bytes[i];
    fb.assign(cur, cur + t.nbytes);
    uint8_t now[8];
    bool exact = true;
    for (uint64_t k = 0; k < t.nbytes / uf; ++k) {
      convert_elements(cur + k * uf, t.dtype, now, served, 1);
      if (std::memcmp(now, want + k * us, us) == 0) continue;
      if (!converts_back_exactly(want + k * us, served, t.dtype)) {
        exact = false;
        break;
      }
      convert_elements(want + k * us, served, fb.data() + k * uf, t.dtype, 1);
    }
    if (!exact) {
      out_dtype[i] = served;
      fb.clear();
      rewrite[t.file] = true;
      widened.push_back(t.name);
    }
  }
  auto bytes_of = [&](size_t i) -> const uint8_t* {
    return file_bytes[i].empty() ? target[i].data() : file_bytes[i].data();
  };
  std::string journal = journal_header(commit_.materialized, generation);
  uint32_t count = 0;
  for (uint32_t f = 0; f < commit_.files.size(); ++f) {
    if (!rewrite[f]) continue;
    const std::string& name = commit_.files[f].name;
    report(progress, "rewrite " + name, 0, 1);
    safetensors::File orig = safetensors::File::open(fs::join(model_dir_, name));
    std::vector<safetensors::TensorRef> refs;
    for (size_t i = 0; i < commit_.tensors.size(); ++i) {
      const TensorEntry& t = commit_.tensors[i];
      if (t.file != f) continue;
      const uint64_t nbytes = out_dtype[i] == served_[i] ? target[i].size() : t.nbytes;
      refs.push_back(safetensors::TensorRef{t.name, out_dtype[i], t.shape, bytes_of(i), nbytes});
    }
    safetensors::WriteOptions opt;
    opt.metadata = orig.header().metadata;
    const std::string prepared = prepared_path(model_dir_, name);
    safetensors::write_file(prepared, refs, opt);  // durable under its own name before the journal names it
    fs::Mapping m = fs::Mapping::open_readonly(prepared);
    journal_append_replace(journal, f, m.size(), content_hash(m.data(), m.size()));
    ++count;
  }
  crash_point("rewritten-prepared");
  std::vector<bool> written(commit_.files.size(), false);  // files the journal writes in place
  for (size_t i = 0; i < commit_.tensors.size(); ++i) {
    const TensorEntry& t = commit_.tensors[i];
    if (rewrite[t.file]) continue;
    const uint8_t* cur = maps[t.file].data() + t.offset;
    const uint8_t* want = bytes_of(i);
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
      written[t.file] = true;
      ++count;
      k = last + 1;
    }
  }
  journal_finish(journal);
  maps.clear();
  // Every file written in place must open for writing before the journal exists: a journal that cannot be
  // applied (a read-only model directory) would be redone, and fail, on every later open of the store.
  for (uint32_t f = 0; f < commit_.files.size(); ++f) {
    if (!written[f]) continue;
    const std::string path = fs::join(model_dir_, commit_.files[f].name);
    if (!fs::Fd(::open(path.c_str(), O_WRONLY | O_NOFOLLOW | O_CLOEXEC)).valid())
      throw io_error("materialize writes the model files in place; cannot open " + path + " for writing");
  }

  std::string jpath = fs::join(dir_, std::string(kJournalFileName));
  report(progress, "write journal", 0, journal.size());
  fs::write_file_atomic(jpath, journal);
  crash_point("journal-written");
  report(progress, "apply", 0, count);
  // Parsed back, so that every entry is checked before anything is written.
  apply_journal(parse_journal(reinterpret_cast<const uint8_t*>(journal.data()), journal.size(), jpath), jpath);
  crash_point("applied");
  commit_materialized(generation);
  crash_point("materialize-committed");
  if (::unlink(jpath.c_str()) != 0) throw io_error("remove " + jpath);
  fs::fsync_dir(dir_);
  return rounded.empty() ? widened : rounded;  // nothing is widened when the values were rounded first
}

}  // namespace livetrain::checkpoint
