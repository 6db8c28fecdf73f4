// The manifest format: golden bytes of the canonical writer, and a strict parser that names the field of
// every problem (corrupt, truncated, unknown dtype, out-of-buffer extents, overflow, unknown fields).
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <string>

#include "helpers.hpp"
#include "livetrain/error.hpp"
#include "livetrain/sharing.hpp"

using livetrain::DType;
using livetrain::Error;
using livetrain::ErrorCode;
namespace json = livetrain::json;
namespace sh = livetrain::sharing;

namespace {

sh::Manifest sample() {
  sh::Manifest m;
  m.owner = {4242, 987654, "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"};
  m.model.path = "/models/tiny-llama";
  m.model.engine = "reference";
  m.model.config = json::parse(R"({"model_type":"llama","hidden_size":8})");
  sh::BufferDesc shm;
  shm.kind = sh::BufferKind::kShm;
  shm.shm_name = "/livetrain-4242-0";
  shm.size = 4096;
  sh::BufferDesc ipc;
  ipc.kind = sh::BufferKind::kCudaIpc;
  ipc.ipc_handle = "deadbeef" + std::string(120, '0');
  ipc.device_uuid = "GPU-01234567-89ab-cdef-0123-456789abcdef";
  ipc.size = 2097152;
  m.buffers = {shm, ipc};
  m.tensors.push_back(sh::TensorDesc{"model.norm.weight", DType::kBF16, {8}, {1}, 0, 0});
  m.tensors.push_back(sh::TensorDesc{"lm_head.weight", DType::kF32, {16, 8}, {8, 1}, 1, 512});
  return m;
}

// Version 1 as specified in docs/manifest.md; a change here is a format change.
const char* kGolden = R"GOLDEN({
  "magic": "livetrain-manifest",
  "version": 1,
  "owner": {
    "pid": 4242,
    "start_time": 987654,
    "boot_id": "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
  },
  "model": {
    "path": "/models/tiny-llama",
    "engine": "reference",
    "tp_rank": 0,
    "tp_size": 1,
    "config": {
      "model_type": "llama",
      "hidden_size": 8
    }
  },
  "buffers": [
    {
      "kind": "shm",
      "name": "/livetrain-4242-0",
      "size": 4096
    },
    {
      "kind": "cuda_ipc",
      "handle": "deadbeef000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
      "device_uuid": "GPU-01234567-89ab-cdef-0123-456789abcdef",
      "size": 2097152
    }
  ],
  "tensors": [
    {
      "name": "model.norm.weight",
      "dtype": "BF16",
      "shape": [
        8
      ],
      "strides": [
        1
      ],
      "buffer": 0,
      "offset": 0
    },
    {
      "name": "lm_head.weight",
      "dtype": "F32",
      "shape": [
        16,
        8
      ],
      "strides": [
        8,
        1
      ],
      "buffer": 1,
      "offset": 512
    }
  ]
}

)GOLDEN";

// Replaces the first occurrence of `from` in the golden text and expects the parser to fail with `code`
// and a message containing `needle`.
void expect_rejected(const std::string& from, const std::string& to, const std::string& needle,
                     ErrorCode code = ErrorCode::kFormat) {
  std::string text = kGolden;
  size_t at = text.find(from);
  ASSERT_NE(at, std::string::npos) << from;
  text.replace(at, from.size(), to);
  try {
    sh::manifest_parse(text, "m.json");
    FAIL() << "accepted after replacing " << from << " by " << to;
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), code) << e.what();
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    EXPECT_EQ(std::string(e.what()).rfind("m.json", 0), 0u) << e.what();
  }
}

}  // namespace

TEST(Manifest, GoldenBytes) { EXPECT_EQ(sh::manifest_serialize(sample()), kGolden); }

TEST(Manifest, RoundTrip) {
  sh::Manifest m = sh::manifest_parse(kGolden);
  EXPECT_EQ(sh::manifest_serialize(m), kGolden);
  EXPECT_EQ(m.owner.pid, 4242u);
  EXPECT_EQ(m.buffers[1].kind, sh::BufferKind::kCudaIpc);
  ASSERT_NE(m.find("lm_head.weight"), nullptr);
  EXPECT_EQ(m.find("lm_head.weight")->offset, 512u);
  EXPECT_EQ(m.model.config.find("hidden_size")->as_u64(), 8u);
}

// model.group is optional: written only when set (the golden bytes above have none), read back when present.
TEST(Manifest, GroupOfTensorParallelRanks) {
  sh::Manifest m = sample();
  m.model.tp_rank = 1;
  m.model.tp_size = 2;
  m.model.group = "run-7f3a";
  std::string text = sh::manifest_serialize(m);
  EXPECT_NE(text.find("\"tp_size\": 2,\n    \"group\": \"run-7f3a\",\n    \"config\""), std::string::npos) << text;
  EXPECT_EQ(sh::manifest_parse(text).model.group, "run-7f3a");
  EXPECT_EQ(sh::manifest_parse(kGolden).model.group, "");
  std::string bad = text;
  bad.replace(bad.find("\"run-7f3a\""), 10, "7");
  try {
    sh::manifest_parse(bad);
    ADD_FAILURE() << "a group that is not a string";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.group: expected a string"), std::string::npos) << e.what();
  }
}

TEST(Manifest, WriteIsAtomicAndPrivate) {
  livetrain::testing::TempDir dir;
  std::string path = dir.file("m.json");
  sh::manifest_write(path, sample());
  struct stat st {};
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);  // the file names capabilities to the engine's memory
  EXPECT_EQ(livetrain::testing::read_bytes(path), kGolden);
  EXPECT_EQ(sh::manifest_serialize(sh::manifest_read(path)), kGolden);
}

TEST(Manifest, TruncatedAtEveryLengthIsRejected) {
  std::string text = kGolden;
  // Every strict prefix either is not JSON or misses a field; none may parse or crash.
  for (size_t n = 0; n < text.rfind('}'); ++n) {
    EXPECT_THROW(sh::manifest_parse(text.substr(0, n)), Error) << n;
  }
}

TEST(Manifest, CorruptBytes) {
  EXPECT_THROW(sh::manifest_parse(""), Error);
  EXPECT_THROW(sh::manifest_parse("\x80\x81"), Error);
  EXPECT_THROW(sh::manifest_parse("[]"), Error);
  expect_rejected("livetrain-manifest", "safetensors", "not a livetrain manifest");
  expect_rejected("\"version\": 1", "\"version\": 2", "version 2 is not supported", ErrorCode::kUnsupported);
  expect_rejected("\"version\": 1", "\"version\": 1.0", "version");
  expect_rejected("\"pid\": 4242", "\"pid\": -4242", "owner.pid");
  expect_rejected("\"pid\": 4242", "\"pid\": \"4242\"", "owner.pid");
  expect_rejected("\"tp_size\": 1", "\"tp_size\": 0", "model.tp_size");
  expect_rejected("\"config\": {", "\"config\": 5, \"x\": {", "model.config: expected an object, found number");
}

TEST(Manifest, UnknownDtype) {
  expect_rejected("\"BF16\"", "\"Q4_K\"", "tensors[0].dtype: unknown dtype \"Q4_K\" (tensor \"model.norm.weight\")");
  expect_rejected("\"BF16\"", "\"F4\"", "tensors[0].dtype");  // packed: no element address
}

TEST(Manifest, MissingUnknownAndRepeatedFields) {
  expect_rejected("\"boot_id\"", "\"bootid\"", "owner.boot_id: missing");
  expect_rejected("\"boot_id\"", "\"extra\": true, \"boot_id\"", "owner.extra: unknown field");
  expect_rejected("\"offset\": 512", "\"offset\": 512, \"offset\": 512", "tensors[1].offset: repeated key");
  expect_rejected("\"kind\": \"shm\",", "", "buffers[0].kind: missing");
  expect_rejected("\"kind\": \"shm\"", "\"kind\": \"file\"", "unknown buffer kind \"file\"");
  expect_rejected("\"tensors\"", "\"tensor\"", "tensors: missing");
  expect_rejected("\"tensors\"", "\"tensorz\": [], \"tensors\"", "tensorz: unknown field");
}

TEST(Manifest, BuffersAreValidated) {
  expect_rejected("/livetrain-4242-0", "/../etc/passwd", "buffers[0].name");
  expect_rejected("/livetrain-4242-0", "livetrain", "buffers[0].name");
  expect_rejected("deadbeef", "deadbee", "buffers[1].handle");
  expect_rejected("deadbeef", "DEADBEEF", "buffers[1].handle");
  expect_rejected("GPU-01234567", "GPU-0123456z", "buffers[1].device_uuid");
}

TEST(Manifest, TensorsLieInsideTheirBuffers) {
  // norm: 8 BF16 = 16 bytes in a 4096-byte segment.
  expect_rejected("\"offset\": 0", "\"offset\": 4082", "tensors[0]: tensor \"model.norm.weight\" spans bytes [4082");
  expect_rejected("\"offset\": 0", "\"offset\": 1", "not a multiple of the element size 2");
  expect_rejected("\"buffer\": 0", "\"buffer\": 2", "tensors[0].buffer");
  expect_rejected("\"strides\": [\n        1\n      ]", "\"strides\": [\n        4096\n      ]", "tensors[0]");
  expect_rejected("\"strides\": [\n        1\n      ]", "\"strides\": []", "tensors[0].strides");
  expect_rejected("\"shape\": [\n        8\n      ]", "\"shape\": [\n        18446744073709551615\n      ]",
                  "overflows", ErrorCode::kFormat);
  expect_rejected("\"lm_head.weight\"", "\"model.norm.weight\"",
                  "tensors[1].name: \"model.norm.weight\" appears twice");
}

TEST(Manifest, EmptyTensorHasNoExtent) {
  sh::TensorDesc t{"e", DType::kF32, {0, 5}, {5, 1}, 0, 4096};
  EXPECT_EQ(sh::tensor_extent_bytes(t), 0u);
  sh::Manifest m = sample();
  m.tensors.push_back(t);
  EXPECT_NO_THROW(sh::manifest_validate(m));                       // offset == size is fine for zero bytes
  sh::TensorDesc strided{"s", DType::kF16, {3, 4}, {1, 3}, 0, 0};  // a transposed view
  EXPECT_EQ(sh::tensor_extent_bytes(strided), 24u);
  EXPECT_EQ(sh::contiguous_strides({2, 3, 4}), (std::vector<uint64_t>{12, 4, 1}));
}
