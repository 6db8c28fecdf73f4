// The byte-stream coder of the checkpoint delta format: raw, constant or canonical Huffman with codes of
// at most 11 bits (format in entropy.hpp). Built for the byte planes of XOR deltas, whose high bytes are
// almost all zero and whose low bytes after a small step hold few distinct values.
#include "checkpoint/entropy.hpp"

#include <algorithm>
#include <array>
#include <cstring>

#include "checkpoint/bytes.hpp"
#include "livetrain/error.hpp"

namespace livetrain::checkpoint::entropy {

namespace {

using Lengths = std::array<uint8_t, 256>;

// Optimal code lengths for `freq` (two-queue Huffman). Symbols with frequency 0 get length 0. Needs at
// least two used symbols.
int huffman_lengths(const std::array<uint64_t, 256>& freq, Lengths& len) {
  struct Node {
    uint64_t weight;
    int parent;
  };
  std::array<int, 256> leaves{};
  int nleaves = 0;
  for (int s = 0; s < 256; ++s) {
    if (freq[s]) leaves[nleaves++] = s;
  }
  std::sort(leaves.begin(), leaves.begin() + nleaves,
            [&](int a, int b) { return freq[a] != freq[b] ? freq[a] < freq[b] : a < b; });
  std::array<Node, 511> nodes{};  // leaves first (in sorted order), then internal nodes in creation order
  for (int i = 0; i < nleaves; ++i) nodes[i] = Node{freq[leaves[i]], -1};
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
    len[leaves[i]] = static_cast<uint8_t>(depth[i]);
    max_len = std::max(max_len, depth[i]);
  }
  return max_len;
}

// Lengths limited to kMaxCodeBits: while the optimal code is too deep, halve the frequencies (keeping
// every used symbol at least 1) and rebuild. Flattens the distribution a little; with 256 symbols it ends
// by depth 8 at worst.
void limited_lengths(std::array<uint64_t, 256> freq, Lengths& len) {
  while (huffman_lengths(freq, len) > kMaxCodeBits) {
    for (auto& f : freq) {
      if (f) f = std::max<uint64_t>(1, f >> 1);
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

void encode(const uint8_t* in, size_t n, std::string& out, size_t stride) {
  if (n > (size_t{1} << 31))
    throw Error(ErrorCode::kInvalidArg, "entropy::encode: stream of " + std::to_string(n) + " bytes (at most 2^31)");
  std::array<uint64_t, 256> freq{};
  {
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
  }
  int used = 0;
  for (auto f : freq) used += f != 0;
  if (n > 0 && used == 1) {
    put_header(out, Mode::kConstant, 1);
    out.push_back(static_cast<char>(in[0]));
    return;
  }
  Lengths len{};
  uint64_t bits = 0;
  if (used >= 2) {
    limited_lengths(freq, len);
    for (int s = 0; s < 256; ++s) bits += freq[s] * len[s];
  }
  const uint64_t huff_bytes = kTableBytes + (bits + 7) / 8;
  if (used < 2 || huff_bytes >= n) {
    put_header(out, Mode::kRaw, n);
    if (stride == 1) {
      out.append(reinterpret_cast<const char*>(in), n);
    } else {
      const size_t start = out.size();
      out.resize(start + n);
      for (size_t i = 0; i < n; ++i) out[start + i] = static_cast<char>(in[i * stride]);
    }
    return;
  }
  put_header(out, Mode::kHuffman, huff_bytes);
  for (int s = 0; s < 256; s += 2) out.push_back(static_cast<char>(len[s] | (len[s + 1] << 4)));
  std::array<uint16_t, 256> rev{};
  canonical_codes(len, rev);
  const size_t start = out.size();
  out.resize(start + (bits + 7) / 8 + 8);  // 8 bytes of slack for the 64-bit stores; trimmed below
  uint8_t* dst = reinterpret_cast<uint8_t*>(out.data()) + start;
  uint64_t acc = 0;
  int nbits = 0;
  std::array<uint32_t, 256> code{};  // reversed code | length << 16: one load per symbol
  for (int s = 0; s < 256; ++s) code[s] = rev[s] | (static_cast<uint32_t>(len[s]) << 16);
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
  out.resize(start + (bits + 7) / 8);
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
