// The diff of live weights against the last durable state: a CPU reference and a CUDA implementation with
// the same result (changed counts, bitmaps, XOR values), whose parts delta.hpp encodes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

namespace livetrain::checkpoint {

// One tensor to diff: `units` elements of `unit` bytes (1, 2, 4 or 8), compared bit for bit.
struct DiffTensor {
  const void* now = nullptr;  // [units × unit] the live weights (device memory for delta_diff_cuda)
  const void* old = nullptr;  // [units × unit] the last durable bytes (for delta_diff_cuda: device memory,
                              // or pinned host memory, which the kernel then reads over PCIe; written
                              // when delta_diff_cuda is asked to update it)
  uint64_t units = 0;
  uint32_t unit = 2;
};

// Host memory that frees itself (pinned, from cudaMallocHost, when written by delta_diff_cuda).
struct HostBytes {
  uint8_t* data = nullptr;
  size_t size = 0;
  void (*release)(uint8_t*) = nullptr;

  HostBytes() = default;
  HostBytes(HostBytes&& o) noexcept : data(o.data), size(o.size), release(o.release) {
    o.data = nullptr;
    o.size = 0;
  }
  HostBytes& operator=(HostBytes&& o) noexcept {
    if (this != &o) {
      reset();
      data = o.data;
      size = o.size;
      release = o.release;
      o.data = nullptr;
      o.size = 0;
    }
    return *this;
  }
  HostBytes(const HostBytes&) = delete;
  HostBytes& operator=(const HostBytes&) = delete;
  ~HostBytes() { reset(); }
  void reset() {
    if (data && release) release(data);
    data = nullptr;
    size = 0;
  }
};

// The diff of every tensor, in host memory: only the changed elements' values and the bitmaps travel.
struct DiffOutput {
  std::vector<uint64_t> changed;        // [tensors] elements whose bits differ
  std::vector<uint64_t> bitmap_offset;  // [tensors] into `bitmaps`: ceil(units / 8) bytes, LSB first
  std::vector<uint64_t> value_offset;   // [tensors] into `values`: changed × unit bytes, now XOR old
  HostBytes bitmaps;
  HostBytes values;
};

// CPU reference (multithreaded over tensors); `now` and `old` are host memory.
void delta_diff_cpu(const std::vector<DiffTensor>& tensors, DiffOutput& out);

// Page-locked, GPU-mapped host buffers for delta_diff_cuda's outputs, kept between calls and grown as
// needed (by a quarter more than asked), so that a store's saves stop allocating once sizes settle.
struct DiffWorkspace {
  HostBytes bitmaps, values;
  // Values buffers outgrown during the last call (one pass over staged groups learns the total only at
  // the end): kept until the next call, so that addresses handed to its DiffReady stay valid.
  std::vector<HostBytes> retired;
  // With the knob checkpoint.digests and update_old: one 64-bit digest per chunk of `old`, in device
  // memory (src/checkpoint/digest.hpp), kept for the same list of tensors. Whoever changes `old` other
  // than through delta_diff_cuda must reset it (the next call then hashes `old` again).
  std::shared_ptr<void> digests;
};
// Sizes a workspace ahead of time (page-locking is slow: a store does it on its first GPU save).
void diff_workspace_reserve(DiffWorkspace& ws, size_t bitmap_bytes, size_t value_bytes);
// The same for a workspace whose buffers are unset, by writing fresh pages and registering them
// (cudaHostRegister, one call per buffer) instead of cudaHostAlloc: Store::prepare_gpu's, on its own thread.
void diff_workspace_reserve_registered(DiffWorkspace& ws, size_t bitmap_bytes, size_t value_bytes);

// The same result computed on the current CUDA device: a count pass (per-warp ballots give the bitmap,
// per-block counts), a prefix sum over the block counts, then a compaction pass that places each
// changed element's XOR by its rank. The bitmaps are written straight into page-locked host memory;
// the values go through bounded device scratch buffers (checkpoint.group_mib) and are copied to page-locked host
// memory group by group. Positions come from the count pass's bitmap, so the record stays
// self-consistent while the weights are written concurrently (an element changed back in between is
// recorded with XOR 0, which applies as no change). With `workspace`, the outputs are views into it
// (valid until its next use); without, `out` owns them. With `update_old`, each `old` is afterwards
// the state the output describes (old ^ XOR at every marked position, i.e. the `now` bits read there),
// written back by whole 32-element rows that hold a change; `old` must then be writable. Synchronizes
// `stream` (a cudaStream_t) before returning. Throws Error(kUnsupported) in builds without CUDA.
//
// Tuning (docs/tuning.md): checkpoint.diff = 1 replaces the two passes by one pass over groups of chunks
// whose `old` bytes are staged in device memory by DMA (read once over PCIe, not twice); 2 (the default) runs
// that pass with the copies in, the kernels and the copies out on three streams, checkpoint.diff_slots groups
// in flight (both directions of PCIe at once); checkpoint.group_mib sizes the groups; checkpoint.digests skips chunks
// whose digest matches (see DiffWorkspace::digests). Every variant gives the same output.
//
// `ready`, if given, is called on the calling thread each time the outputs of more tensors are complete
// in host memory: tensors [0, done) may then be read (out.changed, the offsets, and the bytes at
// `bitmaps` + bitmap_offset and `values` + value_offset; the values buffer may move while the call runs,
// the addresses passed stay valid until the next call with the same workspace, or the return without
// one). out.changed and the offsets are sized before the first call. The last call has done = tensors.
using DiffReady = std::function<void(size_t done, const uint8_t* bitmaps, const uint8_t* values)>;
void delta_diff_cuda(const std::vector<DiffTensor>& tensors, DiffOutput& out, void* stream,
                     DiffWorkspace* workspace = nullptr, bool update_old = false, const DiffReady& ready = {});

}  // namespace livetrain::checkpoint
