// Where a dense save's encode time goes, phase by phase, against memcpy of the same bytes: one bf16 tensor of
// `blocks` blocks (2^20 elements each) after a step that stochastically rounds w + lr·N(0,1) (w ~ N(0, 0.02),
// bench/checkpoint.py's random model and step; lr 1.3e-6 changes 4.1% of the elements, the real APOLLO-Mini
// step's density at 27B, bench/RESULTS.md). Per block, on one thread (best of 5):
//   - memcpy of the block's input (its bitmap bytes and its values): the physical reference;
//   - the phases of encode_records (src/checkpoint/delta.cpp): the bit count, the bitmap stream (its
//     histogram alone, then the whole stream), each byte plane of the values, and encode_records of the whole
//     tensor (count, blocks, assemble);
//   - what the save's writer does with the encoded bytes: XXH64 (its streaming hash) and write() into a file
//     (the page cache; no fsync);
//   - "as a save": encode_records of the whole tensor 32 times (a save's worth of blocks) with the output held
//     until all is hashed and written, then freed (the early writer holds the records it writes until the
//     diff is over), with the minor page faults it took (getrusage).
// With `threads` > 1, then encode_records of the whole tensor at that many threads (input MB/s per thread, as the
// save's encoder uses them). Prints one table. Results: bench/RESULTS.md, "Seventh session of 2026-12-01".
//
// build (after the CMake build in build/):
//   g++ -O2 -std=c++20 -Iinclude -Isrc bench/encode_phases.cpp build/liblivetrain_core.a -lpthread
//     -o /tmp/encode_phases && /tmp/encode_phases [blocks=16] [lr=1.3e-6] [threads=1]
// (one line)
// or without a CMake build: the same line with, instead of the library,
//   -Ithird_party src/checkpoint/{delta,entropy,hash,region}.cpp src/common/{parallel,tuning,error,dtype}.cpp
#include <fcntl.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "bench_diff.hpp"
#include "checkpoint/bytes.hpp"
#include "checkpoint/entropy.hpp"
#include "livetrain/checkpoint/delta.hpp"
#include "livetrain/checkpoint/format.hpp"
#include "livetrain/checkpoint/hash.hpp"
#include "livetrain/parallel.hpp"

namespace {

namespace checkpoint = livetrain::checkpoint;
using checkpoint::kBlockUnits;

using bench::best_of;
using bench::Diff;
using bench::make_diff;

uint64_t minor_faults() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<uint64_t>(u.ru_minflt);
}

}  // namespace

int main(int argc, char** argv) {
  const uint64_t blocks = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 16;
  const double lr = argc > 2 ? std::strtod(argv[2], nullptr) : 1.3e-6;
  const int threads = argc > 3 ? std::atoi(argv[3]) : 1;
  const int reps = 5;
  // The parts below run on this thread alone; encode_records' parallel regions take the pool's threads,
  // whose number is fixed at its first use: --threads, and the one-thread rows call it from inside a region
  // of one chunk (a nested parallel_for runs on its caller).
  setenv("LIVETRAIN_NUM_THREADS", std::to_string(std::max(1, threads)).c_str(), 1);
  auto alone = [](const std::function<void()>& fn) { livetrain::parallel_for(1, 1, [&](int64_t, int64_t) { fn(); }); };

  const uint64_t units = blocks * kBlockUnits;
  const Diff d = make_diff(units, lr, 1);
  const uint64_t nbytes = kBlockUnits / 8;
  std::vector<uint64_t> start(blocks + 1, 0);
  for (uint64_t b = 0; b < blocks; ++b)
    start[b + 1] = start[b] + checkpoint::bytes::count_bits(d.bitmap.data() + b * nbytes, nbytes);
  const checkpoint::RecordParts rec{"t", livetrain::DType::kBF16, units, d.changed, d.bitmap.data(), d.values.data(),
                                    {}};
  const double input = static_cast<double>(d.bitmap.size() + d.values.size());

  struct Row {
    std::string phase;
    double bytes, seconds;
    uint64_t faults = 0;
    bool has_faults = false;
  };
  std::vector<Row> rows;
  volatile uint64_t sink = 0;

  // The physical reference: the block's input bytes copied once.
  std::vector<uint8_t> copy(d.bitmap.size() + d.values.size());
  rows.push_back({"memcpy of the input (bitmap + values)", input, best_of(reps, [&] {
                    std::memcpy(copy.data(), d.bitmap.data(), d.bitmap.size());
                    std::memcpy(copy.data() + d.bitmap.size(), d.values.data(), d.values.size());
                    sink = sink + copy[copy.size() / 2];
                  })});
  rows.push_back({"bit count (encode_records' first pass)", static_cast<double>(d.bitmap.size()), best_of(reps, [&] {
                    for (uint64_t b = 0; b < blocks; ++b)
                      sink = sink + checkpoint::bytes::count_bits(d.bitmap.data() + b * nbytes, nbytes);
                  })});
  std::string out;
  out.reserve(4 * kBlockUnits);
  rows.push_back({"bitmap stream: histogram", static_cast<double>(d.bitmap.size()), best_of(reps, [&] {
                    for (uint64_t b = 0; b < blocks; ++b)
                      sink = sink + checkpoint::entropy::histogram(d.bitmap.data() + b * nbytes, nbytes, 1)[0];
                  })});
  rows.push_back({"bitmap stream: whole (histogram, code lengths, codes)", static_cast<double>(d.bitmap.size()),
                  best_of(reps, [&] {
                    for (uint64_t b = 0; b < blocks; ++b) {
                      out.clear();
                      checkpoint::entropy::encode(d.bitmap.data() + b * nbytes, nbytes, out, 1);
                    }
                  })});
  const char* plane_name[2] = {"low byte plane of the values", "high byte plane of the values"};
  for (int p = 0; p < 2; ++p) {
    rows.push_back({plane_name[p], static_cast<double>(d.values.size()) / 2, best_of(reps, [&] {
                      for (uint64_t b = 0; b < blocks; ++b) {
                        out.clear();
                        checkpoint::entropy::encode(d.values.data() + start[b] * 2 + p, start[b + 1] - start[b], out,
                                                    2);
                      }
                    })});
  }
  std::vector<std::vector<std::string>> outs;
  const size_t whole_row = rows.size();  // its one-thread time, against the threads' below
  rows.push_back({"encode_records, the whole tensor", input,
                  best_of(reps, [&] { alone([&] { checkpoint::encode_records({rec}, outs, false); }); })});
  double encoded = 0;
  for (const std::string& piece : outs[0]) encoded += static_cast<double>(piece.size());
  rows.push_back({"XXH64 of the encoded bytes (the writer's hash)", encoded, best_of(reps, [&] {
                    checkpoint::Xxh64Stream sum;
                    for (const std::string& piece : outs[0]) sum.update(piece.data(), piece.size());
                    sink = sink + sum.digest();
                  })});
  char path[] = "/tmp/livetrain-encode-phases-XXXXXX";
  const int fd = mkstemp(path);
  if (fd < 0) {
    std::perror("mkstemp");
    return 1;
  }
  unlink(path);
  auto write_all = [&](const std::vector<std::string>& pieces) {
    for (const std::string& piece : pieces) {
      if (write(fd, piece.data(), piece.size()) != static_cast<ssize_t>(piece.size())) std::perror("write");
    }
  };
  rows.push_back({"write() of the encoded bytes (page cache, no fsync)", encoded, best_of(reps, [&] {
                    if (ftruncate(fd, 0) != 0 || lseek(fd, 0, SEEK_SET) != 0) std::perror("ftruncate");
                    write_all(outs[0]);
                  })});
  // As a save: the tensor encoded `copies` times (a save's worth of blocks), every piece held until all are
  // hashed and written, then all freed (what the early writer does with the records it holds until the diff
  // is over); the faults are the mean over the reps, per block.
  const int copies = 32;
  auto as_a_save = [&]() {
    double best = 1e30;
    uint64_t faults = 0;
    for (int r = 0; r < reps; ++r) {
      const uint64_t f0 = minor_faults();
      const auto t0 = std::chrono::steady_clock::now();
      {
        std::vector<std::vector<std::vector<std::string>>> held(copies);
        for (auto& h : held) alone([&] { checkpoint::encode_records({rec}, h, false); });
        if (ftruncate(fd, 0) != 0 || lseek(fd, 0, SEEK_SET) != 0) std::perror("ftruncate");
        checkpoint::Xxh64Stream sum;
        for (auto& h : held) {
          for (const std::string& piece : h[0]) sum.update(piece.data(), piece.size());
          write_all(h[0]);
        }
        sink = sink + sum.digest();
      }
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / copies);
      faults += minor_faults() - f0;
    }
    return std::make_pair(best, faults / reps / copies);
  };
  {
    auto [t, f] = as_a_save();
    rows.push_back({"as a save: encode_records, XXH64, write, free", input, t, f, true});
  }
  close(fd);

  std::printf(
      "one thread, a bf16 tensor of %llu blocks of 2^20 elements, lr %g: %.1f%% of the elements changed, %.0f bytes "
      "of input per block (bitmap + values) coded into %.0f; best of %d, per block:\n\n",
      static_cast<unsigned long long>(blocks), lr, 100.0 * static_cast<double>(d.changed) / static_cast<double>(units),
      input / static_cast<double>(blocks), encoded / static_cast<double>(blocks), reps);
  std::printf(
      "| phase | bytes it reads per block | us per block | MB/s | x memcpy's time | minor faults per block |\n");
  std::printf("|---|---:|---:|---:|---:|---:|\n");
  const double per = 1e6 / static_cast<double>(blocks), ref = rows[0].seconds;
  for (const Row& r : rows) {
    const std::string faults =
        r.has_faults ? std::to_string(static_cast<double>(r.faults) / static_cast<double>(blocks)).substr(0, 6) : "-";
    std::printf("| %s | %.0f | %.1f | %.0f | %.2f | %s |\n", r.phase.c_str(), r.bytes / static_cast<double>(blocks),
                r.seconds * per, r.bytes / r.seconds / 1e6, r.seconds / ref, faults.c_str());
  }
  if (threads > 1) {
    const double t = best_of(reps, [&] { checkpoint::encode_records({rec}, outs, false); });
    std::printf(
        "\nencode_records of the whole tensor at %d threads: %.1f us per block, input %.0f MB/s in all, %.0f MB/s "
        "per thread (one thread: %.0f)\n",
        threads, t * per, input / t / 1e6, input / t / 1e6 / threads, input / rows[whole_row].seconds / 1e6);
  }
  return 0;
}
