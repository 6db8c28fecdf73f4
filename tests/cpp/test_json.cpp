// The strict JSON reader and compact writer.
#include <gtest/gtest.h>

#include <string>

#include "livetrain/error.hpp"
#include "livetrain/json.hpp"

using livetrain::Error;
using livetrain::ErrorCode;
namespace json = livetrain::json;

namespace {

std::string parse_error(std::string_view text) {
  try {
    json::parse(text, "doc");
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kFormat);
    return e.what();
  }
  ADD_FAILURE() << "accepted: " << text;
  return "";
}

}  // namespace

TEST(Json, ParsesNestedValuesInOrder) {
  json::Value v = json::parse(R"( {"b": [1, -2, 3.5e2, true, false, null], "a": {"x": "y"}} )");
  ASSERT_TRUE(v.is_object());
  ASSERT_EQ(v.members().size(), 2u);
  EXPECT_EQ(v.members()[0].first, "b");
  const auto& arr = v.find("b")->items();
  ASSERT_EQ(arr.size(), 6u);
  EXPECT_EQ(*arr[0].as_u64(), 1u);
  EXPECT_FALSE(arr[1].as_u64().has_value());
  EXPECT_EQ(*arr[1].as_i64(), -2);
  EXPECT_DOUBLE_EQ(*arr[2].as_double(), 350.0);
  EXPECT_TRUE(arr[3].as_bool());
  EXPECT_TRUE(arr[5].is_null());
  EXPECT_EQ(v.find("a")->find("x")->as_string(), "y");
  EXPECT_EQ(v.find("zzz"), nullptr);
}

TEST(Json, IntegersAreOnlyPlainDigitsThatFit) {
  EXPECT_EQ(*json::parse("18446744073709551615").as_u64(), UINT64_MAX);
  EXPECT_FALSE(json::parse("18446744073709551616").as_u64().has_value());
  EXPECT_FALSE(json::parse("1.0").as_u64().has_value());
  EXPECT_FALSE(json::parse("1e0").as_u64().has_value());
  EXPECT_FALSE(json::parse("-0").as_u64().has_value());
  EXPECT_EQ(*json::parse("-9223372036854775808").as_i64(), INT64_MIN);
}

TEST(Json, DecodesEscapesAndSurrogatePairs) {
  json::Value v = json::parse(R"("a\"\\\/\b\f\n\r\t\u00e9\ud83d\ude00")");
  EXPECT_EQ(v.as_string(), "a\"\\/\b\f\n\r\t\xC3\xA9\xF0\x9F\x98\x80");
}

TEST(Json, RejectsMalformedInput) {
  EXPECT_NE(parse_error("").find("unexpected end"), std::string::npos);
  EXPECT_NE(parse_error("{} x").find("trailing characters"), std::string::npos);
  EXPECT_NE(parse_error("{\"a\":1,}").find("expected a string key"), std::string::npos);
  EXPECT_NE(parse_error("[1,]").find("unexpected character"), std::string::npos);
  EXPECT_NE(parse_error("01").find("leading zero"), std::string::npos);
  EXPECT_NE(parse_error("1.").find("fraction"), std::string::npos);
  EXPECT_NE(parse_error("1e").find("exponent"), std::string::npos);
  EXPECT_NE(parse_error("\"\\ud800\"").find("surrogate"), std::string::npos);
  EXPECT_NE(parse_error("\"\\udc00\"").find("surrogate"), std::string::npos);
  EXPECT_NE(parse_error("\"\\x\"").find("invalid escape"), std::string::npos);
  EXPECT_NE(parse_error("\"\\u12G4\"").find("hex digit"), std::string::npos);
  EXPECT_NE(parse_error("\"a\nb\"").find("control character"), std::string::npos);
  EXPECT_NE(parse_error("\"abc").find("unterminated"), std::string::npos);
  EXPECT_NE(parse_error("tru").find("invalid literal"), std::string::npos);
  EXPECT_NE(parse_error("\"\xC3\x28\"").find("UTF-8"), std::string::npos);          // bad continuation
  EXPECT_NE(parse_error("\"\xC0\xAF\"").find("UTF-8"), std::string::npos);          // overlong '/'
  EXPECT_NE(parse_error("\"\xED\xA0\x80\"").find("UTF-8"), std::string::npos);      // encoded surrogate
  EXPECT_NE(parse_error("\"\xF4\x90\x80\x80\"").find("UTF-8"), std::string::npos);  // > U+10FFFF
  // The message names the document and the byte offset.
  EXPECT_NE(parse_error("[1, 2, @]").find("doc: unexpected character at byte 7"), std::string::npos);
}

TEST(Json, CapsNestingDepth) {
  std::string ok(json::kMaxDepth, '[');
  ok += std::string(json::kMaxDepth, ']');
  EXPECT_NO_THROW(json::parse(ok));
  std::string deep(100000, '[');  // would overflow the stack without the cap
  EXPECT_NE(parse_error(deep).find("nesting deeper"), std::string::npos);
}

TEST(Json, FindsDuplicateKeys) {
  EXPECT_FALSE(json::parse(R"({"a":1,"b":2})").find_duplicate_key().has_value());
  EXPECT_EQ(*json::parse(R"({"a":1,"b":2,"a":3})").find_duplicate_key(), "a");
}

TEST(Json, DumpIsCompactAndRoundTrips) {
  const char* text = R"({"k":[1,"x\"y",{"z":null}],"e":"\u0001é","t":true})";
  json::Value v = json::parse(text);
  EXPECT_EQ(v.dump(), "{\"k\":[1,\"x\\\"y\",{\"z\":null}],\"e\":\"\\u0001\xC3\xA9\",\"t\":true}");
  EXPECT_EQ(json::parse(v.dump()).dump(), v.dump());
  EXPECT_EQ(json::parse(v.dump_pretty()).dump(), v.dump());
}
