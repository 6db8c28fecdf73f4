// Model directories: single-file and sharded writes, lookup across shards, and index validation.
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "helpers.hpp"
#include "livetrain/error.hpp"
#include "livetrain/json.hpp"
#include "livetrain/safetensors.hpp"

using livetrain::DType;
using livetrain::Error;
using livetrain::ErrorCode;
namespace st = livetrain::safetensors;

namespace {

std::vector<float> buf(size_t n, float base) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = base + static_cast<float>(i);
  return v;
}

std::string error_of(const std::string& path) {
  try {
    st::Model::open(path);
  } catch (const Error& e) {
    return e.what();
  }
  return "accepted";
}

}  // namespace

TEST(Model, WritesShardsAndFindsEveryTensor) {
  auto a = buf(100, 0), b = buf(300, 1000), c = buf(50, 5000);
  std::vector<st::TensorRef> tensors = {
      {"layers.0.w", DType::kF32, {10, 10}, a.data(), 400},
      {"layers.1.w", DType::kF32, {300}, b.data(), 1200},
      {"norm", DType::kF32, {50}, c.data(), 200},
  };
  livetrain::testing::TempDir dir;
  auto files = st::write_model(dir.path(), tensors, 1000);
  EXPECT_EQ(files, (std::vector<std::string>{"model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                                             "model-00003-of-00003.safetensors", "model.safetensors.index.json"}));
  st::Model m = st::Model::open(dir.path());
  EXPECT_TRUE(m.sharded());
  EXPECT_EQ(m.size(), 3u);
  EXPECT_EQ(m.total_bytes(), 1800u);
  EXPECT_EQ(m.names(), (std::vector<std::string>{"layers.0.w", "layers.1.w", "norm"}));
  const auto& e = m.tensor("layers.1.w");
  EXPECT_EQ(livetrain::fs::basename(e.file->path()), "model-00002-of-00003.safetensors");
  EXPECT_EQ(std::memcmp(e.file->data(*e.info), b.data(), 1200), 0);
  auto index = livetrain::json::parse(livetrain::fs::read_file(dir.file("model.safetensors.index.json")));
  EXPECT_EQ(*index.find("metadata")->find("total_size")->as_u64(), 1800u);

  livetrain::testing::TempDir single;
  EXPECT_EQ(st::write_model(single.path(), tensors, 1 << 20), (std::vector<std::string>{"model.safetensors"}));
  st::Model m1 = st::Model::open(single.path());
  EXPECT_FALSE(m1.sharded());
  EXPECT_EQ(m1.size(), 3u);
  // A file path opens as a one-file model too.
  EXPECT_EQ(st::Model::open(single.file("model.safetensors")).size(), 3u);
}

TEST(Model, RejectsBadIndexesWithClearErrors) {
  auto a = buf(4, 0);
  livetrain::testing::TempDir dir;
  st::write_file(dir.file("s1.safetensors"), {{"w", DType::kF32, {4}, a.data(), 16}});
  auto index_with = [&](const std::string& weight_map) {
    livetrain::fs::write_file_atomic(dir.file("model.safetensors.index.json"),
                                     "{\"metadata\":{},\"weight_map\":" + weight_map + "}");
    return error_of(dir.path());
  };
  EXPECT_NE(index_with(R"({"w":"s1.safetensors"})").find("accepted"), std::string::npos);
  EXPECT_NE(index_with(R"({"w":"missing.safetensors"})").find("missing.safetensors: no such file"), std::string::npos);
  EXPECT_NE(index_with(R"({"v":"s1.safetensors"})")
                .find("tensor \"v\" is mapped to s1.safetensors, which does not contain it"),
            std::string::npos);
  EXPECT_NE(index_with(R"({"w":"../s1.safetensors"})").find("not a file name inside the model directory"),
            std::string::npos);
  EXPECT_NE(index_with(R"({"w":"s1.safetensors","w":"s1.safetensors"})").find("lists tensor \"w\" twice"),
            std::string::npos);
  EXPECT_NE(index_with(R"(["w"])").find("missing object \"weight_map\""), std::string::npos);
  livetrain::fs::write_file_atomic(dir.file("model.safetensors.index.json"), "{\"weight_map\":");
  EXPECT_NE(error_of(dir.path()).find("model.safetensors.index.json: unexpected end of input"), std::string::npos);

  livetrain::testing::TempDir empty;
  EXPECT_NE(error_of(empty.path()).find("neither model.safetensors nor model.safetensors.index.json"),
            std::string::npos);
}
