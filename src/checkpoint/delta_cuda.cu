// The live-weights diff on CUDA (delta_diff_cuda; CPU reference delta_diff_cpu in diff.cpp, same output
// bytes): a count pass writes the bitmap with warp ballots and one count per block, the host turns the
// block counts into prefix sums (value offsets), a compaction pass writes each changed element's XOR at
// its rank, and only the bitmaps and the compacted values are copied to pinned host memory.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "checkpoint/diff_check.hpp"
#include "cuda/check.hpp"
#include "livetrain/checkpoint/diff.hpp"
#include "livetrain/error.hpp"

namespace livetrain::checkpoint {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Elements per block ("chunk"). A multiple of kThreads, so every warp's 32 elements start at a multiple of
// 32 within the tensor and its ballot is exactly one 32-bit word of the tensor's bitmap: no two blocks or
// warps ever write the same word, so no atomics and no memset are needed.
constexpr uint64_t kChunk = 8192;
static_assert(kChunk % kThreads == 0);
// Device scratch for the compacted values of pass 2 (bounded, whatever the model's size).
constexpr uint64_t kScratchBytes = uint64_t{256} << 20;

struct DevTensor {
  const uint8_t* now;    // [units × unit]
  uint8_t* old;          // [units × unit], device or pinned host memory (written when update_old)
  uint64_t units;
  uint64_t first_chunk;  // global index of the tensor's first chunk
  uint64_t bitmap_word;  // offset of its bitmap in the bitmap buffer, in 32-bit words
  uint32_t unit;
};

// The tensor a chunk belongs to: the last one whose first_chunk <= c (tensors with no elements have no
// chunk and share first_chunk with the next tensor, which this picks).
__device__ int find_tensor(const DevTensor* ts, int n, uint64_t c) {
  int lo = 0, hi = n;  // first index with first_chunk > c is in [lo, hi]
  while (lo < hi) {
    int mid = (lo + hi) / 2;
    if (ts[mid].first_chunk <= c) lo = mid + 1;
    else hi = mid;
  }
  return lo - 1;
}

template <typename T>
__device__ __forceinline__ T load(const uint8_t* p, uint64_t i) {
  return reinterpret_cast<const T*>(p)[i];
}

__device__ __forceinline__ bool differs(const DevTensor& t, uint64_t i) {
  switch (t.unit) {
    case 1: return load<uint8_t>(t.now, i) != load<uint8_t>(t.old, i);
    case 2: return load<uint16_t>(t.now, i) != load<uint16_t>(t.old, i);
    case 4: return load<uint32_t>(t.now, i) != load<uint32_t>(t.old, i);
    default: return load<unsigned long long>(t.now, i) != load<unsigned long long>(t.old, i);
  }
}

// The XOR of element i at `rank` in `out`; with `update`, `old` takes the value of `now` that was read
// (so old ^ XOR stays exactly what the delta records, even while `now` is being written).
template <typename T>
__device__ __forceinline__ void xor_one(const DevTensor& t, uint64_t i, uint8_t* out, uint64_t rank, bool update) {
  const T a = load<T>(t.now, i), b = load<T>(t.old, i);
  reinterpret_cast<T*>(out)[rank] = a ^ b;
  if (update) reinterpret_cast<T*>(t.old)[i] = a;
}

__device__ __forceinline__ void write_xor(const DevTensor& t, uint64_t i, uint8_t* out, uint64_t rank, bool update) {
  switch (t.unit) {
    case 1: xor_one<uint8_t>(t, i, out, rank, update); break;
    case 2: xor_one<uint16_t>(t, i, out, rank, update); break;
    case 4: xor_one<uint32_t>(t, i, out, rank, update); break;
    default: xor_one<unsigned long long>(t, i, out, rank, update);
  }
}

// Pass 1, one block per chunk: bitmap words and the chunk's changed count.
__global__ void __launch_bounds__(kThreads) diff_count_kernel(const DevTensor* __restrict__ ts, int n,
                                                              uint32_t* __restrict__ bitmap,         // [bitmap words]
                                                              uint32_t* __restrict__ chunk_counts) {  // [chunks]
  const uint64_t c = blockIdx.x;
  const DevTensor t = ts[find_tensor(ts, n, c)];
  const uint64_t begin = (c - t.first_chunk) * kChunk;
  const uint64_t end = min(begin + kChunk, t.units);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __shared__ uint32_t words[kChunk / 32];
  unsigned count = 0;
  for (uint64_t i0 = begin; i0 < end; i0 += kThreads) {
    const uint64_t w0 = i0 + warp * 32;  // this warp's first element, a multiple of 32
    const uint64_t i = w0 + lane;
    const unsigned ballot = __ballot_sync(0xFFFFFFFFu, i < end && differs(t, i));
    if (lane == 0 && w0 < end) {
      words[(w0 - begin) / 32] = ballot;  // bit k = element w0 + k: LSB first, as the file format
      count += __popc(ballot);
    }
  }
  __shared__ unsigned warp_counts[kWarps];
  if (lane == 0) warp_counts[warp] = count;
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned total = 0;
    for (int w = 0; w < kWarps; ++w) total += warp_counts[w];
    chunk_counts[c] = total;
  }
  // The chunk's bitmap words leave together, coalesced (the bitmap is usually host memory over PCIe).
  const uint64_t nwords = (end - begin + 31) / 32;
  for (uint64_t k = threadIdx.x; k < nwords; k += kThreads) bitmap[t.bitmap_word + begin / 32 + k] = words[k];
}

// Pass 2, one block per chunk: each changed element (by pass 1's bitmap, not re-evaluated, so the count
// and the offsets stay exact even if the weights changed in between) writes its XOR at its rank.
// Launched over chunks [chunk0, chunk0 + gridDim.x); `values` holds the bytes from offset `value_base`
// on. With `stage` (moving `old` along), the chunk's old bytes are read from, and the recorded new bits
// written to, device memory at stage + stage_offsets[blockIdx.x], which the host copies in and out
// with DMA: the GPU writing rows of page-locked host memory directly runs at a fraction of PCIe speed.
__global__ void __launch_bounds__(kThreads) diff_compact_kernel(const DevTensor* __restrict__ ts, int n,
                                                                const uint32_t* __restrict__ bitmap,
                                                                const uint64_t* __restrict__ chunk_offsets,  // [chunks] bytes
                                                                uint64_t chunk0, uint64_t value_base,
                                                                uint8_t* __restrict__ values, uint8_t* stage,
                                                                const uint64_t* __restrict__ stage_offsets) {
  const uint64_t c = chunk0 + blockIdx.x;
  DevTensor t = ts[find_tensor(ts, n, c)];
  const uint64_t begin = (c - t.first_chunk) * kChunk;
  const uint64_t end = min(begin + kChunk, t.units);
  // Element i of this chunk is at old + i * unit: with a stage, old points `begin` elements before it.
  if (stage) t.old = reinterpret_cast<uint8_t*>(reinterpret_cast<uintptr_t>(stage + stage_offsets[blockIdx.x]) - begin * t.unit);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  uint8_t* out = values + (chunk_offsets[c] - value_base);
  __shared__ uint32_t words[kChunk / 32];  // the chunk's bitmap, read once, coalesced
  const uint64_t nwords = (end - begin + 31) / 32;
  for (uint64_t k = threadIdx.x; k < nwords; k += kThreads) words[k] = bitmap[t.bitmap_word + begin / 32 + k];
  __syncthreads();
  __shared__ unsigned warp_counts[kWarps];
  uint64_t written = 0;  // elements this chunk placed in earlier iterations (the same in every thread)
  for (uint64_t i0 = begin; i0 < end; i0 += kThreads) {
    const uint64_t w0 = i0 + warp * 32;
    const unsigned word = w0 < end ? words[(w0 - begin) / 32] : 0u;
    if (lane == 0) warp_counts[warp] = __popc(word);
    __syncthreads();
    unsigned before = 0, total = 0;
    for (int w = 0; w < kWarps; ++w) {
      const unsigned k = warp_counts[w];
      before += w < warp ? k : 0u;
      total += k;
    }
    if ((word >> lane) & 1u) {
      const uint64_t rank = written + before + __popc(word & ((1u << lane) - 1u));
      write_xor(t, w0 + lane, out, rank, stage != nullptr);
    }
    written += total;
    __syncthreads();  // everyone has read warp_counts before the next iteration overwrites it
  }
}

// Device memory owned by scope (cudaFree synchronizes, so a throw with kernels in flight is still safe).
struct DeviceBuffer {
  void* p = nullptr;
  explicit DeviceBuffer(size_t bytes) { LIVETRAIN_CUDA_CHECK(cudaMalloc(&p, bytes ? bytes : 1)); }
  ~DeviceBuffer() { if (p) cudaFree(p); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  template <typename T>
  T* as() const { return static_cast<T*>(p); }
};

// A non-blocking stream owned by scope.
struct Stream {
  cudaStream_t s = nullptr;
  Stream() { LIVETRAIN_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)); }
  ~Stream() { if (s) cudaStreamDestroy(s); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
};

void free_pinned(uint8_t* p) { cudaFreeHost(p); }

// Page-locked host memory the GPU can write (mapped), freed with the HostBytes.
HostBytes pinned_alloc(size_t bytes) {
  HostBytes b;
  void* p = nullptr;
  LIVETRAIN_CUDA_CHECK(cudaHostAlloc(&p, bytes ? bytes : 1, cudaHostAllocMapped | cudaHostAllocPortable));
  b.data = static_cast<uint8_t*>(p);
  b.size = bytes;
  b.release = free_pinned;
  return b;
}

// A buffer of at least `bytes`: `owned` grows (by a quarter more, so that sizes creeping up do not
// reallocate every time) and the result is a non-owning view of it.
HostBytes view_of(HostBytes& owned, size_t bytes) {
  if (owned.size < bytes || !owned.data) {
    owned.reset();
    owned = pinned_alloc(bytes + bytes / 4);
  }
  HostBytes v;
  v.data = owned.data;
  v.size = bytes;
  return v;
}

template <typename T>
T* device_view(const HostBytes& b) {
  void* d = nullptr;
  LIVETRAIN_CUDA_CHECK(cudaHostGetDevicePointer(&d, b.data, 0));
  return static_cast<T*>(d);
}

}  // namespace

void diff_workspace_reserve(DiffWorkspace& ws, size_t bitmap_bytes, size_t value_bytes) {
  (void)view_of(ws.bitmaps, bitmap_bytes);
  (void)view_of(ws.values, value_bytes);
}

void delta_diff_cuda(const std::vector<DiffTensor>& tensors, DiffOutput& out, void* stream_ptr, DiffWorkspace* ws,
                     bool update_old) {
  delta_diff_check(tensors);
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const size_t n = tensors.size();
  if (n > static_cast<size_t>(INT32_MAX)) throw Error(ErrorCode::kInvalidArg, "delta diff: too many tensors");

  std::vector<DevTensor> table(n);
  uint64_t chunks = 0, words = 0;
  for (size_t i = 0; i < n; ++i) {
    const DiffTensor& t = tensors[i];
    const auto now = reinterpret_cast<uintptr_t>(t.now), old = reinterpret_cast<uintptr_t>(t.old);
    if (now % t.unit || old % t.unit) {
      throw Error(ErrorCode::kInvalidArg, "delta diff: tensor " + std::to_string(i) + " is not aligned to its element size " + std::to_string(t.unit));
    }
    table[i] = DevTensor{static_cast<const uint8_t*>(t.now), static_cast<uint8_t*>(const_cast<void*>(t.old)), t.units, chunks, words, t.unit};
    chunks += (t.units + kChunk - 1) / kChunk;
    words += (t.units + 31) / 32;
  }
  if (chunks > static_cast<uint64_t>(INT32_MAX)) throw Error(ErrorCode::kInvalidArg, "delta diff: tensors too large for one launch");

  // The bitmaps and values are written by the kernels straight into page-locked host memory (coalesced
  // rows over PCIe): no device scratch the size of the delta, and no copy afterwards.
  DiffWorkspace local;
  DiffWorkspace& w = ws ? *ws : local;
  HostBytes bitmaps = view_of(w.bitmaps, words * 4);
  DeviceBuffer d_table(n * sizeof(DevTensor));
  DeviceBuffer d_counts(chunks * sizeof(uint32_t));
  DeviceBuffer d_offsets(chunks * sizeof(uint64_t));
  HostBytes h_counts = pinned_alloc(chunks * sizeof(uint32_t));
  HostBytes h_offsets = pinned_alloc(chunks * sizeof(uint64_t));
  HostBytes h_table = pinned_alloc(n * sizeof(DevTensor));
  std::copy(table.begin(), table.end(), reinterpret_cast<DevTensor*>(h_table.data));
  LIVETRAIN_CUDA_CHECK(cudaMemcpyAsync(d_table.p, h_table.data, n * sizeof(DevTensor), cudaMemcpyHostToDevice, stream));

  // Pass 1: count.
  if (chunks) {
    diff_count_kernel<<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(d_table.as<DevTensor>(), static_cast<int>(n),
                                                                            device_view<uint32_t>(bitmaps), d_counts.as<uint32_t>());
    LIVETRAIN_CUDA_CHECK(cudaGetLastError());
    LIVETRAIN_CUDA_CHECK(cudaMemcpyAsync(h_counts.data, d_counts.p, chunks * sizeof(uint32_t), cudaMemcpyDeviceToHost, stream));
  }
  LIVETRAIN_CUDA_CHECK(cudaStreamSynchronize(stream));

  // Prefix sums over the block counts, on the host: a few MB for a large model, and it gives the
  // per-tensor totals the record headers need anyway. Each tensor's values start 8-byte aligned.
  const auto* counts = reinterpret_cast<const uint32_t*>(h_counts.data);
  auto* offsets = reinterpret_cast<uint64_t*>(h_offsets.data);
  std::vector<uint64_t> ends(chunks);  // end of each chunk's values
  out.changed.assign(n, 0);
  out.bitmap_offset.assign(n, 0);
  out.value_offset.assign(n, 0);
  uint64_t value_total = 0;
  for (size_t i = 0; i < n; ++i) {
    value_total = (value_total + 7) / 8 * 8;
    out.value_offset[i] = value_total;
    out.bitmap_offset[i] = table[i].bitmap_word * 4;
    const uint64_t last = i + 1 < n ? table[i + 1].first_chunk : chunks;
    uint64_t changed = 0;
    for (uint64_t c = table[i].first_chunk; c < last; ++c) {
      offsets[c] = value_total + changed * tensors[i].unit;
      changed += counts[c];
      ends[c] = value_total + changed * tensors[i].unit;
    }
    out.changed[i] = changed;
    value_total += changed * tensors[i].unit;
  }

  // Pass 2: compact (and move `old` along, when asked), in groups of chunks whose bytes fit bounded
  // device scratch buffers, each group's values copied to the host after its kernel: coalesced writes
  // to device memory and DMA, instead of small writes over PCIe.
  HostBytes values = view_of(w.values, value_total);
  if (chunks && value_total) {
    LIVETRAIN_CUDA_CHECK(cudaMemcpyAsync(d_offsets.p, h_offsets.data, chunks * sizeof(uint64_t), cudaMemcpyHostToDevice, stream));
    LIVETRAIN_CUDA_CHECK(cudaStreamSynchronize(stream));
    auto chunk_tensor = [&](uint64_t c) {  // the last tensor whose first chunk is <= c
      return static_cast<size_t>(std::upper_bound(table.begin(), table.end(), c, [](uint64_t x, const DevTensor& t) { return x < t.first_chunk; }) - table.begin()) - 1;
    };
    auto chunk_bytes = [&](uint64_t c, size_t i) {
      const uint64_t begin = (c - table[i].first_chunk) * kChunk;
      return (std::min(begin + kChunk, table[i].units) - begin) * table[i].unit;
    };
    // Groups: consecutive chunks with at most kScratchBytes of values, and (when staging `old`) of elements.
    struct Segment {
      uint8_t* old;
      uint64_t stage_offset, bytes;
    };
    struct Group {
      uint64_t c0, c1;
      std::vector<Segment> segments;
    };
    std::vector<Group> groups;
    std::vector<uint64_t> stage_offsets(chunks, 0);
    for (uint64_t c = 0; c < chunks;) {
      Group g{c, c, {}};
      uint64_t staged = 0;
      size_t i = chunk_tensor(c);
      while (c < chunks) {
        while (i + 1 < n && table[i + 1].first_chunk <= c) ++i;
        const uint64_t bytes = chunk_bytes(c, i);
        // A chunk continues its tensor's segment, or starts a new one at a 16-byte aligned offset (the
        // kernel reads elements of up to 8 bytes there).
        const bool continues = c > g.c0 && c != table[i].first_chunk;
        const uint64_t at = continues ? staged : (staged + 15) / 16 * 16;
        if (c > g.c0 && (ends[c] - offsets[g.c0] > kScratchBytes || (update_old && at + bytes > kScratchBytes))) break;
        if (update_old) {
          stage_offsets[c] = at;
          uint8_t* old = table[i].old + (c - table[i].first_chunk) * kChunk * table[i].unit;
          if (continues) g.segments.back().bytes += bytes;
          else g.segments.push_back(Segment{old, at, bytes});
          staged = at + bytes;
        }
        ++c;
      }
      g.c1 = c;
      groups.push_back(std::move(g));
    }
    DeviceBuffer d_stage_offsets(update_old ? chunks * sizeof(uint64_t) : 0);
    if (update_old) {
      LIVETRAIN_CUDA_CHECK(cudaMemcpy(d_stage_offsets.p, stage_offsets.data(), chunks * sizeof(uint64_t), cudaMemcpyHostToDevice));
    }
    // Two buffers and two streams: one group's copies overlap the other's kernel and copies.
    const uint64_t cap = std::min<uint64_t>(value_total, kScratchBytes);  // >= any one chunk's values
    DeviceBuffer d_values0(cap), d_values1(cap);
    DeviceBuffer d_stage0(update_old ? kScratchBytes : 0), d_stage1(update_old ? kScratchBytes : 0);
    Stream s0, s1;
    for (size_t k = 0; k < groups.size(); ++k) {
      const Group& g = groups[k];
      cudaStream_t st = k % 2 ? s1.s : s0.s;
      uint8_t* d_values = (k % 2 ? d_values1 : d_values0).as<uint8_t>();
      uint8_t* d_stage = update_old ? (k % 2 ? d_stage1 : d_stage0).as<uint8_t>() : nullptr;
      for (const Segment& sg : g.segments) {
        LIVETRAIN_CUDA_CHECK(cudaMemcpyAsync(d_stage + sg.stage_offset, sg.old, sg.bytes, cudaMemcpyDefault, st));
      }
      const uint64_t base = offsets[g.c0];
      diff_compact_kernel<<<static_cast<unsigned>(g.c1 - g.c0), kThreads, 0, st>>>(
          d_table.as<DevTensor>(), static_cast<int>(n), device_view<uint32_t>(bitmaps), d_offsets.as<uint64_t>(), g.c0,
          base, d_values, d_stage, update_old ? d_stage_offsets.as<uint64_t>() + g.c0 : nullptr);
      LIVETRAIN_CUDA_CHECK(cudaGetLastError());
      if (ends[g.c1 - 1] > base) {
        LIVETRAIN_CUDA_CHECK(cudaMemcpyAsync(values.data + base, d_values, ends[g.c1 - 1] - base, cudaMemcpyDeviceToHost, st));
      }
      for (const Segment& sg : g.segments) {
        LIVETRAIN_CUDA_CHECK(cudaMemcpyAsync(sg.old, d_stage + sg.stage_offset, sg.bytes, cudaMemcpyDefault, st));
      }
    }
    LIVETRAIN_CUDA_CHECK(cudaStreamSynchronize(s0.s));  // before the buffers go
    LIVETRAIN_CUDA_CHECK(cudaStreamSynchronize(s1.s));
  }
  LIVETRAIN_CUDA_CHECK(cudaStreamSynchronize(stream));
  if (ws) {
    out.bitmaps = std::move(bitmaps);  // views into the workspace
    out.values = std::move(values);
  } else {
    // The outputs own their memory: hand over the local workspace's buffers.
    out.bitmaps = std::move(local.bitmaps);
    out.bitmaps.size = words * 4;
    out.values = std::move(local.values);
    out.values.size = value_total;
  }
}

}  // namespace livetrain::checkpoint
