// Attribution of delta_diff_cuda's time on an 8 GiB bf16 set (20% of the elements changed by +-1 ulp):
// the last durable copy on the device, in page-locked host memory, and in host memory moved along by the
// kernel (update_old, as the checkpoint store's saves do). Results: bench/RESULTS.md, "Checkpoint save".
//
// build (GPU machine, after `bash scripts/gpu.sh none`):
//   nvcc -O2 -std=c++20 -arch=sm_90a -Iinclude bench/diff_cuda.cu build-gpu/liblivetrain_core.a -o /tmp/diff_cuda
//   /tmp/diff_cuda
#include <cuda_runtime.h>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <vector>
#include "livetrain/checkpoint/diff.hpp"
using namespace livetrain;
__global__ void init(uint16_t* now, uint16_t* old, uint64_t n, uint64_t seed) {
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x) {
    uint64_t h = (i + seed) * 0x9E3779B97F4A7C15ull;
    h ^= h >> 29;
    h *= 0xBF58476D1CE4E5B9ull;
    h ^= h >> 32;
    uint16_t o = 0x3c00 + (h & 0x3ff);
    old[i] = o;
    now[i] = ((h >> 20) % 5 == 0) ? (uint16_t)(o + (((h >> 40) & 1) ? 1 : -1)) : o;
  }
}
int main() {
  const int T = 64;  // 64 tensors of 64 Mi elements
  const uint64_t units = (uint64_t{8} << 30) / 2 / T;
  std::vector<uint16_t*> now(T), dold(T);
  uint8_t* host;
  size_t bytes = units * 2 * T;
  cudaHostAlloc((void**)&host, bytes, cudaHostAllocMapped | cudaHostAllocPortable);
  std::vector<uint8_t> backup(bytes);
  for (int t = 0; t < T; ++t) {
    cudaMalloc(&now[t], units * 2);
    cudaMalloc(&dold[t], units * 2);
    init<<<1024, 256>>>(now[t], dold[t], units, t * units);
    cudaMemcpy(host + t * units * 2, dold[t], units * 2, cudaMemcpyDeviceToHost);
  }
  std::memcpy(backup.data(), host, bytes);
  cudaDeviceSynchronize();
  auto run = [&](const char* what, bool on_device, bool update) {
    std::memcpy(host, backup.data(), bytes);
    std::vector<checkpoint::DiffTensor> ts;
    for (int t = 0; t < T; ++t)
      ts.push_back({now[t], on_device ? (void*)dold[t] : (void*)(host + t * units * 2), units, 2});
    checkpoint::DiffWorkspace ws;
    checkpoint::diff_workspace_reserve(ws, bytes / 16, bytes / 4);
    for (int rep = 0; rep < 2; ++rep) {
      std::memcpy(host, backup.data(), bytes);
      checkpoint::DiffOutput out;
      auto t0 = std::chrono::steady_clock::now();
      checkpoint::delta_diff_cuda(ts, out, nullptr, &ws, update);
      double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      uint64_t c = 0;
      for (auto x : out.changed) c += x;
      std::printf("%-40s rep %d: %.3f s (changed %.1f%%)\n", what, rep, s, 100.0 * c / (units * T));
    }
  };
  run("old on device", true, false);
  run("old pinned host, no update", false, false);
  run("old pinned host, update_old", false, true);
}
