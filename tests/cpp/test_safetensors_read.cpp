// Strict safetensors header validation: golden files parse, a corpus of malformed files is rejected with
// messages that name the file, the tensor and the field.
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "helpers.hpp"
#include "livetrain/error.hpp"
#include "livetrain/safetensors.hpp"

using livetrain::DType;
using livetrain::Error;
using livetrain::ErrorCode;
using livetrain::testing::raw_file;
namespace st = livetrain::safetensors;

namespace {

st::Header parse(const std::string& bytes) {
  return st::parse_header(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), "f.safetensors");
}

std::string tensor(const std::string& name, const std::string& dtype, const std::string& shape, uint64_t b,
                   uint64_t e) {
  return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape + ",\"data_offsets\":[" +
         std::to_string(b) + "," + std::to_string(e) + "]}";
}

}  // namespace

// Bytes of the reference implementation's own serialization test (`test_serialization`): one F32 tensor
// "attn.0" of shape [1, 2, 3] holding 0..5.
TEST(SafetensorsRead, ParsesReferenceGoldenFile) {
  const unsigned char golden[] = {
      64,  0,  0,   0,  0,   0,  0,   0,   123, 34,  97,  116, 116, 110, 46,  48, 34, 58, 123, 34, 100, 116, 121, 112,
      101, 34, 58,  34, 70,  51, 50,  34,  44,  34,  115, 104, 97,  112, 101, 34, 58, 91, 49,  44, 50,  44,  51,  93,
      44,  34, 100, 97, 116, 97, 95,  111, 102, 102, 115, 101, 116, 115, 34,  58, 91, 48, 44,  50, 52,  93,  125, 125,
      0,   0,  0,   0,  0,   0,  128, 63,  0,   0,   0,   64,  0,   0,   64,  64, 0,  0,  128, 64, 0,   0,   160, 64};
  st::Header h = st::parse_header(golden, sizeof(golden), "golden");
  ASSERT_EQ(h.tensors.size(), 1u);
  const st::TensorInfo& t = h.tensors[0];
  EXPECT_EQ(t.name, "attn.0");
  EXPECT_EQ(t.dtype, DType::kF32);
  EXPECT_EQ(t.shape, (std::vector<uint64_t>{1, 2, 3}));
  EXPECT_EQ(t.begin, 0u);
  EXPECT_EQ(t.end, 24u);
  EXPECT_EQ(h.data_start(), 72u);
  EXPECT_FALSE(h.metadata.has_value());
  float values[6];
  std::memcpy(values, golden + h.data_start(), sizeof(values));
  for (int i = 0; i < 6; ++i) EXPECT_EQ(values[i], static_cast<float>(i));
}

TEST(SafetensorsRead, AcceptsEmptyZeroDAndSubByteTensorsAndMetadata) {
  std::string header = "{\"__metadata__\":{\"format\":\"pt\",\"note\":\"\xC3\xA9\"}," +
                       tensor("scalar", "F64", "[]", 0, 8) + "," + tensor("empty", "BF16", "[0,7]", 8, 8) + "," +
                       tensor("f4", "F4", "[2,3]", 8, 11) + "," + tensor("f6", "F6_E2M3", "[4]", 11, 14) + "}  ";
  st::Header h = parse(raw_file(header, std::string(14, 'x')));
  ASSERT_EQ(h.tensors.size(), 4u);
  EXPECT_EQ(h.find("scalar")->numel(), 1u);
  EXPECT_EQ(h.find("empty")->nbytes(), 0u);
  ASSERT_TRUE(h.metadata.has_value());
  EXPECT_EQ((*h.metadata)[1].second, "\xC3\xA9");
  // Offsets given out of order are sorted, as the reference does.
  std::string shuffled = "{" + tensor("b", "U8", "[2]", 1, 3) + "," + tensor("a", "U8", "[1]", 0, 1) + "}";
  st::Header h2 = parse(raw_file(shuffled, "abc"));
  EXPECT_EQ(h2.tensors[0].name, "a");
  EXPECT_EQ(h2.find("b")->begin, 1u);
}

TEST(SafetensorsRead, AcceptsEveryReferenceDType) {
  const char* names[] = {"BOOL",    "F4",          "F6_E2M3",     "F6_E3M2", "U8",  "I8",  "F8_E5M2", "F8_E4M3",
                         "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "I16",     "U16", "F16", "BF16",    "I32",
                         "U32",     "F32",         "C64",         "F64",     "I64", "U64"};
  for (const char* name : names) {
    auto dt = livetrain::dtype_from_name(name);
    ASSERT_TRUE(dt.has_value()) << name;
    uint64_t bytes = livetrain::dtype_bits(*dt) * 4 / 8;  // 4 elements
    st::Header h = parse(raw_file("{" + tensor("t", name, "[4]", 0, bytes) + "}", std::string(bytes, '\0')));
    EXPECT_EQ(h.tensors[0].dtype, *dt) << name;
  }
}

struct BadCase {
  const char* label;
  std::string bytes;
  const char* expect;  // a substring of the message
  ErrorCode code = ErrorCode::kFormat;
};

TEST(SafetensorsRead, RejectsMalformedCorpus) {
  std::string good_header = "{" + tensor("w", "F32", "[2]", 0, 8) + "}";
  std::string too_long(8, '\0');
  uint64_t big = 100'000'001;
  for (int i = 0; i < 8; ++i) too_long[i] = static_cast<char>((big >> (8 * i)) & 0xFF);
  std::string huge_len(8, '\xFF');
  std::string past_end = raw_file(good_header, std::string(8, 'x'));
  past_end[0] = static_cast<char>(past_end[0] + 20);

  std::vector<BadCase> cases = {
      {"empty file", "", "too small for the 8-byte header length"},
      {"truncated length", std::string(5, '\0'), "too small"},
      {"header too long", too_long + "{}", "exceeds the limit of 100000000"},
      {"length 2^64-1", huge_len, "exceeds the limit"},
      {"header past end", past_end, "runs past the end of the file"},
      {"truncated data", raw_file(good_header, std::string(7, 'x')), "(truncated)"},
      {"trailing garbage", raw_file(good_header, std::string(9, 'x')), "(trailing bytes)"},
      {"bad UTF-8", raw_file("{\"w\xFF\":1}"), "not valid UTF-8"},
      {"not starting with {", raw_file(" {}"), "does not start with '{'"},
      {"array header", raw_file("[1]"), "does not start with '{'"},
      {"invalid JSON", raw_file("{\"w\":}"), "unexpected character"},
      {"NUL after JSON", raw_file(good_header + std::string(2, '\0'), std::string(8, 'x')), "trailing characters"},
      {"unknown dtype", raw_file("{" + tensor("w", "F33", "[2]", 0, 8) + "}", std::string(8, 'x')),
       "tensor \"w\": unknown dtype \"F33\""},
      {"lowercase dtype", raw_file("{" + tensor("w", "f32", "[2]", 0, 8) + "}", std::string(8, 'x')), "unknown dtype"},
      {"missing shape", raw_file("{\"w\":{\"dtype\":\"U8\",\"data_offsets\":[0,1]}}", "x"), "missing field \"shape\""},
      {"missing dtype", raw_file("{\"w\":{\"shape\":[1],\"data_offsets\":[0,1]}}", "x"), "missing field \"dtype\""},
      {"missing offsets", raw_file("{\"w\":{\"dtype\":\"U8\",\"shape\":[1]}}", "x"), "missing field \"data_offsets\""},
      {"negative dim", raw_file("{" + tensor("w", "U8", "[-1]", 0, 1) + "}", "x"),
       "shape[0] is not a non-negative integer"},
      {"float dim", raw_file("{" + tensor("w", "U8", "[1.0]", 0, 1) + "}", "x"), "shape[0]"},
      {"three offsets", raw_file("{\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1,1]}}", "x"),
       "not an array of 2 integers"},
      {"tensor not object", raw_file("{\"w\":[1]}"), "tensor \"w\": expected an object"},
      {"non-string metadata", raw_file("{\"__metadata__\":{\"a\":1}}"), "__metadata__ value of \"a\" is a number"},
      {"metadata not object", raw_file("{\"__metadata__\":[\"a\"]}"), "__metadata__ is not an object"},
      {"duplicate tensor",
       raw_file("{" + tensor("w", "U8", "[1]", 0, 1) + "," + tensor("w", "U8", "[1]", 0, 1) + "}", "x"),
       "lists \"w\" twice"},
      {"hole", raw_file("{" + tensor("a", "U8", "[1]", 0, 1) + "," + tensor("b", "U8", "[1]", 2, 3) + "}", "xxx"),
       "tensor \"b\": data_offsets [2, 3] do not continue the previous tensor's end at 1"},
      {"overlap", raw_file("{" + tensor("a", "U8", "[2]", 0, 2) + "," + tensor("b", "U8", "[2]", 1, 3) + "}", "xxx"),
       "tensor \"b\": data_offsets [1, 3]"},
      {"not starting at 0", raw_file("{" + tensor("a", "U8", "[1]", 1, 2) + "}", "xx"), "(overlap or hole)"},
      {"end before begin", raw_file("{" + tensor("a", "U8", "[0]", 0, 0) + "," + tensor("b", "U8", "[1]", 0, 0) + "}"),
       "tensor \"b\": data_offsets [0, 0] hold 0 bytes but dtype U8 shape [1] needs 1"},
      {"size mismatch", raw_file("{" + tensor("w", "F32", "[3]", 0, 8) + "}", std::string(8, 'x')),
       "hold 8 bytes but dtype F32 shape [3] needs 12"},
      {"shape overflow", raw_file("{" + tensor("w", "U64", "[4294967296,4294967296]", 0, 8) + "}", std::string(8, 'x')),
       "overflows 64 bits", ErrorCode::kOverflow},
      {"size overflow", raw_file("{" + tensor("w", "U64", "[4611686018427387904]", 0, 8) + "}", std::string(8, 'x')),
       "overflows 64 bits", ErrorCode::kOverflow},
      {"offset overflow",
       raw_file("{\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,18446744073709551616]}}", "x"),
       "data_offsets are not non-negative integers that fit in 64 bits"},
      {"sub-byte misaligned", raw_file("{" + tensor("w", "F4", "[3]", 0, 2) + "}", "xx"),
       "does not end on a byte boundary"},
  };
  for (const BadCase& c : cases) {
    try {
      parse(c.bytes);
      ADD_FAILURE() << c.label << ": accepted";
    } catch (const Error& e) {
      std::string msg = e.what();
      EXPECT_EQ(e.code(), c.code) << c.label << ": " << msg;
      EXPECT_EQ(msg.rfind("f.safetensors: ", 0), 0u) << c.label << ": message does not name the file: " << msg;
      EXPECT_NE(msg.find(c.expect), std::string::npos) << c.label << ": got \"" << msg << "\"";
    }
  }
}

TEST(SafetensorsRead, FileOpenMapsAndFindsTensors) {
  livetrain::testing::TempDir dir;
  std::string path = dir.file("m.safetensors");
  livetrain::testing::write_bytes(path, raw_file("{" + tensor("w", "U8", "[3]", 0, 3) + "}", "abc"));
  st::File f = st::File::open(path);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(f.data(f.tensor("w"))), 3), "abc");
  try {
    f.tensor("nope");
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kNotFound);
    EXPECT_NE(std::string(e.what()).find("no tensor \"nope\""), std::string::npos);
  }
  try {
    st::File::open(dir.file("missing.safetensors"));
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kNotFound);
    EXPECT_NE(std::string(e.what()).find("missing.safetensors"), std::string::npos);
  }
}
