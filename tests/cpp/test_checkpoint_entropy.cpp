// The delta format's byte-stream coder (src/checkpoint/entropy.hpp): golden bytes of each mode, round trips
// over the distributions XOR deltas produce (and ones that force the 11-bit length limit), and strict
// rejection of malformed streams.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "checkpoint/entropy.hpp"
#include "livetrain/checkpoint/hash.hpp"
#include "livetrain/error.hpp"

namespace entropy = livetrain::checkpoint::entropy;

namespace {

std::string hex(const std::string& s) {
  static const char* d = "0123456789abcdef";
  std::string out;
  for (unsigned char c : s) {
    out.push_back(d[c >> 4]);
    out.push_back(d[c & 15]);
  }
  return out;
}

std::string encode(const std::vector<uint8_t>& in) {
  std::string out;
  entropy::encode(in.data(), in.size(), out);
  return out;
}

std::vector<uint8_t> decode(const std::string& s, size_t n) {
  std::vector<uint8_t> out(n, 0xEE);
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  entropy::decode(&p, p + s.size(), out.data(), n, "test: ");
  EXPECT_EQ(p, reinterpret_cast<const uint8_t*>(s.data()) + s.size()) << "decode consumes the whole stream";
  return out;
}

void expect_format_error(const std::string& s, size_t n, const char* why) {
  std::vector<uint8_t> out(n);
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  try {
    entropy::decode(&p, p + s.size(), out.data(), n, "test: ");
    ADD_FAILURE() << "accepted: " << why;
  } catch (const livetrain::Error& e) {
    EXPECT_EQ(e.code(), livetrain::ErrorCode::kFormat) << why;
  }
}

// Appends the coded streams of 600 inputs to `all` with `coder` (shared by the golden digest test).
template <typename Coder>
void encode_pinned_cases(Coder coder, std::string& all) {
  std::mt19937_64 rng(23);  // raw draws only: std distributions differ between standard libraries
  for (int t = 0; t < 600; ++t) {
    const size_t n = t < 6 ? static_cast<size_t>(t) : t % 50 == 0 ? 40000 + rng() % 30000 : rng() % 5000;
    const size_t stride = 1 + rng() % 4, off = rng() % 4;
    std::vector<uint8_t> buf(off + n * stride + 3);
    for (auto& b : buf) b = static_cast<uint8_t>(rng());  // filler between the symbols
    const int kind = t % 6;
    const unsigned k = 1 + static_cast<unsigned>(rng() % 256), p = 1 + static_cast<unsigned>(rng() % 60);
    for (size_t i = 0; i < n; ++i) {
      const uint64_t r = rng();
      uint8_t s = 0;
      switch (kind) {
        case 0: s = static_cast<uint8_t>(r % k); break;                                             // flat over k
        case 1: s = static_cast<uint8_t>(std::min(std::countr_zero(r | (1ull << 50)), 40)); break;  // 2^-s: deep
        case 2: s = static_cast<uint8_t>((1u << std::min(std::countr_one(r) + 1, 8)) - 1); break;   // bf16 low XOR
        case 3: s = r % 100 < 97 ? 0 : static_cast<uint8_t>(r >> 32) % 16; break;                   // high XOR
        case 4:                                                                                     // bitmap bytes
          for (int b = 0; b < 8; ++b) s |= static_cast<uint8_t>(((r >> (8 * b)) & 0xFF) * 100 / 256 < p) << b;
          break;
        default: s = static_cast<uint8_t>(k + (r % 3 == 0)); break;  // one or two symbols
      }
      buf[off + i * stride] = s;
    }
    coder(buf.data() + off, n, all, stride);
  }
}

}  // namespace

TEST(CheckpointEntropy, GoldenBytesOfEachMode) {
  EXPECT_EQ(hex(encode({})),
            "00"
            "0000000000000000");
  EXPECT_EQ(hex(encode({7, 7, 7})),
            "01"
            "0100000000000000"
            "07");
  EXPECT_EQ(hex(encode({1, 2, 3})),
            "00"
            "0300000000000000"
            "010203");  // Huffman would not be smaller
  // 200 × 'a', 100 × 'b', 100 × 'c': lengths a=1, b=2, c=2; canonical codes a=0, b=10, c=11, each
  // written most significant bit first into bytes least significant bit first.
  std::vector<uint8_t> in(200, 'a');
  in.insert(in.end(), 100, 'b');
  in.insert(in.end(), 100, 'c');
  std::string s = encode(in);
  ASSERT_EQ(s.size(), 9u + 128 + 75);  // 200·1 + 200·2 = 600 bits
  EXPECT_EQ(hex(s.substr(0, 9)),
            "02"
            "cb00000000000000");
  EXPECT_EQ(static_cast<uint8_t>(s[9 + 'a' / 2]), 0x10);   // 'a' = 97 odd: high nibble 1; 96 unused
  EXPECT_EQ(static_cast<uint8_t>(s[9 + 'b' / 2]), 0x22);   // 'b' = 98 low nibble 2, 'c' = 99 high nibble 2
  EXPECT_EQ(static_cast<uint8_t>(s[9 + 128]), 0x00);       // eight a's
  EXPECT_EQ(static_cast<uint8_t>(s[9 + 128 + 25]), 0x55);  // b = "10" → bits 1,0 → byte 0b01010101
  EXPECT_EQ(static_cast<uint8_t>(s.back()), 0xFF);         // c = "11"
  EXPECT_EQ(decode(s, in.size()), in);
}

TEST(CheckpointEntropy, RoundTripsAndCompressesXorPlanes) {
  std::mt19937_64 rng(3);
  for (size_t n : {1ul, 2ul, 5ul, 255ul, 4096ul, 100000ul}) {
    // The low byte of bf16 XORs after a small step (mostly 1, 3, 7, ...), a mostly-zero high byte,
    // uniform bytes, and every symbol once.
    std::vector<std::vector<uint8_t>> cases(4, std::vector<uint8_t>(n));
    for (size_t i = 0; i < n; ++i) {
      int run = std::countr_one(rng());
      cases[0][i] = static_cast<uint8_t>((1u << std::min(run + 1, 8)) - 1);
      cases[1][i] = rng() % 1000 == 0 ? static_cast<uint8_t>(rng()) : 0;
      cases[2][i] = static_cast<uint8_t>(rng());
      cases[3][i] = static_cast<uint8_t>(i);
    }
    for (size_t c = 0; c < cases.size(); ++c) {
      std::string s = encode(cases[c]);
      EXPECT_EQ(decode(s, n), cases[c]) << "n " << n << " case " << c;
      EXPECT_LE(s.size(), n + 9) << "never more than raw";
      if (n == 100000 && c == 0) {
        EXPECT_LT(s.size(), n / 3) << "about 2 bits per low byte";
      }
      if (n == 100000 && c == 1) {
        EXPECT_LT(s.size(), n / 7) << "about 1 bit per mostly-zero byte";
      }
    }
  }
}

TEST(CheckpointEntropy, DeepTreesAreLimitedTo11Bits) {
  // Fibonacci frequencies give an optimal code as deep as the alphabet; the coder must flatten it.
  std::vector<uint8_t> in;
  uint64_t a = 1, b = 1;
  for (int s = 0; s < 24; ++s) {
    in.insert(in.end(), a, static_cast<uint8_t>(s));
    uint64_t c = a + b;
    a = b;
    b = c;
  }
  std::string s = encode(in);
  ASSERT_EQ(s[0], 2) << "Huffman";
  for (int k = 0; k < 128; ++k) {
    EXPECT_LE(static_cast<uint8_t>(s[9 + k]) & 15, entropy::kMaxCodeBits);
    EXPECT_LE(static_cast<uint8_t>(s[9 + k]) >> 4, entropy::kMaxCodeBits);
  }
  EXPECT_EQ(decode(s, in.size()), in);
}

TEST(CheckpointEntropy, MalformedStreamsAreRejected) {
  std::vector<uint8_t> in(200, 'a');
  in.insert(in.end(), 100, 'b');
  in.insert(in.end(), 100, 'c');
  const std::string good = encode(in);
  expect_format_error(good.substr(0, 5), in.size(), "truncated header");
  expect_format_error(good.substr(0, good.size() - 1), in.size(), "truncated stream");
  expect_format_error(good, in.size() + 1, "ends early");
  std::string s = good;
  s[0] = 9;
  expect_format_error(s, in.size(), "unknown mode");
  s = good;
  s[9 + 'a' / 2] = 0x20;  // 'a' length 2: lengths 2,2,2 are incomplete
  expect_format_error(s, in.size(), "incomplete code");
  s = good;
  s[9 + 'a' / 2] = 0x10 | 0x01;  // 96 gets length 1 too: over-subscribed
  expect_format_error(s, in.size(), "over-subscribed code");
  s = good;
  s[9 + 'a' / 2] = 0xC0;  // length 12
  expect_format_error(s, in.size(), "length over the limit");
  s = good;
  s.back() = static_cast<char>(0xFF);
  s += std::string(1, '\x00');
  s[1] = static_cast<char>(s[1] + 1);  // one more byte, declared
  expect_format_error(s, in.size(), "bytes after the last code");
  expect_format_error(encode({1, 2, 3}), 4, "raw length mismatch");
  expect_format_error(std::string("\x01\x01\0\0\0\0\0\0\0\x07", 10), 0, "constant stream of nothing");
  // Set padding bits: 3 symbols of a 2-symbol code leave 5 bits in the last byte.
  std::string pad = std::string("\x02") + std::string(8, '\0') + std::string(128, '\0') + "\x02";
  pad[0] = 2;
  pad[1] = static_cast<char>(129);
  pad[9] = 0x11;  // symbols 0 and 1, length 1 each
  EXPECT_EQ(decode(pad, 3), (std::vector<uint8_t>{0, 1, 0}));
  pad.back() = static_cast<char>(0x02 | 0x80);
  expect_format_error(pad, 3, "set padding bits");
}

// Every stream the store has written must come out of the encoder byte for byte the same (a save of the
// same diff is compared with the CPU save's file, and the format has one encoding per input): 600 inputs
// of random, odd sizes (0-5 bytes, up to 70,000), strides 1-4 with other bytes between the symbols, and
// distributions from one symbol to all 256 (flat, 2^-s tails that hit the 11-bit limit, bf16 XOR planes,
// bitmap bytes), digested. The digest is that of the coder before the word-wise histograms and the
// branch-free bit writer (encode_reference; checkpoint.encoder=0), taken from its build.
TEST(CheckpointEntropy, EncoderBytesAreThoseOfTheCoderBefore) {
  std::string fast, reference;
  encode_pinned_cases(
      [](const uint8_t* in, size_t n, std::string& out, size_t stride) { entropy::encode(in, n, out, stride); }, fast);
  encode_pinned_cases(entropy::encode_reference, reference);
  EXPECT_EQ(fast.size(), 950644u);
  EXPECT_EQ(livetrain::checkpoint::xxh64(fast.data(), fast.size()), 0x13c565c936be60b2ull);
  EXPECT_TRUE(fast == reference) << "encode and encode_reference differ";
  std::string baseline;  // without the CPU's extensions (entropy::use_cpu_extensions)
  const bool was = entropy::use_cpu_extensions(false);
  encode_pinned_cases(
      [](const uint8_t* in, size_t n, std::string& out, size_t stride) { entropy::encode(in, n, out, stride); },
      baseline);
  entropy::use_cpu_extensions(was);
  EXPECT_TRUE(baseline == reference) << "encode without the CPU's extensions and encode_reference differ";
  // What the cases cover: each mode, and Huffman codes at the 11-bit limit.
  int modes[3] = {0, 0, 0}, at_limit = 0;
  std::string again;
  encode_pinned_cases(
      [&](const uint8_t* in, size_t n, std::string& out, size_t stride) {
        const size_t start = out.size();
        entropy::encode(in, n, out, stride);
        const auto mode = static_cast<uint8_t>(out[start]);
        ASSERT_LT(mode, 3);
        ++modes[mode];
        if (mode == 2) {
          int deepest = 0;
          for (size_t k = 0; k < entropy::kTableBytes; ++k) {
            const auto b = static_cast<uint8_t>(out[start + 9 + k]);
            deepest = std::max({deepest, b & 15, b >> 4});
          }
          at_limit += deepest == entropy::kMaxCodeBits;
        }
        std::vector<uint8_t> plane(n);
        for (size_t i = 0; i < n; ++i) plane[i] = in[i * stride];
        EXPECT_EQ(decode(out.substr(start), n), plane);
      },
      again);
  EXPECT_GT(modes[0], 10);
  EXPECT_GT(modes[1], 2);
  EXPECT_GT(modes[2], 100);
  EXPECT_GT(at_limit, 10);
}

namespace {

// encode and encode_reference write the same bytes on random inputs beyond the pinned ones: odd sizes up to
// 300,000 (past the pair table's threshold, kPairBytesPerSymbol bytes per used symbol, at stride 1), strides
// 1-5 with random bytes between the symbols, one symbol, two, all 256 (flat, or after a run of 0s: the
// histogram that skips 0s), and sparse bitmaps whose zero bytes come in runs of eight and more or not; each
// stream decodes back. Counts that the pair table's streams and its 8-zero runs were among them.
void encode_equals_reference_on_random_inputs() {
  std::mt19937_64 rng(28);
  int paired = 0, paired_runs = 0, huffman = 0;
  for (int t = 0; t < 300; ++t) {
    const size_t n = t < 10 ? static_cast<size_t>(t) : t % 3 == 0 ? 50000 + rng() % 250000 : rng() % 9000;
    const size_t stride = t % 2 == 0 ? 1 : 1 + rng() % 5, off = rng() % 8;
    std::vector<uint8_t> buf(off + n * stride + 7);
    for (auto& b : buf) b = static_cast<uint8_t>(rng());
    const int kind = t % 6;
    const unsigned a = static_cast<unsigned>(rng() % 256), density = 1 + static_cast<unsigned>(rng() % 400);
    for (size_t i = 0; i < n; ++i) {
      const uint64_t r = rng();
      uint8_t s = 0;
      switch (kind) {
        case 0: s = static_cast<uint8_t>(a); break;                       // one symbol
        case 1: s = static_cast<uint8_t>(r % 5 == 0 ? a : a + 1); break;  // two
        case 2: s = static_cast<uint8_t>(r); break;                       // all 256, flat
        case 3:  // bitmap bytes, each bit set with probability density / 4096
          for (int b = 0; b < 8; ++b) s |= static_cast<uint8_t>(((r >> (8 * b)) & 0xFFF) < density) << b;
          break;
        case 4: s = static_cast<uint8_t>(std::min(std::countr_zero(r | (1ull << 40)), 20)); break;  // deep
        default: s = i < 100 ? 0 : static_cast<uint8_t>(r); break;  // 0s, then all 256 (histograms that skip 0s)
      }
      buf[off + i * stride] = s;
    }
    std::string fast, reference;
    entropy::encode(buf.data() + off, n, fast, stride);
    entropy::encode_reference(buf.data() + off, n, reference, stride);
    ASSERT_EQ(fast, reference) << "case " << t << ": n " << n << ", stride " << stride << ", kind " << kind;
    std::vector<uint8_t> plane(n);
    for (size_t i = 0; i < n; ++i) plane[i] = buf[off + i * stride];
    ASSERT_EQ(decode(fast, n), plane) << "case " << t;
    if (static_cast<uint8_t>(fast[0]) != 2) continue;
    ++huffman;
    int used = 0;
    for (size_t k = 0; k < entropy::kTableBytes; ++k) {
      const auto b = static_cast<uint8_t>(fast[9 + k]);
      used += (b & 15) != 0;
      used += (b >> 4) != 0;
    }
    if (stride == 1 && n >= entropy::kPairBytesPerSymbol * static_cast<size_t>(used)) {
      ++paired;
      paired_runs += kind == 3 && (static_cast<uint8_t>(fast[9]) & 15) <= 4;  // 0's code: at most 4 bits
    }
  }
  EXPECT_GT(huffman, 100);
  EXPECT_GT(paired, 10);
  EXPECT_GT(paired_runs, 3);
}

}  // namespace

// The same with the code compiled for the CPU's extensions and, where it has them, with the baseline x86-64 code.
TEST(CheckpointEntropy, EncodeEqualsReferenceOnRandomInputs) {
  encode_equals_reference_on_random_inputs();
  // The baseline x86-64 code too, where the CPU's extensions are used.
  const bool was = entropy::use_cpu_extensions(false);
  encode_equals_reference_on_random_inputs();
  entropy::use_cpu_extensions(was);
}

// The room a block of the delta's blocks encoding reserves for its streams (delta.cpp, encode_block) is
// max_encoded_bytes per stream plus kEncodeSlack once: at the worst cases, incompressible bytes (a raw stream,
// the largest outcome) and the largest Huffman stream (n - 1 bytes, while its codes are written 8 bytes more),
// the string does not grow; with one byte less room it does, so the bound is exact.
TEST(CheckpointEntropy, ReservedRoomIsExactAtTheWorstCase) {
  using Encoder = void (*)(const uint8_t*, size_t, std::string&, size_t);
  // Whether encoding `in` into a string with `room` bytes reserved keeps it where it is; the stream's mode and L.
  auto fits = [](Encoder coder, const std::vector<uint8_t>& in, size_t room, int& mode, uint64_t& length) {
    std::string out;
    out.reserve(room);
    const size_t capacity = out.capacity();
    const char* data = out.data();
    coder(in.data(), in.size(), out, 1);
    mode = static_cast<uint8_t>(out[0]);
    std::memcpy(&length, out.data() + 1, 8);
    EXPECT_LE(out.size(), entropy::max_encoded_bytes(in.size()));
    return out.capacity() == capacity && out.data() == data;
  };
  for (Encoder coder : {&entropy::encode, &entropy::encode_reference}) {
    std::mt19937_64 rng(3);
    std::vector<uint8_t> random(4096);
    for (auto& b : random) b = static_cast<uint8_t>(rng());
    int mode = -1;
    uint64_t length = 0;
    EXPECT_TRUE(fits(coder, random, entropy::max_encoded_bytes(random.size()), mode, length));
    EXPECT_EQ(mode, 0);  // raw: exactly max_encoded_bytes
    // Every byte value equally often (8-bit codes: raw wins), then more and more zeros until Huffman wins:
    // the first stream it wins is n - 1 bytes long.
    std::vector<uint8_t> skewed;
    for (int r = 0; r < 4; ++r) {
      for (int s = 0; s < 256; ++s) skewed.push_back(static_cast<uint8_t>(s));
    }
    while (true) {
      ASSERT_TRUE(fits(coder, skewed, entropy::max_encoded_bytes(skewed.size()) + entropy::kEncodeSlack, mode, length));
      if (mode != 0) break;
      skewed.push_back(0);
    }
    ASSERT_EQ(mode, 2);
    ASSERT_EQ(length, skewed.size() - 1);
    const size_t n = skewed.size();
    EXPECT_TRUE(fits(coder, skewed, entropy::max_encoded_bytes(n) + entropy::kEncodeSlack, mode, length));
    EXPECT_FALSE(fits(coder, skewed, entropy::max_encoded_bytes(n) + entropy::kEncodeSlack - 1, mode, length));
  }
}
