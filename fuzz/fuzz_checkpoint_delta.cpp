// libFuzzer target: the checkpoint delta parser (delta_parse, versions 2 and 3 with region records) and
// record decoder (apply_record) on arbitrary bytes. Every input must either be rejected with livetrain::Error or parse
// into records whose sizes do not overflow, whose XOR is self-inverse, and whose re-encoding decodes to the same bytes.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "livetrain/checkpoint/delta.hpp"
#include "livetrain/checkpoint/hash.hpp"
#include "livetrain/error.hpp"

namespace checkpoint = livetrain::checkpoint;

namespace {

// Records larger than this are parsed but not decoded into a buffer (the parser does not allocate by
// `units`; the decoder's caller does, and that allocation is not what is being fuzzed).
constexpr uint64_t kMaxDecodeBytes = 1 << 20;

uint64_t get64(const std::string& s, size_t at) {
  uint64_t v;
  std::memcpy(&v, s.data() + at, 8);
  return v;
}

// Random bytes almost never carry valid XXH64 checksums, and the parser checks the file's checksum
// before anything else, so without this the fuzzer would only ever explore the first 40 bytes. Walks the
// records as leniently as possible and rewrites each record checksum and the file trailer; the checksum
// comparisons themselves are covered by test_checkpoint_format (CorruptAndTruncatedAreClearErrors).
void fix_checksums(std::string& f) {
  if (f.size() < 40) return;
  const size_t end = f.size() - 8;
  uint32_t version, records;
  std::memcpy(&version, f.data() + 8, 4);
  std::memcpy(&records, f.data() + 12, 4);
  const bool part = version == checkpoint::kPartVersion;  // a rank's part: 8 more header bytes, regions
  size_t pos = part ? 40 : 32;
  if (pos > end) return;
  for (uint32_t r = 0; r < records; ++r) {
    const size_t start = pos;
    if (end - pos < 4) break;
    uint32_t name_len;
    std::memcpy(&name_len, f.data() + pos, 4);
    if (end - pos - 4 < name_len) break;
    pos += 4 + name_len;
    if (end - pos < 4) break;
    const uint8_t unit = static_cast<uint8_t>(f[pos + 1]);
    const bool blocks = static_cast<uint8_t>(f[pos + 2]) == 2;  // values inside the positions field
    const size_t region = part ? 16 * static_cast<size_t>(static_cast<uint8_t>(f[pos + 3])) : 0;
    if (end - pos < 4 + region + 24) break;
    const uint64_t changed = get64(f, pos + 12 + region), plen = get64(f, pos + 20 + region);
    pos += 28 + region;
    if (plen > end - pos) break;
    pos += plen;
    if (unit != 0 && changed > std::numeric_limits<uint64_t>::max() / unit) break;
    const uint64_t vlen = blocks ? 0 : changed * unit;
    if (vlen > end - pos || end - pos - vlen < 8) break;
    pos += vlen;
    const uint64_t sum = checkpoint::xxh64(f.data() + start, pos - start);
    std::memcpy(f.data() + pos, &sum, 8);
    pos += 8;
  }
  const uint64_t sum = checkpoint::xxh64(f.data(), end);
  std::memcpy(f.data() + end, &sum, 8);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string file(reinterpret_cast<const char*>(data), size);
  fix_checksums(file);
  const uint8_t* bytes = reinterpret_cast<const uint8_t*>(file.data());
  try {
    checkpoint::delta_parse(bytes, file.size(), "fuzz", [&](const checkpoint::DeltaRecord& rec) {
      // The invariants the store relies on after a successful parse.
      if (rec.unit != checkpoint::unit_bytes(rec.dtype) || rec.changed == 0 || rec.changed > rec.units) std::abort();
      if (rec.units > std::numeric_limits<uint64_t>::max() / rec.unit) std::abort();
      const bool blocks = rec.encoding == checkpoint::PositionEncoding::kBlocks;
      if (rec.values.size() != (blocks ? 0 : rec.changed * rec.unit)) std::abort();
      const auto* lo = reinterpret_cast<const char*>(bytes);
      if (rec.values.data() < lo || rec.values.data() + rec.values.size() > lo + file.size()) std::abort();
      const uint64_t nbytes = rec.units * rec.unit;
      if (nbytes > kMaxDecodeBytes) return;
      std::vector<uint8_t> zero(nbytes, 0), buf(nbytes, 0);
      try {
        checkpoint::apply_record(rec, buf.data(), "fuzz");
      } catch (const livetrain::Error&) {
        if (buf != zero) std::abort();  // a rejected record must change nothing
        return;
      }
      // Re-encoding what the record did must give a record that does exactly the same.
      std::string again;
      uint64_t changed = checkpoint::encode_record(again, rec.name, rec.dtype, rec.units, zero.data(), buf.data());
      if (changed > rec.changed) std::abort();  // zero XOR values in the input are no change
      if (changed) {
        std::string f2 = checkpoint::delta_file_header(1, 0, 1) + again;
        uint64_t sum = checkpoint::xxh64(f2.data(), f2.size());
        f2.append(reinterpret_cast<const char*>(&sum), 8);
        std::vector<uint8_t> buf2(nbytes, 0);
        try {
          checkpoint::delta_parse(
              reinterpret_cast<const uint8_t*>(f2.data()), f2.size(), "fuzz re-encoded",
              [&](const checkpoint::DeltaRecord& r2) { checkpoint::apply_record(r2, buf2.data(), "fuzz re-encoded"); });
        } catch (const livetrain::Error&) {
          std::abort();  // our own encoder's output must parse
        }
        if (buf2 != buf) std::abort();
      }
      try {
        checkpoint::apply_record(rec, buf.data(), "fuzz");  // XOR twice is the identity
      } catch (const livetrain::Error&) {
        std::abort();  // it was accepted once
      }
      if (buf != zero) std::abort();
    });
  } catch (const livetrain::Error&) {
  }
  return 0;
}
