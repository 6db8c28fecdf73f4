// The live-weights diff: the CPU reference (delta_diff_cpu) against the record encoder on random tensors,
// and the CUDA kernel (delta_diff_cuda) against the CPU reference byte for byte (skipped without a GPU).
#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "checkpoint/digest.hpp"
#include "livetrain/checkpoint/delta.hpp"
#include "livetrain/checkpoint/diff.hpp"
#include "livetrain/cuda.hpp"
#include "livetrain/error.hpp"
#include "livetrain/tuning.hpp"

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

// The chunk digests behind checkpoint.digests: a change of any one byte changes its chunk's digest and no
// other; equal bytes give equal digests wherever they are; the length counts (trailing zeros differ).
TEST(CheckpointDiff, ChunkDigests) {
  std::mt19937_64 rng(4);
  std::vector<uint8_t> a(3 * checkpoint::kDiffChunk * 2 + 37);
  for (auto& b : a) b = static_cast<uint8_t>(rng());
  std::vector<uint8_t> b = a;
  const uint64_t units = a.size() / 2;
  std::vector<checkpoint::DiffTensor> t = {{a.data(), b.data(), units, 2}};
  std::vector<uint64_t> now, old;
  checkpoint::chunk_digests_cpu(t, false, now);
  checkpoint::chunk_digests_cpu(t, true, old);
  ASSERT_EQ(now.size(), 4u);
  EXPECT_EQ(now, old);
  for (size_t pos : {size_t{0}, size_t{7}, size_t{8}, checkpoint::kDiffChunk * 2 - 1, checkpoint::kDiffChunk * 2, a.size() - 2}) {
    for (uint8_t x : {uint8_t{1}, uint8_t{0x80}}) {
      std::vector<uint8_t> c = a;
      c[pos] ^= x;
      std::vector<uint64_t> d;
      checkpoint::chunk_digests_cpu({{c.data(), b.data(), units, 2}}, false, d);
      for (size_t k = 0; k < d.size(); ++k) {
        EXPECT_EQ(d[k] != now[k], k == pos / (checkpoint::kDiffChunk * 2)) << "byte " << pos << " chunk " << k;
      }
    }
  }
  // Swapping two words is a change too (each word's term depends on its position).
  std::vector<uint8_t> c = a;
  std::swap_ranges(c.begin(), c.begin() + 8, c.begin() + 8);
  std::vector<uint64_t> d;
  checkpoint::chunk_digests_cpu({{c.data(), b.data(), units, 2}}, false, d);
  EXPECT_NE(d[0], now[0]);
  std::vector<uint8_t> zeros(16, 0);
  EXPECT_NE(checkpoint::chunk_digest(zeros.data(), 8), checkpoint::chunk_digest(zeros.data(), 16));
  EXPECT_NE(checkpoint::chunk_digest(zeros.data(), 15), checkpoint::chunk_digest(zeros.data(), 16));
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

// The store's layout of a diff's inputs: `now` copied to the device, `old` to mapped page-locked host
// memory (freed with the object).
struct StoreLayout {
  std::vector<std::unique_ptr<DeviceCopy>> now;
  std::vector<void*> pinned;
  std::vector<checkpoint::DiffTensor> t;
  explicit StoreLayout(const Data& d) : t(d.tensors) {
    for (size_t i = 0; i < t.size(); ++i) {
      now.push_back(std::make_unique<DeviceCopy>(d.now[i]));
      void* h = nullptr;
      EXPECT_EQ(cudaHostAlloc(&h, d.old[i].size() + 1, cudaHostAllocMapped | cudaHostAllocPortable), cudaSuccess);
      std::memcpy(h, d.old[i].data(), d.old[i].size());
      pinned.push_back(h);
      t[i].now = now.back()->p;
      t[i].old = h;
    }
  }
  ~StoreLayout() {
    for (void* h : pinned) cudaFreeHost(h);
  }
  StoreLayout(const StoreLayout&) = delete;
  StoreLayout& operator=(const StoreLayout&) = delete;
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

  StoreLayout layout(d);
  const std::vector<checkpoint::DiffTensor>& t = layout.t;
  const std::vector<void*>& pinned = layout.pinned;
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
}

// The GPU digests equal the CPU's, for `now` in device memory and `old` in mapped page-locked memory, on
// odd sizes, every element size and a misaligned start.
TEST(CheckpointDiffCuda, ChunkDigestsMatchCpu) {
  if (livetrain::cuda::devices().empty()) GTEST_SKIP() << "no GPU visible";
  Data d = make(21);
  std::vector<uint64_t> cpu_now, cpu_old;
  checkpoint::chunk_digests_cpu(d.tensors, false, cpu_now);
  checkpoint::chunk_digests_cpu(d.tensors, true, cpu_old);
  std::vector<std::unique_ptr<DeviceCopy>> now;
  std::vector<void*> pinned;
  std::vector<checkpoint::DiffTensor> t = d.tensors;
  for (size_t i = 0; i < t.size(); ++i) {
    std::vector<uint8_t> shifted(d.now[i].size() + t[i].unit);  // starts one element in: not 8-byte aligned
    std::memcpy(shifted.data() + t[i].unit, d.now[i].data(), d.now[i].size());
    now.push_back(std::make_unique<DeviceCopy>(shifted));
    void* h = nullptr;
    ASSERT_EQ(cudaHostAlloc(&h, d.old[i].size() + 1, cudaHostAllocMapped), cudaSuccess);
    std::memcpy(h, d.old[i].data(), d.old[i].size());
    pinned.push_back(h);
    t[i].now = static_cast<uint8_t*>(now.back()->p) + t[i].unit;
    t[i].old = h;
  }
  std::vector<uint64_t> gpu_now, gpu_old;
  checkpoint::chunk_digests_cuda(t, false, gpu_now, nullptr);
  checkpoint::chunk_digests_cuda(t, true, gpu_old, nullptr);
  EXPECT_EQ(gpu_now, cpu_now);
  EXPECT_EQ(gpu_old, cpu_old);
  for (void* h : pinned) cudaFreeHost(h);
}

namespace {

// Knob settings of the GPU diff; each must give the CPU's output.
struct Variant {
  int diff, digests, group_mib;
};
std::string name_of(const Variant& v) {
  return "diff=" + std::to_string(v.diff) + " digests=" + std::to_string(v.digests) + " group_mib=" + std::to_string(v.group_mib);
}
std::vector<Variant> variants() {
  std::vector<Variant> out;
  for (int diff : {0, 1}) {
    for (int digests : {0, 1}) {
      for (int mib : {1, 256}) out.push_back({diff, digests, mib});
    }
  }
  return out;
}

struct KnobScope {
  explicit KnobScope(const Variant& v) {
    livetrain::tuning::reset();
    livetrain::tuning::set("checkpoint.diff", v.diff);
    livetrain::tuning::set("checkpoint.digests", v.digests);
    livetrain::tuning::set("checkpoint.group_mib", v.group_mib);
  }
  ~KnobScope() { livetrain::tuning::reset(); }
};

}  // namespace

// The store's way under every variant: a workspace whose values buffer is too small (the one-pass
// diff then outgrows it mid-call), `old` in mapped page-locked memory moved along, DiffReady seeing each
// tensor complete exactly when it says, then a second diff that finds nothing (with digests: without
// reading `old`), then a change to two tensors only.
TEST(CheckpointDiffCuda, EveryVariantMatchesCpuAndReportsTensorsAsTheyComplete) {
  if (livetrain::cuda::devices().empty()) GTEST_SKIP() << "no GPU visible";
  for (const Variant& v : variants()) {
    SCOPED_TRACE(name_of(v));
    KnobScope knobs(v);
    Data d = make(31);
    {  // two tensors of ~1.5 MiB, so that 1 MiB groups split them
      std::mt19937_64 rng(8);
      for (int k = 0; k < 2; ++k) {
        const uint64_t units = 777777;
        std::vector<uint8_t> old(units * 2), now;
        for (auto& b : old) b = static_cast<uint8_t>(rng());
        now = old;
        for (uint64_t i = 0; i < units; i += 1 + rng() % 3) now[2 * i] ^= static_cast<uint8_t>(1 + rng() % 7);
        d.old.push_back(std::move(old));
        d.now.push_back(std::move(now));
        d.tensors.push_back({nullptr, nullptr, units, 2});
      }
      for (size_t i = 0; i < d.tensors.size(); ++i) d.tensors[i] = {d.now[i].data(), d.old[i].data(), d.tensors[i].units, d.tensors[i].unit};
    }
    checkpoint::DiffOutput cpu;
    checkpoint::delta_diff_cpu(d.tensors, cpu);

    StoreLayout layout(d);
    const std::vector<checkpoint::DiffTensor>& t = layout.t;
    const auto& now = layout.now;
    const std::vector<void*>& pinned = layout.pinned;
    checkpoint::DiffWorkspace ws;
    checkpoint::diff_workspace_reserve(ws, 1 << 22, 64);
    checkpoint::DiffOutput gpu;
    size_t seen = 0;
    auto ready = [&](size_t done, const uint8_t* bitmaps, const uint8_t* values) {
      EXPECT_GE(done, seen);
      EXPECT_LE(done, t.size());
      for (size_t i = seen; i < done; ++i) {  // complete when announced, at the addresses given
        ASSERT_EQ(gpu.changed[i], cpu.changed[i]) << i;
        EXPECT_EQ(std::memcmp(bitmaps + gpu.bitmap_offset[i], cpu.bitmaps.data + cpu.bitmap_offset[i], (t[i].units + 7) / 8), 0) << i;
        EXPECT_EQ(std::memcmp(values + gpu.value_offset[i], cpu.values.data + cpu.value_offset[i], cpu.changed[i] * t[i].unit), 0) << i;
      }
      seen = done;
    };
    checkpoint::delta_diff_cuda(t, gpu, nullptr, &ws, true, ready);
    EXPECT_EQ(seen, t.size());
    for (size_t i = 0; i < t.size(); ++i) {
      ASSERT_EQ(gpu.changed[i], cpu.changed[i]) << i;
      EXPECT_EQ(std::memcmp(gpu.values.data + gpu.value_offset[i], cpu.values.data + cpu.value_offset[i], cpu.changed[i] * t[i].unit), 0) << i;
      EXPECT_EQ(std::memcmp(pinned[i], d.now[i].data(), d.now[i].size()), 0) << "old was moved to the recorded state: " << i;
    }
    EXPECT_EQ(ws.digests != nullptr, v.digests == 1);
    checkpoint::DiffOutput again;
    seen = 0;
    checkpoint::delta_diff_cuda(t, again, nullptr, &ws, true, [&](size_t done, const uint8_t*, const uint8_t*) { seen = done; });
    EXPECT_EQ(seen, t.size());
    for (size_t i = 0; i < t.size(); ++i) EXPECT_EQ(again.changed[i], 0u) << i;
    // Change one element of tensor 3 and the last element of the last tensor, on the device only.
    const size_t last = t.size() - 1;
    for (size_t i : {size_t{3}, last}) {
      if (t[i].units == 0) continue;
      const uint64_t e = i == last ? t[i].units - 1 : 0;
      uint8_t byte = d.now[i][e * t[i].unit] ^ 0x10;
      ASSERT_EQ(cudaMemcpy(static_cast<uint8_t*>(now[i]->p) + e * t[i].unit, &byte, 1, cudaMemcpyHostToDevice), cudaSuccess);
    }
    checkpoint::DiffOutput third;
    checkpoint::delta_diff_cuda(t, third, nullptr, &ws, true);
    for (size_t i = 0; i < t.size(); ++i) {
      EXPECT_EQ(third.changed[i], (i == 3 || i == last) && t[i].units ? 1u : 0u) << i;
    }
  }
}
#endif
