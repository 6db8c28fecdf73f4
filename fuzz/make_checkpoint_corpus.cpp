// Writes the seed corpora of fuzz_checkpoint_delta and fuzz_checkpoint_journal with the real encoders
// (encode_record, journal_append, journal_append_replace), so the seeds are valid files of every shape the
// store writes. The checked-in corpora are its output byte for byte (ctest FuzzCorpus.IsTheMakersOutput);
// after a change to the encoders or to this file, write them again:
//   build/make_checkpoint_corpus fuzz/corpus-checkpoint-delta fuzz/corpus-checkpoint-journal
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "livetrain/checkpoint/delta.hpp"
#include "livetrain/checkpoint/hash.hpp"
#include "livetrain/checkpoint/journal.hpp"
#include "livetrain/checkpoint/region.hpp"

namespace checkpoint = livetrain::checkpoint;
using livetrain::DType;

namespace {

void write(const std::string& path, const std::string& bytes) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f || std::fwrite(bytes.data(), 1, bytes.size(), f) != bytes.size() || std::fclose(f) != 0) {
    std::perror(path.c_str());
    std::exit(1);
  }
}

// One record of `units` elements of `dtype` where a `fraction` of the elements changed.
// With `small_step`, each change flips the lowest bit only (XOR planes of one value: coded blocks).
std::string record(std::mt19937_64& rng, const std::string& name, DType dtype, uint64_t units, double fraction,
                   bool small_step = false) {
  const uint32_t unit = checkpoint::unit_bytes(dtype);
  std::vector<uint8_t> old(units * unit), now;
  for (auto& b : old) b = static_cast<uint8_t>(rng());
  now = old;
  std::uniform_real_distribution<double> u(0, 1);
  for (uint64_t i = 0; i < units; ++i) {
    if (u(rng) < fraction) now[i * unit] ^= small_step ? 1 : static_cast<uint8_t>(1 + rng() % 255);
  }
  now[0] ^= 1;  // at least one change, so the record exists
  std::string rec;
  checkpoint::encode_record(rec, name, dtype, units, old.data(), now.data());
  return rec;
}

// The record of a region of a tensor (as a tensor-parallel rank writes it): `region` elements, a
// `fraction` changed.
std::string region_record(std::mt19937_64& rng, const std::string& name, DType dtype, const checkpoint::Region& region,
                          double fraction) {
  const uint32_t unit = checkpoint::unit_bytes(dtype);
  const uint64_t units = checkpoint::region_units(region);
  std::vector<uint8_t> bitmap((units + 7) / 8, 0), values;
  std::uniform_real_distribution<double> u(0, 1);
  uint64_t changed = 0;
  for (uint64_t i = 0; i < units; ++i) {
    if (i == 0 || u(rng) < fraction) {
      bitmap[i / 8] |= static_cast<uint8_t>(1u << (i % 8));
      for (uint32_t b = 0; b < unit; ++b) values.push_back(static_cast<uint8_t>(b == 0 ? 1 + rng() % 255 : rng()));
      ++changed;
    }
  }
  std::vector<std::vector<std::string>> outs;
  checkpoint::encode_records({{name, dtype, units, changed, bitmap.data(), values.data(), region}}, outs);
  std::string record;
  for (const std::string& piece : outs[0]) record += piece;
  return record;
}

std::string delta(uint64_t generation, const std::vector<std::string>& records, int rank = -1, uint32_t ranks = 1) {
  const uint32_t n = static_cast<uint32_t>(records.size());
  std::string f = rank < 0
                      ? checkpoint::delta_file_header(generation, generation - 1, n)
                      : checkpoint::part_file_header(generation, generation - 1, n, static_cast<uint32_t>(rank), ranks);
  for (const auto& r : records) f += r;
  uint64_t sum = checkpoint::xxh64(f.data(), f.size());
  f.append(reinterpret_cast<const char*>(&sum), 8);
  return f;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s DELTA_CORPUS_DIR JOURNAL_CORPUS_DIR\n", argv[0]);
    return 2;
  }
  const std::string d = argv[1], j = argv[2];
  std::mt19937_64 rng(20260101);
  write(d + "/empty.delta", delta(1, {}));
  write(d + "/sparse_gaps_bf16.delta", delta(2, {record(rng, "w", DType::kBF16, 300, 0.01)}));
  write(d + "/dense_bitmap_bf16.delta",
        delta(3, {record(rng, "model.layers.0.mlp.up_proj.weight", DType::kBF16, 201, 0.5)}));
  write(d + "/mixed.delta", delta(4, {record(rng, "a", DType::kF32, 33, 0.1), record(rng, "b", DType::kF64, 9, 1.0),
                                      record(rng, "c", DType::kU8, 17, 0.3), record(rng, "d", DType::kF4, 40, 0.05)}));
  write(d + "/blocks_bf16.delta",
        delta(5, {record(rng, "e", DType::kBF16, 3000, 0.3, true), record(rng, "f", DType::kF32, 700, 0.9, true)}));
  // Parts of a tensor-parallel generation: rows, columns, a 3-d segment, and a whole tensor (no region).
  // Their own generator, so the other seeds stay as they were.
  std::mt19937_64 prng(20261130);
  write(d + "/part_rank1_regions.delta", delta(6,
                                               {region_record(prng, "rows", DType::kBF16, {{40, 0}, {40, 16}}, 0.2),
                                                region_record(prng, "cols", DType::kBF16, {{0, 8}, {12, 8}}, 0.5),
                                                region_record(prng, "conv", DType::kBF16, {{6, 0, 0}, {3, 1, 4}}, 1.0),
                                                record(prng, "norm", DType::kF32, 16, 0.5)},
                                               1, 2));

  // Journals against the file sizes fuzz_checkpoint_journal checks them with: {4096, 100, 0, 70000}. Their
  // bytes from a generator of their own, so that a delta seed added above does not change them.
  std::mt19937_64 jrng(20261201);
  std::vector<uint8_t> bytes(300);
  for (auto& b : bytes) b = static_cast<uint8_t>(jrng());
  std::string empty = checkpoint::journal_header(0, 1);
  checkpoint::journal_finish(empty);
  write(j + "/empty.journal", empty);
  std::string one = checkpoint::journal_header(1, 2);
  checkpoint::journal_append(one, 0, 4000, bytes.data(), 96);
  checkpoint::journal_finish(one);
  write(j + "/one.journal", one);
  std::string many = checkpoint::journal_header(5, 3);
  checkpoint::journal_append(many, 0, 0, bytes.data(), 1);
  checkpoint::journal_append(many, 1, 98, bytes.data() + 1, 2);
  checkpoint::journal_append(many, 2, 0, bytes.data(), 0);
  checkpoint::journal_append(many, 3, 69800, bytes.data() + 3, 200);
  checkpoint::journal_finish(many);
  write(j + "/many.journal", many);
  std::string replace = checkpoint::journal_header(2, 3);  // version 2: a file rewritten whole, another written
  checkpoint::journal_append_replace(replace, 1, 150, 0x0123456789abcdefull);
  checkpoint::journal_append(replace, 0, 10, bytes.data(), 20);
  checkpoint::journal_finish(replace);
  write(j + "/replace.journal", replace);
  return 0;
}
