// Strict JSON reader and compact writer (see include/livetrain/json.hpp for the rules).
#include "livetrain/json.hpp"

#include <charconv>
#include <cstdlib>
#include <string>
#include <unordered_set>

#include "livetrain/error.hpp"

namespace livetrain::json {

const char* type_name(Type type) {
  switch (type) {
    case Type::kNull: return "null";
    case Type::kBool: return "boolean";
    case Type::kNumber: return "number";
    case Type::kString: return "string";
    case Type::kArray: return "array";
    case Type::kObject: return "object";
  }
  return "unknown";
}

Value Value::boolean(bool b) {
  Value v;
  v.type_ = Type::kBool;
  v.bool_ = b;
  return v;
}

Value Value::string(std::string s) {
  Value v;
  v.type_ = Type::kString;
  v.text_ = std::move(s);
  return v;
}

Value Value::unsigned_integer(uint64_t u) {
  Value v;
  v.type_ = Type::kNumber;
  v.text_ = std::to_string(u);
  return v;
}

Value Value::number_text(std::string text) {
  Value v;
  v.type_ = Type::kNumber;
  v.text_ = std::move(text);
  return v;
}

Value Value::array(std::vector<Value> items) {
  Value v;
  v.type_ = Type::kArray;
  v.items_ = std::move(items);
  return v;
}

Value Value::object(std::vector<Member> members) {
  Value v;
  v.type_ = Type::kObject;
  v.members_ = std::move(members);
  return v;
}

std::optional<uint64_t> Value::as_u64() const {
  if (type_ != Type::kNumber || text_.empty()) return std::nullopt;
  for (char c : text_) {
    if (c < '0' || c > '9') return std::nullopt;  // sign, fraction or exponent
  }
  uint64_t out = 0;
  auto [end, ec] = std::from_chars(text_.data(), text_.data() + text_.size(), out);
  if (ec != std::errc() || end != text_.data() + text_.size()) return std::nullopt;
  return out;
}

std::optional<int64_t> Value::as_i64() const {
  if (type_ != Type::kNumber || text_.empty()) return std::nullopt;
  for (size_t i = 0; i < text_.size(); ++i) {
    char c = text_[i];
    if (!(c >= '0' && c <= '9') && !(i == 0 && c == '-')) return std::nullopt;
  }
  int64_t out = 0;
  auto [end, ec] = std::from_chars(text_.data(), text_.data() + text_.size(), out);
  if (ec != std::errc() || end != text_.data() + text_.size()) return std::nullopt;
  return out;
}

std::optional<double> Value::as_double() const {
  if (type_ != Type::kNumber) return std::nullopt;
  char* end = nullptr;
  double d = std::strtod(text_.c_str(), &end);
  if (end != text_.c_str() + text_.size()) return std::nullopt;
  return d;
}

const Value* Value::find(std::string_view key) const {
  for (const auto& [k, v] : members_) {
    if (k == key) return &v;
  }
  return nullptr;
}

std::optional<std::string> Value::find_duplicate_key() const {
  std::unordered_set<std::string_view> seen;
  seen.reserve(members_.size());
  for (const auto& member : members_) {
    if (!seen.insert(member.first).second) return member.first;
  }
  return std::nullopt;
}

Value& Value::set(std::string key, Value v) {
  type_ = Type::kObject;
  members_.emplace_back(std::move(key), std::move(v));
  return members_.back().second;
}

Value& Value::push(Value v) {
  type_ = Type::kArray;
  items_.push_back(std::move(v));
  return items_.back();
}

void append_quoted(std::string& out, std::string_view s) {
  static const char kHex[] = "0123456789abcdef";
  out.push_back('"');
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          out += "\\u00";
          out.push_back(kHex[c >> 4]);
          out.push_back(kHex[c & 0xF]);
        } else {
          out.push_back(static_cast<char>(c));
        }
    }
  }
  out.push_back('"');
}

std::string quoted(std::string_view s) {
  std::string out;
  append_quoted(out, s);
  return out;
}

void Value::dump_to(std::string& out) const {
  switch (type_) {
    case Type::kNull: out += "null"; break;
    case Type::kBool: out += bool_ ? "true" : "false"; break;
    case Type::kNumber: out += text_; break;
    case Type::kString: append_quoted(out, text_); break;
    case Type::kArray:
      out.push_back('[');
      for (size_t i = 0; i < items_.size(); ++i) {
        if (i) out.push_back(',');
        items_[i].dump_to(out);
      }
      out.push_back(']');
      break;
    case Type::kObject:
      out.push_back('{');
      for (size_t i = 0; i < members_.size(); ++i) {
        if (i) out.push_back(',');
        append_quoted(out, members_[i].first);
        out.push_back(':');
        members_[i].second.dump_to(out);
      }
      out.push_back('}');
      break;
  }
}

std::string Value::dump() const {
  std::string out;
  dump_to(out);
  return out;
}

void Value::dump_pretty_to(std::string& out, int indent) const {
  auto newline = [&](int level) {
    out.push_back('\n');
    out.append(static_cast<size_t>(level) * 2, ' ');
  };
  if (type_ == Type::kArray && !items_.empty()) {
    out.push_back('[');
    for (size_t i = 0; i < items_.size(); ++i) {
      if (i) out.push_back(',');
      newline(indent + 1);
      items_[i].dump_pretty_to(out, indent + 1);
    }
    newline(indent);
    out.push_back(']');
  } else if (type_ == Type::kObject && !members_.empty()) {
    out.push_back('{');
    for (size_t i = 0; i < members_.size(); ++i) {
      if (i) out.push_back(',');
      newline(indent + 1);
      append_quoted(out, members_[i].first);
      out += ": ";
      members_[i].second.dump_pretty_to(out, indent + 1);
    }
    newline(indent);
    out.push_back('}');
  } else {
    dump_to(out);
  }
}

std::string Value::dump_pretty() const {
  std::string out;
  dump_pretty_to(out, 0);
  out.push_back('\n');
  return out;
}

bool is_valid_utf8(std::string_view bytes, size_t* bad_offset) {
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  size_t n = bytes.size();
  size_t i = 0;
  while (i < n) {
    unsigned char c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    uint32_t cp;
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
      cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      cp = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      cp = c & 0x07;
    } else {
      if (bad_offset) *bad_offset = i;
      return false;
    }
    if (n - i < len) {
      if (bad_offset) *bad_offset = i;
      return false;
    }
    for (size_t k = 1; k < len; ++k) {
      if ((p[i + k] & 0xC0) != 0x80) {
        if (bad_offset) *bad_offset = i;
        return false;
      }
      cp = (cp << 6) | (p[i + k] & 0x3F);
    }
    bool overlong = (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000);
    bool surrogate = cp >= 0xD800 && cp <= 0xDFFF;
    if (overlong || surrogate || cp > 0x10FFFF) {
      if (bad_offset) *bad_offset = i;
      return false;
    }
    i += len;
  }
  return true;
}

namespace {

class Parser {
 public:
  Parser(std::string_view text, std::string_view what) : s_(text), what_(what) {}

  Value parse_document() {
    size_t bad = 0;
    if (!is_valid_utf8(s_, &bad)) fail("invalid UTF-8", bad);
    skip_ws();
    Value v = parse_value(0);
    skip_ws();
    if (pos_ != s_.size()) fail("trailing characters after the JSON value", pos_);
    return v;
  }

 private:
  [[noreturn]] void fail(std::string_view reason, size_t at) const {
    std::string message(what_);
    message += ": ";
    message += reason;
    message += " at byte ";
    message += std::to_string(at);
    throw Error(ErrorCode::kFormat, message);
  }

  void skip_ws() {
    while (pos_ < s_.size()) {
      char c = s_[pos_];
      if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
      ++pos_;
    }
  }

  bool eat(char c) {
    if (pos_ < s_.size() && s_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }

  void expect_word(std::string_view word) {
    if (s_.substr(pos_, word.size()) != word) fail("invalid literal", pos_);
    pos_ += word.size();
  }

  Value parse_value(int depth) {
    if (depth > kMaxDepth) fail("nesting deeper than 128 levels", pos_);
    if (pos_ >= s_.size()) fail("unexpected end of input", pos_);
    char c = s_[pos_];
    switch (c) {
      case '{': return parse_object(depth);
      case '[': return parse_array(depth);
      case '"': return Value::string(parse_string());
      case 't': expect_word("true"); return Value::boolean(true);
      case 'f': expect_word("false"); return Value::boolean(false);
      case 'n': expect_word("null"); return Value::null();
      default:
        if (c == '-' || (c >= '0' && c <= '9')) return parse_number();
        fail("unexpected character", pos_);
    }
  }

  Value parse_object(int depth) {
    ++pos_;  // '{'
    Value obj = Value::object();
    skip_ws();
    if (eat('}')) return obj;
    while (true) {
      skip_ws();
      if (pos_ >= s_.size() || s_[pos_] != '"') fail("expected a string key", pos_);
      std::string key = parse_string();
      skip_ws();
      if (!eat(':')) fail("expected ':' after key", pos_);
      skip_ws();
      obj.members().emplace_back(std::move(key), parse_value(depth + 1));
      skip_ws();
      if (eat(',')) continue;
      if (eat('}')) return obj;
      fail("expected ',' or '}' in object", pos_);
    }
  }

  Value parse_array(int depth) {
    ++pos_;  // '['
    Value arr = Value::array();
    skip_ws();
    if (eat(']')) return arr;
    while (true) {
      skip_ws();
      arr.items().push_back(parse_value(depth + 1));
      skip_ws();
      if (eat(',')) continue;
      if (eat(']')) return arr;
      fail("expected ',' or ']' in array", pos_);
    }
  }

  uint32_t parse_hex4() {
    if (s_.size() - pos_ < 4) fail("truncated \\u escape", pos_);
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      char c = s_[pos_++];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= static_cast<uint32_t>(c - '0');
      else if (c >= 'a' && c <= 'f') v |= static_cast<uint32_t>(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') v |= static_cast<uint32_t>(c - 'A' + 10);
      else fail("invalid hex digit in \\u escape", pos_ - 1);
    }
    return v;
  }

  static void append_utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
      out.push_back(static_cast<char>(cp));
    } else if (cp < 0x800) {
      out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
      out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
      out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
      out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else {
      out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
      out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
  }

  std::string parse_string() {
    size_t start = pos_;
    ++pos_;  // opening quote
    std::string out;
    while (true) {
      if (pos_ >= s_.size()) fail("unterminated string", start);
      unsigned char c = static_cast<unsigned char>(s_[pos_]);
      if (c == '"') {
        ++pos_;
        return out;
      }
      if (c < 0x20) fail("control character in string", pos_);
      if (c != '\\') {
        out.push_back(static_cast<char>(c));
        ++pos_;
        continue;
      }
      size_t esc = pos_;
      ++pos_;
      if (pos_ >= s_.size()) fail("unterminated escape", esc);
      char e = s_[pos_++];
      switch (e) {
        case '"': out.push_back('"'); break;
        case '\\': out.push_back('\\'); break;
        case '/': out.push_back('/'); break;
        case 'b': out.push_back('\b'); break;
        case 'f': out.push_back('\f'); break;
        case 'n': out.push_back('\n'); break;
        case 'r': out.push_back('\r'); break;
        case 't': out.push_back('\t'); break;
        case 'u': {
          uint32_t cp = parse_hex4();
          if (cp >= 0xDC00 && cp <= 0xDFFF) fail("unpaired low surrogate in \\u escape", esc);
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (s_.substr(pos_, 2) != "\\u") fail("unpaired high surrogate in \\u escape", esc);
            pos_ += 2;
            uint32_t lo = parse_hex4();
            if (lo < 0xDC00 || lo > 0xDFFF) fail("unpaired high surrogate in \\u escape", esc);
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          append_utf8(out, cp);
          break;
        }
        default: fail("invalid escape", esc);
      }
    }
  }

  Value parse_number() {
    size_t start = pos_;
    auto digit = [&] { return pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9'; };
    eat('-');
    if (!digit()) fail("invalid number", start);
    if (s_[pos_] == '0') {
      ++pos_;
      if (digit()) fail("leading zero in number", start);
    } else {
      while (digit()) ++pos_;
    }
    if (eat('.')) {
      if (!digit()) fail("invalid number fraction", start);
      while (digit()) ++pos_;
    }
    if (pos_ < s_.size() && (s_[pos_] == 'e' || s_[pos_] == 'E')) {
      ++pos_;
      if (!eat('+')) eat('-');
      if (!digit()) fail("invalid number exponent", start);
      while (digit()) ++pos_;
    }
    return Value::number_text(std::string(s_.substr(start, pos_ - start)));
  }

  std::string_view s_;
  std::string_view what_;
  size_t pos_ = 0;
};

}  // namespace

Value parse(std::string_view text, std::string_view what) { return Parser(text, what).parse_document(); }

}  // namespace livetrain::json
