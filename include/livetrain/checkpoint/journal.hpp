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
Journal journal_parse(const uint8_t* bytes, size_t size, std::string_view what,
                      const std::vector<uint64_t>& file_sizes);

}  // namespace livetrain::checkpoint
