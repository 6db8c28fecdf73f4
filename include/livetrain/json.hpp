// A strict JSON (RFC 8259) reader and a compact writer, for every livetrain format that is JSON on disk.
//
// Strictness, because these parse bytes from outside (safetensors headers, manifests, index files):
// the input must be valid UTF-8; escapes must be well-formed, with surrogates paired; nesting is capped
// at kMaxDepth; nothing but whitespace may follow the value; integers that do not fit in 64 bits are
// kept as text and reported as non-integers. Objects keep their members in file order; whether a
// repeated key is an error is the caller's decision (see Value::find_duplicate_key).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace livetrain::json {

inline constexpr int kMaxDepth = 128;

enum class Type { kNull, kBool, kNumber, kString, kArray, kObject };

const char* type_name(Type type);

class Value {
 public:
  using Member = std::pair<std::string, Value>;

  Value() = default;
  static Value null() { return Value(); }
  static Value boolean(bool b);
  static Value string(std::string s);
  static Value unsigned_integer(uint64_t u);
  static Value number_text(std::string text);  // a number as written; must be valid JSON number syntax
  static Value array(std::vector<Value> items = {});
  static Value object(std::vector<Member> members = {});

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::kNull; }
  bool is_bool() const { return type_ == Type::kBool; }
  bool is_number() const { return type_ == Type::kNumber; }
  bool is_string() const { return type_ == Type::kString; }
  bool is_array() const { return type_ == Type::kArray; }
  bool is_object() const { return type_ == Type::kObject; }

  bool as_bool() const { return bool_; }
  const std::string& as_string() const { return text_; }    // for strings
  const std::string& number_text() const { return text_; }  // for numbers, as written
  // The value as an unsigned 64-bit integer, if it is written as one (no sign, fraction or exponent)
  // and fits; JSON's `1.0`, `1e0` and `-0` are not integers here, as in serde's usize.
  std::optional<uint64_t> as_u64() const;
  std::optional<int64_t> as_i64() const;
  std::optional<double> as_double() const;

  const std::vector<Value>& items() const { return items_; }
  std::vector<Value>& items() { return items_; }
  const std::vector<Member>& members() const { return members_; }
  std::vector<Member>& members() { return members_; }

  // Object access: the first member with this key, or nullptr.
  const Value* find(std::string_view key) const;
  // The first key that occurs twice in this object (not recursive), if any.
  std::optional<std::string> find_duplicate_key() const;

  // Builders for objects and arrays.
  Value& set(std::string key, Value v);  // appends; does not replace
  Value& push(Value v);

  // Compact serialization with no spaces, members in stored order, non-ASCII kept as UTF-8 and
  // control characters escaped: byte-identical to serde_json's compact output for the same tree.
  std::string dump() const;
  void dump_to(std::string& out) const;
  // Indented serialization (2 spaces) for files meant to be read by people.
  std::string dump_pretty() const;

 private:
  void dump_pretty_to(std::string& out, int indent) const;

  Type type_ = Type::kNull;
  bool bool_ = false;
  std::string text_;
  std::vector<Value> items_;
  std::vector<Member> members_;
};

// Parses exactly one JSON value from `text`, which may be surrounded by whitespace only. On failure
// throws livetrain::Error (kFormat) whose message is "<what>: <reason> at byte <offset>".
Value parse(std::string_view text, std::string_view what = "JSON");

// Whether `bytes` is valid UTF-8 (no overlong forms, no surrogates, nothing above U+10FFFF); if not and
// `bad_offset` is given, the offset of the first invalid byte is stored there.
bool is_valid_utf8(std::string_view bytes, size_t* bad_offset = nullptr);

// Appends `s` as a JSON string literal (with quotes) to `out`.
void append_quoted(std::string& out, std::string_view s);

// `s` as a JSON string literal: how error messages quote names from outside (escapes included).
std::string quoted(std::string_view s);

}  // namespace livetrain::json
