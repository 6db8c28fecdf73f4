// The checkpoint formats: XXH64 against published vectors, golden bytes of a delta record and file, the
// codec's round trip (gaps and bitmap), and clear errors for corrupt or truncated deltas.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <random>

#include "checkpoint/bytes.hpp"
#include "helpers.hpp"
#include "livetrain/checkpoint/delta.hpp"
#include "livetrain/checkpoint/hash.hpp"
#include "livetrain/checkpoint/journal.hpp"
#include "livetrain/error.hpp"
#include "livetrain/tuning.hpp"

namespace checkpoint = livetrain::checkpoint;
using livetrain::DType;
using livetrain::Error;
using livetrain::testing::hex;

namespace {

std::vector<uint8_t> apply_all(const std::string& file, std::vector<uint8_t> buf) {
  checkpoint::delta_parse(
      reinterpret_cast<const uint8_t*>(file.data()), file.size(), "t.delta",
      [&](const checkpoint::DeltaRecord& r) { checkpoint::apply_record(r, buf.data(), "t.delta"); });
  return buf;
}

std::string make_file(const std::string& records, uint32_t count) {
  std::string f = checkpoint::delta_file_header(3, 2, count) + records;
  uint64_t sum = checkpoint::xxh64(f.data(), f.size());
  f.append(reinterpret_cast<const char*>(&sum), 8);
  return f;
}

// Three records as a save encodes them: a dense bf16 step over three blocks (the last one partial; about
// a fifth of the elements changed by XORs of the low mantissa bits), a sparser fp32 tensor over two
// blocks, and a sparse u8 one (gaps); returns them concatenated, in order.
template <typename Encode>
std::string encode_dense_records(Encode encode) {
  std::mt19937_64 rng(15);  // raw draws only
  struct T {
    const char* name;
    DType dtype;
    uint32_t unit;
    uint64_t units, per_mille;
  };
  const T ts[] = {{"dense.bf16", DType::kBF16, 2, 2621441, 200},
                  {"fp32", DType::kF32, 4, 1500000, 50},
                  {"sparse.u8", DType::kU8, 1, 70001, 3}};
  std::vector<std::vector<uint8_t>> bitmaps, values;
  std::vector<checkpoint::RecordParts> recs;
  for (const T& t : ts) {
    std::vector<uint8_t> bitmap((t.units + 7) / 8), vals;
    uint64_t changed = 0;
    for (uint64_t i = 0; i < t.units; ++i) {
      const uint64_t r = rng();
      if (r % 1000 >= t.per_mille) continue;
      bitmap[i / 8] |= static_cast<uint8_t>(1u << (i % 8));
      ++changed;
      for (uint32_t b = 0; b < t.unit; ++b) {
        const unsigned run = static_cast<unsigned>(std::countr_one(r >> (16 + 8 * b)));
        vals.push_back(b == 0 ? static_cast<uint8_t>((1u << std::min(run + 1, 8u)) - 1)
                              : static_cast<uint8_t>((r >> 60) == 0 ? (r >> (8 * b)) & 0xFF : 0));
      }
    }
    bitmaps.push_back(std::move(bitmap));
    values.push_back(std::move(vals));
    recs.push_back({t.name, t.dtype, t.units, changed, bitmaps.back().data(), values.back().data(), {}});
  }
  return encode(recs);
}
}  // namespace

TEST(CheckpointHash, Xxh64MatchesPublishedVectors) {
  EXPECT_EQ(checkpoint::hash_hex(checkpoint::xxh64("", 0)), "ef46db3751d8e999");
  EXPECT_EQ(checkpoint::hash_hex(checkpoint::xxh64("a", 1)), "d24ec4f1a98c6e5b");
  EXPECT_EQ(checkpoint::hash_hex(checkpoint::xxh64("abc", 3)), "44bc2cf5ad770999");
  std::string s = "Nobody inspects the spammish repetition";
  EXPECT_EQ(checkpoint::hash_hex(checkpoint::xxh64(s.data(), s.size())), "fbcea83c8a378bf1");
}

TEST(CheckpointHash, StreamingEqualsOneShotForEverySplit) {
  std::mt19937_64 rng(9);
  std::string data(300, '\0');
  for (auto& c : data) c = static_cast<char>(rng());
  for (size_t n : {0ul, 1ul, 31ul, 32ul, 33ul, 64ul, 100ul, 300ul}) {
    const uint64_t want = checkpoint::xxh64(data.data(), n, 7);
    for (size_t piece : {1ul, 5ul, 31ul, 32ul, 33ul, 300ul}) {
      checkpoint::Xxh64Stream h(7);
      for (size_t at = 0; at < n; at += piece) h.update(data.data() + at, std::min(piece, n - at));
      EXPECT_EQ(h.digest(), want) << n << " in pieces of " << piece;
    }
  }
}

TEST(CheckpointHash, ContentHashIsXxh64OfBlockHashes) {
  std::vector<uint8_t> data(3 * 4096 + 5);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<uint8_t>(i * 7);
  std::vector<uint64_t> blocks;
  for (size_t off = 0; off < data.size(); off += 4096)
    blocks.push_back(checkpoint::xxh64(data.data() + off, std::min<size_t>(4096, data.size() - off)));
  EXPECT_EQ(checkpoint::content_hash(data.data(), data.size()), checkpoint::xxh64(blocks.data(), blocks.size() * 8));
  EXPECT_EQ(checkpoint::content_hash(nullptr, 0), checkpoint::xxh64("", 0));
}

// Pins the record and file layout of docs/checkpoint.md byte by byte.
TEST(CheckpointDelta, GoldenBytes) {
  std::vector<uint16_t> old(10, 0x3f80), now = old;
  now[1] = 0x3f81;
  now[7] = 0xbf80;
  std::string rec;
  uint64_t changed = checkpoint::encode_record(rec, "w", DType::kBF16, 10, reinterpret_cast<const uint8_t*>(old.data()),
                                               reinterpret_cast<const uint8_t*>(now.data()));
  EXPECT_EQ(changed, 2u);
  EXPECT_EQ(hex(rec.substr(0, rec.size() - 8)),
            "01000000"
            "77"  // name
            "0e"
            "02"
            "00"
            "00"                // BF16, unit 2, gaps, reserved
            "0a00000000000000"  // units
            "0200000000000000"  // changed
            "0200000000000000"
            "01"
            "05"  // positions: 1, then 7-1-1
            "0100"
            "0080");  // XOR values
  uint64_t sum = checkpoint::xxh64(rec.data(), rec.size() - 8);
  EXPECT_EQ(rec.substr(rec.size() - 8), std::string(reinterpret_cast<const char*>(&sum), 8));
  std::string file = make_file(rec, 1);
  EXPECT_EQ(hex(file.substr(0, 32)),
            "4c54434b444c5431"
            "02000000"
            "01000000"
            "0300000000000000"
            "0200000000000000");
  EXPECT_EQ(file.size(), 32 + rec.size() + 8);
  // The whole file, pinned: any change to the encoding changes this.
  EXPECT_EQ(checkpoint::hash_hex(checkpoint::xxh64(file.data(), file.size())), "399631584826e34d");
}

// Pins the blocks encoding: 128 bf16 elements all changed by XOR 0x0001 (the last mantissa bit).
TEST(CheckpointDelta, GoldenBytesOfBlocks) {
  std::vector<uint16_t> old(128, 0x3f80), now(128, 0x3f81);
  std::string rec;
  ASSERT_EQ(checkpoint::encode_record(rec, "w", DType::kBF16, 128, reinterpret_cast<const uint8_t*>(old.data()),
                                      reinterpret_cast<const uint8_t*>(now.data())),
            128u);
  EXPECT_EQ(hex(rec.substr(0, rec.size() - 8)),
            "01000000"
            "77"  // name
            "0e"
            "02"
            "02"
            "00"                // BF16, unit 2, blocks, reserved
            "8000000000000000"  // units
            "8000000000000000"  // changed
            "2e00000000000000"  // payload length 46
            "0000100000000000"  // block size 2^20
            "8000000000000000"  // block 0: 128 changed
            "01"
            "0100000000000000"
            "ff"  // bitmap: 16 × 0xff
            "01"
            "0100000000000000"
            "01"  // byte plane 0: all 0x01
            "01"
            "0100000000000000"
            "00");  // byte plane 1: all 0x00
  std::string file = make_file(rec, 1);
  std::vector<uint8_t> buf(reinterpret_cast<const uint8_t*>(old.data()),
                           reinterpret_cast<const uint8_t*>(old.data()) + 256);
  std::vector<uint8_t> want(reinterpret_cast<const uint8_t*>(now.data()),
                            reinterpret_cast<const uint8_t*>(now.data()) + 256);
  EXPECT_EQ(apply_all(file, buf), want);
}

// Blocks over several kBlockUnits blocks (the last one short), with a small-step XOR distribution.
TEST(CheckpointDelta, MultiBlockRoundTripIsSmall) {
  const uint64_t units = 2 * checkpoint::kBlockUnits + 4099;
  std::mt19937_64 rng(5);
  std::vector<uint16_t> old(units), now;
  for (auto& v : old) v = static_cast<uint16_t>(0x3c00 + rng() % 0x400);
  now = old;
  uint64_t want_changed = 0;
  for (uint64_t i = 0; i < units; ++i) {
    if (rng() % 5 == 0) {
      now[i] = static_cast<uint16_t>(now[i] + ((rng() & 1) ? 1 : -1));  // ±1 ulp, as a step at lr 1e-5
      want_changed += now[i] != old[i];
    }
  }
  std::string rec;
  const auto* o = reinterpret_cast<const uint8_t*>(old.data());
  const auto* n = reinterpret_cast<const uint8_t*>(now.data());
  ASSERT_EQ(checkpoint::encode_record(rec, "big", DType::kBF16, units, o, n), want_changed);
  EXPECT_EQ(rec[9], 2) << "blocks";
  EXPECT_LT(rec.size(), units * 2 / 10) << "under 10% of the tensor's bytes for ~20% changed elements";
  std::string file = make_file(rec, 1);
  std::vector<uint8_t> buf(o, o + units * 2);
  EXPECT_EQ(apply_all(file, buf), std::vector<uint8_t>(n, n + units * 2));
}

TEST(CheckpointDelta, BitmapWhenDenseAndRoundTrip) {
  std::mt19937_64 rng(1);
  for (double frac : {0.0005, 0.01, 0.3, 1.0}) {
    for (uint64_t units : {1ull, 7ull, 1000ull, 4099ull}) {
      std::vector<uint8_t> old(units * 2), now;
      for (auto& b : old) b = static_cast<uint8_t>(rng());
      now = old;
      std::uniform_real_distribution<double> u(0, 1);
      for (uint64_t i = 0; i < units; ++i)
        if (u(rng) < frac) now[2 * i + (rng() & 1)] ^= 0x10;
      std::string rec;
      uint64_t c = checkpoint::encode_record(rec, "t", DType::kBF16, units, old.data(), now.data());
      if (c == 0) {
        EXPECT_TRUE(rec.empty());
        continue;
      }
      std::string file = make_file(rec, 1);
      EXPECT_EQ(apply_all(file, old), now) << frac << " " << units;
      EXPECT_EQ(apply_all(file, now), old) << "XOR deltas are self-inverse";
      // Position bytes never exceed the bitmap's size.
      EXPECT_LE(rec.size(), 4 + 1 + 4 + 24 + (units + 7) / 8 + c * 2 + 8);
      if (frac == 1.0 && units > 100) {
        EXPECT_EQ(rec[7], 2) << "dense changes with few distinct XOR bytes use coded blocks";
      }
    }
  }
}

TEST(CheckpointDelta, OtherElementSizes) {
  for (DType dt : {DType::kU8, DType::kF32, DType::kF64, DType::kF4}) {
    uint32_t unit = checkpoint::unit_bytes(dt);
    std::vector<uint8_t> old(33 * unit, 1), now = old;
    now[5 * unit + unit - 1] = 9;
    now[32 * unit] = 3;
    std::string rec;
    EXPECT_EQ(checkpoint::encode_record(rec, "t", dt, 33, old.data(), now.data()), 2u);
    EXPECT_EQ(apply_all(make_file(rec, 1), old), now);
  }
}

TEST(CheckpointDelta, CorruptAndTruncatedAreClearErrors) {
  std::vector<uint16_t> old(100, 1), now = old;
  now[50] = 2;
  std::string rec;
  checkpoint::encode_record(rec, "w", DType::kBF16, 100, reinterpret_cast<const uint8_t*>(old.data()),
                            reinterpret_cast<const uint8_t*>(now.data()));
  std::string file = make_file(rec, 1);
  auto parse = [](const std::string& f) {
    checkpoint::delta_parse(reinterpret_cast<const uint8_t*>(f.data()), f.size(), "g.delta",
                            [](const checkpoint::DeltaRecord&) {});
  };
  auto expect_error = [&](const std::string& f, const std::string& needle) {
    try {
      parse(f);
      ADD_FAILURE() << "no error for " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("g.delta"), std::string::npos) << e.what();
    }
  };
  for (size_t cut : {0ul, 10ul, 39ul, file.size() - 1})
    expect_error(file.substr(0, cut), cut < 40 ? "truncated" : "checksum");
  std::string flipped = file;
  flipped[40] ^= 1;
  expect_error(flipped, "checksum");
  std::string magic = file;
  magic[0] = 'X';
  expect_error(magic, "bad magic");
  // A record whose own checksum is wrong but the file checksum recomputed: the record is named.
  std::string bad_rec = rec;
  bad_rec[bad_rec.size() - 9] ^= 1;
  expect_error(make_file(bad_rec, 1), "record 0 (w): record checksum mismatch");
  // More records announced than present.
  expect_error(make_file(rec, 2), "record 1: truncated");
}

// Pins the journal layout of docs/checkpoint.md and the parser's checks (the parser materialize and
// recovery use, and fuzz_checkpoint_journal fuzzes).
TEST(CheckpointJournal, GoldenBytesAndRoundTrip) {
  const uint8_t a[3] = {0xAA, 0xBB, 0xCC};
  std::string j = checkpoint::journal_header(4, 5);
  checkpoint::journal_append(j, 1, 0x10, a, 3);
  checkpoint::journal_finish(j);
  EXPECT_EQ(hex(j.substr(0, 32 + 24 + 3)),
            "4c54434b4a524e31"
            "01000000"
            "01000000"  // magic, version, 1 entry
            "0400000000000000"
            "0500000000000000"  // from, to
            "01000000"
            "00000000"
            "1000000000000000"
            "0300000000000000"
            "aabbcc");
  EXPECT_EQ(j.size(), 32u + 24 + 3 + 8 + 8);
  checkpoint::Journal p =
      checkpoint::journal_parse(reinterpret_cast<const uint8_t*>(j.data()), j.size(), "m.journal", {100, 100});
  EXPECT_EQ(p.from, 4u);
  EXPECT_EQ(p.to, 5u);
  // The header alone (`checkpoint list`): the generations, nothing of the entries, whatever they hold.
  std::string torn = j;
  torn[40] ^= 1;
  const checkpoint::Journal h =
      checkpoint::journal_parse_header(reinterpret_cast<const uint8_t*>(torn.data()), torn.size(), "m.journal");
  EXPECT_EQ(h.from, 4u);
  EXPECT_EQ(h.to, 5u);
  EXPECT_TRUE(h.entries.empty());
  EXPECT_THROW(checkpoint::journal_parse_header(reinterpret_cast<const uint8_t*>(torn.data()), 39, "m.journal"),
               livetrain::Error);
  ASSERT_EQ(p.entries.size(), 1u);
  EXPECT_EQ(p.entries[0].file, 1u);
  EXPECT_EQ(p.entries[0].offset, 0x10u);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(p.entries[0].bytes), 3), "\xAA\xBB\xCC");
}

// Version 2: a model file replaced whole by the copy materialize prepared beside it (a tensor written in its
// served dtype); its size and content hash are the entry's offset and bytes.
TEST(CheckpointJournal, GoldenBytesOfAReplaceEntry) {
  const uint8_t a[2] = {0xAA, 0xBB};
  std::string j = checkpoint::journal_header(1, 2);
  checkpoint::journal_append(j, 0, 8, a, 2);
  checkpoint::journal_append_replace(j, 1, 0x1234, 0x0102030405060708ull);
  checkpoint::journal_finish(j);
  EXPECT_EQ(hex(j.substr(0, 32)),
            "4c54434b4a524e31"
            "02000000"
            "02000000"  // magic, version 2, 2 entries
            "0100000000000000"
            "0200000000000000");
  EXPECT_EQ(hex(j.substr(32 + 24 + 2 + 8, 24 + 8)),
            "01000000"
            "01000000"  // file 1, kind 1
            "3412000000000000"
            "0800000000000000"    // its new size, length 8
            "0807060504030201");  // its content hash
  checkpoint::Journal p =
      checkpoint::journal_parse(reinterpret_cast<const uint8_t*>(j.data()), j.size(), "m.journal", {100, 10});
  ASSERT_EQ(p.entries.size(), 2u);
  EXPECT_EQ(p.entries[0].kind, checkpoint::JournalEntry::kWrite);
  EXPECT_EQ(p.entries[1].kind, checkpoint::JournalEntry::kReplace);
  EXPECT_EQ(p.entries[1].file, 1u);
  EXPECT_EQ(p.entries[1].offset, 0x1234u);  // larger than the file it replaces: no range check
  EXPECT_EQ(p.entries[1].hash, 0x0102030405060708ull);

  auto expect_error = [](const std::string& j, const std::string& needle) {
    try {
      checkpoint::journal_parse(reinterpret_cast<const uint8_t*>(j.data()), j.size(), "m.journal", {100, 10});
      ADD_FAILURE() << "no error for " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  std::string both = checkpoint::journal_header(1, 2);
  checkpoint::journal_append_replace(both, 1, 5, 7);
  checkpoint::journal_append(both, 1, 0, a, 2);
  checkpoint::journal_finish(both);
  expect_error(both, "entry 1: file 1 is both written in place and replaced");
  std::string v2 = checkpoint::journal_header(1, 2);
  checkpoint::journal_append(v2, 0, 0, a, 2);
  v2[8] = 2;
  checkpoint::journal_finish(v2);
  expect_error(v2, "version 2 journal without a replace entry");
  std::string kind = j;
  kind[32 + 24 + 2 + 8 + 4] = 2;
  uint64_t sum = checkpoint::xxh64(kind.data(), kind.size() - 8);
  std::memcpy(kind.data() + kind.size() - 8, &sum, 8);
  expect_error(kind, "entry 1: entry kind 2");
}

TEST(CheckpointJournal, BadInputIsAClearError) {
  const uint8_t a[4] = {1, 2, 3, 4};
  auto make = [&](uint32_t file, uint64_t offset) {
    std::string j = checkpoint::journal_header(0, 1);
    checkpoint::journal_append(j, file, offset, a, 4);
    checkpoint::journal_finish(j);
    return j;
  };
  auto expect_error = [](const std::string& j, const std::string& needle) {
    try {
      checkpoint::journal_parse(reinterpret_cast<const uint8_t*>(j.data()), j.size(), "m.journal", {8});
      ADD_FAILURE() << "no error for " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("m.journal"), std::string::npos) << e.what();
    }
  };
  auto refix = [](std::string j) {  // recompute the trailer so the field check is what fails
    uint64_t sum = checkpoint::xxh64(j.data(), j.size() - 8);
    std::memcpy(j.data() + j.size() - 8, &sum, 8);
    return j;
  };
  expect_error(make(0, 4).substr(0, 30), "truncated");
  expect_error(make(0, 5), "range past the end of file 0");
  expect_error(make(1, 0), "file index 1 out of range");
  std::string flipped = make(0, 0);
  flipped[60] ^= 1;
  expect_error(flipped, "journal checksum mismatch");
  expect_error(refix(flipped), "entry 0: checksum mismatch");
  std::string reserved = make(0, 0);
  reserved[36] = 1;
  expect_error(refix(reserved), "entry 0: entry kind 1 (version 1)");  // a replace entry needs version 2
  std::string more = make(0, 0);
  more[12] = 2;
  expect_error(refix(more), "entry 1 truncated");
}

// Regression test: a record whose units × unit wraps around 2^64 could match a small tensor's byte size
// and then be decoded far past the buffer; the parser now refuses it.
TEST(CheckpointDelta, UnitsOverflowIsRefused) {
  std::vector<uint16_t> old(4, 1), now = old;
  now[1] = 2;
  std::string rec;
  checkpoint::encode_record(rec, "w", DType::kBF16, 4, reinterpret_cast<const uint8_t*>(old.data()),
                            reinterpret_cast<const uint8_t*>(now.data()));
  uint64_t units = (1ull << 63) + 4;  // × 2 wraps to 8, the real tensor's byte size
  std::memcpy(rec.data() + 4 + 1 + 4, &units, 8);
  uint64_t sum = checkpoint::xxh64(rec.data(), rec.size() - 8);
  std::memcpy(rec.data() + rec.size() - 8, &sum, 8);
  std::string file = make_file(rec, 1);
  try {
    checkpoint::delta_parse(reinterpret_cast<const uint8_t*>(file.data()), file.size(), "g.delta",
                            [](const checkpoint::DeltaRecord&) {});
    ADD_FAILURE() << "accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("units overflow"), std::string::npos) << e.what();
  }
}

// A save's records are the same bytes whatever the encoder's inner workings: pinned to the digest of the
// encoder before the records were handed on as pieces and before the word-wise entropy coder (its build),
// under every checkpoint.encoder setting. With the default the dense record comes as several pieces (its
// blocks' own strings), before as one; the pieces of every record join into a record that parses.
TEST(CheckpointDelta, DenseRecordsAreTheBytesOfTheEncoderBefore) {
  for (int coder : {4, 3, 2, 1, 0}) {
    livetrain::tuning::set("checkpoint.encoder", coder);
    std::vector<size_t> pieces;
    const std::string all = encode_dense_records([&](const std::vector<checkpoint::RecordParts>& recs) {
      std::vector<std::vector<std::string>> outs;
      checkpoint::encode_records(recs, outs);
      std::string joined;
      for (const auto& rec : outs) {
        pieces.push_back(rec.size());
        for (const std::string& p : rec) joined += p;
      }
      return joined;
    });
    livetrain::tuning::reset();
    EXPECT_EQ(all.size(), 590760u) << "coder " << coder;
    EXPECT_EQ(checkpoint::xxh64(all.data(), all.size()), 0xfac91567e444f8ceull) << "coder " << coder;
    ASSERT_EQ(pieces.size(), 3u);
    if (coder >= 2) {
      EXPECT_GT(pieces[0], 2u) << "the dense record's blocks are pieces of their own";
    } else {
      EXPECT_EQ(pieces[0], 1u) << "coder " << coder;
    }
    uint32_t records = 0;
    const std::string file = make_file(all, 3);
    checkpoint::delta_parse(
        reinterpret_cast<const uint8_t*>(file.data()), file.size(), "t.delta", [&](const checkpoint::DeltaRecord& r) {
          ++records;
          EXPECT_EQ(r.encoding,
                    records == 3 ? checkpoint::PositionEncoding::kGaps : checkpoint::PositionEncoding::kBlocks)
              << r.name;
        });
    EXPECT_EQ(records, 3u);
  }
  // Without checksums (a writer appends them): the records less their last 8 bytes, which are the XXH64 of
  // the rest.
  const std::string without = encode_dense_records([&](const std::vector<checkpoint::RecordParts>& recs) {
    std::vector<std::vector<std::string>> outs;
    checkpoint::encode_records(recs, outs, false);
    std::string joined;
    for (const auto& rec : outs) {
      std::string record;
      for (const std::string& p : rec) record += p;
      const uint64_t sum = checkpoint::xxh64(record.data(), record.size());
      joined += record + std::string(reinterpret_cast<const char*>(&sum), 8);
    }
    return joined;
  });
  EXPECT_EQ(checkpoint::xxh64(without.data(), without.size()), 0xfac91567e444f8ceull);
}

// bytes::count_bits (the clone this CPU runs: POPCNT on x86-64 where it has it) counts every bit of every
// length and alignment, words and the tail, as one std::popcount per byte does.
TEST(CheckpointDelta, BitmapCountsAreThoseOfAByteAtATime) {
  std::mt19937_64 rng(11);
  std::vector<uint8_t> bits(200);
  for (auto& b : bits) b = static_cast<uint8_t>(rng());
  bits[3] = 0xFF;
  for (size_t start = 0; start < 9; ++start) {
    for (size_t n = 0; start + n <= bits.size(); ++n) {
      uint64_t want = 0;
      for (size_t i = start; i < start + n; ++i) want += static_cast<uint64_t>(std::popcount(bits[i]));
      ASSERT_EQ(livetrain::checkpoint::bytes::count_bits(bits.data() + start, n), want) << start << " " << n;
    }
  }
}

// checkpoint.encoder=3 measures the gap encoding's size only where it could beat the blocks encoding (a gap
// takes at least one byte); 2 measures it per block for every record with at most 1/8 of its elements
// changed; 4 (the default) measures and writes them as 3 does, block by block on the pool's threads. Over records of
// every element size, odd lengths, densities from one change to all changed, and values from XORs of low mantissa bits
// to random bytes, both choose the same encoding and write the same bytes; among them records of each encoding, and
// blocks records no smaller than changed + the raw values (where 3 measures the gaps and the blocks still win).
TEST(CheckpointDelta, GapSizesMeasuredOnlyWhereTheyCouldWinChooseTheSame) {
  struct Reset {
    ~Reset() { livetrain::tuning::reset(); }
  } reset;
  std::mt19937_64 rng(26);
  int chosen[3] = {0, 0, 0}, blocks_past_bound = 0, records = 0, with_changes = 0;
  const uint64_t lengths[] = {1, 63, 1000, 70001, (uint64_t{2} << 20) + 77};
  const uint64_t per_million[] = {0, 30, 300, 3000, 20000, 60000, 110000, 124000, 126000, 300000, 1000000};
  for (uint32_t unit : {1u, 2u, 4u}) {
    const DType dtype = unit == 1 ? DType::kU8 : unit == 2 ? DType::kBF16 : DType::kF32;
    for (uint64_t units : lengths) {
      for (uint64_t density : per_million) {
        for (int kind = 0; kind < 3; ++kind) {  // low mantissa bits, random bytes, one repeated value
          std::vector<uint8_t> bitmap((units + 7) / 8, 0), values;
          uint64_t changed = 0;
          for (uint64_t i = 0; i < units; ++i) {
            const uint64_t r = rng();
            if (r % 1000000 >= density && !(density == 0 && i == units / 2)) continue;  // 0: one change
            bitmap[i / 8] |= static_cast<uint8_t>(1u << (i % 8));
            ++changed;
            for (uint32_t b = 0; b < unit; ++b) {
              const uint64_t v = rng();
              values.push_back(kind == 1   ? static_cast<uint8_t>(v)
                               : kind == 2 ? uint8_t{0x5A}
                               : b == 0    ? static_cast<uint8_t>((2u << (v % 3)) - 1)
                                           : uint8_t{0});
            }
          }
          const checkpoint::RecordParts rec{"t", dtype, units, changed, bitmap.data(), values.data(), {}};
          std::string out[3];
          for (int k = 0; k < 3; ++k) {
            livetrain::tuning::set("checkpoint.encoder", 2 + k);
            std::vector<std::vector<std::string>> outs;
            checkpoint::encode_records({rec}, outs);
            for (const std::string& p : outs[0]) out[k] += p;
          }
          livetrain::tuning::reset();
          ASSERT_EQ(out[0], out[1]) << "unit " << unit << ", units " << units << ", density " << density << "e-6, kind "
                                    << kind;
          ASSERT_EQ(out[2], out[1]) << "encoder 4: unit " << unit << ", units " << units << ", density " << density
                                    << "e-6, kind " << kind;
          if (changed == 0) {  // no record
            EXPECT_TRUE(out[1].empty());
            continue;
          }
          ++with_changes;
          const std::string file = make_file(out[1], 1);
          checkpoint::delta_parse(reinterpret_cast<const uint8_t*>(file.data()), file.size(), "t.delta",
                                  [&](const checkpoint::DeltaRecord& r) {
                                    ++records;
                                    ++chosen[static_cast<int>(r.encoding)];
                                    if (r.encoding == checkpoint::PositionEncoding::kBlocks &&
                                        changed <= (units + 7) / 8 &&
                                        r.positions.size() >= std::min((units + 7) / 8, changed) + changed * unit) {
                                      ++blocks_past_bound;
                                    }
                                  });
        }
      }
    }
  }
  EXPECT_EQ(records, with_changes);
  EXPECT_GT(chosen[0], 0) << "gaps";
  EXPECT_GT(chosen[1], 0) << "bitmap";
  EXPECT_GT(chosen[2], 0) << "blocks";
  EXPECT_GT(blocks_past_bound, 0) << "no blocks record where the gaps had to be measured";
}

// checkpoint.encoder=4 writes a record's gaps block by block on the pool's threads and assembles the record from
// them: the bytes of 3 (one thread over the whole bitmap), with or without checksums, for a record of many blocks
// whose changes lie in a few (a real step's sparse embedding): blocks without a change between, a block with more
// than a piece's worth of gaps (handed on as a piece of its own), a short last block whose last element changed.
TEST(CheckpointDelta, GapsWrittenPerBlockAreTheBytesOfOneThread) {
  struct Reset {
    ~Reset() { livetrain::tuning::reset(); }
  } reset;
  const uint64_t units = 9 * checkpoint::kBlockUnits + 12345;
  std::vector<uint8_t> bitmap((units + 7) / 8, 0), values;
  std::mt19937_64 rng(29);
  uint64_t changed = 0;
  auto mark = [&](uint64_t i) {
    if (bitmap[i / 8] & (1u << (i % 8))) return;
    bitmap[i / 8] |= static_cast<uint8_t>(1u << (i % 8));
    ++changed;
  };
  for (int i = 0; i < 3; ++i) mark(checkpoint::kBlockUnits + rng() % checkpoint::kBlockUnits);
  for (int i = 0; i < 20000; ++i) mark(2 * checkpoint::kBlockUnits + rng() % checkpoint::kBlockUnits);
  mark(5 * checkpoint::kBlockUnits + 17);
  for (int i = 0; i < 6; ++i) mark(9 * checkpoint::kBlockUnits + rng() % 12345);
  mark(units - 1);
  for (uint64_t i = 0; i < changed; ++i) {
    values.push_back(static_cast<uint8_t>((2u << (rng() % 3)) - 1));
    values.push_back(0);
  }
  const checkpoint::RecordParts rec{
      "model.embed_tokens.weight", DType::kBF16, units, changed, bitmap.data(), values.data(), {}};
  for (bool checksums : {true, false}) {
    std::string out[2];
    size_t pieces[2] = {0, 0};
    for (int k = 0; k < 2; ++k) {
      livetrain::tuning::set("checkpoint.encoder", 3 + k);
      std::vector<std::vector<std::string>> outs;
      checkpoint::encode_records({rec}, outs, checksums);
      pieces[k] = outs[0].size();
      for (const std::string& p : outs[0]) {
        EXPECT_FALSE(p.empty()) << "an empty piece marks a record's end for the writer";
        out[k] += p;
      }
    }
    ASSERT_EQ(out[1], out[0]) << "checksums " << checksums;
    EXPECT_GT(pieces[1], 1u) << "the dense block's gaps are a piece of their own";
    if (!checksums) continue;
    int records = 0;
    const std::string file = make_file(out[1], 1);
    checkpoint::delta_parse(reinterpret_cast<const uint8_t*>(file.data()), file.size(), "t.delta",
                            [&](const checkpoint::DeltaRecord& r) {
                              ++records;
                              EXPECT_EQ(r.encoding, checkpoint::PositionEncoding::kGaps);
                            });
    EXPECT_EQ(records, 1);
  }
}
