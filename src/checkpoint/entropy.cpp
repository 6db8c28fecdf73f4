// The byte-stream coder of the checkpoint delta format: raw, constant or canonical Huffman with codes of
// at most 11 bits (format in entropy.hpp). Built for the byte planes of XOR deltas, whose high bytes are
// almost all zero and whose low bytes after a small step hold few distinct values.
#include "checkpoint/entropy.hpp"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <memory>
#include <utility>

// LIVETRAIN_ENTROPY_BASELINE builds the baseline x86-64 code alone (bench/encode_ab.py compares it).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(LIVETRAIN_ENTROPY_BASELINE)
#include <immintrin.h>
#endif

#include "checkpoint/bytes.hpp"
#include "livetrain/error.hpp"

namespace livetrain::checkpoint::entropy {

namespace {

using Lengths = std::array<uint8_t, 256>;

// Optimal code lengths (two-queue Huffman) for the `nleaves` >= 2 used symbols in `keys`, each
// frequency · 256 + symbol, in ascending order (by frequency, then by symbol). Unused symbols get length
// 0. Returns the deepest length.
int huffman_lengths(const uint64_t* keys, int nleaves, Lengths& len) {
  struct Node {
    uint64_t weight;
    int parent;
  };
  std::array<Node, 511> nodes{};  // leaves first (in sorted order), then internal nodes in creation order
  for (int i = 0; i < nleaves; ++i) nodes[i] = Node{keys[i] >> 8, -1};
  int next_leaf = 0, next_internal = nleaves, count = nleaves;
  auto take = [&]() {
    // The lighter of the next leaf and the next internal node (internal nodes are created in order of weight).
    if (next_leaf < nleaves && (next_internal >= count || nodes[next_leaf].weight <= nodes[next_internal].weight))
      return next_leaf++;
    return next_internal++;
  };
  while (count < 2 * nleaves - 1) {
    int a = take(), b = take();
    nodes[count] = Node{nodes[a].weight + nodes[b].weight, -1};
    nodes[a].parent = nodes[b].parent = count;
    ++count;
  }
  len.fill(0);
  int max_len = 0;
  std::array<int, 511> depth{};
  for (int i = count - 2; i >= 0; --i) depth[i] = depth[nodes[i].parent] + 1;  // parents come after children
  for (int i = 0; i < nleaves; ++i) {
    len[keys[i] & 0xFF] = static_cast<uint8_t>(depth[i]);
    max_len = std::max(max_len, depth[i]);
  }
  return max_len;
}

// Lengths limited to kMaxCodeBits for `freq` (at least two used symbols; each at most 2^31, so
// frequency · 256 + symbol fits 64 bits): while the optimal code is too deep, halve the frequencies
// (keeping every used symbol at least 1) and rebuild. Flattens the distribution a little; with 256 symbols
// it ends by depth 8 at worst.
void limited_lengths(const std::array<uint64_t, 256>& freq, Lengths& len) {
  std::array<uint64_t, 256> keys{};
  int n = 0;
  for (int s = 0; s < 256; ++s) {
    if (freq[s]) keys[n++] = freq[s] << 8 | static_cast<uint64_t>(s);
  }
  std::sort(keys.begin(), keys.begin() + n);
  while (huffman_lengths(keys.data(), n, len) > kMaxCodeBits) {
    // Halving keeps unequal frequencies in order; those it makes equal are neighbours and go back into symbol
    // order: an insertion sort of an almost sorted array instead of a sort.
    for (int i = 0; i < n; ++i) keys[i] = std::max<uint64_t>(1, keys[i] >> 9) << 8 | (keys[i] & 0xFF);
    for (int i = 1; i < n; ++i) {
      const uint64_t k = keys[i];
      int j = i;
      for (; j > 0 && keys[j - 1] > k; --j) keys[j] = keys[j - 1];
      keys[j] = k;
    }
  }
}

// Canonical codes, bit-reversed so that emitting them least significant bit first writes each code's
// bits most significant first.
void canonical_codes(const Lengths& len, std::array<uint16_t, 256>& rev) {
  std::array<int, kMaxCodeBits + 1> count{};
  for (int s = 0; s < 256; ++s) count[len[s]]++;
  count[0] = 0;
  std::array<uint32_t, kMaxCodeBits + 2> next{};
  uint32_t code = 0;
  for (int l = 1; l <= kMaxCodeBits; ++l) {
    code = (code + static_cast<uint32_t>(count[l - 1])) << 1;
    next[l] = code;
  }
  for (int s = 0; s < 256; ++s) {
    int l = len[s];
    if (!l) continue;
    uint32_t c = next[l]++, r = 0;
    for (int b = 0; b < l; ++b) r |= ((c >> b) & 1u) << (l - 1 - b);
    rev[s] = static_cast<uint16_t>(r);
  }
}

void put_header(std::string& out, Mode mode, uint64_t length) {
  out.push_back(static_cast<char>(mode));
  bytes::put<uint64_t>(out, length);
}

Error bad(std::string_view where, const std::string& msg) {
  return Error(ErrorCode::kFormat, std::string(where) + msg);
}

}  // namespace

namespace {

using Histogram = std::array<uint64_t, 256>;

// The byte histogram of in[0], in[stride], ..., in[(n - 1) · stride], one symbol per load (the
// reference coder's).
Histogram histogram_bytewise(const uint8_t* in, size_t n, size_t stride) {
  Histogram freq{};
  // Four histograms break the store-to-load dependency on runs of one value.
  std::array<std::array<uint32_t, 256>, 4> h{};
  size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    h[0][in[i * stride]]++;
    h[1][in[(i + 1) * stride]]++;
    h[2][in[(i + 2) * stride]]++;
    h[3][in[(i + 3) * stride]]++;
  }
  for (; i < n; ++i) h[0][in[i * stride]]++;
  for (int s = 0; s < 256; ++s) freq[s] = h[0][s] + h[1][s] + h[2][s] + h[3][s];
  return freq;
}

// Eight tables: a plane that is mostly one value (the high bytes of XOR deltas) increments one counter
// per table only every eighth symbol, so the increments' store-to-load chains overlap.
constexpr size_t kTables = 8;
using Tables = std::array<std::array<uint32_t, 256>, kTables>;

// The histogram the tables add up to, with `zeros` more 0s (those counted a step or a load at a time).
Histogram merged(const Tables& h, uint64_t zeros) {
  Histogram freq{};
  for (const auto& t : h) {
    for (int s = 0; s < 256; ++s) freq[s] += t[s];
  }
  freq[0] += zeros;
  return freq;
}

// The bits of an 8-byte load that hold symbols of a plane of stride S (its bytes 0, S, 2S, ...).
template <size_t S>
constexpr uint64_t plane_mask() {
  return S == 1 ? ~uint64_t{0} : S == 2 ? 0x00FF00FF00FF00FFull : 0x000000FF000000FFull;
}

// Counts the symbols K of two loads (the byte at 8·S·K bits of the K·S/8-th), symbol K in table K mod 8;
// unrolled.
template <size_t S, size_t... K>
inline void count_words(uint64_t w0, uint64_t w1, Tables& h, std::index_sequence<K...>) {
  constexpr size_t per = 8 / S;
  ((h[K % kTables][((K < per ? w0 : w1) >> (8 * S * (K % per))) & 0xFF]++), ...);
}

// The same histogram from 8-byte loads for strides 1, 2 and 4 (a plane of 1-, 2- or 4-byte values): 8, 4
// or 2 symbols per load, two loads per step. A load never reaches past the last symbol's byte. A step whose
// symbols are all 0 is counted at once.
template <size_t S>
Histogram histogram_words(const uint8_t* in, size_t n) {
  static_assert(S == 1 || S == 2 || S == 4);
  constexpr size_t per = 8 / S;
  Tables h{};
  uint64_t zeros = 0;  // symbols counted a step at a time, where all of a step's were 0
  size_t i = 0;
  if (n > 0) {
    for (; i * S + 16 <= (n - 1) * S + 1; i += 2 * per) {
      uint64_t w0, w1;
      std::memcpy(&w0, in + i * S, 8);
      std::memcpy(&w1, in + i * S + 8, 8);
      if (((w0 | w1) & plane_mask<S>()) == 0) {
        zeros += 2 * per;
        continue;
      }
      count_words<S>(w0, w1, h, std::make_index_sequence<2 * per>{});
    }
  }
  for (; i < n; ++i) h[i % kTables][in[i * S]]++;
  return merged(h, zeros);
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(LIVETRAIN_ENTROPY_BASELINE)
#define LIVETRAIN_ENTROPY_X86 1

// What the CPU has beyond the baseline x86-64 the build targets (GCC, clang): the coder's hot loops are
// compiled for it too (target attributes) and chosen at run time.
// use_cpu_extensions turns them off for tests.
std::atomic<bool> extensions_on{true};

bool has_bmi2() {
  static const bool has = [] {
    __builtin_cpu_init();  // a static initializer may run before libgcc's
    return __builtin_cpu_supports("bmi2") != 0;
  }();
  return has && extensions_on.load(std::memory_order_relaxed);
}
bool has_avx512_vbmi2() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vbmi2");
  }();
  return has && extensions_on.load(std::memory_order_relaxed);
}

// The histogram of a plane of stride S (1, 2, 4) with AVX-512: each 64-byte load's plane bytes that are not 0
// are compressed (vpcompressb) into a buffer and the 0s only counted, so that the buffer's bytes alone go
// through the tables, eight symbols per 8-byte load. A plane that is mostly 0 (a sparse step's bitmap, the
// high bytes of bf16 XORs) skips most increments; any plane of stride 2 or 4 has its bytes gathered. A load
// never reaches past the last symbol's byte.
template <size_t S>
[[gnu::target("avx512f,avx512bw,avx512vbmi2")]] Histogram histogram_compressed(const uint8_t* in, size_t n) {
  static_assert(S == 1 || S == 2 || S == 4);
  constexpr uint64_t plane = S == 1 ? ~uint64_t{0} : S == 2 ? 0x5555555555555555ull : 0x1111111111111111ull;
  constexpr size_t kBuffer = 4096;
  alignas(64) uint8_t buffer[kBuffer + 64];
  Tables h{};
  uint64_t zeros = 0;
  size_t fill = 0;
  auto count_buffer = [&] {
    size_t j = 0;
    for (; j + 16 <= fill; j += 16) {
      uint64_t w0, w1;
      std::memcpy(&w0, buffer + j, 8);
      std::memcpy(&w1, buffer + j + 8, 8);
      count_words<1>(w0, w1, h, std::make_index_sequence<16>{});
    }
    for (; j < fill; ++j) h[j % kTables][buffer[j]]++;
    fill = 0;
  };
  size_t i = 0;
  if (n > 0) {
    for (; i * S + 64 <= (n - 1) * S + 1; i += 64 / S) {
      const __m512i v = _mm512_loadu_si512(in + i * S);
      const __mmask64 keep = _mm512_test_epi8_mask(v, v) & plane;
      const auto k = static_cast<size_t>(__builtin_popcountll(keep));
      zeros += 64 / S - k;
      _mm512_storeu_si512(buffer + fill, _mm512_maskz_compress_epi8(keep, v));
      fill += k;
      if (fill > kBuffer - 64) count_buffer();
    }
  }
  count_buffer();
  for (; i < n; ++i) h[i % kTables][in[i * S]]++;
  return merged(h, zeros);
}

// Whether at least a quarter of the first 64 symbols are 0: a plane where histogram_compressed, which pays
// for gathering every byte that is not 0, saves more than that (the bitmap of a sparse step, the high bytes
// of bf16 XORs; not their low bytes).
bool starts_mostly_zero(const uint8_t* in, size_t n, size_t stride) {
  const size_t m = std::min<size_t>(n, 64);
  size_t zeros = 0;
  for (size_t i = 0; i < m; ++i) zeros += in[i * stride] == 0;
  return 4 * zeros >= m && m > 0;
}
#endif

}  // namespace

std::array<uint64_t, 256> histogram(const uint8_t* in, size_t n, size_t stride) {
#ifdef LIVETRAIN_ENTROPY_X86
  if (has_avx512_vbmi2() && starts_mostly_zero(in, n, stride)) {
    switch (stride) {
      case 1: return histogram_compressed<1>(in, n);
      case 2: return histogram_compressed<2>(in, n);
      case 4: return histogram_compressed<4>(in, n);
      default: break;
    }
  }
#endif
  switch (stride) {
    case 1: return histogram_words<1>(in, n);
    case 2: return histogram_words<2>(in, n);
    case 4: return histogram_words<4>(in, n);
    default: return histogram_bytewise(in, n, stride);
  }
}

namespace {

// What the stream of a histogram is: its mode, and for Huffman the code lengths and the coded bits.
struct Plan {
  Mode mode = Mode::kRaw;
  Lengths len{};
  uint64_t bits = 0;
};

// The smallest of the three modes (raw on a tie with Huffman).
Plan plan(const Histogram& freq, size_t n) {
  Plan p;
  int used = 0;
  for (auto f : freq) used += f != 0;
  if (n > 0 && used == 1) {
    p.mode = Mode::kConstant;
    return p;
  }
  if (used >= 2) {
    limited_lengths(freq, p.len);
    for (int s = 0; s < 256; ++s) p.bits += freq[s] * p.len[s];
  }
  if (used >= 2 && kTableBytes + (p.bits + 7) / 8 < n) p.mode = Mode::kHuffman;
  return p;
}

// Writes the stream of a non-Huffman plan; false for a Huffman one (nothing written).
bool put_simple(const Plan& p, const uint8_t* in, size_t n, std::string& out, size_t stride) {
  if (p.mode == Mode::kConstant) {
    put_header(out, Mode::kConstant, 1);
    out.push_back(static_cast<char>(in[0]));
    return true;
  }
  if (p.mode != Mode::kRaw) return false;
  put_header(out, Mode::kRaw, n);
  if (stride == 1) {
    out.append(reinterpret_cast<const char*>(in), n);
  } else {
    const size_t start = out.size();
    out.resize(start + n);
    for (size_t i = 0; i < n; ++i) out[start + i] = static_cast<char>(in[i * stride]);
  }
  return true;
}

// Writes a Huffman plan's header and table, makes room for its codes (plus 8 bytes of slack for the
// 64-bit stores, trimmed by the caller) and returns where they go; `code` gets each symbol's reversed
// code | length << 16 (one load per symbol).
uint8_t* put_huffman_head(const Plan& p, std::string& out, std::array<uint32_t, 256>& code) {
  put_header(out, Mode::kHuffman, kTableBytes + (p.bits + 7) / 8);
  for (int s = 0; s < 256; s += 2) out.push_back(static_cast<char>(p.len[s] | (p.len[s + 1] << 4)));
  std::array<uint16_t, 256> rev{};
  canonical_codes(p.len, rev);
  for (int s = 0; s < 256; ++s) code[s] = rev[s] | (static_cast<uint32_t>(p.len[s]) << 16);
  const size_t start = out.size();
  out.resize(start + (p.bits + 7) / 8 + 8);
  return reinterpret_cast<uint8_t*>(out.data()) + start;
}

// Appends `len` bits (the low bits of `bits`, at most 57 - pending) to the accumulator holding `nbits` < 8
// pending bits: the accumulator is stored whole (8 bytes, its bits above the pending ones 0) and moves on by
// the bytes it completed. No branch depends on the data.
inline void put_bits(uint64_t bits, unsigned len, uint64_t& acc, unsigned& nbits, uint8_t*& dst) {
  acc |= bits << nbits;
  nbits += len;
  std::memcpy(dst, &acc, 8);  // little-endian host (bytes.hpp): the low bits go first
  dst += nbits >> 3;
  acc >>= nbits & ~7u;
  nbits &= 7;
}

// Eight 0s as one code (0's code repeated eight times) where 0's code has 1 to 4 bits, so that the writers take
// a run of eight 0s in one put_bits; 0 otherwise (not used then).
inline uint64_t eight_zeros(const std::array<uint32_t, 256>& code) {
  const unsigned zero_len = code[0] >> 16;
  uint64_t zeros8 = 0;
  for (unsigned k = 0; zero_len >= 1 && zero_len <= 4 && k < 8; ++k)
    zeros8 |= static_cast<uint64_t>(code[0] & 0xFFFF) << (k * zero_len);
  return zeros8;
}

// Symbols i .. i + 3 into the accumulator: their four codes (at most 44 bits) in one put_bits.
inline void put_four(const uint8_t* in, size_t i, size_t stride, const std::array<uint32_t, 256>& code, uint64_t& acc,
                     unsigned& nbits, uint8_t*& dst) {
  const uint32_t c0 = code[in[i * stride]], c1 = code[in[(i + 1) * stride]];
  const uint32_t c2 = code[in[(i + 2) * stride]], c3 = code[in[(i + 3) * stride]];
  const unsigned l0 = c0 >> 16, l1 = c1 >> 16, l2 = c2 >> 16, l3 = c3 >> 16;
  const uint64_t lo = (c0 & 0xFFFF) | static_cast<uint64_t>(c1 & 0xFFFF) << l0;
  const uint64_t hi = (c2 & 0xFFFF) | static_cast<uint64_t>(c3 & 0xFFFF) << l2;
  put_bits(lo | hi << (l0 + l1), l0 + l1 + l2 + l3, acc, nbits, dst);
}

// A stride-1 stream of at least kPairBytesPerSymbol bytes per used symbol takes its codes two symbols per
// load of a pair table (put_codes_pairs): filling the table's used × used entries costs less than the loads
// and shifts it saves on the stream's n / 2 pairs.

// The pair table of `code`: entry a | b << 8 holds the codes of a then b (a's bits first, at most 22) |
// their length << 24, for every used a and b (the other entries are never read: a stream holds only used
// symbols).
// One per thread, on the heap (256 KiB: too big for the stack, and thread_local arrays of that size take a
// loaded library's static TLS), reused.
const uint32_t* pair_table(const std::array<uint32_t, 256>& code) {
  thread_local std::unique_ptr<uint32_t[]> table;
  if (!table) table = std::make_unique<uint32_t[]>(size_t{1} << 16);
  uint32_t* t = table.get();
  std::array<uint8_t, 256> used{};
  int nused = 0;
  for (int s = 0; s < 256; ++s) {
    if (code[s] >> 16) used[nused++] = static_cast<uint8_t>(s);
  }
  for (int j = 0; j < nused; ++j) {
    const uint32_t cb = code[used[j]] & 0xFFFF, lb = code[used[j]] >> 16;
    uint32_t* row = t + (used[j] << 8);
    for (int i = 0; i < nused; ++i) {
      const uint32_t ca = code[used[i]] & 0xFFFF, la = code[used[i]] >> 16;
      row[used[i]] = (ca | cb << la) | (la + lb) << 24;
    }
  }
  return t;
}

// Four symbols given as a little-endian 32-bit word into the accumulator, as put_four: two pair-table loads.
inline void put_four_pairs(uint32_t w, const uint32_t* pair, uint64_t& acc, unsigned& nbits, uint8_t*& dst) {
  const uint32_t p0 = pair[w & 0xFFFF], p1 = pair[w >> 16];
  const unsigned l0 = p0 >> 24;
  put_bits(static_cast<uint64_t>(p0 & 0xFFFFFF) | static_cast<uint64_t>(p1 & 0xFFFFFF) << l0, l0 + (p1 >> 24), acc,
           nbits, dst);
}

// put_codes for stride 1 by pairs, eight symbols per load; where 0 has a code of at most 4 bits, eight 0s
// go in as one 8-fold code (as put_codes). Same bits.
void put_codes_pairs(const uint8_t* in, size_t n, const std::array<uint32_t, 256>& code, uint8_t* dst) {
  static_assert(4 * kMaxCodeBits + 7 <= 64 && 8 * 4 + 7 <= 64);
  const uint32_t* pair = pair_table(code);
  const unsigned zero_len = code[0] >> 16;
  const bool zeros_at_once = zero_len >= 1 && zero_len <= 4;
  const uint64_t zeros8 = eight_zeros(code);
  uint64_t acc = 0;
  unsigned nbits = 0;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, in + i, 8);
    if (w == 0 && zeros_at_once) {
      put_bits(zeros8, 8 * zero_len, acc, nbits, dst);
      continue;
    }
    put_four_pairs(static_cast<uint32_t>(w), pair, acc, nbits, dst);
    put_four_pairs(static_cast<uint32_t>(w >> 32), pair, acc, nbits, dst);
  }
  for (; i < n; ++i) {
    const uint32_t c = code[in[i]];
    put_bits(static_cast<uint64_t>(c & 0xFFFF), c >> 16, acc, nbits, dst);
  }
  std::memcpy(dst, &acc, 8);
}

// The codes of in[0], in[stride], ..., four symbols per flush; the bits are the same as one symbol at a
// time. S is the stride when it is 1, 2 or 4 (a plane of values of that size), 0 for any (`stride`).
template <size_t S>
void put_codes(const uint8_t* in, size_t n, size_t stride, const std::array<uint32_t, 256>& code, uint8_t* dst) {
  static_assert(4 * kMaxCodeBits + 7 <= 64);
  if constexpr (S == 1) {
    size_t used = 0;
    for (uint32_t c : code) used += c != 0;
    if (n >= kPairBytesPerSymbol * used) return put_codes_pairs(in, n, code, dst);
  }
  if constexpr (S != 0) stride = S;
  uint64_t acc = 0;
  unsigned nbits = 0;
  size_t i = 0;
  // Where 0 has a code of at most 4 bits (a plane that is mostly 0: the high bytes of XOR deltas, the bitmap
  // of a sparse step), eight 0s in a row, seen in one or two loads, go in as one 8-fold code.
  const unsigned zero_len = code[0] >> 16;
  if constexpr (S != 0) {
    if (zero_len >= 1 && zero_len <= 4 && n > 0) {
      const uint64_t zeros8 = eight_zeros(code);
      constexpr size_t words = S;  // 8 symbols: 8·S bytes
      while (i * S + 8 * S <= (n - 1) * S + 1) {
        uint64_t any = 0;
        for (size_t k = 0; k < words; ++k) {
          uint64_t w;
          std::memcpy(&w, in + i * S + 8 * k, 8);
          any |= w;
        }
        if ((any & plane_mask<S>()) == 0) {
          put_bits(zeros8, 8 * zero_len, acc, nbits, dst);
          i += 8;
          continue;
        }
        for (size_t end = i + 8; i < end; i += 4) put_four(in, i, stride, code, acc, nbits, dst);
      }
    }
  }
  for (; i + 4 <= n; i += 4) put_four(in, i, stride, code, acc, nbits, dst);
  for (; i < n; ++i) {
    const uint32_t c = code[in[i * stride]];
    put_bits(static_cast<uint64_t>(c & 0xFFFF), c >> 16, acc, nbits, dst);
  }
  std::memcpy(dst, &acc, 8);
}

// The codes as the coder of 2026-11 wrote them: two symbols per step, 32 bits flushed when they are there.
void put_codes_pairwise(const uint8_t* in, size_t n, size_t stride, const std::array<uint32_t, 256>& code,
                        uint8_t* dst) {
  uint64_t acc = 0;
  int nbits = 0;
  // Two symbols per iteration, joined before they meet the accumulator: the loop-carried chain (shift by
  // nbits, add to nbits, flush) runs once per pair. Codes are at most kMaxCodeBits (11), so a pair adds at
  // most 22 bits to the < 32 pending ones: 64 bits hold them. The bits are the same as one at a time.
  static_assert(2 * kMaxCodeBits + 31 <= 64);
  size_t i = 0;
  for (; i + 2 <= n; i += 2) {
    const uint32_t c0 = code[in[i * stride]], c1 = code[in[(i + 1) * stride]];
    const int l0 = static_cast<int>(c0 >> 16);
    acc |= (static_cast<uint64_t>(c0 & 0xFFFF) | static_cast<uint64_t>(c1 & 0xFFFF) << l0) << nbits;
    nbits += l0 + static_cast<int>(c1 >> 16);
    if (nbits >= 32) {
      std::memcpy(dst, &acc, 4);  // little-endian host (bytes.hpp): the low bits go first
      dst += 4;
      acc >>= 32;
      nbits -= 32;
    }
  }
  for (; i < n; ++i) {
    const uint32_t c = code[in[i * stride]];
    acc |= static_cast<uint64_t>(c & 0xFFFF) << nbits;
    nbits += static_cast<int>(c >> 16);
    if (nbits >= 32) {
      std::memcpy(dst, &acc, 4);
      dst += 4;
      acc >>= 32;
      nbits -= 32;
    }
  }
  std::memcpy(dst, &acc, 8);
}

#ifdef LIVETRAIN_ENTROPY_X86
// The same compiled for BMI2 where the CPU has it (the build targets baseline x86-64): every call inlined, so
// that the codes' variable shifts are one-uop shlx/shrx instead of three-uop shifts by cl (GCC, clang).
template <size_t S>
[[gnu::target("bmi2"), gnu::flatten]] void put_codes_bmi2(const uint8_t* in, size_t n, size_t stride,
                                                          const std::array<uint32_t, 256>& code, uint8_t* dst) {
  put_codes<S>(in, n, stride, code, dst);
}
#endif

void put_codes_any(const uint8_t* in, size_t n, size_t stride, const std::array<uint32_t, 256>& code, uint8_t* dst) {
#ifdef LIVETRAIN_ENTROPY_X86
  if (has_bmi2()) {
    switch (stride) {
      case 1: return put_codes_bmi2<1>(in, n, stride, code, dst);
      case 2: return put_codes_bmi2<2>(in, n, stride, code, dst);
      case 4: return put_codes_bmi2<4>(in, n, stride, code, dst);
      default: return put_codes_bmi2<0>(in, n, stride, code, dst);
    }
  }
#endif
  switch (stride) {
    case 1: return put_codes<1>(in, n, stride, code, dst);
    case 2: return put_codes<2>(in, n, stride, code, dst);
    case 4: return put_codes<4>(in, n, stride, code, dst);
    default: return put_codes<0>(in, n, stride, code, dst);
  }
}

// One stream, its histogram from `count` and its Huffman codes from `put` (the two coders differ only there).
template <typename Count, typename Put>
void encode_with(const uint8_t* in, size_t n, std::string& out, size_t stride, Count count, Put put) {
  if (n > (size_t{1} << 31))
    throw Error(ErrorCode::kInvalidArg, "entropy::encode: stream of " + std::to_string(n) + " bytes (at most 2^31)");
  const Plan p = plan(count(in, n, stride), n);
  if (put_simple(p, in, n, out, stride)) return;
  std::array<uint32_t, 256> code{};
  uint8_t* dst = put_huffman_head(p, out, code);
  put(in, n, stride, code, dst);
  out.resize(out.size() - 8);  // the codes' slack
}

}  // namespace

void encode(const uint8_t* in, size_t n, std::string& out, size_t stride) {
  encode_with(in, n, out, stride, histogram, put_codes_any);
}

bool use_cpu_extensions(bool on) {
#ifdef LIVETRAIN_ENTROPY_X86
  return extensions_on.exchange(on);
#else
  (void)on;
  return false;
#endif
}

void encode_reference(const uint8_t* in, size_t n, std::string& out, size_t stride) {
  encode_with(in, n, out, stride, histogram_bytewise, put_codes_pairwise);
}

void decode(const uint8_t** pp, const uint8_t* end, uint8_t* out, size_t n, std::string_view where) {
  const uint8_t* p = *pp;
  if (end - p < 9) throw bad(where, "truncated stream header");
  const uint8_t mode = p[0];
  const uint64_t length = bytes::get<uint64_t>(p + 1);
  p += 9;
  if (length > static_cast<uint64_t>(end - p)) throw bad(where, "stream longer than its record");
  const uint8_t* stop = p + length;
  switch (static_cast<Mode>(mode)) {
    case Mode::kRaw:
      if (length != n)
        throw bad(where, "raw stream of " + std::to_string(length) + " bytes, expected " + std::to_string(n));
      if (n) std::memcpy(out, p, n);
      break;
    case Mode::kConstant:
      if (length != 1 || n == 0) throw bad(where, "bad constant stream");
      std::memset(out, *p, n);
      break;
    case Mode::kHuffman: {
      if (length < kTableBytes) throw bad(where, "truncated Huffman table");
      Lengths len{};
      for (int s = 0; s < 256; s += 2) {
        len[s] = p[s / 2] & 0x0F;
        len[s + 1] = p[s / 2] >> 4;
      }
      uint64_t kraft = 0;  // in units of 2^-kMaxCodeBits
      int used = 0;
      for (int s = 0; s < 256; ++s) {
        if (len[s] > kMaxCodeBits) throw bad(where, "Huffman code length over " + std::to_string(kMaxCodeBits));
        if (len[s]) {
          kraft += uint64_t{1} << (kMaxCodeBits - len[s]);
          ++used;
        }
      }
      if (used < 2 || kraft != (uint64_t{1} << kMaxCodeBits))
        throw bad(where, "Huffman code lengths do not form a complete code");
      std::array<uint16_t, 256> rev{};
      canonical_codes(len, rev);
      // A complete code: every kMaxCodeBits-bit window starts with exactly one code.
      std::array<uint16_t, 1 << kMaxCodeBits> table{};  // symbol | length << 8
      for (int s = 0; s < 256; ++s) {
        if (!len[s]) continue;
        for (uint32_t hi = 0; hi < (1u << (kMaxCodeBits - len[s])); ++hi) {
          table[rev[s] | (hi << len[s])] = static_cast<uint16_t>(s | (len[s] << 8));
        }
      }
      const uint8_t* q = p + kTableBytes;
      uint64_t acc = 0;
      int nbits = 0;
      for (size_t i = 0; i < n; ++i) {
        while (nbits <= 56 && q < stop) {
          acc |= static_cast<uint64_t>(*q++) << nbits;
          nbits += 8;
        }
        const uint16_t e = table[acc & ((1u << kMaxCodeBits) - 1)];
        const int l = e >> 8;
        if (l > nbits) throw bad(where, "Huffman stream ends early");
        out[i] = static_cast<uint8_t>(e);
        acc >>= l;
        nbits -= l;
      }
      if (q != stop || nbits >= 8 || acc != 0) throw bad(where, "Huffman stream has data after its last code");
      break;
    }
    default: throw bad(where, "unknown stream mode " + std::to_string(mode));
  }
  *pp = stop;
}

}  // namespace livetrain::checkpoint::entropy
