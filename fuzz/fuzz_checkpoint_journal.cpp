// libFuzzer target: the materialize journal parser (journal_parse) on arbitrary bytes. Every input must
// either be rejected with livetrain::Error or parse into entries that lie inside the input and inside the
// model files they name, and that re-encode to exactly the input (the format has one encoding). The header's
// parser (journal_parse_header, `checkpoint list`'s) must accept whatever journal_parse accepts, with the
// same generations.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "livetrain/checkpoint/hash.hpp"
#include "livetrain/checkpoint/journal.hpp"
#include "livetrain/error.hpp"

namespace checkpoint = livetrain::checkpoint;

namespace {

// The model files the fuzzed journals are checked against; the seed corpus (make_checkpoint_corpus) uses them.
const std::vector<uint64_t> kFileSizes = {4096, 100, 0, 70000};

// As in fuzz_checkpoint_delta: rewrite each entry checksum and the trailer so mutations reach past them (the
// comparisons themselves are covered by test_checkpoint_format).
void fix_checksums(std::string& j) {
  if (j.size() < 40) return;
  const size_t end = j.size() - 8;
  uint32_t count;
  std::memcpy(&count, j.data() + 12, 4);
  size_t pos = 32;
  for (uint32_t i = 0; i < count; ++i) {
    if (end - pos < 24) break;
    uint64_t length;
    std::memcpy(&length, j.data() + pos + 16, 8);
    if (length > end - pos - 24 || end - pos - 24 - length < 8) break;
    const uint64_t sum = checkpoint::xxh64(j.data() + pos, 24 + length);
    std::memcpy(j.data() + pos + 24 + length, &sum, 8);
    pos += 24 + length + 8;
  }
  const uint64_t sum = checkpoint::xxh64(j.data(), end);
  std::memcpy(j.data() + end, &sum, 8);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string input(reinterpret_cast<const char*>(data), size);
  fix_checksums(input);
  const uint8_t* bytes = reinterpret_cast<const uint8_t*>(input.data());
  checkpoint::Journal header;
  bool header_read = false;
  try {
    header = checkpoint::journal_parse_header(bytes, input.size(), "fuzz");
    header_read = true;
  } catch (const livetrain::Error&) {
  }
  try {
    checkpoint::Journal j = checkpoint::journal_parse(bytes, input.size(), "fuzz", kFileSizes);
    if (!header_read || header.from != j.from || header.to != j.to || !header.entries.empty()) std::abort();
    std::string again = checkpoint::journal_header(j.from, j.to);
    std::vector<std::vector<uint8_t>> files;
    for (uint64_t s : kFileSizes) files.emplace_back(s, 0);
    for (const auto& e : j.entries) {
      if (e.kind == checkpoint::JournalEntry::kReplace) {  // a whole file replaced: no range in the old file
        if (e.file >= kFileSizes.size() || e.length != 8) std::abort();
        checkpoint::journal_append_replace(again, e.file, e.offset, e.hash);
        continue;
      }
      // The invariants apply_journal relies on before it writes a byte.
      if (e.file >= kFileSizes.size() || e.offset > kFileSizes[e.file] || e.length > kFileSizes[e.file] - e.offset)
        std::abort();
      if (e.bytes < bytes || e.bytes + e.length > bytes + input.size()) std::abort();
      if (e.length) std::memcpy(files[e.file].data() + e.offset, e.bytes, e.length);  // what pwrite would do
      checkpoint::journal_append(again, e.file, e.offset, e.bytes, e.length);
    }
    checkpoint::journal_finish(again);
    if (again != input) std::abort();
  } catch (const livetrain::Error&) {
  }
  return 0;
}
