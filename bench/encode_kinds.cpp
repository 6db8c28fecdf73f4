// Where a dense save's encode time goes, per thread: one bf16 tensor of --blocks blocks (2^20 elements each)
// after a step that stochastically rounds w + lr·N(0,1) (w ~ N(0, 0.02), as bench/checkpoint.py's random
// model and step), at each lr given (the step's density follows: lr 1e-5 changes ~20% of the elements,
// 2e-6 ~4%, a real APOLLO-Mini step at lr 1e-5 changed 4.1% of the 27B model's, bench/RESULTS.md). Per
// block, on this thread alone (best of --reps): the parts of encode_block (the gap sizes it measures when a
// record has at most 1/8 of its elements changed, the bitmap stream, the two byte planes of the values), the
// bit count, and the whole encode_records of the tensor (one thread: LIVETRAIN_NUM_THREADS=1 is set here)
// under checkpoint.encoder 2 (the gap sizes measured per block wherever at most 1/8 changed) and 3 (only where
// the gaps could win). Prints one table; the last columns are the input (bitmap + values) per second. Results:
// bench/RESULTS.md, "Fifth session of 2026-12-01".
//
// build (after the CMake build in build/):
//   g++ -O2 -std=c++20 -Iinclude -Isrc bench/encode_kinds.cpp build/liblivetrain_core.a -lpthread
//     -o /tmp/encode_kinds && /tmp/encode_kinds [blocks] [lr,lr,...]   (one line)
#include <bit>
#include <chrono>
#include <cmath>
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
#include "livetrain/tuning.hpp"

namespace {

namespace checkpoint = livetrain::checkpoint;
using checkpoint::kBlockUnits;

using bench::best_of;
using bench::Diff;
using bench::make_diff;

// encode_block's gap measurement (delta.cpp), over one block's bitmap bytes.
__attribute__((noinline)) uint64_t gap_bytes(const uint8_t* bits, uint64_t nbytes, uint64_t begin) {
  uint64_t j = 0, prev = 0, inner = 0, first = 0;
  for (uint64_t byte = 0; byte < nbytes; ++byte) {
    for (unsigned w = bits[byte]; w; w &= w - 1) {
      uint64_t i = begin + byte * 8 + static_cast<uint64_t>(std::countr_zero(w));
      if (j++ == 0) first = i;
      else inner += i - prev - 1 == 0 ? 1 : (std::bit_width(i - prev - 1) + 6) / 7;
      prev = i;
    }
  }
  return inner + first + prev;
}

}  // namespace

int main(int argc, char** argv) {
  setenv("LIVETRAIN_NUM_THREADS", "1", 1);
  const uint64_t blocks = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 16;
  std::vector<double> lrs;
  for (const char* s = argc > 2 ? argv[2] : "1e-5,2e-6"; *s;) {
    char* end;
    lrs.push_back(std::strtod(s, &end));
    s = *end == ',' ? end + 1 : end;
  }
  const int reps = 3;
  const uint64_t units = blocks * kBlockUnits;
  std::printf("one thread, a bf16 tensor of %llu blocks of 2^20 elements, best of %d; per block:\n\n",
              static_cast<unsigned long long>(blocks), reps);
  std::printf(
      "| lr | changed | gap sizes us | bitmap stream us | low plane us | high plane us | bit count us | sum us | "
      "encode_records, encoder 2 us | encoder 3 us | input MB/s, encoder 2 | encoder 3 |\n");
  std::printf("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  for (double lr : lrs) {
    const Diff d = make_diff(units, lr, 1);
    const uint64_t nbytes = kBlockUnits / 8;
    // Each block's values start at the rank of its first change.
    std::vector<uint64_t> start(blocks + 1, 0);
    for (uint64_t b = 0; b < blocks; ++b)
      start[b + 1] = start[b] + checkpoint::bytes::count_bits(d.bitmap.data() + b * nbytes, nbytes);
    volatile uint64_t sink = 0;
    std::string out;
    out.reserve(4 * kBlockUnits);
    const double gaps = best_of(reps, [&] {
      for (uint64_t b = 0; b < blocks; ++b)
        sink = sink + gap_bytes(d.bitmap.data() + b * nbytes, nbytes, b * kBlockUnits);
    });
    const double bitmap = best_of(reps, [&] {
      for (uint64_t b = 0; b < blocks; ++b) {
        out.clear();
        checkpoint::entropy::encode(d.bitmap.data() + b * nbytes, nbytes, out, 1);
      }
    });
    double plane[2];
    for (int p = 0; p < 2; ++p) {
      plane[p] = best_of(reps, [&] {
        for (uint64_t b = 0; b < blocks; ++b) {
          out.clear();
          checkpoint::entropy::encode(d.values.data() + start[b] * 2 + p, start[b + 1] - start[b], out, 2);
        }
      });
    }
    const double count = best_of(reps, [&] {
      for (uint64_t b = 0; b < blocks; ++b)
        sink = sink + checkpoint::bytes::count_bits(d.bitmap.data() + b * nbytes, nbytes);
    });
    auto records = [&](int encoder) {
      livetrain::tuning::set("checkpoint.encoder", encoder);
      const double t = best_of(reps, [&] {
        std::vector<std::vector<std::string>> outs;
        checkpoint::encode_records(
            {checkpoint::RecordParts{
                "t", livetrain::DType::kBF16, units, d.changed, d.bitmap.data(), d.values.data(), {}}},
            outs, false);
      });
      livetrain::tuning::reset();
      return t;
    };
    const double before = records(2), whole = records(3);
    const double per = 1e6 / static_cast<double>(blocks);
    const double sum = gaps + bitmap + plane[0] + plane[1] + count;
    const double input = static_cast<double>(d.bitmap.size() + d.values.size());
    std::printf("| %g | %.1f%% | %.0f | %.0f | %.0f | %.0f | %.0f | %.0f | %.0f | %.0f | %.0f | %.0f |\n", lr,
                100.0 * static_cast<double>(d.changed) / static_cast<double>(units), gaps * per, bitmap * per,
                plane[0] * per, plane[1] * per, count * per, sum * per, before * per, whole * per, input / before / 1e6,
                input / whole / 1e6);
  }
  return 0;
}
