// The delta codec: encodes a tensor's changed elements (positions as LEB128 gaps or a bitmap, values as
// XOR with the old bits), and parses/validates delta files record by record.
#include <bit>
#include <cstring>
#include <limits>

#include "livetrain/ckpt.hpp"
#include "livetrain/error.hpp"
#include "ckpt/bytes.hpp"

namespace livetrain::ckpt {

namespace {

using bytes::put;

void put_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7F) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}

inline uint64_t varint_size(uint64_t v) { return v == 0 ? 1 : (std::bit_width(v) + 6) / 7; }

Error format_error(std::string_view what, const std::string& msg) {
  return Error(ErrorCode::kFormat, std::string(what) + ": " + msg);
}

// A bounds-checked reader over outside bytes.
struct Cursor {
  const uint8_t* p;
  size_t left;
  std::string_view what;
  std::string where;

  const uint8_t* take(uint64_t n, const char* field) {
    if (n > left) throw format_error(what, where + "truncated in " + field);
    const uint8_t* r = p;
    p += n;
    left -= n;
    return r;
  }
  template <typename T>
  T get(const char* field) {
    T v;
    std::memcpy(&v, take(sizeof(T), field), sizeof(T));
    return v;
  }
};

// Scans `units` elements of T; reads `now` once per word so a concurrently written tensor still yields
// the XOR of what this read saw. Marks changes in `bitmap`, appends XOR values to `values`, and sums the
// bytes that gap encoding would take.
template <typename T>
uint64_t scan(uint64_t units, const uint8_t* old, const uint8_t* now, std::vector<uint8_t>& bitmap,
              std::string& values, uint64_t& gap_bytes) {
  uint64_t changed = 0;
  uint64_t prev = 0;
  auto hit = [&](uint64_t i, T x) {
    bitmap[i >> 3] |= static_cast<uint8_t>(1u << (i & 7));
    put(values, x);
    gap_bytes += varint_size(changed == 0 ? i : i - prev - 1);
    prev = i;
    ++changed;
  };
  constexpr uint64_t per_word = 8 / sizeof(T);
  uint64_t words = units / per_word;
  for (uint64_t w = 0; w < words; ++w) {
    uint64_t a, b;
    std::memcpy(&a, old + w * 8, 8);
    std::memcpy(&b, now + w * 8, 8);
    uint64_t x = a ^ b;
    if (x == 0) continue;  // the common case for sparse updates: one compare per 8 bytes
    for (uint64_t k = 0; k < per_word; ++k) {
      T e;
      std::memcpy(&e, reinterpret_cast<const uint8_t*>(&x) + k * sizeof(T), sizeof(T));
      if (e != 0) hit(w * per_word + k, e);
    }
  }
  for (uint64_t i = words * per_word; i < units; ++i) {
    T a, b;
    std::memcpy(&a, old + i * sizeof(T), sizeof(T));
    std::memcpy(&b, now + i * sizeof(T), sizeof(T));
    if (a != b) hit(i, static_cast<T>(a ^ b));
  }
  return changed;
}

// Appends a record from its parts (bitmap, XOR values, and the size the gap encoding would take).
void encode_parts(std::string& out, std::string_view name, DType dtype, uint64_t units, uint64_t changed,
                  const uint8_t* bitmap, const uint8_t* values, uint64_t gap_bytes) {
  const uint64_t bitmap_bytes = (units + 7) / 8;
  size_t start = out.size();
  put<uint32_t>(out, static_cast<uint32_t>(name.size()));
  out.append(name);
  PositionEncoding enc = bitmap_bytes < gap_bytes ? PositionEncoding::kBitmap : PositionEncoding::kGaps;
  out.push_back(static_cast<char>(dtype));
  out.push_back(static_cast<char>(unit_bytes(dtype)));
  out.push_back(static_cast<char>(enc));
  out.push_back(0);
  put<uint64_t>(out, units);
  put<uint64_t>(out, changed);
  if (enc == PositionEncoding::kBitmap) {
    put<uint64_t>(out, bitmap_bytes);
    out.append(reinterpret_cast<const char*>(bitmap), bitmap_bytes);
  } else {
    put<uint64_t>(out, gap_bytes);
    size_t pos_start = out.size();
    uint64_t prev = 0;
    bool first = true;
    for (uint64_t byte = 0; byte < bitmap_bytes; ++byte) {
      for (unsigned bits = bitmap[byte]; bits; bits &= bits - 1) {
        uint64_t i = byte * 8 + static_cast<uint64_t>(std::countr_zero(bits));
        put_varint(out, first ? i : i - prev - 1);
        prev = i;
        first = false;
      }
    }
    if (out.size() - pos_start != gap_bytes) throw Error(ErrorCode::kInvalidArg, "checkpoint: gap size mismatch");
  }
  out.append(reinterpret_cast<const char*>(values), changed * unit_bytes(dtype));
  put<uint64_t>(out, xxh64(out.data() + start, out.size() - start));
}

}  // namespace

uint32_t unit_bytes(DType dtype) {
  uint32_t bits = dtype_bits(dtype);
  return bits >= 8 && bits % 8 == 0 ? bits / 8 : 1;  // packed sub-byte types are compared per byte
}

uint64_t encode_record(std::string& out, std::string_view name, DType dtype, uint64_t units, const uint8_t* old,
                       const uint8_t* now) {
  uint32_t unit = unit_bytes(dtype);
  std::vector<uint8_t> bitmap((units + 7) / 8, 0);
  std::string values;
  uint64_t gap_bytes = 0, changed = 0;
  switch (unit) {
    case 1: changed = scan<uint8_t>(units, old, now, bitmap, values, gap_bytes); break;
    case 2: changed = scan<uint16_t>(units, old, now, bitmap, values, gap_bytes); break;
    case 4: changed = scan<uint32_t>(units, old, now, bitmap, values, gap_bytes); break;
    case 8: changed = scan<uint64_t>(units, old, now, bitmap, values, gap_bytes); break;
    default: throw Error(ErrorCode::kUnsupported, "checkpoint: element size " + std::to_string(unit));
  }
  if (changed == 0) return 0;
  encode_parts(out, name, dtype, units, changed, bitmap.data(), reinterpret_cast<const uint8_t*>(values.data()), gap_bytes);
  return changed;
}

void encode_record_parts(std::string& out, std::string_view name, DType dtype, uint64_t units, uint64_t changed,
                         const uint8_t* bitmap, const uint8_t* values) {
  if (changed == 0) return;
  // The gap encoding's size, from the bitmap: one more pass over units / 8 bytes.
  uint64_t gap_bytes = 0, prev = 0, k = 0;
  for (uint64_t byte = 0; byte < (units + 7) / 8; ++byte) {
    for (unsigned bits = bitmap[byte]; bits; bits &= bits - 1) {
      uint64_t i = byte * 8 + static_cast<uint64_t>(std::countr_zero(bits));
      gap_bytes += varint_size(k == 0 ? i : i - prev - 1);
      prev = i;
      ++k;
    }
  }
  if (k != changed) throw Error(ErrorCode::kInvalidArg, "checkpoint: bitmap holds " + std::to_string(k) + " changes, not " + std::to_string(changed));
  encode_parts(out, name, dtype, units, changed, bitmap, values, gap_bytes);
}

std::string delta_file_header(uint64_t generation, uint64_t parent, uint32_t records) {
  std::string out(kDeltaMagic);
  put<uint32_t>(out, kDeltaVersion);
  put<uint32_t>(out, records);
  put<uint64_t>(out, generation);
  put<uint64_t>(out, parent);
  return out;
}

DeltaHeader delta_parse(const uint8_t* bytes, size_t size, std::string_view what,
                        const std::function<void(const DeltaRecord&)>& fn) {
  if (size < 40) throw format_error(what, "truncated delta file (" + std::to_string(size) + " bytes)");
  if (std::memcmp(bytes, kDeltaMagic.data(), 8) != 0) throw format_error(what, "not a livetrain delta file (bad magic)");
  uint64_t stored;
  std::memcpy(&stored, bytes + size - 8, 8);
  Cursor c{bytes + 8, size - 16, what, ""};
  DeltaHeader h;
  uint32_t version = c.get<uint32_t>("version");
  if (version != kDeltaVersion) {
    throw Error(ErrorCode::kUnsupported, std::string(what) + ": delta version " + std::to_string(version) +
                                             " (this build reads version " + std::to_string(kDeltaVersion) + ")");
  }
  // The whole-file checksum first: a torn or corrupt file is reported as such, not as a bad field.
  if (xxh64(bytes, size - 8) != stored) throw format_error(what, "file checksum mismatch (corrupt or truncated)");
  h.records = c.get<uint32_t>("record count");
  h.generation = c.get<uint64_t>("generation");
  h.parent = c.get<uint64_t>("parent");
  for (uint32_t r = 0; r < h.records; ++r) {
    c.where = "record " + std::to_string(r) + ": ";
    const uint8_t* rec_start = c.p;
    DeltaRecord rec;
    uint32_t name_len = c.get<uint32_t>("name length");
    rec.name = std::string_view(reinterpret_cast<const char*>(c.take(name_len, "name")), name_len);
    c.where = "record " + std::to_string(r) + " (" + std::string(rec.name) + "): ";
    uint8_t dtype = c.get<uint8_t>("dtype");
    if (dtype >= kNumDTypes) throw format_error(what, c.where + "unknown dtype " + std::to_string(dtype));
    rec.dtype = static_cast<DType>(dtype);
    rec.unit = c.get<uint8_t>("unit");
    if (rec.unit != unit_bytes(rec.dtype)) throw format_error(what, c.where + "unit does not match dtype");
    uint8_t enc = c.get<uint8_t>("encoding");
    if (enc > 1) throw format_error(what, c.where + "unknown position encoding " + std::to_string(enc));
    rec.encoding = static_cast<PositionEncoding>(enc);
    if (c.get<uint8_t>("reserved") != 0) throw format_error(what, c.where + "reserved byte is not 0");
    rec.units = c.get<uint64_t>("units");
    // units × unit is the tensor's byte size, which callers compare with the model's: it must not wrap,
    // or a crafted record could pass that check and then write far past the buffer.
    if (rec.units > std::numeric_limits<uint64_t>::max() / rec.unit) throw format_error(what, c.where + "units overflow");
    rec.changed = c.get<uint64_t>("changed");
    if (rec.changed == 0 || rec.changed > rec.units) throw format_error(what, c.where + "bad changed count");
    uint64_t plen = c.get<uint64_t>("positions length");
    rec.positions = std::string_view(reinterpret_cast<const char*>(c.take(plen, "positions")), plen);
    if (rec.changed > std::numeric_limits<uint64_t>::max() / rec.unit) throw format_error(what, c.where + "overflow");
    uint64_t vlen = rec.changed * rec.unit;
    rec.values = std::string_view(reinterpret_cast<const char*>(c.take(vlen, "values")), vlen);
    size_t covered = static_cast<size_t>(c.p - rec_start);
    uint64_t sum = c.get<uint64_t>("checksum");
    if (xxh64(rec_start, covered) != sum) throw format_error(what, c.where + "record checksum mismatch");
    fn(rec);
  }
  if (c.left != 0) throw format_error(what, "trailing bytes after the last record");
  return h;
}

void apply_record(const DeltaRecord& rec, uint8_t* buf, std::string_view what) {
  const uint8_t* vals = reinterpret_cast<const uint8_t*>(rec.values.data());
  const uint32_t unit = rec.unit;
  std::string where = std::string(what) + ": " + std::string(rec.name) + ": ";
  auto xor_at = [&](uint64_t pos, uint64_t k) {
    uint8_t* dst = buf + pos * unit;
    const uint8_t* src = vals + k * unit;
    for (uint32_t b = 0; b < unit; ++b) dst[b] ^= src[b];
  };
  const uint8_t* p = reinterpret_cast<const uint8_t*>(rec.positions.data());
  const uint8_t* end = p + rec.positions.size();
  if (rec.encoding == PositionEncoding::kBitmap) {
    // Not (units + 7) / 8: that wraps for units near 2^64, and an empty bitmap would then pass.
    if (rec.positions.size() != rec.units / 8 + (rec.units % 8 != 0)) throw Error(ErrorCode::kFormat, where + "bitmap size mismatch");
    // Validate fully before writing, so a bad record changes nothing.
    uint64_t count = 0;
    for (const uint8_t* q = p; q < end; ++q) count += static_cast<uint64_t>(std::popcount(*q));
    if (rec.units % 8 && (end[-1] >> (rec.units % 8))) throw Error(ErrorCode::kFormat, where + "bitmap bits past the end");
    if (count != rec.changed) throw Error(ErrorCode::kFormat, where + "bitmap count does not match");
    uint64_t k = 0;
    for (uint64_t byte = 0; p + byte < end; ++byte) {
      for (unsigned bits = p[byte]; bits; bits &= bits - 1) xor_at(byte * 8 + std::countr_zero(bits), k++);
    }
    return;
  }
  // Gaps: decode once to validate (bounds, count), then again to apply.
  for (int pass = 0; pass < 2; ++pass) {
    const uint8_t* q = p;
    uint64_t pos = 0, k = 0;
    while (q < end) {
      uint64_t v = 0;
      int shift = 0;
      while (true) {
        if (q >= end || shift > 63) throw Error(ErrorCode::kFormat, where + "bad varint in positions");
        uint8_t b = *q++;
        v |= static_cast<uint64_t>(b & 0x7F) << shift;
        shift += 7;
        if (!(b & 0x80)) break;
      }
      uint64_t next = k == 0 ? v : pos + 1 + v;
      if ((k > 0 && next <= pos) || next >= rec.units) throw Error(ErrorCode::kFormat, where + "position out of range");
      pos = next;
      if (k >= rec.changed) throw Error(ErrorCode::kFormat, where + "more positions than changed elements");
      if (pass == 1) xor_at(pos, k);
      ++k;
    }
    if (k != rec.changed) throw Error(ErrorCode::kFormat, where + "fewer positions than changed elements");
  }
}

}  // namespace livetrain::ckpt
