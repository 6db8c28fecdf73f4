// Helpers of the checkpoint tests: a small random bf16 model directory, live copies of it, and changes.
#pragma once

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "livetrain/checkpoint/format.hpp"
#include "livetrain/checkpoint/store.hpp"
#include "livetrain/safetensors.hpp"
#include "livetrain/tuning.hpp"

namespace livetrain::testing {

// Weights held by "the engine": one host buffer per tensor.
struct LiveModel {
  std::vector<std::string> names;
  std::vector<std::vector<uint64_t>> shapes;
  std::vector<DType> dtypes;
  std::vector<std::vector<uint8_t>> data;

  std::vector<checkpoint::LiveTensor> views() {
    std::vector<checkpoint::LiveTensor> v;
    for (size_t i = 0; i < names.size(); ++i)
      v.push_back(checkpoint::LiveTensor{names[i], dtypes[i], shapes[i], data[i].data(), -1, {}});
    return v;
  }
  std::vector<safetensors::TensorRef> refs() const {
    std::vector<safetensors::TensorRef> r;
    for (size_t i = 0; i < names.size(); ++i)
      r.push_back({names[i], dtypes[i], shapes[i], data[i].data(), data[i].size()});
    return r;
  }
};

// Odd sizes on purpose; one F32 tensor beside the bf16 ones; `scale` multiplies the big matrix.
inline LiveModel make_live(uint64_t seed, uint64_t scale = 1) {
  LiveModel m;
  std::mt19937_64 rng(seed);
  auto add = [&](std::string name, DType dt, std::vector<uint64_t> shape) {
    uint64_t n = 1;
    for (auto d : shape) n *= d;
    std::vector<uint8_t> bytes(n * checkpoint::unit_bytes(dt));
    for (auto& b : bytes) b = static_cast<uint8_t>(rng());
    if (dt == DType::kBF16) {  // finite bf16: clear the top exponent bit
      for (size_t i = 1; i < bytes.size(); i += 2) bytes[i] &= 0xBF;
    }
    m.names.push_back(std::move(name));
    m.dtypes.push_back(dt);
    m.shapes.push_back(std::move(shape));
    m.data.push_back(std::move(bytes));
  };
  add("model.embed_tokens.weight", DType::kBF16, {97 * scale, 64});
  add("model.layers.0.mlp.up_proj.weight", DType::kBF16, {112, 64});
  add("model.layers.0.self_attn.q_proj.weight", DType::kBF16, {64, 63});
  add("model.norm.weight", DType::kF32, {64});
  return m;
}

// Flips low mantissa bits of a fraction of bf16 elements (an optimizer step's footprint).
inline void perturb(LiveModel& m, uint64_t seed, double fraction) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(0, 1);
  for (size_t t = 0; t < m.names.size(); ++t) {
    uint32_t unit = checkpoint::unit_bytes(m.dtypes[t]);
    for (size_t e = 0; e < m.data[t].size() / unit; ++e) {
      if (u(rng) < fraction) m.data[t][e * unit] ^= static_cast<uint8_t>(1 + rng() % 7);
    }
  }
}

// Writes the model as a sharded directory (so several files are involved).
inline void write_model_dir(const std::string& dir, const LiveModel& m) {
  std::filesystem::create_directories(dir);
  safetensors::write_model(dir, m.refs(), 16 * 1024);
}

// Every tensor of `want` at generation g of the store. The store's tensor order is sorted by name, LiveModel's
// is make_live's: they are compared by name.
inline void expect_state(checkpoint::Store& s, uint64_t g, const LiveModel& want) {
  auto bufs = s.state(g);
  for (size_t i = 0; i < s.commit().tensors.size(); ++i) {
    const auto& name = s.commit().tensors[i].name;
    size_t k = std::find(want.names.begin(), want.names.end(), name) - want.names.begin();
    ASSERT_EQ(bufs[i], want.data[k]) << "generation " << g << " tensor " << name;
  }
}

// Runs `body` under every tuning of a GPU save (docs/tuning.md): checkpoint.pipeline and .digests each 0 and
// 1, .diff 0, 1 and 2, checkpoint.group_mib alternately 256 and 1 (1 MiB: several groups per large tensor); the
// combination is in the failure messages, and every knob is back at its default afterwards.
template <class Body>
void for_each_gpu_save_tuning(Body body) {
  struct Reset {
    ~Reset() { tuning::reset(); }
  } reset_after;
  int combo = 0;
  for (int pipeline : {0, 1}) {
    for (int diff : {0, 1, 2}) {
      for (int digests : {0, 1}) {
        const int mib = combo % 2 ? 1 : 256, early = combo / 2 % 2;
        ++combo;
        SCOPED_TRACE("pipeline=" + std::to_string(pipeline) + " diff=" + std::to_string(diff) +
                     " digests=" + std::to_string(digests) + " group_mib=" + std::to_string(mib) +
                     " early_writer=" + std::to_string(early));
        tuning::reset();
        tuning::set("checkpoint.pipeline", pipeline);
        tuning::set("checkpoint.diff", diff);
        tuning::set("checkpoint.digests", digests);
        tuning::set("checkpoint.group_mib", mib);
        tuning::set("checkpoint.early_writer", early);
        body();
      }
    }
  }
}

}  // namespace livetrain::testing
