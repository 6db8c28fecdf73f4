// Internal: the byte-stream coder of the checkpoint delta format (docs/checkpoint.md, "Coded streams").
//
// A stream is a byte string of a known decoded length n, stored as
//   u8 mode, u64 L, then L bytes:
//     mode 0 (raw):      L == n, the bytes as they are
//     mode 1 (constant): L == 1, the one byte every position holds (n >= 1)
//     mode 2 (huffman):  128 bytes of code lengths (symbol s's length in the low nibble of byte s/2 for even
//                        s, the high nibble for odd s; 0 = unused, at most kMaxCodeBits), then the codes of
//                        the n bytes, canonical Huffman (shorter codes first, then by symbol), each code's
//                        bits most significant first packed into bytes least significant bit first; the
//                        last byte's unused high bits are 0 and no byte follows.
// The encoder picks the smallest of the three. The decoder accepts exactly what this says and nothing
// else: code lengths that do not form a complete prefix code of at least two symbols (Kraft sum exactly
// 1), a stream that ends early, or bytes or set bits left over is kFormat.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace livetrain::checkpoint::entropy {

inline constexpr int kMaxCodeBits = 11;
inline constexpr size_t kTableBytes = 128;

enum class Mode : uint8_t { kRaw = 0, kConstant = 1, kHuffman = 2 };

// The most bytes encode appends for n bytes: a raw stream's (the header, then the n bytes), since the
// encoder picks a constant stream (1 byte) or a Huffman one only when it is smaller than n.
inline constexpr size_t max_encoded_bytes(size_t n) { return 9 + n; }
// While it writes a Huffman stream, encode holds up to this many bytes more than max_encoded_bytes(n) (its
// 64-bit stores' slack, trimmed before it returns): its codes take 8 bytes of room past the L <= n - 1
// bytes of the stream. A string with room for every stream's max_encoded_bytes and this, once, never
// grows while the streams are appended (tests/cpp/test_checkpoint_entropy.cpp, at the worst case).
inline constexpr size_t kEncodeSlack = 7;

// Appends the coded stream of the `n` (at most 2^31) bytes in[0], in[stride], ..., in[(n - 1) · stride] to `out` (a
// stride reads one byte plane of interleaved values without gathering it first).
void encode(const uint8_t* in, size_t n, std::string& out, size_t stride = 1);
// The same bytes as encode, by the coder it replaced (one symbol per histogram load, codes flushed 32 bits
// at a time behind a branch; the code lengths come from the same builder as encode's): what tests check
// encode against and what checkpoint.encoder=0 selects, so that a benchmark compares the two in one run.
void encode_reference(const uint8_t* in, size_t n, std::string& out, size_t stride = 1);

// The byte histogram of in[0], in[stride], ..., in[(n - 1) · stride]: encode's first pass (declared for
// bench/encode_phases.cpp, which times it alone).
std::array<uint64_t, 256> histogram(const uint8_t* in, size_t n, size_t stride);

// Reads one stream from `*p` (at most `end`), decoding exactly `n` bytes into `out`; advances `*p` past
// it. Throws Error(kFormat) with `where` on anything malformed.
void decode(const uint8_t** p, const uint8_t* end, uint8_t* out, size_t n, std::string_view where);

}  // namespace livetrain::checkpoint::entropy
