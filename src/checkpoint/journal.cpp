// The materialize journal codec: builds and parses the redo journal of docs/checkpoint.md in memory, so
// that materialize, recovery and the fuzz target share one parser of these outside bytes.
#include <algorithm>
#include <cstring>

#include "checkpoint/bytes.hpp"
#include "livetrain/checkpoint/hash.hpp"
#include "livetrain/checkpoint/journal.hpp"
#include "livetrain/error.hpp"

namespace livetrain::checkpoint {

namespace {

using bytes::get;
using bytes::put;

constexpr size_t kHeaderBytes = 32;
constexpr size_t kEntryFraming = 24;  // file, kind, offset, length; then the bytes and a u64 checksum

}  // namespace

std::string journal_header(uint64_t from, uint64_t to) {
  std::string j(kJournalMagic);
  put<uint32_t>(j, kJournalVersion);
  put<uint32_t>(j, 0);  // entry count, bumped by journal_append
  put<uint64_t>(j, from);
  put<uint64_t>(j, to);
  return j;
}

namespace {

void append_entry(std::string& journal, uint32_t kind, uint32_t file, uint64_t offset, const uint8_t* bytes,
                  uint64_t length) {
  if (journal.size() < kHeaderBytes) throw Error(ErrorCode::kInvalidArg, "journal_append: no journal header");
  uint32_t count = get<uint32_t>(reinterpret_cast<const uint8_t*>(journal.data()) + 12);
  if (count == UINT32_MAX) throw Error(ErrorCode::kInvalidArg, "journal_append: too many entries");
  size_t at = journal.size();
  put<uint32_t>(journal, file);
  put<uint32_t>(journal, kind);
  put<uint64_t>(journal, offset);
  put<uint64_t>(journal, length);
  journal.append(reinterpret_cast<const char*>(bytes), length);
  put<uint64_t>(journal, xxh64(journal.data() + at, journal.size() - at));
  ++count;
  std::memcpy(journal.data() + 12, &count, 4);
}

}  // namespace

void journal_append(std::string& journal, uint32_t file, uint64_t offset, const uint8_t* bytes, uint64_t length) {
  append_entry(journal, JournalEntry::kWrite, file, offset, bytes, length);
}

void journal_append_replace(std::string& journal, uint32_t file, uint64_t size, uint64_t hash) {
  uint8_t h[8];
  std::memcpy(h, &hash, 8);
  append_entry(journal, JournalEntry::kReplace, file, size, h, 8);
  const uint32_t version = kJournalVersionReplace;
  std::memcpy(journal.data() + 8, &version, 4);
}

void journal_finish(std::string& journal) {
  uint64_t sum = xxh64(journal.data(), journal.size());
  put<uint64_t>(journal, sum);
}

Journal journal_parse_header(const uint8_t* bytes, size_t size, std::string_view what) {
  auto bad = [&](const std::string& msg) { return Error(ErrorCode::kFormat, std::string(what) + ": " + msg); };
  if (size < kHeaderBytes + 8) throw bad("truncated journal (" + std::to_string(size) + " bytes)");
  if (std::memcmp(bytes, kJournalMagic.data(), 8) != 0) throw bad("not a livetrain journal (bad magic)");
  uint32_t version = get<uint32_t>(bytes + 8);
  if (version != kJournalVersion && version != kJournalVersionReplace) {
    throw Error(ErrorCode::kUnsupported, std::string(what) + ": journal version " + std::to_string(version) +
                                             " (this build reads versions " + std::to_string(kJournalVersion) +
                                             " and " + std::to_string(kJournalVersionReplace) + ")");
  }
  Journal j;
  j.from = get<uint64_t>(bytes + 16);
  j.to = get<uint64_t>(bytes + 24);
  return j;
}

Journal journal_parse(const uint8_t* bytes, size_t size, std::string_view what,
                      const std::vector<uint64_t>& file_sizes) {
  auto bad = [&](const std::string& msg) { return Error(ErrorCode::kFormat, std::string(what) + ": " + msg); };
  Journal j = journal_parse_header(bytes, size, what);
  const uint32_t version = get<uint32_t>(bytes + 8);
  // The whole-file checksum first: a torn journal is reported as such, not as a bad field.
  if (xxh64(bytes, size - 8) != get<uint64_t>(bytes + size - 8))
    throw bad("journal checksum mismatch (corrupt or truncated)");
  uint32_t count = get<uint32_t>(bytes + 12);
  // Not reserve(count): the count is outside input, and a short file cannot hold that many entries.
  size_t pos = kHeaderBytes;
  const size_t end = size - 8;
  std::vector<uint8_t> written(file_sizes.size(), 0), replaced(file_sizes.size(), 0);
  for (uint32_t i = 0; i < count; ++i) {
    std::string where = "entry " + std::to_string(i);
    if (end - pos < kEntryFraming) throw bad(where + " truncated");
    JournalEntry e{get<uint32_t>(bytes + pos), get<uint64_t>(bytes + pos + 8), get<uint64_t>(bytes + pos + 16),
                   nullptr};
    e.kind = get<uint32_t>(bytes + pos + 4);
    if (e.kind != JournalEntry::kWrite && (version == kJournalVersion || e.kind != JournalEntry::kReplace))
      throw bad(where + ": entry kind " + std::to_string(e.kind) + " (version " + std::to_string(version) + ")");
    if (e.kind == JournalEntry::kReplace && e.length != 8) throw bad(where + ": a replace entry's length is not 8");
    // Both sides of each comparison are bounded by `size`, so nothing here can overflow.
    const size_t room = end - pos - kEntryFraming;
    if (e.length > room || room - e.length < 8) throw bad(where + " truncated");
    if (e.file >= file_sizes.size()) {
      throw bad(where + ": file index " + std::to_string(e.file) + " out of range (" +
                std::to_string(file_sizes.size()) + " files)");
    }
    if (e.kind == JournalEntry::kWrite && (e.offset > file_sizes[e.file] || e.length > file_sizes[e.file] - e.offset)) {
      throw bad(where + ": range past the end of file " + std::to_string(e.file));
    }
    (e.kind == JournalEntry::kWrite ? written : replaced)[e.file] = 1;
    if (written[e.file] && replaced[e.file])
      throw bad(where + ": file " + std::to_string(e.file) + " is both written in place and replaced");
    e.bytes = bytes + pos + kEntryFraming;
    if (e.kind == JournalEntry::kReplace) e.hash = get<uint64_t>(e.bytes);
    if (xxh64(bytes + pos, kEntryFraming + e.length) != get<uint64_t>(bytes + pos + kEntryFraming + e.length)) {
      throw bad(where + ": checksum mismatch");
    }
    pos += kEntryFraming + e.length + 8;
    j.entries.push_back(e);
  }
  if (pos != end) throw bad("trailing bytes after the last entry");
  if (version == kJournalVersionReplace && std::find(replaced.begin(), replaced.end(), 1) == replaced.end())
    throw bad("version 2 journal without a replace entry");
  return j;
}

}  // namespace livetrain::checkpoint
