// The commit record (COMMIT): serialization and strict parsing; it alone says what the store holds.
#include <cstdio>
#include <set>

#include "livetrain/checkpoint/commit.hpp"
#include "livetrain/checkpoint/convert.hpp"
#include "livetrain/checkpoint/hash.hpp"
#include "livetrain/error.hpp"
#include "livetrain/fs.hpp"
#include "livetrain/json.hpp"

namespace livetrain::checkpoint {

namespace {

using json::Value;

Value u64(uint64_t v) { return Value::unsigned_integer(v); }
Value str(const std::string& s) { return Value::string(s); }
Value str_or_null(const std::string& s) { return s.empty() ? Value::null() : Value::string(s); }

struct Reader {
  std::string_view what;
  [[noreturn]] void fail(const std::string& field, const std::string& msg) const {
    throw Error(ErrorCode::kFormat, std::string(what) + ": " + field + ": " + msg);
  }
  const Value& member(const Value& obj, const std::string& field, const char* key) const {
    if (!obj.is_object()) fail(field, "expected an object");
    const Value* v = obj.find(key);
    if (!v) fail(field + "." + key, "missing");
    return *v;
  }
  uint64_t get_u64(const Value& obj, const std::string& field, const char* key) const {
    auto v = member(obj, field, key).as_u64();
    if (!v) fail(field + "." + key, "expected an unsigned integer");
    return *v;
  }
  int64_t get_i64(const Value& obj, const std::string& field, const char* key) const {
    auto v = member(obj, field, key).as_i64();
    if (!v) fail(field + "." + key, "expected an integer");
    return *v;
  }
  std::string get_str(const Value& obj, const std::string& field, const char* key, bool nullable = false) const {
    const Value& v = member(obj, field, key);
    if (nullable && v.is_null()) return "";
    if (!v.is_string()) fail(field + "." + key, nullable ? "expected a string or null" : "expected a string");
    return v.as_string();
  }
  uint64_t get_hash(const Value& obj, const std::string& field, const char* key) const {
    auto h = hash_from_hex(get_str(obj, field, key));
    if (!h) fail(field + "." + key, "expected 16 lowercase hex digits");
    return *h;
  }
  const std::vector<Value>& get_array(const Value& obj, const std::string& field, const char* key) const {
    const Value& v = member(obj, field, key);
    if (!v.is_array()) fail(field + "." + key, "expected an array");
    return v.items();
  }
};

// A file name inside the store or model directory: no separators, no `..`, not hidden tricks.
bool plain_name(const std::string& s) {
  return !s.empty() && s != "." && s != ".." && s.find('/') == std::string::npos && s.find('\0') == std::string::npos;
}

}  // namespace

const Generation* Commit::find(uint64_t generation) const {
  if (generation < oldest || generation > head) return nullptr;
  return &generations[generation - oldest];
}

const Part* Generation::part(uint32_t rank) const {
  for (const Part& p : parts) {
    if (p.rank == rank) return &p;
  }
  return nullptr;
}

std::string delta_file_name(uint64_t generation) {
  char buf[48];
  std::snprintf(buf, sizeof buf, "gen-%020llu.delta", static_cast<unsigned long long>(generation));
  return buf;
}

std::string part_file_name(uint64_t generation, uint32_t rank, uint32_t ranks) {
  char buf[96];
  std::snprintf(buf, sizeof buf, "gen-%020llu.rank-%u-of-%u.delta", static_cast<unsigned long long>(generation), rank,
                ranks);
  return buf;
}

std::string optimizer_file_name(const std::string& delta_file) {
  return delta_file.substr(0, delta_file.size() - std::string_view(".delta").size()) + ".optim";
}

std::string commit_serialize(const Commit& c) {
  Value root = Value::object();
  root.set("magic", str(std::string(kCommitMagic)));
  // Version 3 only when a tensor is served in another dtype: a store without one stays readable by builds
  // that know version 2, and one with one is refused by them instead of misread.
  bool served_differs = false;
  for (const auto& t : c.tensors) served_differs = served_differs || t.served != t.dtype;
  root.set("version", u64(served_differs ? kCommitVersionServed : kCommitVersion));
  root.set("head", u64(c.head));
  root.set("oldest", u64(c.oldest));
  root.set("materialized", u64(c.materialized));
  root.set("hash", str("xxh64-4k"));
  Value files = Value::array();
  for (const auto& f : c.files) {
    Value o = Value::object();
    o.set("name", str(f.name));
    o.set("size", u64(f.size));
    o.set("hash", str(hash_hex(f.hash)));
    files.push(std::move(o));
  }
  root.set("files", std::move(files));
  Value gens = Value::array();
  for (const auto& g : c.generations) {
    Value o = Value::object();
    o.set("generation", u64(g.generation));
    o.set("parent", u64(g.parent));
    o.set("time_ms", Value::number_text(std::to_string(g.time_ms)));
    o.set("weight_version", u64(g.weight_version));
    o.set("bytes", u64(g.bytes));
    o.set("changed", u64(g.changed));
    o.set("ranks", u64(g.ranks));
    Value parts = Value::array();
    for (const auto& p : g.parts) {
      Value q = Value::object();
      q.set("rank", u64(p.rank));
      q.set("file", str(p.file));
      q.set("bytes", p.bytes ? u64(*p.bytes) : Value::null());
      q.set("hash", str(hash_hex(p.hash)));
      q.set("changed", u64(p.changed));
      q.set("optimizer_state", str_or_null(p.optimizer_state));
      q.set("optimizer_bytes", p.optimizer_bytes ? u64(*p.optimizer_bytes) : Value::null());
      q.set("optimizer_hash", p.optimizer_hash ? str(hash_hex(*p.optimizer_hash)) : Value::null());
      parts.push(std::move(q));
    }
    o.set("parts", std::move(parts));
    gens.push(std::move(o));
  }
  root.set("generations", std::move(gens));
  Value tensors = Value::array();
  for (const auto& t : c.tensors) {
    Value o = Value::object();
    o.set("name", str(t.name));
    o.set("dtype", str(std::string(dtype_name(t.dtype))));
    Value shape = Value::array();
    for (uint64_t d : t.shape) shape.push(u64(d));
    o.set("shape", std::move(shape));
    o.set("file", u64(t.file));
    o.set("offset", u64(t.offset));
    o.set("nbytes", u64(t.nbytes));
    if (t.served != t.dtype) o.set("served", str(std::string(dtype_name(t.served))));
    tensors.push(std::move(o));
  }
  root.set("tensors", std::move(tensors));
  return root.dump_pretty() + "\n";
}

Commit commit_parse(std::string_view text, std::string_view what) {
  Value root = json::parse(text, what);
  Reader r{what};
  if (!root.is_object()) r.fail("(root)", "expected an object");
  if (r.get_str(root, "(root)", "magic") != kCommitMagic) r.fail("magic", "not a livetrain checkpoint commit");
  uint64_t version = r.get_u64(root, "(root)", "version");
  if (version != kCommitVersion && version != kCommitVersionServed && version != 1) {
    throw Error(ErrorCode::kUnsupported, std::string(what) + ": commit version " + std::to_string(version) +
                                             " (this build reads versions 1 to " +
                                             std::to_string(kCommitVersionServed) + ")");
  }
  if (r.get_str(root, "(root)", "hash") != "xxh64-4k") r.fail("hash", "unknown hash (expected \"xxh64-4k\")");
  Commit c;
  c.head = r.get_u64(root, "(root)", "head");
  c.oldest = r.get_u64(root, "(root)", "oldest");
  c.materialized = r.get_u64(root, "(root)", "materialized");
  if (c.head > kMaxGeneration) r.fail("head", "beyond the largest generation number " + std::to_string(kMaxGeneration));
  if (c.oldest > c.head || c.materialized < c.oldest || c.materialized > c.head) {
    r.fail("materialized", "generations out of order (need oldest <= materialized <= head)");
  }
  const auto& files = r.get_array(root, "(root)", "files");
  for (size_t i = 0; i < files.size(); ++i) {
    std::string f = "files[" + std::to_string(i) + "]";
    ModelFile m{r.get_str(files[i], f, "name"), r.get_u64(files[i], f, "size"), r.get_hash(files[i], f, "hash")};
    if (!plain_name(m.name)) r.fail(f + ".name", "not a plain file name");
    c.files.push_back(std::move(m));
  }
  const auto& gens = r.get_array(root, "(root)", "generations");
  if (gens.empty() || gens.size() - 1 != c.head - c.oldest)
    r.fail("generations", "expected one entry per generation oldest..head");
  for (size_t i = 0; i < gens.size(); ++i) {
    std::string f = "generations[" + std::to_string(i) + "]";
    Generation g;
    g.generation = r.get_u64(gens[i], f, "generation");
    if (g.generation != c.oldest + i) r.fail(f + ".generation", "expected " + std::to_string(c.oldest + i));
    g.parent = r.get_u64(gens[i], f, "parent");
    g.time_ms = r.get_i64(gens[i], f, "time_ms");
    g.weight_version = r.get_u64(gens[i], f, "weight_version");
    g.bytes = r.get_u64(gens[i], f, "bytes");
    g.changed = r.get_u64(gens[i], f, "changed");
    if (version == 1) {
      // Version 1: one delta file per generation, no sizes or optimizer hash recorded.
      std::string delta = r.get_str(gens[i], f, "delta", true);
      uint64_t delta_hash = r.get_hash(gens[i], f, "delta_hash");
      std::string optim = r.get_str(gens[i], f, "optimizer_state", true);
      if (i > 0 && (delta.empty() || !plain_name(delta))) r.fail(f + ".delta", "expected a delta file name");
      if (!optim.empty() && !plain_name(optim)) r.fail(f + ".optimizer_state", "not a plain file name");
      if (i > 0)
        g.parts.push_back(Part{0, delta, std::nullopt, delta_hash, g.changed, optim, std::nullopt, std::nullopt});
      c.generations.push_back(std::move(g));
      continue;
    }
    uint64_t ranks = r.get_u64(gens[i], f, "ranks");
    if (ranks == 0 || ranks > kMaxRanks) r.fail(f + ".ranks", "expected 1.." + std::to_string(kMaxRanks));
    g.ranks = static_cast<uint32_t>(ranks);
    const auto& parts = r.get_array(gens[i], f, "parts");
    if (i > 0 && parts.size() != g.ranks)
      r.fail(f + ".parts", "expected one part per rank (" + std::to_string(g.ranks) + ")");
    if (i == 0 && !parts.empty()) r.fail(f + ".parts", "the oldest generation is the base: it has no parts");
    for (size_t k = 0; k < parts.size(); ++k) {
      std::string pf = f + ".parts[" + std::to_string(k) + "]";
      Part p;
      p.rank = static_cast<uint32_t>(r.get_u64(parts[k], pf, "rank"));
      if (p.rank != k) r.fail(pf + ".rank", "expected " + std::to_string(k) + " (parts are listed by rank)");
      p.file = r.get_str(parts[k], pf, "file");
      if (!plain_name(p.file)) r.fail(pf + ".file", "not a plain file name");
      if (!r.member(parts[k], pf, "bytes").is_null()) p.bytes = r.get_u64(parts[k], pf, "bytes");
      p.hash = r.get_hash(parts[k], pf, "hash");
      p.changed = r.get_u64(parts[k], pf, "changed");
      p.optimizer_state = r.get_str(parts[k], pf, "optimizer_state", true);
      if (!p.optimizer_state.empty() && !plain_name(p.optimizer_state))
        r.fail(pf + ".optimizer_state", "not a plain file name");
      if (!r.member(parts[k], pf, "optimizer_bytes").is_null())
        p.optimizer_bytes = r.get_u64(parts[k], pf, "optimizer_bytes");
      if (!r.member(parts[k], pf, "optimizer_hash").is_null())
        p.optimizer_hash = r.get_hash(parts[k], pf, "optimizer_hash");
      g.parts.push_back(std::move(p));
    }
    c.generations.push_back(std::move(g));
  }
  const auto& tensors = r.get_array(root, "(root)", "tensors");
  std::set<std::string> names;
  for (size_t i = 0; i < tensors.size(); ++i) {
    std::string f = "tensors[" + std::to_string(i) + "]";
    TensorEntry t;
    t.name = r.get_str(tensors[i], f, "name");
    if (!names.insert(t.name).second) r.fail(f + ".name", "\"" + t.name + "\" is listed twice");
    auto dt = dtype_from_name(r.get_str(tensors[i], f, "dtype"));
    if (!dt) r.fail(f + ".dtype", "unknown dtype");
    t.dtype = *dt;
    for (const Value& d : r.get_array(tensors[i], f, "shape")) {
      auto v = d.as_u64();
      if (!v) r.fail(f + ".shape", "expected unsigned integers");
      t.shape.push_back(*v);
    }
    t.file = static_cast<uint32_t>(r.get_u64(tensors[i], f, "file"));
    if (t.file >= c.files.size()) r.fail(f + ".file", "index out of range");
    t.offset = r.get_u64(tensors[i], f, "offset");
    t.nbytes = r.get_u64(tensors[i], f, "nbytes");
    if (t.nbytes > c.files[t.file].size || t.offset > c.files[t.file].size - t.nbytes)
      r.fail(f, "extends past its file");
    if (t.nbytes % unit_bytes(t.dtype)) r.fail(f + ".nbytes", "not a whole number of elements");
    // Every reader sizes the tensor from its shape: the two must agree, as in the safetensors header.
    uint64_t bits = dtype_bits(t.dtype);
    for (uint64_t d : t.shape) {
      if (__builtin_mul_overflow(bits, d, &bits)) r.fail(f + ".shape", shape_string(t.shape) + " overflows 64 bits");
    }
    if (bits % 8 != 0 || bits / 8 != t.nbytes) {
      r.fail(f + ".shape", std::string(dtype_name(t.dtype)) + " " + shape_string(t.shape) + " does not hold nbytes " +
                               std::to_string(t.nbytes));
    }
    t.served = t.dtype;
    if (version == kCommitVersionServed && tensors[i].find("served")) {
      auto sd = dtype_from_name(r.get_str(tensors[i], f, "served"));
      if (!sd) r.fail(f + ".served", "unknown dtype");
      if (std::string why = served_conversion_refusal(t.dtype, *sd); !why.empty()) r.fail(f + ".served", why);
      t.served = *sd;
    }
    c.tensors.push_back(std::move(t));
  }
  return c;
}

Commit commit_read(const std::string& store_dir) {
  std::string path = fs::join(store_dir, std::string(kCommitFileName));
  if (!fs::exists(path)) {
    throw Error(ErrorCode::kNotFound, "no checkpoint store at " + store_dir + " (" + path + " does not exist)");
  }
  return commit_parse(fs::read_file(path), path);
}

}  // namespace livetrain::checkpoint
