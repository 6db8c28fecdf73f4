// The live-weights diff: the CPU reference (delta_diff_cpu) against the record encoder on random tensors,
// and the CUDA kernel (delta_diff_cuda) against the CPU reference byte for byte (skipped without a GPU).
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "livetrain/checkpoint/delta.hpp"
#include "livetrain/checkpoint/diff.hpp"
#include "livetrain/cuda.hpp"
#include "livetrain/error.hpp"

#ifdef LIVETRAIN_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace checkpoint = livetrain::checkpoint;
using livetrain::DType;

namespace {

struct Case {
  DType dtype;
  uint64_t units;
  double fraction;  // of elements changed
};

// Odd sizes (not multiples of 8, 32, the kernel's block or chunk), sparse (0.1%), medium (12%) and dense
// changes, bf16 and fp32 (plus 1- and 8-byte elements), an empty tensor and an unchanged one.
std::vector<Case> cases() {
  std::vector<Case> c;
  for (double f : {0.001, 0.12, 1.0}) {
    for (uint64_t units : {1ull, 31ull, 33ull, 257ull, 8191ull, 8193ull, 100003ull}) {
      c.push_back({DType::kBF16, units, f});
      c.push_back({DType::kF32, units, f});
    }
  }
  c.push_back({DType::kU8, 999, 0.3});
  c.push_back({DType::kF64, 515, 0.12});
  c.push_back({DType::kBF16, 0, 0.5});
  c.push_back({DType::kBF16, 40000, 0.0});
  return c;
}

struct Data {
  std::vector<std::vector<uint8_t>> old, now;
  std::vector<checkpoint::DiffTensor> tensors;  // host pointers
};

Data make(uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(0, 1);
  Data d;
  for (const Case& c : cases()) {
    const uint32_t unit = checkpoint::unit_bytes(c.dtype);
    std::vector<uint8_t> old(c.units * unit), now;
    for (auto& b : old) b = static_cast<uint8_t>(rng());
    now = old;
    for (uint64_t i = 0; i < c.units; ++i) {
      if (c.fraction >= 1.0 || u(rng) < c.fraction) now[i * unit + rng() % unit] ^= static_cast<uint8_t>(1 + rng() % 255);
    }
    d.old.push_back(std::move(old));
    d.now.push_back(std::move(now));
  }
  const auto cs = cases();
  for (size_t i = 0; i < cs.size(); ++i) {
    d.tensors.push_back({d.now[i].data(), d.old[i].data(), cs[i].units, checkpoint::unit_bytes(cs[i].dtype)});
  }
  return d;
}

// One tensor's output as a record, through the encoder the save path uses.
std::string record_of(const checkpoint::DiffOutput& out, size_t i, const Case& c) {
  std::string rec;
  checkpoint::encode_record_parts(rec, "t", c.dtype, c.units, out.changed[i], out.bitmaps.data + out.bitmap_offset[i],
                            out.values.data + out.value_offset[i]);
  return rec;
}

}  // namespace

TEST(CheckpointDiff, CpuMatchesTheRecordEncoder) {
  Data d = make(7);
  checkpoint::DiffOutput out;
  checkpoint::delta_diff_cpu(d.tensors, out);
  const auto cs = cases();
  for (size_t i = 0; i < cs.size(); ++i) {
    std::string want;
    uint64_t changed = checkpoint::encode_record(want, "t", cs[i].dtype, cs[i].units, d.old[i].data(), d.now[i].data());
    EXPECT_EQ(out.changed[i], changed) << i;
    EXPECT_EQ(record_of(out, i, cs[i]), want) << "tensor " << i << " (" << cs[i].units << " units)";
  }
}

TEST(CheckpointDiff, BadArgumentsAreClearErrors) {
  uint16_t a = 1, b = 2;
  checkpoint::DiffOutput out;
  EXPECT_THROW(checkpoint::delta_diff_cpu({{&a, &b, 1, 3}}, out), livetrain::Error);
  EXPECT_THROW(checkpoint::delta_diff_cpu({{nullptr, &b, 1, 2}}, out), livetrain::Error);
  checkpoint::delta_diff_cpu({}, out);
  EXPECT_TRUE(out.changed.empty());
}

#ifdef LIVETRAIN_WITH_CUDA
namespace {

struct DeviceCopy {
  void* p = nullptr;
  explicit DeviceCopy(const std::vector<uint8_t>& v) {
    EXPECT_EQ(cudaMalloc(&p, v.size() + 1), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(p, v.data(), v.size(), cudaMemcpyHostToDevice), cudaSuccess);
  }
  ~DeviceCopy() { cudaFree(p); }
};

void expect_same(const checkpoint::DiffOutput& gpu, const checkpoint::DiffOutput& cpu, const Data& d) {
  const auto cs = cases();
  ASSERT_EQ(gpu.changed.size(), cs.size());
  for (size_t i = 0; i < cs.size(); ++i) {
    ASSERT_EQ(gpu.changed[i], cpu.changed[i]) << "tensor " << i;
    const uint64_t bitmap_bytes = (cs[i].units + 7) / 8, value_bytes = cpu.changed[i] * d.tensors[i].unit;
    EXPECT_EQ(std::memcmp(gpu.bitmaps.data + gpu.bitmap_offset[i], cpu.bitmaps.data + cpu.bitmap_offset[i], bitmap_bytes), 0)
        << "bitmap of tensor " << i << " (" << cs[i].units << " units)";
    EXPECT_EQ(std::memcmp(gpu.values.data + gpu.value_offset[i], cpu.values.data + cpu.value_offset[i], value_bytes), 0)
        << "values of tensor " << i << " (" << cs[i].units << " units)";
    EXPECT_EQ(record_of(gpu, i, cs[i]), record_of(cpu, i, cs[i])) << i;
  }
}

}  // namespace

TEST(CheckpointDiffCuda, MatchesCpuWithOldOnDeviceAndPinnedHost) {
  if (livetrain::cuda::devices().empty()) GTEST_SKIP() << "no GPU visible";
  Data d = make(11);
  checkpoint::DiffOutput cpu;
  checkpoint::delta_diff_cpu(d.tensors, cpu);

  std::vector<std::unique_ptr<DeviceCopy>> now, old;
  std::vector<void*> pinned;
  std::vector<checkpoint::DiffTensor> on_device = d.tensors, old_pinned = d.tensors;
  for (size_t i = 0; i < d.tensors.size(); ++i) {
    now.push_back(std::make_unique<DeviceCopy>(d.now[i]));
    old.push_back(std::make_unique<DeviceCopy>(d.old[i]));
    void* h = nullptr;
    ASSERT_EQ(cudaMallocHost(&h, d.old[i].size() + 1), cudaSuccess);
    std::memcpy(h, d.old[i].data(), d.old[i].size());
    pinned.push_back(h);
    on_device[i].now = now.back()->p;
    on_device[i].old = old.back()->p;
    old_pinned[i].now = now.back()->p;
    old_pinned[i].old = h;
  }
  cudaStream_t stream;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  {
    checkpoint::DiffOutput gpu;
    checkpoint::delta_diff_cuda(on_device, gpu, stream);
    expect_same(gpu, cpu, d);
  }
  {
    checkpoint::DiffOutput gpu;
    checkpoint::delta_diff_cuda(old_pinned, gpu, stream);
    expect_same(gpu, cpu, d);
  }
  cudaStreamDestroy(stream);
  for (void* h : pinned) cudaFreeHost(h);
}

// The store's way: outputs in a reused workspace, and `old` (mapped page-locked host memory) moved to the
// recorded state by the kernel; a second diff then finds nothing. One tensor's values exceed the 256 MiB
// device scratch, so pass 2 runs in several groups.
TEST(CheckpointDiffCuda, WorkspaceAndUpdateOld) {
  if (livetrain::cuda::devices().empty()) GTEST_SKIP() << "no GPU visible";
  Data d = make(12);
  {
    const uint64_t units = (uint64_t{300} << 20) / 2 + 12345;  // ~300 MiB of bf16, every element changed
    std::vector<uint8_t> old(units * 2), now(units * 2);
    std::mt19937_64 rng(3);
    for (uint64_t i = 0; i < units; ++i) {
      const uint64_t r = rng();
      std::memcpy(&old[2 * i], &r, 2);
      const uint16_t x = static_cast<uint16_t>(r) ^ static_cast<uint16_t>(1 + (r >> 20) % 65535);
      std::memcpy(&now[2 * i], &x, 2);
    }
    d.old.push_back(std::move(old));
    d.now.push_back(std::move(now));
    d.tensors.push_back({d.now.back().data(), d.old.back().data(), units, 2});
    for (size_t i = 0; i + 1 < d.tensors.size(); ++i) d.tensors[i] = {d.now[i].data(), d.old[i].data(), d.tensors[i].units, d.tensors[i].unit};
  }
  checkpoint::DiffOutput cpu;
  checkpoint::delta_diff_cpu(d.tensors, cpu);

  std::vector<std::unique_ptr<DeviceCopy>> now;
  std::vector<void*> pinned;
  std::vector<checkpoint::DiffTensor> t = d.tensors;
  for (size_t i = 0; i < d.tensors.size(); ++i) {
    now.push_back(std::make_unique<DeviceCopy>(d.now[i]));
    void* h = nullptr;
    ASSERT_EQ(cudaHostAlloc(&h, d.old[i].size() + 1, cudaHostAllocMapped | cudaHostAllocPortable), cudaSuccess);
    std::memcpy(h, d.old[i].data(), d.old[i].size());
    pinned.push_back(h);
    t[i].now = now.back()->p;
    t[i].old = h;
  }
  checkpoint::DiffWorkspace ws;
  checkpoint::DiffOutput gpu;
  checkpoint::delta_diff_cuda(t, gpu, nullptr, &ws, true);
  ASSERT_EQ(gpu.changed.size(), d.tensors.size());
  for (size_t i = 0; i < d.tensors.size(); ++i) {
    ASSERT_EQ(gpu.changed[i], cpu.changed[i]) << i;
    const uint64_t bitmap_bytes = (d.tensors[i].units + 7) / 8, value_bytes = cpu.changed[i] * d.tensors[i].unit;
    EXPECT_EQ(std::memcmp(gpu.bitmaps.data + gpu.bitmap_offset[i], cpu.bitmaps.data + cpu.bitmap_offset[i], bitmap_bytes), 0) << i;
    EXPECT_EQ(std::memcmp(gpu.values.data + gpu.value_offset[i], cpu.values.data + cpu.value_offset[i], value_bytes), 0) << i;
    EXPECT_EQ(std::memcmp(pinned[i], d.now[i].data(), d.now[i].size()), 0) << "old was moved to the recorded state: " << i;
  }
  checkpoint::DiffOutput again;
  checkpoint::delta_diff_cuda(t, again, nullptr, &ws, true);
  for (size_t i = 0; i < d.tensors.size(); ++i) EXPECT_EQ(again.changed[i], 0u) << i;
  EXPECT_EQ(again.values.data, gpu.values.data) << "the workspace is reused";
  for (void* h : pinned) cudaFreeHost(h);
}
#endif
