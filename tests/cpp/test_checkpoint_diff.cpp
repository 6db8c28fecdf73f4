// The live-weights diff: the CPU reference (delta_diff_cpu) against the record encoder on random tensors,
// and the CUDA kernel (delta_diff_cuda) against the CPU reference byte for byte (skipped without a GPU).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "checkpoint/diff_plan.hpp"
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
      if (c.fraction >= 1.0 || u(rng) < c.fraction)
        now[i * unit + rng() % unit] ^= static_cast<uint8_t>(1 + rng() % 255);
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
  for (size_t pos :
       {size_t{0}, size_t{7}, size_t{8}, checkpoint::kDiffChunk * 2 - 1, checkpoint::kDiffChunk * 2, a.size() - 2}) {
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

// Regression test for the GPU diff's cudaErrorMisalignedAddress on the 27b shapes (issue #15's sweep): a
// group of chunks may start inside a tensor, at any multiple of its element size, and the group's values
// went to device scratch from offset 0, so a fp32 tensor after a split bf16 one with an odd changed count
// was written at an address ≡ 2 mod 4. This checks the host-side plan (diff_plan.hpp) the kernels follow:
// every value and every staged element of every group lands at a multiple of its element size in
// device memory, within the scratch the kernels are given, for odd sizes, unaligned tensor addresses,
// small groups, skipped (digest-matched) chunks and random changed counts.
TEST(CheckpointDiff, GroupPlanKeepsEveryDeviceAccessAligned) {
  struct Shape {
    uint64_t units;
    uint32_t unit;
  };
  // Qwen3.5-27B-like: split bf16 matrices of odd size, fp32 A_log [48], bf16 dt_bias [48], conv1d [C,1,4],
  // norms of odd size, plus 1- and 8-byte elements and an empty tensor.
  const std::vector<Shape> shapes = {{777777, 2}, {48, 4},  {48, 2},  {10240 * 4, 2}, {5121, 4}, {0, 2},
                                     {600001, 2}, {515, 8}, {999, 1}, {262147, 4},    {33, 2},   {48, 4}};
  std::vector<checkpoint::DiffTensor> tensors;
  uintptr_t at = uintptr_t{1} << 32;
  for (size_t i = 0; i < shapes.size(); ++i) {
    // Unaligned to 16 (one element past a 256-byte boundary) but aligned to the element, as the
    // kernels require; never dereferenced here.
    const uintptr_t p = (at + 255) / 256 * 256 + shapes[i].unit;
    tensors.push_back({reinterpret_cast<const void*>(p), reinterpret_cast<const void*>(p + (uintptr_t{1} << 36)),
                       shapes[i].units, shapes[i].unit});
    at = p + shapes[i].units * shapes[i].unit;
  }
  const size_t n = tensors.size();
  uint64_t chunks = 0, words = 0;
  const auto table = checkpoint::diff_chunk_table(tensors, chunks, words);
  auto tensor_of = [&](uint64_t c) {
    size_t i = 0;
    while (i + 1 < n && table[i + 1].first_chunk <= c) ++i;
    return i;
  };
  std::mt19937_64 rng(15);
  uint64_t unshifted_misaligned = 0;  // accesses the plan before the fix would have made
  for (uint64_t group_bytes : {uint64_t{1} << 16, uint64_t{1} << 20, (uint64_t{1} << 20) + 6}) {
    for (int skip : {0, 1}) {
      for (int trial = 0; trial < 8; ++trial) {
        SCOPED_TRACE("group_bytes " + std::to_string(group_bytes) + " skip " + std::to_string(skip) + " trial " +
                     std::to_string(trial));
        std::vector<uint8_t> used(chunks);
        for (auto& u : used) u = !skip || rng() % 3 != 0;
        std::vector<uint32_t> counts(chunks);
        for (uint64_t c = 0; c < chunks; ++c) {
          const auto& t = table[tensor_of(c)];
          const uint64_t len = std::min(checkpoint::kDiffChunk, t.units - (c - t.first_chunk) * checkpoint::kDiffChunk);
          counts[c] = used[c] ? static_cast<uint32_t>(rng() % (len + 1)) : 0;
        }
        std::vector<uint64_t> stage_offsets(chunks, 0), offsets(chunks, 0);
        const auto groups = checkpoint::diff_groups(table, chunks, group_bytes, stage_offsets,
                                                    [&](uint64_t c) { return used[c] != 0; });
        uint64_t slot_bytes = 16;
        for (const auto& g : groups) slot_bytes = std::max(slot_bytes, g.staged);
        checkpoint::DiffOutput out;
        out.changed.assign(n, 0);
        out.value_offset.assign(n, 0);
        checkpoint::DiffValuePlan plan(table, chunks, offsets.data(), out);
        ASSERT_FALSE(groups.empty());
        EXPECT_EQ(groups.front().c0, 0u);
        EXPECT_EQ(groups.back().c1, chunks);
        for (size_t k = 0; k < groups.size(); ++k) {
          const auto& g = groups[k];
          if (k) EXPECT_EQ(g.c0, groups[k - 1].c1);
          const uint64_t base = plan.total;  // the one-pass diff's base; the two-pass one's is offsets[g.c0]
          plan.place(g.c0, g.c1, counts.data());
          if (k + 1 == groups.size()) plan.place_rest();
          if (g.c1 == g.c0) continue;
          // (first value's host offset, scratch bytes) as delta_cuda.cu has them: one pass, two passes.
          const std::pair<uint64_t, uint64_t> modes[2] = {
              {base, slot_bytes + 8 * n + checkpoint::kDiffScratchAlign},
              {offsets[g.c0], group_bytes + 8 * n + checkpoint::kDiffScratchAlign}};
          for (const auto& [first, cap] : modes) {
            const uint64_t shift = checkpoint::diff_value_shift(first);
            for (uint64_t c = g.c0; c < g.c1; ++c) {
              const uint32_t unit = table[tensor_of(c)].unit;
              ASSERT_GE(offsets[c], first);
              const uint64_t dev = shift + offsets[c] - first;
              ASSERT_EQ(dev % unit, 0u) << "values of chunk " << c << " (tensor " << tensor_of(c)
                                        << ") at scratch offset " << dev;
              ASSERT_LE(shift + plan.ends[c] - first, cap) << "chunk " << c;
              if (counts[c] && (offsets[c] - first) % unit) ++unshifted_misaligned;
            }
          }
          for (uint64_t c = g.c0; c < g.c1; ++c) {
            if (!used[c]) continue;
            const auto& t = table[tensor_of(c)];
            const uint64_t begin = (c - t.first_chunk) * checkpoint::kDiffChunk;
            const uint64_t bytes = (std::min(begin + checkpoint::kDiffChunk, t.units) - begin) * t.unit;
            ASSERT_EQ(stage_offsets[c] % t.unit, 0u) << "staged chunk " << c;
            ASSERT_LE(stage_offsets[c] + bytes, g.staged) << "staged chunk " << c;
            ASSERT_TRUE(g.c1 - g.c0 == 1 || g.staged <= group_bytes + checkpoint::kDiffScratchAlign) << "group " << k;
          }
          for (const auto& sg : g.segments) EXPECT_EQ(sg.stage_offset % checkpoint::kDiffScratchAlign, 0u);
        }
        for (size_t i = 0; i < n; ++i) {
          EXPECT_EQ(out.value_offset[i] % 8, 0u) << "tensor " << i;
          uint64_t want = 0;
          for (uint64_t c = table[i].first_chunk; c < (i + 1 < n ? table[i + 1].first_chunk : chunks); ++c)
            want += counts[c];
          EXPECT_EQ(out.changed[i], want) << "tensor " << i;
        }
      }
    }
  }
  EXPECT_GT(unshifted_misaligned, 0u) << "the shapes no longer reproduce the case the shift exists for";
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
    EXPECT_EQ(
        std::memcmp(gpu.bitmaps.data + gpu.bitmap_offset[i], cpu.bitmaps.data + cpu.bitmap_offset[i], bitmap_bytes), 0)
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
    for (size_t i = 0; i + 1 < d.tensors.size(); ++i)
      d.tensors[i] = {d.now[i].data(), d.old[i].data(), d.tensors[i].units, d.tensors[i].unit};
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
    EXPECT_EQ(
        std::memcmp(gpu.bitmaps.data + gpu.bitmap_offset[i], cpu.bitmaps.data + cpu.bitmap_offset[i], bitmap_bytes), 0)
        << i;
    EXPECT_EQ(std::memcmp(gpu.values.data + gpu.value_offset[i], cpu.values.data + cpu.value_offset[i], value_bytes), 0)
        << i;
    EXPECT_EQ(std::memcmp(pinned[i], d.now[i].data(), d.now[i].size()), 0)
        << "old was moved to the recorded state: " << i;
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
  int diff, digests, group_mib, slots;
};
std::string name_of(const Variant& v) {
  return "diff=" + std::to_string(v.diff) + " digests=" + std::to_string(v.digests) +
         " group_mib=" + std::to_string(v.group_mib) + " diff_slots=" + std::to_string(v.slots);
}
// checkpoint.diff 2 with 1 MiB groups also under 2 and 3 slots (more groups than slots: each slot's buffers
// are reused while other groups are in flight), with 256 MiB groups under the default 4 (fewer groups than
// slots).
std::vector<Variant> variants() {
  std::vector<Variant> out;
  for (int diff : {0, 1, 2}) {
    for (int digests : {0, 1}) {
      for (int mib : {1, 256}) {
        out.push_back({diff, digests, mib, 4});
        if (diff == 2 && mib == 1) out.push_back({diff, digests, mib, 2 + digests});
      }
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
    livetrain::tuning::set("checkpoint.diff_slots", v.slots);
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
      for (size_t i = 0; i < d.tensors.size(); ++i)
        d.tensors[i] = {d.now[i].data(), d.old[i].data(), d.tensors[i].units, d.tensors[i].unit};
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
        EXPECT_EQ(
            std::memcmp(bitmaps + gpu.bitmap_offset[i], cpu.bitmaps.data + cpu.bitmap_offset[i], (t[i].units + 7) / 8),
            0)
            << i;
        EXPECT_EQ(std::memcmp(values + gpu.value_offset[i], cpu.values.data + cpu.value_offset[i],
                              cpu.changed[i] * t[i].unit),
                  0)
            << i;
      }
      seen = done;
    };
    checkpoint::delta_diff_cuda(t, gpu, nullptr, &ws, true, ready);
    EXPECT_EQ(seen, t.size());
    for (size_t i = 0; i < t.size(); ++i) {
      ASSERT_EQ(gpu.changed[i], cpu.changed[i]) << i;
      EXPECT_EQ(std::memcmp(gpu.values.data + gpu.value_offset[i], cpu.values.data + cpu.value_offset[i],
                            cpu.changed[i] * t[i].unit),
                0)
          << i;
      EXPECT_EQ(std::memcmp(pinned[i], d.now[i].data(), d.now[i].size()), 0)
          << "old was moved to the recorded state: " << i;
    }
    EXPECT_EQ(ws.digests != nullptr, v.digests == 1);
    checkpoint::DiffOutput again;
    seen = 0;
    checkpoint::delta_diff_cuda(t, again, nullptr, &ws, true,
                                [&](size_t done, const uint8_t*, const uint8_t*) { seen = done; });
    EXPECT_EQ(seen, t.size());
    for (size_t i = 0; i < t.size(); ++i) EXPECT_EQ(again.changed[i], 0u) << i;
    // Change one element of tensor 3 and the last element of the last tensor, on the device only.
    const size_t last = t.size() - 1;
    for (size_t i : {size_t{3}, last}) {
      if (t[i].units == 0) continue;
      const uint64_t e = i == last ? t[i].units - 1 : 0;
      uint8_t byte = d.now[i][e * t[i].unit] ^ 0x10;
      ASSERT_EQ(cudaMemcpy(static_cast<uint8_t*>(now[i]->p) + e * t[i].unit, &byte, 1, cudaMemcpyHostToDevice),
                cudaSuccess);
    }
    checkpoint::DiffOutput third;
    checkpoint::delta_diff_cuda(t, third, nullptr, &ws, true);
    for (size_t i = 0; i < t.size(); ++i) {
      EXPECT_EQ(third.changed[i], (i == 3 || i == last) && t[i].units ? 1u : 0u) << i;
    }
  }
}
// Regression test for the 27b shapes' cudaErrorMisalignedAddress (see GroupPlanKeepsEveryDeviceAccessAligned):
// odd sizes and element sizes mixed so that 1 MiB groups start inside bf16 tensors with odd changed
// counts and end in fp32 / fp64 ones, every tensor one element past a 16-byte boundary (in device memory
// and in mapped page-locked memory), under every variant, against the CPU reference; `old` moved along.
TEST(CheckpointDiffCuda, OddSizesAndUnalignedOffsetsUnderEveryVariant) {
  if (livetrain::cuda::devices().empty()) GTEST_SKIP() << "no GPU visible";
  const std::vector<std::pair<uint64_t, DType>> shapes = {
      {777777, DType::kBF16}, {48, DType::kF32},      {48, DType::kBF16}, {40960, DType::kBF16},
      {5121, DType::kF32},    {600001, DType::kBF16}, {515, DType::kF64}, {999, DType::kU8},
      {262147, DType::kF32},  {33, DType::kBF16},     {48, DType::kF32}};
  for (const Variant& v : variants()) {
    SCOPED_TRACE(name_of(v));
    KnobScope knobs(v);
    std::mt19937_64 rng(27);
    std::vector<std::vector<uint8_t>> olds, nows;
    std::vector<checkpoint::DiffTensor> host;
    for (const auto& [units, dtype] : shapes) {
      const uint32_t unit = checkpoint::unit_bytes(dtype);
      std::vector<uint8_t> old(units * unit), now;
      for (auto& b : old) b = static_cast<uint8_t>(rng());
      now = old;
      for (uint64_t i = 0; i < units; ++i) {
        if (rng() % 2) now[i * unit + rng() % unit] ^= static_cast<uint8_t>(1 + rng() % 255);
      }
      olds.push_back(std::move(old));
      nows.push_back(std::move(now));
    }
    for (size_t i = 0; i < shapes.size(); ++i)
      host.push_back({nows[i].data(), olds[i].data(), shapes[i].first, checkpoint::unit_bytes(shapes[i].second)});
    checkpoint::DiffOutput cpu;
    checkpoint::delta_diff_cpu(host, cpu);

    std::vector<void*> device, pinned;
    std::vector<checkpoint::DiffTensor> t = host;
    for (size_t i = 0; i < t.size(); ++i) {
      const uint32_t unit = t[i].unit;
      void* d = nullptr;
      ASSERT_EQ(cudaMalloc(&d, nows[i].size() + 16), cudaSuccess);
      ASSERT_EQ(cudaMemcpy(static_cast<uint8_t*>(d) + unit, nows[i].data(), nows[i].size(), cudaMemcpyHostToDevice),
                cudaSuccess);
      void* h = nullptr;
      ASSERT_EQ(cudaHostAlloc(&h, olds[i].size() + 16, cudaHostAllocMapped | cudaHostAllocPortable), cudaSuccess);
      std::memcpy(static_cast<uint8_t*>(h) + unit, olds[i].data(), olds[i].size());
      device.push_back(d);
      pinned.push_back(h);
      t[i].now = static_cast<uint8_t*>(d) + unit;
      t[i].old = static_cast<uint8_t*>(h) + unit;
    }
    checkpoint::DiffWorkspace ws;
    checkpoint::DiffOutput gpu;
    checkpoint::delta_diff_cuda(t, gpu, nullptr, &ws, true);
    ASSERT_EQ(gpu.changed.size(), t.size());
    for (size_t i = 0; i < t.size(); ++i) {
      ASSERT_EQ(gpu.changed[i], cpu.changed[i]) << "tensor " << i;
      EXPECT_EQ(std::memcmp(gpu.bitmaps.data + gpu.bitmap_offset[i], cpu.bitmaps.data + cpu.bitmap_offset[i],
                            (t[i].units + 7) / 8),
                0)
          << i;
      EXPECT_EQ(std::memcmp(gpu.values.data + gpu.value_offset[i], cpu.values.data + cpu.value_offset[i],
                            cpu.changed[i] * t[i].unit),
                0)
          << i;
      EXPECT_EQ(std::memcmp(static_cast<uint8_t*>(pinned[i]) + t[i].unit, nows[i].data(), nows[i].size()), 0)
          << "old moved along: " << i;
    }
    checkpoint::DiffOutput again;
    checkpoint::delta_diff_cuda(t, again, nullptr, &ws, true);
    for (size_t i = 0; i < t.size(); ++i) EXPECT_EQ(again.changed[i], 0u) << i;
    for (void* d : device) cudaFree(d);
    for (void* h : pinned) cudaFreeHost(h);
  }
}
#endif
