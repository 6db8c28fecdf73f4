// safetensors writing: byte-identical to the reference writer's golden outputs, reference tensor order,
// optional 4 KiB data alignment, and clear errors for impossible input.
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
namespace st = livetrain::safetensors;

namespace {

std::vector<uint8_t> to_vec(const std::string& s) { return std::vector<uint8_t>(s.begin(), s.end()); }

std::string written(const std::string& path) { return livetrain::testing::read_bytes(path); }

}  // namespace

// The reference implementation's `test_serialization` bytes.
TEST(SafetensorsWrite, MatchesReferenceGoldenBytes) {
  float values[6] = {0, 1, 2, 3, 4, 5};
  livetrain::testing::TempDir dir;
  st::WriteOptions no_meta;
  no_meta.metadata = std::nullopt;
  st::write_file(dir.file("a.safetensors"), {{"attn.0", DType::kF32, {1, 2, 3}, values, sizeof(values)}}, no_meta);
  const std::vector<uint8_t> golden = {
      64,  0,  0,   0,  0,   0,  0,   0,   123, 34,  97,  116, 116, 110, 46,  48, 34, 58, 123, 34, 100, 116, 121, 112,
      101, 34, 58,  34, 70,  51, 50,  34,  44,  34,  115, 104, 97,  112, 101, 34, 58, 91, 49,  44, 50,  44,  51,  93,
      44,  34, 100, 97, 116, 97, 95,  111, 102, 102, 115, 101, 116, 115, 34,  58, 91, 48, 44,  50, 52,  93,  125, 125,
      0,   0,  0,   0,  0,   0,  128, 63,  0,   0,   0,   64,  0,   0,   64,  64, 0,  0,  128, 64, 0,   0,   160, 64};
  EXPECT_EQ(to_vec(written(dir.file("a.safetensors"))), golden);

  // `test_serialization_forced_alignement`: a shorter name forces 7 bytes of space padding.
  st::write_file(dir.file("b.safetensors"), {{"attn0", DType::kF32, {1, 1, 2, 3}, values, sizeof(values)}}, no_meta);
  std::string b = written(dir.file("b.safetensors"));
  EXPECT_EQ(static_cast<uint8_t>(b[0]), 72);
  EXPECT_EQ(b.substr(8 + 65, 7), std::string(7, ' '));
  EXPECT_EQ(b.size(), 8u + 72 + 24);

  // `test_empty`: no tensors, with and without metadata.
  st::write_file(dir.file("c.safetensors"), {}, no_meta);
  EXPECT_EQ(to_vec(written(dir.file("c.safetensors"))),
            (std::vector<uint8_t>{8, 0, 0, 0, 0, 0, 0, 0, 123, 125, 32, 32, 32, 32, 32, 32}));
  st::WriteOptions framework;
  framework.metadata = st::Metadata{{"framework", "pt"}};
  st::write_file(dir.file("d.safetensors"), {}, framework);
  EXPECT_EQ(written(dir.file("d.safetensors")),
            std::string("\x28\0\0\0\0\0\0\0", 8) + "{\"__metadata__\":{\"framework\":\"pt\"}}     ");
}

TEST(SafetensorsWrite, OrdersLikeTheReferenceAndRoundTrips) {
  uint16_t h[3] = {1, 2, 3};
  double d = 2.5;
  uint8_t u[2] = {7, 8};
  std::vector<st::TensorRef> in = {
      {"z.bias", DType::kBF16, {3}, h, 6},
      {"b", DType::kU8, {2}, u, 2},
      {"a", DType::kU8, {2}, u, 2},
      {"scalar", DType::kF64, {}, &d, 8},
      {"empty", DType::kF32, {0, 4}, nullptr, 0},
  };
  livetrain::testing::TempDir dir;
  st::write_file(dir.file("m.safetensors"), in);
  st::File f = st::File::open(dir.file("m.safetensors"));
  std::vector<std::string> order;
  for (const auto& t : f.tensors()) order.push_back(t.name);
  // F64 first, then F32, BF16, U8 (alignment order), names ascending within a dtype.
  EXPECT_EQ(order, (std::vector<std::string>{"scalar", "empty", "z.bias", "a", "b"}));
  ASSERT_TRUE(f.header().metadata.has_value());
  EXPECT_EQ(*f.header().metadata, (st::Metadata{{"format", "pt"}}));
  EXPECT_EQ(std::memcmp(f.data(f.tensor("z.bias")), h, 6), 0);
  double back;
  std::memcpy(&back, f.data(f.tensor("scalar")), 8);
  EXPECT_EQ(back, 2.5);
  EXPECT_EQ(f.header().data_start() % 8, 0u);
}

TEST(SafetensorsWrite, AlignsDataTo4KiBOnRequest) {
  uint8_t u[5] = {1, 2, 3, 4, 5};
  livetrain::testing::TempDir dir;
  st::WriteOptions o;
  o.data_alignment = 4096;
  st::write_file(dir.file("m.safetensors"), {{"w", DType::kU8, {5}, u, 5}}, o);
  st::File f = st::File::open(dir.file("m.safetensors"));
  EXPECT_EQ(f.header().data_start(), 4096u);
  EXPECT_EQ(f.file_size(), 4096u + 5);
  EXPECT_EQ(f.data(f.tensor("w"))[4], 5);
}

TEST(SafetensorsWrite, RejectsImpossibleInput) {
  uint8_t u[4] = {};
  livetrain::testing::TempDir dir;
  struct Case {
    std::vector<st::TensorRef> tensors;
    const char* expect;
  };
  std::vector<Case> cases = {
      {{{"", DType::kU8, {1}, u, 1}}, "empty tensor name"},
      {{{"__metadata__", DType::kU8, {1}, u, 1}}, "reserved"},
      {{{"w", DType::kU8, {1}, u, 1}, {"w", DType::kU8, {1}, u, 1}}, "tensor \"w\": name given twice"},
      {{{"w", DType::kF32, {2}, u, 4}}, "tensor \"w\": 4 bytes given, dtype and shape need 8"},
      {{{"w", DType::kF4, {3}, u, 2}}, "does not fill whole bytes"},
      {{{"w", DType::kU8, {4}, nullptr, 4}}, "no data"},
  };
  for (const Case& c : cases) {
    try {
      st::write_file(dir.file("bad.safetensors"), c.tensors);
      ADD_FAILURE() << c.expect;
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kInvalidArg);
      EXPECT_NE(std::string(e.what()).find(c.expect), std::string::npos) << e.what();
    }
    EXPECT_FALSE(livetrain::fs::exists(dir.file("bad.safetensors"))) << "nothing is written on bad input";
  }
  st::WriteOptions o;
  o.data_alignment = 12;
  EXPECT_THROW(st::write_file(dir.file("bad.safetensors"), {}, o), Error);
}
