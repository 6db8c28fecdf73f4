// Strict safetensors header validation and the memory-mapped File (rules: docs/safetensors.md).
#include <algorithm>
#include <cstring>
#include <string>

#include "livetrain/error.hpp"
#include "livetrain/json.hpp"
#include "livetrain/safetensors.hpp"

namespace livetrain::safetensors {

namespace {

[[noreturn]] void fail(std::string_view file, const std::string& message, ErrorCode code = ErrorCode::kFormat) {
  throw Error(code, std::string(file) + ": " + message);
}

[[noreturn]] void fail_tensor(std::string_view file, std::string_view tensor, const std::string& message,
                              ErrorCode code = ErrorCode::kFormat) {
  fail(file, "tensor " + json::quoted(tensor) + ": " + message, code);
}

bool checked_mul(uint64_t a, uint64_t b, uint64_t* out) { return !__builtin_mul_overflow(a, b, out); }

TensorInfo parse_tensor(std::string_view file, const std::string& name, const json::Value& v) {
  if (!v.is_object()) fail_tensor(file, name, std::string("expected an object, found ") + json::type_name(v.type()));
  if (auto dup = v.find_duplicate_key()) fail_tensor(file, name, "field " + json::quoted(*dup) + " appears twice");
  TensorInfo info;
  info.name = name;

  const json::Value* dtype = v.find("dtype");
  if (!dtype) fail_tensor(file, name, "missing field \"dtype\"");
  if (!dtype->is_string()) fail_tensor(file, name, "field \"dtype\" is not a string");
  auto dt = dtype_from_name(dtype->as_string());
  if (!dt) fail_tensor(file, name, "unknown dtype " + json::quoted(dtype->as_string()));
  info.dtype = *dt;

  const json::Value* shape = v.find("shape");
  if (!shape) fail_tensor(file, name, "missing field \"shape\"");
  if (!shape->is_array()) fail_tensor(file, name, "field \"shape\" is not an array");
  for (size_t i = 0; i < shape->items().size(); ++i) {
    auto d = shape->items()[i].as_u64();
    if (!d) {
      fail_tensor(file, name, "shape[" + std::to_string(i) + "] is not a non-negative integer that fits in 64 bits");
    }
    info.shape.push_back(*d);
  }

  const json::Value* offsets = v.find("data_offsets");
  if (!offsets) fail_tensor(file, name, "missing field \"data_offsets\"");
  if (!offsets->is_array() || offsets->items().size() != 2) {
    fail_tensor(file, name, "field \"data_offsets\" is not an array of 2 integers");
  }
  auto begin = offsets->items()[0].as_u64();
  auto end = offsets->items()[1].as_u64();
  if (!begin || !end) fail_tensor(file, name, "data_offsets are not non-negative integers that fit in 64 bits");
  info.begin = *begin;
  info.end = *end;
  return info;
}

}  // namespace

uint64_t TensorInfo::numel() const {
  uint64_t n = 1;
  for (uint64_t d : shape) {
    if (!checked_mul(n, d, &n)) throw Error(ErrorCode::kOverflow, "tensor " + json::quoted(name) + ": shape overflows");
  }
  return n;
}

const TensorInfo* Header::find(std::string_view name) const {
  auto it = index.find(std::string(name));
  return it == index.end() ? nullptr : &tensors[it->second];
}

Header parse_header(const uint8_t* bytes, size_t size, std::string_view file_name) {
  if (size < 8) fail(file_name, "file is " + std::to_string(size) + " bytes, too small for the 8-byte header length");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[i];
  if (n > kMaxHeaderSize) {
    fail(file_name, "header length " + std::to_string(n) + " exceeds the limit of 100000000 bytes");
  }
  if (n > size - 8) {
    fail(file_name,
         "header length " + std::to_string(n) + " runs past the end of the file (" + std::to_string(size) + " bytes)");
  }
  std::string_view text(reinterpret_cast<const char*>(bytes + 8), n);
  size_t bad = 0;
  if (!json::is_valid_utf8(text, &bad))
    fail(file_name, "header is not valid UTF-8 (byte " + std::to_string(8 + bad) + ")");
  if (text.empty() || text.front() != '{') fail(file_name, "header does not start with '{'");

  json::Value root = json::parse(text, std::string(file_name) + ": header");
  if (!root.is_object()) fail(file_name, "header is not a JSON object");
  if (auto dup = root.find_duplicate_key()) fail(file_name, "header lists " + json::quoted(*dup) + " twice");

  Header h;
  h.header_size = n;
  for (const auto& [key, value] : root.members()) {
    if (key == "__metadata__") {
      if (value.is_null()) continue;
      if (!value.is_object()) fail(file_name, "__metadata__ is not an object of strings");
      if (auto dup = value.find_duplicate_key()) fail(file_name, "__metadata__ lists " + json::quoted(*dup) + " twice");
      Metadata md;
      for (const auto& [mk, mv] : value.members()) {
        if (!mv.is_string()) {
          fail(file_name,
               "__metadata__ value of " + json::quoted(mk) + " is a " + json::type_name(mv.type()) + ", not a string");
        }
        md.emplace_back(mk, mv.as_string());
      }
      h.metadata = std::move(md);
      continue;
    }
    h.tensors.push_back(parse_tensor(file_name, key, value));
  }

  std::stable_sort(h.tensors.begin(), h.tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t expected = 0;
  for (const TensorInfo& t : h.tensors) {
    if (t.begin != expected || t.end < t.begin) {
      fail_tensor(file_name, t.name,
                  "data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
                      "] do not continue the previous tensor's end at " + std::to_string(expected) +
                      " (overlap or hole)");
    }
    expected = t.end;
    uint64_t numel = 1, bits = 0;
    for (uint64_t d : t.shape) {
      if (!checked_mul(numel, d, &numel)) {
        fail_tensor(file_name, t.name, "shape " + shape_string(t.shape) + " overflows 64 bits", ErrorCode::kOverflow);
      }
    }
    if (!checked_mul(numel, dtype_bits(t.dtype), &bits)) {
      fail_tensor(file_name, t.name, "size of shape " + shape_string(t.shape) + " overflows 64 bits",
                  ErrorCode::kOverflow);
    }
    if (bits % 8 != 0) {
      fail_tensor(file_name, t.name,
                  "shape " + shape_string(t.shape) + " of sub-byte dtype " + std::string(dtype_name(t.dtype)) +
                      " does not end on a byte boundary");
    }
    if (bits / 8 != t.end - t.begin) {
      fail_tensor(file_name, t.name,
                  "data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) + "] hold " +
                      std::to_string(t.end - t.begin) + " bytes but dtype " + std::string(dtype_name(t.dtype)) +
                      " shape " + shape_string(t.shape) + " needs " + std::to_string(bits / 8));
    }
  }
  h.data_size = expected;
  uint64_t data_bytes = size - 8 - n;
  if (expected != data_bytes) {
    fail(file_name, "tensors cover " + std::to_string(expected) + " data bytes but the file holds " +
                        std::to_string(data_bytes) + (expected < data_bytes ? " (trailing bytes)" : " (truncated)"));
  }
  h.index.reserve(h.tensors.size());
  for (size_t i = 0; i < h.tensors.size(); ++i) h.index.emplace(h.tensors[i].name, i);
  return h;
}

File File::open(const std::string& path) {
  File f;
  f.map_ = fs::Mapping::open_readonly(path);
  f.header_ = parse_header(f.map_.data(), f.map_.size(), path);
  return f;
}

const TensorInfo& File::tensor(std::string_view name) const {
  const TensorInfo* t = find(name);
  if (!t) throw Error(ErrorCode::kNotFound, path() + ": no tensor " + json::quoted(name));
  return *t;
}

}  // namespace livetrain::safetensors
