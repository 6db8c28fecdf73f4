// The live-weights diff on CUDA (delta_diff_cuda; CPU reference delta_diff_cpu in diff.cpp, same output
// bytes): a count pass writes the bitmap with warp ballots and one count per chunk, the host turns the
// chunk counts into prefix sums (value offsets), a compaction pass writes each changed element's XOR at
// its rank, and only the bitmaps and the compacted values are copied to pinned host memory.
//
// Three shapes of the same computation (knob checkpoint.diff, docs/tuning.md):
//   0  the count pass over every chunk reads `old` where it lies (page-locked host memory over
//      PCIe), then the compaction runs in groups of chunks whose `old` bytes are staged in device memory
//      by DMA; `old` crosses PCIe twice.
//   1  one pass: each group's `old` bytes are staged first, counted and compacted in device memory, and
//      written back; `old` crosses PCIe once each way, groups alternating over two streams (measured on
//      the H200: the copies ran one direction at a time).
//   2  (shipped) the same pass with each direction's copies on a stream of their own and the kernels on a
//      third, checkpoint.diff_slots groups in flight, so the copies in of later groups run while earlier
//      groups' copies out do (both directions of PCIe at once: 76-78 GB/s in all on the H200 against 59 for
//      shape 1, pinned copies both ways 98-102 GB/s).
// With digests (checkpoint.digests, src/checkpoint/digest.hpp), chunks whose digest of the live bytes
// equals the stored digest of `old` are neither read nor staged; after no change nothing crosses PCIe.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>

#include "checkpoint/diff_check.hpp"
#include "checkpoint/diff_plan.hpp"
#include "checkpoint/digest.hpp"
#include "cuda/check.hpp"
#include "cuda/owned.hpp"
#include "livetrain/checkpoint/diff.hpp"
#include "livetrain/error.hpp"
#include "livetrain/tuning.hpp"

namespace livetrain::checkpoint {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Elements per block ("chunk"). A multiple of kThreads, so every warp's 32 elements start at a multiple of
// 32 within the tensor and its ballot is exactly one 32-bit word of the tensor's bitmap: no two blocks or
// warps ever write the same word, so no atomics and no memset are needed.
constexpr uint64_t kChunk = kDiffChunk;
static_assert(kChunk % kThreads == 0);
constexpr uint64_t kChunkWords = kChunk / 32;

// Where a kernel finds the chunks of one launch: chunks [chunk0, chunk0 + gridDim.x); the bitmap words of
// the launch start at word `word0` of `bitmap`; with `stage`, chunk chunk0 + b's `old` bytes are at
// stage + stage_offsets[b] (device memory) instead of the tensor's `old`; with `flags`, chunks whose flag
// is 0 are known unchanged (their digests matched) and are not read.
struct Launch {
  const DiffChunkTensor* ts;
  int n;
  uint64_t chunk0;
  uint32_t* bitmap;
  uint64_t word0;
  uint8_t* stage;
  const uint64_t* stage_offsets;
  const uint8_t* flags;
};

// The tensor a chunk belongs to: the last one whose first_chunk <= c (tensors with no elements have no
// chunk and share first_chunk with the next tensor, which this picks).
__device__ int find_tensor(const DiffChunkTensor* ts, int n, uint64_t c) {
  int lo = 0, hi = n;  // first index with first_chunk > c is in [lo, hi]
  while (lo < hi) {
    int mid = (lo + hi) / 2;
    if (ts[mid].first_chunk <= c) lo = mid + 1;
    else hi = mid;
  }
  return lo - 1;
}

// The chunk this block works on: its tensor (with `old` redirected to the stage), its element range, and
// where its bitmap words are.
struct Chunk {
  DiffChunkTensor t;
  uint64_t c, begin, end;
  uint32_t* words;  // the chunk's first bitmap word
  bool skip;        // known unchanged
};

__device__ Chunk chunk_of(const Launch& L) {
  Chunk k;
  k.c = L.chunk0 + blockIdx.x;
  k.t = L.ts[find_tensor(L.ts, L.n, k.c)];
  k.begin = (k.c - k.t.first_chunk) * kChunk;
  k.end = min(k.begin + kChunk, k.t.units);
  // Element i of this chunk is at old + i * unit: with a stage, old points `begin` elements before it.
  if (L.stage)
    k.t.old = reinterpret_cast<uint8_t*>(reinterpret_cast<uintptr_t>(L.stage + L.stage_offsets[blockIdx.x]) -
                                         k.begin * k.t.unit);
  k.words = L.bitmap + (k.t.bitmap_word + k.begin / 32 - L.word0);
  k.skip = L.flags && !L.flags[k.c];
  return k;
}

template <typename T>
__device__ __forceinline__ T load(const uint8_t* p, uint64_t i) {
  return reinterpret_cast<const T*>(p)[i];
}

__device__ __forceinline__ bool differs(const DiffChunkTensor& t, uint64_t i) {
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
__device__ __forceinline__ void xor_one(const DiffChunkTensor& t, uint64_t i, uint8_t* out, uint64_t rank,
                                        bool update) {
  const T a = load<T>(t.now, i), b = load<T>(t.old, i);
  reinterpret_cast<T*>(out)[rank] = a ^ b;
  if (update) reinterpret_cast<T*>(t.old)[i] = a;
}

__device__ __forceinline__ void write_xor(const DiffChunkTensor& t, uint64_t i, uint8_t* out, uint64_t rank,
                                          bool update) {
  switch (t.unit) {
    case 1: xor_one<uint8_t>(t, i, out, rank, update); break;
    case 2: xor_one<uint16_t>(t, i, out, rank, update); break;
    case 4: xor_one<uint32_t>(t, i, out, rank, update); break;
    default: xor_one<unsigned long long>(t, i, out, rank, update);
  }
}

// Count pass, one block per chunk: bitmap words and the chunk's changed count (chunk_counts indexed by
// the global chunk). A skipped chunk writes zero words and count 0 without reading anything.
__global__ void __launch_bounds__(kThreads) diff_count_kernel(const Launch L, uint32_t* __restrict__ chunk_counts) {
  const Chunk k = chunk_of(L);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __shared__ uint32_t words[kChunkWords];
  unsigned count = 0;
  for (uint64_t i0 = k.begin; i0 < k.end; i0 += kThreads) {
    const uint64_t w0 = i0 + warp * 32;  // this warp's first element, a multiple of 32
    const uint64_t i = w0 + lane;
    const unsigned ballot = __ballot_sync(0xFFFFFFFFu, !k.skip && i < k.end && differs(k.t, i));
    if (lane == 0 && w0 < k.end) {
      words[(w0 - k.begin) / 32] = ballot;  // bit k = element w0 + k: LSB first, as the file format
      count += __popc(ballot);
    }
  }
  __shared__ unsigned warp_counts[kWarps];
  if (lane == 0) warp_counts[warp] = count;
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned total = 0;
    for (int w = 0; w < kWarps; ++w) total += warp_counts[w];
    chunk_counts[k.c] = total;
  }
  // The chunk's bitmap words leave together, coalesced (the bitmap may be host memory over PCIe).
  const uint64_t nwords = (k.end - k.begin + 31) / 32;
  for (uint64_t j = threadIdx.x; j < nwords; j += kThreads) k.words[j] = words[j];
}

// Compaction pass, one block per chunk: each changed element (by the count pass's bitmap, not
// re-evaluated, so the count and the offsets stay exact even if the weights changed in between) writes
// its XOR at its rank. `values` holds the bytes from offset `value_base` on; chunk_offsets is indexed by
// the global chunk. With a stage, the recorded new bits are written into it (the host copies them back
// with DMA: the GPU writing rows of page-locked host memory directly runs at a fraction of PCIe speed).
// chunk_offsets may be device memory or mapped page-locked host memory (checkpoint.diff 2).
__global__ void __launch_bounds__(kThreads) diff_compact_kernel(const Launch L,
                                                                const uint64_t* __restrict__ chunk_offsets,  // bytes
                                                                uint64_t value_base, uint8_t* __restrict__ values) {
  const Chunk k = chunk_of(L);
  if (k.skip) return;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  // The chunk's offset, read once per block and not cached (ld.cv): with checkpoint.diff 2 the offsets lie in
  // mapped host memory (each read crosses PCIe), where the host writes a group's offsets after an earlier
  // compaction may have read (and cached) the same line for its own chunks.
  __shared__ uint64_t chunk_offset;
  if (threadIdx.x == 0) chunk_offset = __ldcv(chunk_offsets + k.c);
  __shared__ uint32_t words[kChunkWords];  // the chunk's bitmap, read once, coalesced
  const uint64_t nwords = (k.end - k.begin + 31) / 32;
  for (uint64_t j = threadIdx.x; j < nwords; j += kThreads) words[j] = k.words[j];
  __syncthreads();
  uint8_t* out = values + (chunk_offset - value_base);
  __shared__ unsigned warp_counts[kWarps];
  uint64_t written = 0;  // elements this chunk placed in earlier iterations (the same in every thread)
  for (uint64_t i0 = k.begin; i0 < k.end; i0 += kThreads) {
    const uint64_t w0 = i0 + warp * 32;
    const unsigned word = w0 < k.end ? words[(w0 - k.begin) / 32] : 0u;
    if (lane == 0) warp_counts[warp] = __popc(word);
    __syncthreads();
    unsigned before = 0, total = 0;
    for (int w = 0; w < kWarps; ++w) {
      const unsigned c = warp_counts[w];
      before += w < warp ? c : 0u;
      total += c;
    }
    if ((word >> lane) & 1u) {
      const uint64_t rank = written + before + __popc(word & ((1u << lane) - 1u));
      write_xor(k.t, w0 + lane, out, rank, L.stage != nullptr);
    }
    written += total;
    __syncthreads();  // everyone has read warp_counts before the next iteration overwrites it
  }
}

// The digest of `nbytes` at `p` (digest.hpp), the block's threads adding the words' terms in any order;
// the result is valid in every thread.
__device__ uint64_t block_digest(const uint8_t* p, uint64_t nbytes) {
  uint64_t sum = 0;
  const bool aligned = (reinterpret_cast<uintptr_t>(p) & 7u) == 0;
  const uint64_t nwords = (nbytes + 7) / 8;
  for (uint64_t j = threadIdx.x; j < nwords; j += blockDim.x) {
    uint64_t w = 0;
    if (aligned && (j + 1) * 8 <= nbytes) {
      w = reinterpret_cast<const uint64_t*>(p)[j];
    } else {
      for (uint64_t b = 0; b < 8 && j * 8 + b < nbytes; ++b) w |= static_cast<uint64_t>(p[j * 8 + b]) << (8 * b);
    }
    sum += digest_term(w, j);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xFFFFFFFFu, sum, o);
  __shared__ uint64_t warp_sums[32];
  __shared__ uint64_t result;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    uint64_t total = 0;
    for (int w = 0; w < static_cast<int>((blockDim.x + 31) / 32); ++w) total += warp_sums[w];
    result = digest_finish(total, nbytes);
  }
  __syncthreads();
  return result;
}

// One block per chunk: the digest of the chunk's `now` (of_old false) or `old` bytes into out[c] (the
// global chunk). With `flags`, only flagged chunks (the ones a save staged and moved along).
__global__ void __launch_bounds__(kThreads) digest_kernel(const Launch L, bool of_old, uint64_t* __restrict__ out) {
  const Chunk k = chunk_of(L);
  if (k.skip) return;
  const uint8_t* p = of_old ? k.t.old + k.begin * k.t.unit : k.t.now + k.begin * k.t.unit;
  const uint64_t d = block_digest(p, (k.end - k.begin) * k.t.unit);
  if (threadIdx.x == 0) out[k.c] = d;
}

// One block per chunk: flags[c] = whether the live bytes' digest differs from the stored one; counts the
// flagged chunks.
__global__ void __launch_bounds__(kThreads)
    flag_kernel(const Launch L, const uint64_t* __restrict__ digests, uint8_t* __restrict__ flags,
                unsigned long long* __restrict__ flagged) {
  const Chunk k = chunk_of(L);
  const uint64_t d = block_digest(k.t.now + k.begin * k.t.unit, (k.end - k.begin) * k.t.unit);
  if (threadIdx.x == 0) {
    const bool f = d != digests[k.c];
    flags[k.c] = f;
    if (f) atomicAdd(flagged, 1ull);
  }
}

// One group's second half, the same in both diff shapes: its changed elements' XORs compacted into `d_values`
// (which holds the values from byte `base` on), the digests of its live bytes when they are kept, and its
// values, [base, end), copied to their place in the pinned host buffer `host_values`.
void compact_group(const Launch& L, uint64_t chunks, const uint64_t* d_offsets, uint64_t base, uint8_t* d_values,
                   uint64_t* d_digests, uint64_t end, uint8_t* host_values, cudaStream_t st) {
  diff_compact_kernel<<<static_cast<unsigned>(chunks), kThreads, 0, st>>>(L, d_offsets, base, d_values);
  LIVETRAIN_CUDA_CHECK(cudaGetLastError());
  if (d_digests) {
    digest_kernel<<<static_cast<unsigned>(chunks), kThreads, 0, st>>>(L, true, d_digests);
    LIVETRAIN_CUDA_CHECK(cudaGetLastError());
  }
  if (end > base) {
    LIVETRAIN_CUDA_CHECK(cudaMemcpyAsync(host_values + base, d_values, end - base, cudaMemcpyDeviceToHost, st));
  }
}

// Device memory owned by scope (cudaFree synchronizes, so a throw with kernels in flight is still safe).
struct DeviceBuffer {
  void* p = nullptr;
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes) { LIVETRAIN_CUDA_CHECK(cudaMalloc(&p, bytes ? bytes : 1)); }
  ~DeviceBuffer() {
    if (p) cudaFree(p);
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept : p(o.p) { o.p = nullptr; }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(p, o.p);
    return *this;
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(p);
  }
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

// The values outgrew their buffer (a step changed more than the store reserved for): a bigger one with the
// `kept` bytes so far, once the groups before group `k` have completed; the old one stays alive (retired) for
// the addresses handed out. Returns the new capacity.
uint64_t grow_values(DiffWorkspace& w, uint64_t kept, uint64_t needed, const std::vector<cuda::Event>& done, size_t k) {
  for (size_t j = 0; j < k; ++j) LIVETRAIN_CUDA_CHECK(cudaEventSynchronize(done[j].h));
  HostBytes bigger = pinned_alloc(needed + needed / 2);
  if (kept) std::memcpy(bigger.data, w.values.data, kept);
  w.retired.push_back(std::move(w.values));
  w.values = std::move(bigger);
  return w.values.size;
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

// The stored digests of a workspace: one per chunk of `old`, in device memory, for the tensor list `key`
// describes (old addresses and sizes).
struct Digests {
  DeviceBuffer d;
  uint64_t chunks = 0, key = 0;
};

uint64_t table_key(const std::vector<DiffChunkTensor>& table) {
  uint64_t h = digest_mix(table.size() + 1);
  for (const DiffChunkTensor& t : table) {
    h = digest_mix(h ^ reinterpret_cast<uintptr_t>(t.old));
    h = digest_mix(h ^ (t.units * 8 + t.unit));
  }
  return h;
}

Launch launch_of(const DiffChunkTensor* ts, size_t n, uint64_t chunk0, uint32_t* bitmap, uint64_t word0,
                 uint8_t* stage = nullptr, const uint64_t* stage_offsets = nullptr, const uint8_t* flags = nullptr) {
  return Launch{ts, static_cast<int>(n), chunk0, bitmap, word0, stage, stage_offsets, flags};
}

}  // namespace

void diff_workspace_reserve(DiffWorkspace& ws, size_t bitmap_bytes, size_t value_bytes) {
  (void)view_of(ws.bitmaps, bitmap_bytes);
  (void)view_of(ws.values, value_bytes);
}

namespace {

void unregister_and_free(uint8_t* p) {
  cudaHostUnregister(p);
  std::free(p);
}

// Page-locked, GPU-mapped host memory like pinned_alloc's, made otherwise: pages the CPU has written first,
// then one registration. cudaHostAlloc of the diff's outputs (8 GB at 24 GiB of bf16) took ~5 s on the H200
// and, like a registration, holds up every CUDA call of the process while it runs; registering the head
// copy's memory, already written, ran at ~10 GB/s.
HostBytes registered_alloc(size_t bytes) {
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  const size_t n = (std::max<size_t>(bytes, 1) + page - 1) / page * page;
  void* p = std::aligned_alloc(page, n);
  if (!p) throw Error(ErrorCode::kIo, "allocate " + std::to_string(n) + " bytes for the GPU diff's outputs");
  std::memset(p, 0, n);  // every page exists before the registration
  if (const cudaError_t e = cudaHostRegister(p, n, cudaHostRegisterPortable | cudaHostRegisterMapped);
      e != cudaSuccess) {
    std::free(p);
    (void)cudaGetLastError();
    LIVETRAIN_CUDA_CHECK(e);
  }
  HostBytes b;
  b.data = static_cast<uint8_t*>(p);
  b.size = bytes;
  b.release = unregister_and_free;
  return b;
}

}  // namespace

void diff_workspace_reserve_registered(DiffWorkspace& ws, size_t bitmap_bytes, size_t value_bytes) {
  // The sizes view_of would give (a quarter more than asked).
  if (!ws.bitmaps.data) ws.bitmaps = registered_alloc(bitmap_bytes + bitmap_bytes / 4);
  if (!ws.values.data) ws.values = registered_alloc(value_bytes + value_bytes / 4);
}

void chunk_digests_cuda(const std::vector<DiffTensor>& tensors, bool of_old, std::vector<uint64_t>& out,
                        void* stream_ptr) {
  delta_diff_check(tensors);
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  uint64_t chunks = 0, words = 0;
  std::vector<DiffChunkTensor> table = diff_chunk_table(tensors, chunks, words);
  out.assign(chunks, 0);
  if (!chunks) return;
  DeviceBuffer d_table(table.size() * sizeof(DiffChunkTensor)), d_out(chunks * sizeof(uint64_t));
  LIVETRAIN_CUDA_CHECK(
      cudaMemcpy(d_table.p, table.data(), table.size() * sizeof(DiffChunkTensor), cudaMemcpyHostToDevice));
  digest_kernel<<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(
      launch_of(d_table.as<DiffChunkTensor>(), table.size(), 0, nullptr, 0), of_old, d_out.as<uint64_t>());
  LIVETRAIN_CUDA_CHECK(cudaGetLastError());
  LIVETRAIN_CUDA_CHECK(cudaMemcpyAsync(out.data(), d_out.p, chunks * sizeof(uint64_t), cudaMemcpyDeviceToHost, stream));
  LIVETRAIN_CUDA_CHECK(cudaStreamSynchronize(stream));
}

void delta_diff_cuda(const std::vector<DiffTensor>& tensors, DiffOutput& out, void* stream_ptr, DiffWorkspace* ws,
                     bool update_old, const DiffReady& ready) {
  delta_diff_check(tensors);
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const size_t n = tensors.size();
  if (n > static_cast<size_t>(INT32_MAX)) throw Error(ErrorCode::kInvalidArg, "delta diff: too many tensors");
  uint64_t chunks = 0, words = 0;
  const std::vector<DiffChunkTensor> table = diff_chunk_table(tensors, chunks, words);
  const int64_t diff_shape = tuning::get(tuning::kCheckpointDiff);
  const bool one_pass = diff_shape >= 1, overlapped = diff_shape == 2;
  const uint64_t group_bytes = static_cast<uint64_t>(tuning::get(tuning::kCheckpointGroupMib)) << 20;
  const bool use_digests = ws && update_old && tuning::get(tuning::kCheckpointDigests) == 1;

  DiffWorkspace local;
  DiffWorkspace& w = ws ? *ws : local;
  w.retired.clear();                                  // a previous call's outgrown buffers: nobody reads them any more
  if (update_old && !use_digests) w.digests.reset();  // `old` moves without them: they would go stale
  HostBytes bitmaps = view_of(w.bitmaps, words * 4);
  out.changed.assign(n, 0);
  out.bitmap_offset.assign(n, 0);
  out.value_offset.assign(n, 0);
  for (size_t i = 0; i < n; ++i) out.bitmap_offset[i] = table[i].bitmap_word * 4;
  // Hands the outputs over: views into the workspace, or (without one) the local buffers themselves.
  auto finish = [&](HostBytes values, uint64_t value_total) {
    if (ws) {
      out.bitmaps = std::move(bitmaps);
      out.values = std::move(values);
    } else {
      out.bitmaps = std::move(local.bitmaps);
      out.bitmaps.size = words * 4;
      out.values = std::move(local.values);
      out.values.size = value_total;
    }
  };

  DeviceBuffer d_table(n * sizeof(DiffChunkTensor));
  HostBytes h_table = pinned_alloc(n * sizeof(DiffChunkTensor));
  std::copy(table.begin(), table.end(), reinterpret_cast<DiffChunkTensor*>(h_table.data));
  LIVETRAIN_CUDA_CHECK(
      cudaMemcpyAsync(d_table.p, h_table.data, n * sizeof(DiffChunkTensor), cudaMemcpyHostToDevice, stream));
  const DiffChunkTensor* ts = d_table.as<DiffChunkTensor>();

  // Digests: flag the chunks whose live bytes may differ from `old`; none flagged means no change.
  DeviceBuffer d_flags;
  std::vector<uint8_t> flags;  // host copy, to stage only flagged chunks
  Digests* digests = nullptr;
  if (use_digests && chunks) {
    const uint64_t key = table_key(table);
    digests = static_cast<Digests*>(w.digests.get());
    if (!digests || digests->key != key || digests->chunks != chunks) {
      // First use (or another tensor list): hash `old` where it lies, once.
      auto fresh = std::make_shared<Digests>();
      fresh->d = DeviceBuffer(chunks * sizeof(uint64_t));
      fresh->chunks = chunks;
      fresh->key = key;
      digest_kernel<<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(launch_of(ts, n, 0, nullptr, 0), true,
                                                                            fresh->d.as<uint64_t>());
      LIVETRAIN_CUDA_CHECK(cudaGetLastError());
      w.digests = fresh;
      digests = fresh.get();
    }
    const uint64_t counter_at = (chunks + 7) / 8 * 8;  // the flagged-chunk counter, 8-byte aligned for atomicAdd
    d_flags = DeviceBuffer(counter_at + sizeof(unsigned long long));
    auto* d_flagged = reinterpret_cast<unsigned long long*>(d_flags.as<uint8_t>() + counter_at);
    HostBytes h_flagged = pinned_alloc(sizeof(unsigned long long));
    LIVETRAIN_CUDA_CHECK(cudaMemsetAsync(d_flagged, 0, sizeof(unsigned long long), stream));
    flag_kernel<<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(
        launch_of(ts, n, 0, nullptr, 0), digests->d.as<uint64_t>(), d_flags.as<uint8_t>(), d_flagged);
    LIVETRAIN_CUDA_CHECK(cudaGetLastError());
    LIVETRAIN_CUDA_CHECK(
        cudaMemcpyAsync(h_flagged.data, d_flagged, sizeof(unsigned long long), cudaMemcpyDeviceToHost, stream));
    LIVETRAIN_CUDA_CHECK(cudaStreamSynchronize(stream));
    if (*reinterpret_cast<unsigned long long*>(h_flagged.data) == 0) {
      // Nothing changed (up to the digests): no bitmap, no value is read or written.
      finish(view_of(w.values, 0), 0);
      if (ready) ready(n, out.bitmaps.data, out.values.data);
      return;
    }
    flags.resize(chunks);
    LIVETRAIN_CUDA_CHECK(cudaMemcpy(flags.data(), d_flags.p, chunks, cudaMemcpyDeviceToHost));
  }
  const uint8_t* d_flag_ptr = digests ? d_flags.as<uint8_t>() : nullptr;
  auto use = [&](uint64_t c) { return flags.empty() || flags[c]; };

  // The counts and offsets on the device (checkpoint.diff 2 takes both through the mapped host buffers).
  DeviceBuffer d_counts(overlapped ? 0 : chunks * sizeof(uint32_t));
  DeviceBuffer d_offsets(overlapped ? 0 : chunks * sizeof(uint64_t));
  HostBytes h_counts = pinned_alloc(chunks * sizeof(uint32_t));
  HostBytes h_offsets = pinned_alloc(chunks * sizeof(uint64_t));
  const auto* counts = reinterpret_cast<const uint32_t*>(h_counts.data);
  auto* offsets = reinterpret_cast<uint64_t*>(h_offsets.data);
  std::vector<uint64_t> stage_offsets(chunks, 0);
  DiffValuePlan plan(table, chunks, offsets, out);
  const std::vector<uint64_t>& ends = plan.ends;
  const uint64_t& value_total = plan.total;
  auto place = [&](uint64_t c0, uint64_t c1) { plan.place(c0, c1, counts); };
  auto place_rest = [&] { plan.place_rest(); };

  const std::vector<DiffGroup> groups = diff_groups(table, chunks, group_bytes, stage_offsets, use);
  DeviceBuffer d_stage_offsets(chunks * sizeof(uint64_t));
  if (chunks) {
    LIVETRAIN_CUDA_CHECK(cudaMemcpyAsync(d_stage_offsets.p, stage_offsets.data(), chunks * sizeof(uint64_t),
                                         cudaMemcpyHostToDevice, stream));
  }
  const uint64_t* d_so = d_stage_offsets.as<uint64_t>();
  cuda::Stream s0, s1;
  cuda::Event joined;
  LIVETRAIN_CUDA_CHECK(cudaEventRecord(joined.h, stream));  // the side streams start after the caller's work
  LIVETRAIN_CUDA_CHECK(cudaStreamWaitEvent(s0.h, joined.h, 0));
  LIVETRAIN_CUDA_CHECK(cudaStreamWaitEvent(s1.h, joined.h, 0));
  std::vector<cuda::Event> done(groups.size());

  if (!one_pass) {
    // Pass 1: count every chunk, `old` read where it lies; the bitmap goes straight into page-locked
    // host memory.
    if (chunks) {
      diff_count_kernel<<<static_cast<unsigned>(chunks), kThreads, 0, s0.h>>>(
          launch_of(ts, n, 0, device_view<uint32_t>(bitmaps), 0, nullptr, nullptr, d_flag_ptr),
          d_counts.as<uint32_t>());
      LIVETRAIN_CUDA_CHECK(cudaGetLastError());
      LIVETRAIN_CUDA_CHECK(
          cudaMemcpyAsync(h_counts.data, d_counts.p, chunks * sizeof(uint32_t), cudaMemcpyDeviceToHost, s0.h));
    }
    LIVETRAIN_CUDA_CHECK(cudaStreamSynchronize(s0.h));
    place(0, chunks);
    place_rest();
    HostBytes values = view_of(w.values, value_total);
    // Pass 2: compact (and move `old` along, when asked) group by group, on two streams: one group's
    // copies overlap the other's kernel and copies.
    if (chunks && value_total) {
      LIVETRAIN_CUDA_CHECK(
          cudaMemcpyAsync(d_offsets.p, h_offsets.data, chunks * sizeof(uint64_t), cudaMemcpyHostToDevice, s0.h));
      LIVETRAIN_CUDA_CHECK(cudaEventRecord(joined.h, s0.h));
      LIVETRAIN_CUDA_CHECK(cudaStreamWaitEvent(s1.h, joined.h, 0));
      // A group's values: at most one XOR per staged element, plus up to 7 bytes of alignment per tensor,
      // from diff_value_shift(base) bytes in (diff_plan.hpp).
      const uint64_t cap = std::min<uint64_t>(value_total, group_bytes + 8 * n) + kDiffScratchAlign;
      DeviceBuffer d_values0(cap), d_values1(cap);
      DeviceBuffer d_stage0(update_old ? group_bytes : 0), d_stage1(update_old ? group_bytes : 0);
      for (size_t k = 0; k < groups.size(); ++k) {
        const DiffGroup& g = groups[k];
        cudaStream_t st = k % 2 ? s1.h : s0.h;
        uint8_t* d_scratch = (k % 2 ? d_values1 : d_values0).as<uint8_t>();
        uint8_t* d_stage = update_old ? (k % 2 ? d_stage1 : d_stage0).as<uint8_t>() : nullptr;
        if (g.c1 > g.c0) {
          for (const DiffSegment& sg : g.segments) {
            if (update_old)
              LIVETRAIN_CUDA_CHECK(cudaMemcpyAsync(d_stage + sg.stage_offset, sg.old, sg.bytes, cudaMemcpyDefault, st));
          }
          const uint64_t base = offsets[g.c0];
          uint8_t* d_values = d_scratch + diff_value_shift(base);
          const Launch L = launch_of(ts, n, g.c0, device_view<uint32_t>(bitmaps), 0, d_stage,
                                     update_old ? d_so + g.c0 : nullptr, d_flag_ptr);
          compact_group(L, g.c1 - g.c0, d_offsets.as<uint64_t>(), base, d_values,
                        digests ? digests->d.as<uint64_t>() : nullptr, ends[g.c1 - 1], values.data, st);
          for (const DiffSegment& sg : g.segments) {
            if (update_old)
              LIVETRAIN_CUDA_CHECK(cudaMemcpyAsync(sg.old, d_stage + sg.stage_offset, sg.bytes, cudaMemcpyDefault, st));
          }
        }
        LIVETRAIN_CUDA_CHECK(cudaEventRecord(done[k].h, st));
      }
      for (size_t k = 0; k < groups.size(); ++k) {
        LIVETRAIN_CUDA_CHECK(cudaEventSynchronize(done[k].h));
        if (ready && groups[k].tensors_done < n) ready(groups[k].tensors_done, bitmaps.data, values.data);
      }
      LIVETRAIN_CUDA_CHECK(cudaStreamSynchronize(s0.h));  // before the buffers go
      LIVETRAIN_CUDA_CHECK(cudaStreamSynchronize(s1.h));
    }
    LIVETRAIN_CUDA_CHECK(cudaStreamSynchronize(stream));
    const uint8_t* bitmap_base = bitmaps.data;
    finish(std::move(values), value_total);
    if (ready) ready(n, bitmap_base, out.values.data);
    return;
  }

  // One pass over staged groups (checkpoint.diff 1 and 2). Per group: stage `old`, count, counts to the
  // host; then, once the host has placed the values: compact, values and bitmap to the host, `old` moved
  // along.
  uint64_t max_words = 0;
  // Bitmap words of a group: from its first chunk's first word to its last chunk's last.
  auto word_range = [&](const DiffGroup& g, uint64_t& first, uint64_t& last) {
    auto tensor_of = [&](uint64_t c) {
      return static_cast<size_t>(
                 std::upper_bound(table.begin(), table.end(), c,
                                  [](uint64_t x, const DiffChunkTensor& t) { return x < t.first_chunk; }) -
                 table.begin()) -
             1;
    };
    const size_t a = tensor_of(g.c0), b = tensor_of(g.c1 - 1);
    first = table[a].bitmap_word + (g.c0 - table[a].first_chunk) * kChunkWords;
    const uint64_t last_begin = (g.c1 - 1 - table[b].first_chunk) * kChunk;
    last = table[b].bitmap_word + (std::min(last_begin + kChunk, table[b].units) + 31) / 32;
  };
  for (const DiffGroup& g : groups) {
    if (g.c1 == g.c0) continue;
    uint64_t a, b;
    word_range(g, a, b);
    max_words = std::max(max_words, b - a);
  }
  uint64_t slot_bytes = 16;
  for (const DiffGroup& g : groups) slot_bytes = std::max(slot_bytes, g.staged);
  // A group's values: at most one XOR per staged element, plus up to 7 bytes of alignment per tensor,
  // from diff_value_shift(base) bytes in (diff_plan.hpp).
  const uint64_t slot_values = slot_bytes + 8 * n + kDiffScratchAlign;
  // What both shapes below share: the host's value buffer, which grows as groups are placed; the groups
  // announced in order as they complete (`wait`: until they have); and the ending.
  HostBytes values = view_of(w.values, 0);
  uint64_t values_capacity = w.values.size;
  // Group k's values placed after the earlier groups' (the last group's, then the rest), the host buffer
  // grown to hold them; returns where they begin.
  auto place_group = [&](size_t k) {
    const DiffGroup& g = groups[k];
    const uint64_t base = value_total;
    place(g.c0, g.c1);
    if (k + 1 == groups.size()) place_rest();
    if (value_total > values_capacity) values_capacity = grow_values(w, base, value_total, done, k);
    values = view_of(w.values, value_total);
    return base;
  };
  size_t announced = 0;
  auto announce = [&](size_t upto, bool wait) {
    for (; announced < upto; ++announced) {
      if (wait) {
        LIVETRAIN_CUDA_CHECK(cudaEventSynchronize(done[announced].h));
      } else {
        const cudaError_t e = cudaEventQuery(done[announced].h);
        if (e == cudaErrorNotReady) return;
        LIVETRAIN_CUDA_CHECK(e);
      }
      if (ready && groups[announced].tensors_done < n) ready(groups[announced].tensors_done, bitmaps.data, values.data);
    }
  };
  // Every group announced, the streams drained (`extra`: a shape's own third stream, or null) before the
  // shape's buffers go, the outputs handed over.
  auto conclude = [&](cudaStream_t extra) {
    announce(groups.size(), true);
    if (groups.empty()) place_rest();
    LIVETRAIN_CUDA_CHECK(cudaStreamSynchronize(s0.h));
    LIVETRAIN_CUDA_CHECK(cudaStreamSynchronize(s1.h));
    if (extra) LIVETRAIN_CUDA_CHECK(cudaStreamSynchronize(extra));
    LIVETRAIN_CUDA_CHECK(cudaStreamSynchronize(stream));
    values = view_of(w.values, value_total);
    const uint8_t* bitmap_base = bitmaps.data;
    finish(std::move(values), value_total);
    if (ready) ready(n, bitmap_base, out.values.data);
  };
  if (overlapped) {
    // checkpoint.diff = 2: the copies in both directions at once. Each direction's copies go on one stream of
    // their own (`in`: every group's `old` bytes; `out`: its values, bitmap and moved-along `old`), the
    // kernels on a third (`work`), ordered by events. The two-slot shape below moved `old` at ~55 GB/s in
    // all on the H200, one direction's rate, where pinned copies both ways at once reach ~97 GB/s; there a
    // slot's copy in waits behind its previous group's copy out on the same stream, and each group's small
    // copies (counts out, offsets in) can queue behind the other slot's large ones on the copy engine of
    // their direction, which lets the two slots fall into step. Here nothing small crosses by copy: the
    // count kernel writes the counts into mapped page-locked host memory and the compaction reads the value
    // offsets from there (one 8-byte read per chunk). Group k uses slot k % S (checkpoint.diff_slots); its
    // copy in waits only for group k - S to have left, so up to S groups are staged ahead while earlier ones
    // are copied out.
    const size_t S = static_cast<size_t>(tuning::get(tuning::kCheckpointDiffSlots));
    const size_t G = groups.size();
    std::vector<DeviceBuffer> stage, scratch, bits;
    for (size_t s = 0; s < std::min(S, G); ++s) {
      stage.emplace_back(slot_bytes);
      scratch.emplace_back(slot_values);
      bits.emplace_back(max_words * 4);
    }
    cuda::Stream s2;
    LIVETRAIN_CUDA_CHECK(cudaStreamWaitEvent(s2.h, joined.h, 0));
    cudaStream_t in = s0.h, work = s1.h, out_stream = s2.h;
    std::vector<cuda::Event> staged(G), counted(G), computed(G);
    uint32_t* counts_mapped = device_view<uint32_t>(h_counts);
    const uint64_t* offsets_mapped = device_view<uint64_t>(h_offsets);
    auto launch = [&](size_t k) {
      uint64_t first_word, last_word;
      word_range(groups[k], first_word, last_word);
      const size_t slot = k % S;
      return launch_of(ts, n, groups[k].c0, bits[slot].as<uint32_t>(), first_word, stage[slot].as<uint8_t>(),
                       d_so + groups[k].c0, d_flag_ptr);
    };
    auto copy_in = [&](size_t k) {
      if (k >= S) LIVETRAIN_CUDA_CHECK(cudaStreamWaitEvent(in, done[k - S].h, 0));  // the slot is free
      for (const DiffSegment& sg : groups[k].segments) {
        LIVETRAIN_CUDA_CHECK(
            cudaMemcpyAsync(stage[k % S].as<uint8_t>() + sg.stage_offset, sg.old, sg.bytes, cudaMemcpyDefault, in));
      }
      LIVETRAIN_CUDA_CHECK(cudaEventRecord(staged[k].h, in));
    };
    auto count = [&](size_t k) {
      const DiffGroup& g = groups[k];
      LIVETRAIN_CUDA_CHECK(cudaStreamWaitEvent(work, staged[k].h, 0));
      if (g.c1 > g.c0) {
        diff_count_kernel<<<static_cast<unsigned>(g.c1 - g.c0), kThreads, 0, work>>>(launch(k), counts_mapped);
        LIVETRAIN_CUDA_CHECK(cudaGetLastError());
      }
      LIVETRAIN_CUDA_CHECK(cudaEventRecord(counted[k].h, work));
    };
    auto compact_and_copy_out = [&](size_t k) {
      const DiffGroup& g = groups[k];
      const uint64_t base = place_group(k);
      if (g.c1 > g.c0) {
        const Launch L = launch(k);
        uint8_t* d_group_values = scratch[k % S].as<uint8_t>() + diff_value_shift(base);
        const unsigned blocks = static_cast<unsigned>(g.c1 - g.c0);
        diff_compact_kernel<<<blocks, kThreads, 0, work>>>(L, offsets_mapped, base, d_group_values);
        LIVETRAIN_CUDA_CHECK(cudaGetLastError());
        if (digests) {
          digest_kernel<<<blocks, kThreads, 0, work>>>(L, true, digests->d.as<uint64_t>());
          LIVETRAIN_CUDA_CHECK(cudaGetLastError());
        }
        LIVETRAIN_CUDA_CHECK(cudaEventRecord(computed[k].h, work));
        LIVETRAIN_CUDA_CHECK(cudaStreamWaitEvent(out_stream, computed[k].h, 0));
        const uint64_t end = ends[g.c1 - 1];
        if (end > base) {
          LIVETRAIN_CUDA_CHECK(
              cudaMemcpyAsync(values.data + base, d_group_values, end - base, cudaMemcpyDeviceToHost, out_stream));
        }
        uint64_t first_word, last_word;
        word_range(g, first_word, last_word);
        LIVETRAIN_CUDA_CHECK(cudaMemcpyAsync(bitmaps.data + first_word * 4, bits[k % S].p, (last_word - first_word) * 4,
                                             cudaMemcpyDeviceToHost, out_stream));
        if (update_old) {
          for (const DiffSegment& sg : g.segments) {
            LIVETRAIN_CUDA_CHECK(cudaMemcpyAsync(sg.old, stage[k % S].as<uint8_t>() + sg.stage_offset, sg.bytes,
                                                 cudaMemcpyDefault, out_stream));
          }
        }
      } else {
        LIVETRAIN_CUDA_CHECK(cudaEventRecord(computed[k].h, work));
        LIVETRAIN_CUDA_CHECK(cudaStreamWaitEvent(out_stream, computed[k].h, 0));
      }
      LIVETRAIN_CUDA_CHECK(cudaEventRecord(done[k].h, out_stream));
    };
    // Copies in are queued as far ahead as free slots allow: group j's needs group j - S's `done` recorded,
    // which it is once the loop has passed j - S. The work stream takes group k + 1's count only after group
    // k's compaction, which the host releases as soon as group k's counts are in.
    size_t issued = 0;
    auto copy_in_upto = [&](size_t upto) {
      for (; issued < std::min(upto, G); ++issued) copy_in(issued);
    };
    copy_in_upto(S);
    if (G) count(0);
    for (size_t k = 0; k < G; ++k) {
      LIVETRAIN_CUDA_CHECK(cudaEventSynchronize(counted[k].h));
      compact_and_copy_out(k);
      copy_in_upto(k + 1 + S);
      if (k + 1 < G) count(k + 1);
      announce(k + 1, false);
    }
    conclude(s2.h);
    return;
  }
  // checkpoint.diff = 1: two slots (buffers and a stream each); group k uses slot k % 2, so its buffers are
  // free once the stream has finished group k - 2: front (stage, count, counts out), back (compact, copies out).
  DeviceBuffer d_stage[2] = {DeviceBuffer(slot_bytes), DeviceBuffer(slot_bytes)};
  DeviceBuffer d_values[2] = {DeviceBuffer(slot_values), DeviceBuffer(slot_values)};
  DeviceBuffer d_bitmap[2] = {DeviceBuffer(max_words * 4), DeviceBuffer(max_words * 4)};
  cudaStream_t slot_stream[2] = {s0.h, s1.h};
  std::vector<cuda::Event> counted(groups.size());
  // Zero words for the chunks a group does not stage (not flagged): they are unchanged.
  auto front = [&](size_t k) {
    const DiffGroup& g = groups[k];
    const int slot = static_cast<int>(k % 2);
    cudaStream_t st = slot_stream[slot];
    if (g.c1 > g.c0) {
      for (const DiffSegment& sg : g.segments) {
        LIVETRAIN_CUDA_CHECK(
            cudaMemcpyAsync(d_stage[slot].as<uint8_t>() + sg.stage_offset, sg.old, sg.bytes, cudaMemcpyDefault, st));
      }
      uint64_t first_word, last_word;
      word_range(g, first_word, last_word);
      const Launch L = launch_of(ts, n, g.c0, d_bitmap[slot].as<uint32_t>(), first_word, d_stage[slot].as<uint8_t>(),
                                 d_so + g.c0, d_flag_ptr);
      diff_count_kernel<<<static_cast<unsigned>(g.c1 - g.c0), kThreads, 0, st>>>(L, d_counts.as<uint32_t>());
      LIVETRAIN_CUDA_CHECK(cudaGetLastError());
      LIVETRAIN_CUDA_CHECK(cudaMemcpyAsync(h_counts.data + g.c0 * sizeof(uint32_t), d_counts.as<uint32_t>() + g.c0,
                                           (g.c1 - g.c0) * sizeof(uint32_t), cudaMemcpyDeviceToHost, st));
    }
    LIVETRAIN_CUDA_CHECK(cudaEventRecord(counted[k].h, st));
  };
  auto back = [&](size_t k) {
    const DiffGroup& g = groups[k];
    const int slot = static_cast<int>(k % 2);
    cudaStream_t st = slot_stream[slot];
    const uint64_t base = place_group(k);
    if (g.c1 == g.c0) {
      LIVETRAIN_CUDA_CHECK(cudaEventRecord(done[k].h, st));
      return;
    }
    LIVETRAIN_CUDA_CHECK(cudaMemcpyAsync(d_offsets.as<uint64_t>() + g.c0, offsets + g.c0,
                                         (g.c1 - g.c0) * sizeof(uint64_t), cudaMemcpyHostToDevice, st));
    uint64_t first_word, last_word;
    word_range(g, first_word, last_word);
    const Launch L = launch_of(ts, n, g.c0, d_bitmap[slot].as<uint32_t>(), first_word, d_stage[slot].as<uint8_t>(),
                               d_so + g.c0, d_flag_ptr);
    uint8_t* d_group_values = d_values[slot].as<uint8_t>() + diff_value_shift(base);
    compact_group(L, g.c1 - g.c0, d_offsets.as<uint64_t>(), base, d_group_values,
                  digests ? digests->d.as<uint64_t>() : nullptr, ends[g.c1 - 1], values.data, st);
    LIVETRAIN_CUDA_CHECK(cudaMemcpyAsync(bitmaps.data + first_word * 4, d_bitmap[slot].p, (last_word - first_word) * 4,
                                         cudaMemcpyDeviceToHost, st));
    if (update_old) {
      for (const DiffSegment& sg : g.segments) {
        LIVETRAIN_CUDA_CHECK(
            cudaMemcpyAsync(sg.old, d_stage[slot].as<uint8_t>() + sg.stage_offset, sg.bytes, cudaMemcpyDefault, st));
      }
    }
    LIVETRAIN_CUDA_CHECK(cudaEventRecord(done[k].h, st));
  };
  // The host waits only for counts (and, at the end, for the rest), so one group's back half runs while the
  // next one's front half does.
  for (size_t k = 0; k < std::min<size_t>(2, groups.size()); ++k) front(k);
  for (size_t k = 0; k < groups.size(); ++k) {
    LIVETRAIN_CUDA_CHECK(cudaEventSynchronize(counted[k].h));
    back(k);
    if (k + 2 < groups.size()) front(k + 2);  // same stream: after this group's back has used the slot
    announce(k + 1, false);
  }
  conclude(nullptr);
}

}  // namespace livetrain::checkpoint
