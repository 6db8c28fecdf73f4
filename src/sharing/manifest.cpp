// The manifest format (include/livetrain/sharing.hpp, docs/manifest.md): strict parser, canonical writer.
#include <sys/stat.h>

#include <set>

#include "livetrain/error.hpp"
#include "livetrain/fs.hpp"
#include "livetrain/sharing.hpp"

namespace livetrain::sharing {

namespace {

using json::Value;

// Reads the members of one JSON object, with the field path for error messages. Every member must be
// consumed: whatever is left at finish() is an unknown field, which a strict format refuses so that a
// typo or a newer writer never goes unnoticed.
class Fields {
 public:
  Fields(const Value& v, std::string path, std::string_view what) : v_(v), path_(std::move(path)), what_(what) {
    if (!v.is_object()) fail("", std::string("expected an object, found ") + json::type_name(v.type()));
    if (auto dup = v.find_duplicate_key()) fail(*dup, "repeated key");
  }

  [[noreturn]] void fail(std::string_view key, const std::string& reason) const {
    std::string where = path_;
    if (!key.empty()) where += where.empty() ? std::string(key) : "." + std::string(key);
    if (where.empty()) where = "(top level)";
    throw Error(ErrorCode::kFormat, std::string(what_) + ": " + where + ": " + reason);
  }

  std::string sub(std::string_view key) const {
    return path_.empty() ? std::string(key) : path_ + "." + std::string(key);
  }

  const Value& get(std::string_view key) {
    const Value* m = v_.find(key);
    if (!m) fail(key, "missing");
    seen_.insert(std::string(key));
    return *m;
  }

  std::string str(std::string_view key) {
    const Value& m = get(key);
    if (!m.is_string()) fail(key, std::string("expected a string, found ") + json::type_name(m.type()));
    return m.as_string();
  }

  // An optional string member: "" when absent.
  std::string optional_str(std::string_view key) { return v_.find(key) ? str(key) : std::string(); }

  uint64_t u64(std::string_view key, uint64_t max = UINT64_MAX) {
    const Value& m = get(key);
    auto u = m.is_number() ? m.as_u64() : std::nullopt;
    if (!u) fail(key, "expected a non-negative integer, found " + describe(m));
    if (*u > max) fail(key, std::to_string(*u) + " is larger than " + std::to_string(max));
    return *u;
  }

  std::vector<uint64_t> u64_list(std::string_view key) {
    const Value& m = get(key);
    if (!m.is_array()) fail(key, std::string("expected an array, found ") + json::type_name(m.type()));
    std::vector<uint64_t> out;
    for (size_t i = 0; i < m.items().size(); ++i) {
      auto u = m.items()[i].is_number() ? m.items()[i].as_u64() : std::nullopt;
      if (!u)
        fail(std::string(key) + "[" + std::to_string(i) + "]",
             "expected a non-negative integer, found " + describe(m.items()[i]));
      out.push_back(*u);
    }
    return out;
  }

  const std::vector<Value>& array(std::string_view key) {
    const Value& m = get(key);
    if (!m.is_array()) fail(key, std::string("expected an array, found ") + json::type_name(m.type()));
    return m.items();
  }

  void finish() const {
    for (const auto& [k, _] : v_.members()) {
      if (!seen_.count(k)) fail(k, "unknown field");
    }
  }

 private:
  static std::string describe(const Value& v) {
    if (v.is_number()) return v.number_text();
    return json::type_name(v.type());
  }

  const Value& v_;
  std::string path_;
  std::string_view what_;
  std::set<std::string> seen_;
};

bool is_hex(std::string_view s) {
  for (char c : s) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

bool valid_uuid(std::string_view s) {
  // GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx
  if (s.size() != 40 || s.substr(0, 4) != "GPU-") return false;
  for (size_t i = 4; i < s.size(); ++i) {
    bool dash = i == 12 || i == 17 || i == 22 || i == 27;
    if (dash ? s[i] != '-' : !is_hex(s.substr(i, 1))) return false;
  }
  return true;
}

// shm names go to shm_open: one leading slash and a conservative alphabet, so a manifest cannot name a
// path elsewhere under /dev/shm or smuggle bytes the kernel would treat specially.
bool valid_shm_name(std::string_view s) {
  if (s.size() < 2 || s.size() > 201 || s[0] != '/') return false;
  for (char c : s.substr(1)) {
    bool ok =
        (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
    if (!ok) return false;
  }
  return s != "/." && s != "/..";
}

Value u64_array(const std::vector<uint64_t>& v) {
  Value a = Value::array();
  for (uint64_t x : v) a.push(Value::unsigned_integer(x));
  return a;
}

bool mul_overflows(uint64_t a, uint64_t b, uint64_t* out) { return __builtin_mul_overflow(a, b, out); }
bool add_overflows(uint64_t a, uint64_t b, uint64_t* out) { return __builtin_add_overflow(a, b, out); }

}  // namespace

const TensorDesc* Manifest::find(std::string_view name) const {
  for (const auto& t : tensors) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

std::vector<uint64_t> contiguous_strides(const std::vector<uint64_t>& shape) {
  std::vector<uint64_t> strides(shape.size(), 1);
  uint64_t s = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    strides[i] = s;
    s *= shape[i] == 0 ? 1 : shape[i];
  }
  return strides;
}

uint64_t tensor_extent_bytes(const TensorDesc& t) {
  if (t.shape.size() != t.strides.size()) {
    throw Error(ErrorCode::kInvalidArg, "tensor \"" + t.name + "\": " + std::to_string(t.shape.size()) +
                                            " dimensions but " + std::to_string(t.strides.size()) + " strides");
  }
  for (uint64_t d : t.shape) {
    if (d == 0) return 0;
  }
  // The last element sits at sum((shape[i]-1)·strides[i]); the extent ends one element after it.
  uint64_t last = 0;
  for (size_t i = 0; i < t.shape.size(); ++i) {
    uint64_t step;
    if (mul_overflows(t.shape[i] - 1, t.strides[i], &step) || add_overflows(last, step, &last)) {
      throw Error(ErrorCode::kOverflow, "tensor \"" + t.name + "\": extent overflows 64 bits");
    }
  }
  uint64_t bytes, elems;
  if (add_overflows(last, 1, &elems) || mul_overflows(elems, dtype_bits(t.dtype) / 8, &bytes)) {
    throw Error(ErrorCode::kOverflow, "tensor \"" + t.name + "\": extent overflows 64 bits");
  }
  return bytes;
}

namespace {
[[noreturn]] void invalid(std::string_view what, const std::string& where, const std::string& reason) {
  throw Error(ErrorCode::kFormat, std::string(what) + ": " + where + ": " + reason);
}
}  // namespace

void manifest_validate(const Manifest& m, std::string_view what) {
  if (m.model.tp_size == 0) invalid(what, "model.tp_size", "must be at least 1");
  if (m.model.tp_rank >= m.model.tp_size) {
    invalid(what, "model.tp_rank",
            std::to_string(m.model.tp_rank) + " is not below tp_size " + std::to_string(m.model.tp_size));
  }
  if (!m.model.config.is_object()) invalid(what, "model.config", "expected an object");
  if (m.owner.pid == 0 || m.owner.pid > 0x7fffffff) invalid(what, "owner.pid", "not a valid pid");
  if (m.owner.boot_id.empty()) invalid(what, "owner.boot_id", "empty");
  for (size_t i = 0; i < m.buffers.size(); ++i) {
    const BufferDesc& b = m.buffers[i];
    std::string where = "buffers[" + std::to_string(i) + "]";
    if (b.kind == BufferKind::kShm) {
      if (!valid_shm_name(b.shm_name)) {
        invalid(what, where + ".name", "\"" + b.shm_name + "\" is not a shared-memory name \"/[A-Za-z0-9._-]{1,200}\"");
      }
    } else {
      if (b.ipc_handle.size() != 2 * kIpcHandleBytes || !is_hex(b.ipc_handle)) {
        invalid(what, where + ".handle", "expected " + std::to_string(2 * kIpcHandleBytes) + " lowercase hex digits");
      }
      if (!valid_uuid(b.device_uuid))
        invalid(what, where + ".device_uuid", "\"" + b.device_uuid + "\" is not a GPU UUID");
    }
  }
  std::set<std::string_view> names;
  for (size_t i = 0; i < m.tensors.size(); ++i) {
    const TensorDesc& t = m.tensors[i];
    std::string where = "tensors[" + std::to_string(i) + "]";
    if (t.name.empty()) invalid(what, where + ".name", "empty");
    if (!names.insert(t.name).second) invalid(what, where + ".name", "\"" + t.name + "\" appears twice");
    if (dtype_bits(t.dtype) % 8 != 0) {
      invalid(what, where + ".dtype",
              std::string(dtype_name(t.dtype)) +
                  " is packed below one byte per element; "
                  "share it as U8");
    }
    if (t.shape.size() != t.strides.size()) {
      invalid(what, where + ".strides",
              std::to_string(t.strides.size()) + " strides for " + std::to_string(t.shape.size()) +
                  " dimensions (tensor \"" + t.name + "\")");
    }
    if (t.buffer >= m.buffers.size()) {
      invalid(what, where + ".buffer",
              std::to_string(t.buffer) + " but there are " + std::to_string(m.buffers.size()) + " buffers (tensor \"" +
                  t.name + "\")");
    }
    uint64_t elem = dtype_bits(t.dtype) / 8;
    if (t.offset % elem != 0) {
      invalid(what, where + ".offset",
              std::to_string(t.offset) + " is not a multiple of the element size " + std::to_string(elem) +
                  " (tensor \"" + t.name + "\")");
    }
    uint64_t extent, end;
    try {
      extent = tensor_extent_bytes(t);
    } catch (const Error& e) {
      invalid(what, where, e.what());
    }
    uint64_t size = m.buffers[t.buffer].size;
    if (add_overflows(t.offset, extent, &end) || end > size) {
      invalid(what, where,
              "tensor \"" + t.name + "\" spans bytes [" + std::to_string(t.offset) + ", " + std::to_string(t.offset) +
                  "+" + std::to_string(extent) + ") but buffer " + std::to_string(t.buffer) + " has " +
                  std::to_string(size) + " bytes");
    }
  }
}

std::string manifest_serialize(const Manifest& m) {
  Value root = Value::object();
  root.set("magic", Value::string(std::string(kManifestMagic)));
  root.set("version", Value::unsigned_integer(kManifestVersion));
  Value owner = Value::object();
  owner.set("pid", Value::unsigned_integer(m.owner.pid));
  owner.set("start_time", Value::unsigned_integer(m.owner.start_time));
  owner.set("boot_id", Value::string(m.owner.boot_id));
  root.set("owner", std::move(owner));
  Value model = Value::object();
  model.set("path", Value::string(m.model.path));
  model.set("engine", Value::string(m.model.engine));
  model.set("tp_rank", Value::unsigned_integer(m.model.tp_rank));
  model.set("tp_size", Value::unsigned_integer(m.model.tp_size));
  if (!m.model.group.empty()) model.set("group", Value::string(m.model.group));
  model.set("config", m.model.config);
  root.set("model", std::move(model));
  Value buffers = Value::array();
  for (const BufferDesc& b : m.buffers) {
    Value e = Value::object();
    if (b.kind == BufferKind::kShm) {
      e.set("kind", Value::string("shm"));
      e.set("name", Value::string(b.shm_name));
    } else {
      e.set("kind", Value::string("cuda_ipc"));
      e.set("handle", Value::string(b.ipc_handle));
      e.set("device_uuid", Value::string(b.device_uuid));
    }
    e.set("size", Value::unsigned_integer(b.size));
    buffers.push(std::move(e));
  }
  root.set("buffers", std::move(buffers));
  Value tensors = Value::array();
  for (const TensorDesc& t : m.tensors) {
    Value e = Value::object();
    e.set("name", Value::string(t.name));
    e.set("dtype", Value::string(std::string(dtype_name(t.dtype))));
    e.set("shape", u64_array(t.shape));
    e.set("strides", u64_array(t.strides));
    e.set("buffer", Value::unsigned_integer(t.buffer));
    e.set("offset", Value::unsigned_integer(t.offset));
    tensors.push(std::move(e));
  }
  root.set("tensors", std::move(tensors));
  return root.dump_pretty() + "\n";
}

Manifest manifest_parse(std::string_view text, std::string_view what) {
  Value root = json::parse(text, what);
  Fields top(root, "", what);
  // Magic first, so that a file that is not a manifest at all gets that error, not a missing field.
  const Value* magic = root.is_object() ? root.find("magic") : nullptr;
  if (!magic || !magic->is_string() || magic->as_string() != kManifestMagic) {
    top.fail("magic", "not a livetrain manifest (expected \"magic\": \"" + std::string(kManifestMagic) + "\")");
  }
  top.get("magic");
  uint64_t version = top.u64("version");
  if (version != kManifestVersion) {
    throw Error(version > kManifestVersion ? ErrorCode::kUnsupported : ErrorCode::kFormat,
                std::string(what) + ": version: manifest version " + std::to_string(version) +
                    " is not supported (this livetrain reads version " + std::to_string(kManifestVersion) + ")");
  }
  Manifest m;
  {
    Fields f(top.get("owner"), "owner", what);
    m.owner.pid = f.u64("pid");
    m.owner.start_time = f.u64("start_time");
    m.owner.boot_id = f.str("boot_id");
    f.finish();
  }
  {
    Fields f(top.get("model"), "model", what);
    m.model.path = f.str("path");
    m.model.engine = f.str("engine");
    m.model.tp_rank = static_cast<uint32_t>(f.u64("tp_rank", UINT32_MAX));
    m.model.tp_size = static_cast<uint32_t>(f.u64("tp_size", UINT32_MAX));
    m.model.group = f.optional_str("group");
    const Value& config = f.get("config");
    if (!config.is_object())
      f.fail("config", std::string("expected an object, found ") + json::type_name(config.type()));
    m.model.config = config;
    f.finish();
  }
  const auto& buffers = top.array("buffers");
  for (size_t i = 0; i < buffers.size(); ++i) {
    Fields f(buffers[i], "buffers[" + std::to_string(i) + "]", what);
    BufferDesc b;
    std::string kind = f.str("kind");
    if (kind == "shm") {
      b.kind = BufferKind::kShm;
      b.shm_name = f.str("name");
    } else if (kind == "cuda_ipc") {
      b.kind = BufferKind::kCudaIpc;
      b.ipc_handle = f.str("handle");
      b.device_uuid = f.str("device_uuid");
    } else {
      f.fail("kind", "unknown buffer kind \"" + kind + "\" (expected \"shm\" or \"cuda_ipc\")");
    }
    b.size = f.u64("size");
    f.finish();
    m.buffers.push_back(std::move(b));
  }
  const auto& tensors = top.array("tensors");
  for (size_t i = 0; i < tensors.size(); ++i) {
    Fields f(tensors[i], "tensors[" + std::to_string(i) + "]", what);
    TensorDesc t;
    t.name = f.str("name");
    std::string dtype = f.str("dtype");
    auto dt = dtype_from_name(dtype);
    if (!dt) f.fail("dtype", "unknown dtype \"" + dtype + "\" (tensor \"" + t.name + "\")");
    t.dtype = *dt;
    t.shape = f.u64_list("shape");
    t.strides = f.u64_list("strides");
    t.buffer = static_cast<uint32_t>(f.u64("buffer", UINT32_MAX));
    t.offset = f.u64("offset");
    f.finish();
    m.tensors.push_back(std::move(t));
  }
  top.finish();
  manifest_validate(m, what);
  return m;
}

Manifest manifest_read(const std::string& path) {
  // A manifest names capabilities; cap its size so a wrong path cannot make us read gigabytes.
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && st.st_size > (256ll << 20)) {
    throw Error(ErrorCode::kFormat, path + ": " + std::to_string(st.st_size) + " bytes is too large for a manifest");
  }
  return manifest_parse(fs::read_file(path), path);
}

void manifest_write(const std::string& path, const Manifest& m) {
  manifest_validate(m, path);
  fs::write_file_atomic(path, manifest_serialize(m), 0600);
}

}  // namespace livetrain::sharing
