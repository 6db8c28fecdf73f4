// safetensors writing, byte-compatible with the reference writer (docs/safetensors.md).
#include <algorithm>
#include <numeric>
#include <string>
#include <unordered_set>

#include "livetrain/error.hpp"
#include "livetrain/json.hpp"
#include "livetrain/safetensors.hpp"

namespace livetrain::safetensors {

namespace {
[[noreturn]] void bad_tensor(const TensorRef& t, const std::string& message) {
  std::string q;
  json::append_quoted(q, t.name);
  throw Error(ErrorCode::kInvalidArg, "tensor " + q + ": " + message);
}
}  // namespace

Layout plan(const std::vector<TensorRef>& tensors, const WriteOptions& options) {
  if (options.data_alignment == 0 || options.data_alignment % 8 != 0) {
    throw Error(ErrorCode::kInvalidArg,
                "data_alignment " + std::to_string(options.data_alignment) + " is not a positive multiple of 8");
  }
  std::unordered_set<std::string_view> names;
  for (const TensorRef& t : tensors) {
    if (t.name.empty()) bad_tensor(t, "empty tensor name");
    if (t.name == "__metadata__") bad_tensor(t, "the name __metadata__ is reserved");
    if (!json::is_valid_utf8(t.name)) bad_tensor(t, "name is not valid UTF-8");
    if (!names.insert(t.name).second) bad_tensor(t, "name given twice");
    uint64_t numel = 1, bits = 0;
    for (uint64_t d : t.shape) {
      if (__builtin_mul_overflow(numel, d, &numel)) bad_tensor(t, "shape overflows 64 bits");
    }
    if (__builtin_mul_overflow(numel, dtype_bits(t.dtype), &bits) || bits % 8 != 0) {
      bad_tensor(t, "shape does not fill whole bytes of dtype " + std::string(dtype_name(t.dtype)));
    }
    if (bits / 8 != t.nbytes) {
      bad_tensor(t, std::to_string(t.nbytes) + " bytes given, dtype and shape need " + std::to_string(bits / 8));
    }
    if (t.nbytes > 0 && t.data == nullptr) bad_tensor(t, "no data");
  }

  Layout layout;
  layout.order.resize(tensors.size());
  std::iota(layout.order.begin(), layout.order.end(), size_t{0});
  // The reference writer's order: larger-alignment dtypes first (its enum order, reversed), then by name.
  std::sort(layout.order.begin(), layout.order.end(), [&](size_t a, size_t b) {
    if (tensors[a].dtype != tensors[b].dtype) return tensors[a].dtype > tensors[b].dtype;
    return tensors[a].name < tensors[b].name;
  });

  json::Value root = json::Value::object();
  if (options.metadata) {
    json::Value md = json::Value::object();
    std::unordered_set<std::string_view> keys;
    for (const auto& [k, v] : *options.metadata) {
      if (!keys.insert(k).second) throw Error(ErrorCode::kInvalidArg, "metadata key \"" + k + "\" given twice");
      if (!json::is_valid_utf8(k) || !json::is_valid_utf8(v)) {
        throw Error(ErrorCode::kInvalidArg, "metadata is not valid UTF-8");
      }
      md.set(k, json::Value::string(v));
    }
    root.set("__metadata__", std::move(md));
  }
  uint64_t offset = 0;
  for (size_t i : layout.order) {
    const TensorRef& t = tensors[i];
    json::Value info = json::Value::object();
    info.set("dtype", json::Value::string(std::string(dtype_name(t.dtype))));
    json::Value shape = json::Value::array();
    for (uint64_t d : t.shape) shape.push(json::Value::unsigned_integer(d));
    info.set("shape", std::move(shape));
    json::Value offsets = json::Value::array();
    offsets.push(json::Value::unsigned_integer(offset));
    offsets.push(json::Value::unsigned_integer(offset + t.nbytes));
    info.set("data_offsets", std::move(offsets));
    root.set(t.name, std::move(info));
    offset += t.nbytes;
  }
  layout.data_size = offset;

  std::string text = root.dump();
  uint64_t a = options.data_alignment;
  uint64_t padded = ((8 + text.size() + a - 1) / a) * a - 8;
  if (padded > kMaxHeaderSize) {
    throw Error(ErrorCode::kInvalidArg,
                "header of " + std::to_string(padded) + " bytes exceeds the 100000000-byte limit");
  }
  text.append(padded - text.size(), ' ');
  layout.header.resize(8);
  for (int i = 0; i < 8; ++i) layout.header[i] = static_cast<char>((padded >> (8 * i)) & 0xFF);
  layout.header += text;
  return layout;
}

void write_file(const std::string& path, const std::vector<TensorRef>& tensors, const WriteOptions& options) {
  Layout layout = plan(tensors, options);
  fs::write_file_atomic(path, [&](fs::Writer& w) {
    w.write(layout.header);
    for (size_t i : layout.order) w.write(tensors[i].data, tensors[i].nbytes);
  });
}

}  // namespace livetrain::safetensors
