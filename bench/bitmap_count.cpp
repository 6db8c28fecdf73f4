// The bit count of a delta's positions bitmap (bytes::count_bits: every blocks record's block counts when it
// is written, and every bitmap validated before a record is applied), against what each path ran before:
// one std::popcount per byte (applying) and per word (writing), both at the baseline x86-64 build's ISA,
// where std::popcount is a libgcc call; with for scale the entropy decode of the same bitmap that applying
// a blocks record does first. One thread, the best of 5 runs, on a 16 MiB bitmap (a 134M-element tensor,
// SmolLM2-135M's size) with 20% of its bits set at random. Results: bench/RESULTS.md, "Bitmap count".
//
// build (after the CMake build in build/):
//   g++ -O2 -std=c++20 -Iinclude -Isrc bench/bitmap_count.cpp build/liblivetrain_core.a -lpthread \
//     -o /tmp/bitmap_count && /tmp/bitmap_count
#include <bit>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "checkpoint/bytes.hpp"
#include "checkpoint/entropy.hpp"

namespace {

namespace checkpoint = livetrain::checkpoint;

// The code before: one std::popcount per byte (a libgcc call each without POPCNT).
__attribute__((noinline)) uint64_t per_byte(const uint8_t* p, uint64_t n) {
  uint64_t c = 0;
  for (uint64_t i = 0; i < n; ++i) c += static_cast<uint64_t>(std::popcount(p[i]));
  return c;
}

// count_bits' loop compiled for this file's ISA (baseline x86-64: the libgcc call per word).
__attribute__((noinline)) uint64_t per_word_baseline(const uint8_t* p, uint64_t n) {
  uint64_t c = 0, i = 0;
  for (; i + 8 <= n; i += 8) c += static_cast<uint64_t>(std::popcount(checkpoint::bytes::get<uint64_t>(p + i)));
  for (; i < n; ++i) c += static_cast<uint64_t>(std::popcount(p[i]));
  return c;
}

template <typename F>
double best_seconds(F f) {
  double best = 1e30;
  for (int r = 0; r < 5; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

}  // namespace

int main() {
  const uint64_t nbytes = uint64_t{16} << 20;
  std::vector<uint8_t> bitmap(nbytes, 0);
  std::mt19937_64 rng(1);
  std::bernoulli_distribution changed(0.2);
  for (uint64_t i = 0; i < nbytes * 8; ++i) bitmap[i / 8] |= static_cast<uint8_t>(changed(rng)) << (i % 8);
  std::string coded;
  checkpoint::entropy::encode(bitmap.data(), nbytes, coded);
  std::vector<uint8_t> decoded(nbytes);

  uint64_t counts[3] = {};
  const double before = best_seconds([&] { counts[0] = per_byte(bitmap.data(), nbytes); });
  const double baseline = best_seconds([&] { counts[1] = per_word_baseline(bitmap.data(), nbytes); });
  const double now = best_seconds([&] { counts[2] = checkpoint::bytes::count_bits(bitmap.data(), nbytes); });
  const double decode = best_seconds([&] {
    const uint8_t* p = reinterpret_cast<const uint8_t*>(coded.data());
    checkpoint::entropy::decode(&p, p + coded.size(), decoded.data(), nbytes, "bench: ");
  });
  if (counts[0] != counts[1] || counts[0] != counts[2] || decoded != bitmap) {
    std::fprintf(stderr, "mismatch: counts %llu %llu %llu, or the decoded bitmap differs\n",
                 static_cast<unsigned long long>(counts[0]), static_cast<unsigned long long>(counts[1]),
                 static_cast<unsigned long long>(counts[2]));
    return 1;
  }
  std::printf("bitmap of %llu MiB, %llu bits set; CPU %s POPCNT\n\n", static_cast<unsigned long long>(nbytes >> 20),
              static_cast<unsigned long long>(counts[0]), __builtin_cpu_supports("popcnt") ? "has" : "lacks");
  std::printf("| %-44s | %8s | %8s | %17s |\n", "what", "ms", "GB/s", "x the code before");
  std::printf("|%s|%s|%s|%s|\n", std::string(46, '-').c_str(), std::string(10, '-').c_str(),
              std::string(10, '-').c_str(), std::string(19, '-').c_str());
  auto row = [&](const char* what, double s) {
    std::printf("| %-44s | %8.2f | %8.2f | %17.2f |\n", what, s * 1e3, nbytes / s / 1e9, before / s);
  };
  row("per byte: before, when a record is applied", before);
  row("per word, no POPCNT: before, when written", baseline);
  row("bytes::count_bits (now: the POPCNT clone)", now);
  row("for scale: entropy::decode of the bitmap", decode);
  return 0;
}
