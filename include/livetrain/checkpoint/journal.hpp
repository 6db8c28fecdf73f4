// The codec of the materialize redo journal (format.hpp has the bytes).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "livetrain/checkpoint/format.hpp"

namespace livetrain::checkpoint {

// One entry of a materialize journal: `length` new bytes for file `file` at `offset`; `bytes` points into
// the journal's buffer.
// A kReplace entry (version 2): file `file` is replaced whole by the copy materialize prepared beside it,
// `offset` bytes long with content hash `hash` (its `bytes` are that hash, u64 LE; `length` 8).
struct JournalEntry {
  enum Kind : uint32_t { kWrite = 0, kReplace = 1 };
  uint32_t file = 0;
  uint64_t offset = 0;
  uint64_t length = 0;
  const uint8_t* bytes = nullptr;
  uint32_t kind = kWrite;
  uint64_t hash = 0;  // kReplace: the new file's xxh64-4k content hash
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
// A kReplace entry: file `file` becomes the prepared copy of `size` bytes and content hash `hash`; makes the
// journal version 2.
void journal_append_replace(std::string& journal, uint32_t file, uint64_t size, uint64_t hash);
void journal_finish(std::string& journal);

// Parses a whole journal held in memory (no file I/O), checking magic, version (1 or 2), every checksum, entry
// kinds (version 1: writes only), and that every write lies inside the model file it names (`file_sizes[file]`
// bytes) and no file is both written and replaced. Errors are
// kFormat naming `what` and the entry index.
Journal journal_parse(const uint8_t* bytes, size_t size, std::string_view what,
                      const std::vector<uint64_t>& file_sizes);
// The header only (size, magic, version; `from` and `to`), no entries: what a journal is for, without reading
// its entries and checksums (they hold every changed byte: about the model's size after a dense step).
Journal journal_parse_header(const uint8_t* bytes, size_t size, std::string_view what);

}  // namespace livetrain::checkpoint
