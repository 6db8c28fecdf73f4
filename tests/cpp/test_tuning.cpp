// The internal performance knobs (livetrain/tuning.hpp): names, ranges, the LIVETRAIN_TUNING parser, and
// that every code path a knob selects computes the same step as the CPU reference (CUDA; skipped without a
// GPU). The checkpoint knobs' paths are compared in test_checkpoint_diff.cpp and test_checkpoint_store.cpp.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "livetrain/cuda.hpp"
#include "livetrain/error.hpp"
#include "livetrain/optim.hpp"
#include "livetrain/tuning.hpp"
#include "optim/apollo_update.hpp"

#ifdef LIVETRAIN_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace tuning = livetrain::tuning;
namespace opt = livetrain::optim;

namespace {

// Sets knobs for the scope of a test and puts every knob back to its default afterwards.
struct Knobs {
  explicit Knobs(const std::vector<std::pair<std::string, int64_t>>& values = {}) {
    tuning::reset();
    for (const auto& [name, v] : values) tuning::set(name, v);
  }
  ~Knobs() { tuning::reset(); }
};

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const livetrain::Error& e) {
    EXPECT_EQ(e.code(), livetrain::ErrorCode::kInvalidArg);
    return e.what();
  }
  return "";
}

}  // namespace

TEST(Tuning, DefaultsSetResetAndList) {
  Knobs k;
  const auto all = tuning::list();
  ASSERT_EQ(all.size(), static_cast<size_t>(tuning::kNumKnobs));
  for (const auto& info : all) {
    EXPECT_EQ(info.value, info.default_value) << info.name;
    EXPECT_FALSE(info.help.empty()) << info.name;
  }
  EXPECT_EQ(tuning::get(tuning::kApolloBatch), 64);
  EXPECT_EQ(tuning::get(tuning::kApolloTallRows), 2);
  EXPECT_EQ(tuning::get(tuning::kCheckpointPipeline), 1);
  tuning::set("apollo.tall_rows", 4);
  tuning::set("checkpoint.group_mib", 64);
  EXPECT_EQ(tuning::get(tuning::kApolloTallRows), 4);
  EXPECT_EQ(tuning::get(tuning::kCheckpointGroupMib), 64);
  tuning::reset();
  EXPECT_EQ(tuning::get(tuning::kApolloTallRows), 2);
  EXPECT_EQ(tuning::get(tuning::kCheckpointGroupMib), 128);
}

TEST(Tuning, BadNamesAndValuesAreClearErrors) {
  Knobs k;
  std::string e = error_of([] { tuning::set("apollo.tall_rows", 3); });
  EXPECT_NE(e.find("apollo.tall_rows"), std::string::npos) << e;
  EXPECT_NE(e.find("one of 1, 2, 4"), std::string::npos) << e;
  e = error_of([] { tuning::set("apollo.batch", 65); });
  EXPECT_NE(e.find("[1, 64]"), std::string::npos) << e;
  e = error_of([] { tuning::set("apollo.no_such_knob", 1); });
  EXPECT_NE(e.find("unknown knob \"apollo.no_such_knob\""), std::string::npos) << e;
  EXPECT_NE(e.find("apollo.batch"), std::string::npos) << "lists the knobs: " << e;
  EXPECT_EQ(tuning::get(tuning::kApolloTallRows), 2) << "a refused value changes nothing";
}

// Which kernel the batched bf16 update launches (optim/apollo_update.hpp, the dispatcher's table): Mini's kernel
// (with its short rounding by default) only for a batch of APOLLO-Mini steps; every other batch the generic one.
TEST(Tuning, ApolloUpdateKernelChoice) {
  namespace d = livetrain::optim::detail;
  Knobs k;
  auto current = [] {  // the update's knobs as set now
    return d::UpdateKnobs{
        tuning::get(tuning::kApolloUpdateLoadsFirst) == 1, tuning::get(tuning::kApolloUpdateProbe) == 1,
        static_cast<int>(tuning::get(tuning::kApolloUpdateRounds)), tuning::get(tuning::kApolloUpdateMini) == 1,
        tuning::get(tuning::kApolloUpdateFastRound) == 1};
  };
  const d::UpdateKnobs shipped = current();
  EXPECT_EQ(d::update_variant_bits(shipped, true), d::kMini | d::kFastRound)
      << "the default: Mini's kernel with its short rounding for Mini's batches";
  EXPECT_EQ(d::update_variant_bits(shipped, false), 0) << "the generic kernel for any other batch";
  d::UpdateKnobs f = shipped;
  f.rounds = 7;
  EXPECT_EQ(d::update_variant_bits(f, true), d::kMini | d::kFastRound | d::kSevenRounds);
  EXPECT_EQ(d::update_variant_bits(f, false), d::kSevenRounds) << "no fast rounding outside Mini's kernel";
  f.fast_round = false;
  EXPECT_EQ(d::update_variant_bits(f, true), d::kMini | d::kSevenRounds) << "the full rounding path (before)";
  f.mini = false;
  f.fast_round = true;
  EXPECT_EQ(d::update_variant_bits(f, true), d::kSevenRounds);
  d::UpdateKnobs p = shipped;
  p.probe = true;
  EXPECT_EQ(d::update_variant_bits(p, true), d::kProbe | d::kLoadsFirst);

  // The list the Python tests take their variants from: the defaults first, each setting's kernels compiled,
  // the probe once, and every compiled variant reached by some setting.
  const auto variants = tuning::apollo_update_variants();
  ASSERT_FALSE(variants.empty());
  {
    Knobs first(variants.front());
    const d::UpdateKnobs v = current();
    EXPECT_EQ(d::update_variant_bits(v, true), d::update_variant_bits(shipped, true));
    EXPECT_EQ(d::update_variant_bits(v, false), d::update_variant_bits(shipped, false));
  }
  int probes = 0;
  bool reached[d::kNumUpdateVariants] = {};
  for (const auto& setting : variants) {
    Knobs set(setting);
    const d::UpdateKnobs v = current();
    probes += v.probe;
    for (bool mini_batch : {true, false}) {
      ASSERT_TRUE(d::update_compiled(d::update_variant_bits(v, mini_batch)));
      reached[d::update_variant_bits(v, mini_batch)] = true;
    }
  }
  EXPECT_EQ(probes, 1);
  int compiled = 0;
  for (int bits = 0; bits < d::kNumUpdateVariants; ++bits) {
    if (!d::update_compiled(bits)) continue;
    ++compiled;
    EXPECT_TRUE(reached[bits]) << "bits " << bits;
  }
  EXPECT_EQ(compiled, 13) << "2 loads orders x 2 round counts x (generic, Mini, Mini fast) + the probe";
}

// LIVETRAIN_TUNING is read once per process, on first use: each case runs in a fresh process (a death test
// in "threadsafe" style re-executes this binary) that prints what it sees.
TEST(Tuning, EnvironmentVariable) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  auto run = [](const char* value) {
    setenv("LIVETRAIN_TUNING", value, 1);
    try {
      std::fprintf(stderr, "batch=%lld pipeline=%lld\n", static_cast<long long>(tuning::get(tuning::kApolloBatch)),
                   static_cast<long long>(tuning::get(tuning::kCheckpointPipeline)));
    } catch (const livetrain::Error& e) {
      std::fprintf(stderr, "error: %s\n", e.what());
    }
    std::exit(0);
  };
  EXPECT_EXIT(run("apollo.batch=8,checkpoint.pipeline=0"), ::testing::ExitedWithCode(0), "batch=8 pipeline=0");
  EXPECT_EXIT(run(""), ::testing::ExitedWithCode(0), "batch=64 pipeline=1");
  EXPECT_EXIT(run("apollo.batch=8,,"), ::testing::ExitedWithCode(0), "batch=8 pipeline=1");
  EXPECT_EXIT(run("apollo.batch"), ::testing::ExitedWithCode(0),
              "error: LIVETRAIN_TUNING: \"apollo.batch\" is not name=value");
  EXPECT_EXIT(run("apollo.batch=eight"), ::testing::ExitedWithCode(0),
              "error: LIVETRAIN_TUNING: value of apollo.batch");
  EXPECT_EXIT(run("apollo.batch=0"), ::testing::ExitedWithCode(0),
              "error: LIVETRAIN_TUNING: tuning knob apollo.batch = 0");
  EXPECT_EXIT(run("apollo.bach=8"), ::testing::ExitedWithCode(0), "error: tuning: unknown knob \"apollo.bach\"");
  unsetenv("LIVETRAIN_TUNING");
}

#ifdef LIVETRAIN_WITH_CUDA
namespace {

template <typename T>
struct Dev {
  T* p = nullptr;
  size_t n = 0;
  explicit Dev(size_t count) : n(count) {
    EXPECT_EQ(cudaMalloc(reinterpret_cast<void**>(&p), sizeof(T) * (count ? count : 1)), cudaSuccess);
    EXPECT_EQ(cudaMemset(p, 0, sizeof(T) * (count ? count : 1)), cudaSuccess);
  }
  ~Dev() { cudaFree(p); }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
  void put(const std::vector<T>& v) {
    EXPECT_EQ(cudaMemcpy(p, v.data(), sizeof(T) * v.size(), cudaMemcpyHostToDevice), cudaSuccess);
  }
  std::vector<T> get() const {
    std::vector<T> v(n);
    EXPECT_EQ(cudaMemcpy(v.data(), p, sizeof(T) * n, cudaMemcpyDeviceToHost), cudaSuccess);
    return v;
  }
};

uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
float from_bf16(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// One matrix of the set: a bf16 weight with row stride ld (>= cols), bf16 gradients for each step.
struct Matrix {
  int64_t rows, cols, ld;
  std::vector<uint16_t> w0;
  std::vector<std::vector<uint16_t>> grads;
};

// Tall, wide, odd (no 16-byte rows), strided, a vector-shaped matrix each way, and sizes that leave
// partial warps, row chunks and column strips; 70 matrices, so that a batch of 64 is followed by another;
// some get a NaN gradient in their second step.
std::vector<Matrix> matrices(int steps) {
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{769, 5125}, {5125, 769}, {4096, 96}, {96, 4096},
                                                           {300, 1031}, {1000, 1},   {1, 1000},  {257, 2048},
                                                           {2048, 264}, {4100, 512}};
  std::mt19937_64 rng(5);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  std::vector<Matrix> out;
  for (int i = 0; i < 70; ++i) {
    auto [r, c] = shapes[i % shapes.size()];
    Matrix m{r, c, i % 7 == 3 ? c + 8 : c, {}, {}};
    m.w0.resize(static_cast<size_t>(r * m.ld));
    for (auto& x : m.w0) x = to_bf16(0.1f * n01(rng));
    for (int s = 0; s < steps; ++s) {
      std::vector<uint16_t> g(static_cast<size_t>(r * c));
      for (auto& x : g) x = to_bf16((s == 1 ? 5.0f : 1.0f) * n01(rng));  // step 1: the limiter acts
      if (s == 1 && i % 9 == 4) g[g.size() / 2] = 0x7FC0;  // a NaN: that step writes nothing, on both sides
      m.grads.push_back(std::move(g));
    }
    out.push_back(std::move(m));
  }
  return out;
}

struct Result {
  std::vector<std::vector<uint16_t>> w;
  std::vector<std::vector<float>> m, v;
  std::vector<float> prev;
  std::vector<uint64_t> steps;
};

opt::ApolloHyper hyper() {
  opt::ApolloHyper h = opt::apollo_mini_defaults();
  h.lr = 1e-2f;
  h.weight_decay = 0.01f;
  h.rounding = opt::Rounding::kNearest;  // CPU and GPU sums differ in order; nearest keeps results comparable
  return h;
}

// The CPU reference, matrix by matrix.
Result run_cpu(const std::vector<Matrix>& ms, int steps) {
  Result r;
  for (size_t i = 0; i < ms.size(); ++i) {
    const Matrix& mt = ms[i];
    std::vector<uint16_t> w = mt.w0;
    const int64_t K = std::max(mt.rows, mt.cols);
    std::vector<float> m(K), v(K), prev(1, -1.0f);
    std::vector<int32_t> status(1);
    std::vector<uint64_t> step(1);
    for (int s = 0; s < steps; ++s) {
      opt::ApolloStep st;
      st.weight = w.data();
      st.ld_weight = mt.ld;
      st.grad = mt.grads[s].data();
      st.rows = mt.rows;
      st.cols = mt.cols;
      st.m = m.data();
      st.v = v.data();
      st.prev_norm = prev.data();
      st.status = status.data();
      st.step = step.data();
      st.seed = 100 + i;
      st.hyper = hyper();
      opt::apollo_step_cpu(st);
    }
    r.w.push_back(w);
    r.m.push_back(m);
    r.v.push_back(v);
    r.prev.push_back(prev[0]);
    r.steps.push_back(step[0]);
  }
  return r;
}

// All matrices through apollo_step_many_cuda (one_by_one: apollo_step_cuda each), with the knobs as set.
Result run_cuda(const std::vector<Matrix>& ms, int steps, bool one_by_one) {
  std::vector<std::unique_ptr<Dev<uint16_t>>> w, g;
  std::vector<std::unique_ptr<Dev<float>>> m, v, prev;
  std::vector<std::unique_ptr<Dev<int32_t>>> status;
  std::vector<std::unique_ptr<Dev<uint64_t>>> step;
  std::vector<opt::ApolloStep> st(ms.size());
  for (size_t i = 0; i < ms.size(); ++i) {
    const Matrix& mt = ms[i];
    const int64_t K = std::max(mt.rows, mt.cols);
    w.push_back(std::make_unique<Dev<uint16_t>>(mt.w0.size()));
    w.back()->put(mt.w0);
    g.push_back(std::make_unique<Dev<uint16_t>>(static_cast<size_t>(mt.rows * mt.cols)));
    m.push_back(std::make_unique<Dev<float>>(K));
    v.push_back(std::make_unique<Dev<float>>(K));
    prev.push_back(std::make_unique<Dev<float>>(1));
    prev.back()->put({-1.0f});
    status.push_back(std::make_unique<Dev<int32_t>>(1));
    step.push_back(std::make_unique<Dev<uint64_t>>(1));
    st[i].weight = w[i]->p;
    st[i].ld_weight = mt.ld;
    st[i].grad = g[i]->p;
    st[i].rows = mt.rows;
    st[i].cols = mt.cols;
    st[i].m = m[i]->p;
    st[i].v = v[i]->p;
    st[i].prev_norm = prev[i]->p;
    st[i].status = status[i]->p;
    st[i].step = step[i]->p;
    st[i].seed = 100 + i;
    st[i].hyper = hyper();
  }
  const size_t ws_bytes = opt::apollo_many_workspace_bytes(st.data(), static_cast<int>(st.size()));
  Dev<uint8_t> ws(ws_bytes);
  std::vector<std::unique_ptr<Dev<uint8_t>>> own_ws;
  for (size_t i = 0; i < st.size() && one_by_one; ++i) {
    own_ws.push_back(std::make_unique<Dev<uint8_t>>(opt::apollo_workspace_bytes(st[i].rows, st[i].cols, 1)));
    st[i].workspace = own_ws.back()->p;
  }
  for (int s = 0; s < steps; ++s) {
    for (size_t i = 0; i < ms.size(); ++i) g[i]->put(ms[i].grads[s]);
    if (one_by_one) {
      for (const auto& x : st) opt::apollo_step_cuda(x, nullptr);
    } else {
      opt::apollo_step_many_cuda(st.data(), static_cast<int>(st.size()), ws.p, ws_bytes, nullptr);
    }
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  }
  Result r;
  for (size_t i = 0; i < ms.size(); ++i) {
    r.w.push_back(w[i]->get());
    r.m.push_back(m[i]->get());
    r.v.push_back(v[i]->get());
    r.prev.push_back(prev[i]->get()[0]);
    r.steps.push_back(step[i]->get()[0]);
  }
  return r;
}

double rel(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// The GPU result against the CPU reference, with test05_optim.py's tolerances (bf16: 1e-2 on the weights'
// change, 1e-4 on the moments and the limiter's norm).
void expect_close(const Result& gpu, const Result& cpu, const std::vector<Matrix>& ms, const std::string& what) {
  for (size_t i = 0; i < ms.size(); ++i) {
    std::vector<double> dg, dc;
    for (int64_t r = 0; r < ms[i].rows; ++r) {
      for (int64_t c = 0; c < ms[i].cols; ++c) {
        const size_t k = static_cast<size_t>(r * ms[i].ld + c);
        dg.push_back(from_bf16(gpu.w[i][k]) - from_bf16(ms[i].w0[k]));
        dc.push_back(from_bf16(cpu.w[i][k]) - from_bf16(ms[i].w0[k]));
      }
    }
    EXPECT_LT(rel(dg, dc), 1e-2) << what << ": weights of matrix " << i;
    std::vector<double> mg(gpu.m[i].begin(), gpu.m[i].end()), mc(cpu.m[i].begin(), cpu.m[i].end());
    std::vector<double> vg(gpu.v[i].begin(), gpu.v[i].end()), vc(cpu.v[i].begin(), cpu.v[i].end());
    EXPECT_LT(rel(mg, mc), 1e-4) << what << ": M of matrix " << i;
    EXPECT_LT(rel(vg, vc), 1e-4) << what << ": V of matrix " << i;
    EXPECT_LT(std::abs(gpu.prev[i] - cpu.prev[i]) / cpu.prev[i], 1e-4) << what << ": limiter norm of matrix " << i;
    EXPECT_EQ(gpu.steps[i], cpu.steps[i]) << what << ": steps of matrix " << i;
    // Bytes outside the matrix in a strided weight are never written.
    for (int64_t r = 0; r < ms[i].rows && ms[i].ld > ms[i].cols; ++r) {
      for (int64_t c = ms[i].cols; c < ms[i].ld; ++c) {
        const size_t k = static_cast<size_t>(r * ms[i].ld + c);
        ASSERT_EQ(gpu.w[i][k], ms[i].w0[k]) << what << ": matrix " << i << " wrote past its columns";
      }
    }
  }
}

bool same(const Result& a, const Result& b) {
  return a.w == b.w && a.m == b.m && a.v == b.v && a.prev == b.prev && a.steps == b.steps;
}

}  // namespace

// Every variant of the projections (rows per warp, loads in flight, threads, row chunks) is the same step
// as the CPU's up to summation order; the batching, streams and the update's launch shape do not change a
// single bit.
TEST(TuningCuda, ApolloVariantsMatchTheCpuStep) {
  if (livetrain::cuda::devices().empty()) GTEST_SKIP() << "no GPU visible";
  const int steps = 3;
  const auto ms = matrices(steps);
  const Result cpu = run_cpu(ms, steps);
  Result shipped;
  {
    Knobs k;
    shipped = run_cuda(ms, steps, false);
    expect_close(shipped, cpu, ms, "shipped shapes");
    EXPECT_TRUE(same(run_cuda(ms, steps, true), shipped)) << "one by one = batched";
  }
  using Settings = std::vector<std::pair<std::string, int64_t>>;
  const std::vector<Settings> summation_order = {
      {{"apollo.tall_rows", 1}, {"apollo.tall_loads", 2}},
      {{"apollo.tall_rows", 1}, {"apollo.tall_loads", 4}},
      {{"apollo.tall_rows", 1}, {"apollo.tall_loads", 8}},
      {{"apollo.tall_rows", 2}, {"apollo.tall_loads", 2}},
      {{"apollo.tall_rows", 2}, {"apollo.tall_loads", 8}},
      {{"apollo.tall_rows", 4}, {"apollo.tall_loads", 2}},
      {{"apollo.tall_rows", 4}, {"apollo.tall_loads", 4}},
      {{"apollo.tall_threads", 128}},
      {{"apollo.tall_threads", 512}},
      {{"apollo.wide_loads", 2}},
      {{"apollo.wide_loads", 8}},
      {{"apollo.wide_blocks", 16}},
      {{"apollo.wide_blocks", 256}},
      {{"apollo.moments_blocks_per_sm", 1}},
      // The H100-tuned shapes that shipped before the H200 sweep (one fused projection kernel).
      {{"apollo.split_projection", 0}, {"apollo.tall_loads", 4}, {"apollo.wide_loads", 4}},
  };
  for (const Settings& s : summation_order) {
    Knobs k(s);
    std::string what;
    for (const auto& [n, v] : s) what += n + "=" + std::to_string(v) + " ";
    expect_close(run_cuda(ms, steps, false), cpu, ms, what);
  }
  {
    // The one-kernel step (cooperative, grid-wide barriers) of the one-at-a-time path: odd sizes, strided
    // weights, NaN gradients and the limiter, as the CPU step; alone and with other knobs that it overrides.
    Knobs k({{"apollo.fused_step", 1}});
    const Result fused = run_cuda(ms, steps, true);
    expect_close(fused, cpu, ms, "apollo.fused_step=1");
    EXPECT_TRUE(same(run_cuda(ms, steps, true), fused)) << "apollo.fused_step=1 is deterministic";
    Knobs k2({{"apollo.fused_step", 1}, {"apollo.update_threads", 512}, {"apollo.tall_threads", 512}});
    EXPECT_TRUE(same(run_cuda(ms, steps, true), fused)) << "apollo.fused_step=1 fixes its own launch shapes";
  }
  const std::vector<Settings> bit_identical = {
      {{"apollo.split_projection", 1}},
      {{"apollo.update_threads", 128}},
      {{"apollo.update_threads", 512}},
      {{"apollo.update_blocks_per_sm", 1}},
      {{"apollo.batch", 1}},
      {{"apollo.batch", 7}},
      {{"apollo.streams", 2}},
      {{"apollo.streams", 2}, {"apollo.batch", 5}, {"apollo.update_threads", 512}},
      // Variants of the batched bf16 update (the generic kernel, loads first, Mini's kernel's full rounding path).
      {{"apollo.update_mini", 0}},
      {{"apollo.update_mini", 0}, {"apollo.update_threads", 256}},
      {{"apollo.update_loads_first", 1}},
      {{"apollo.update_loads_first", 1}, {"apollo.update_mini", 0}},
      {{"apollo.update_fast_round", 0}},
      {{"apollo.update_fast_round", 0}, {"apollo.update_loads_first", 1}},
  };
  for (const Settings& s : bit_identical) {
    Knobs k(s);
    std::string what;
    for (const auto& [n, v] : s) what += n + "=" + std::to_string(v) + " ";
    EXPECT_TRUE(same(run_cuda(ms, steps, false), shipped)) << what << "changed the result";
  }
  Knobs k({{"apollo.tall_rows", 4}, {"apollo.tall_loads", 8}});
  std::string e = error_of([&] { run_cuda(ms, 1, false); });
  EXPECT_NE(e.find("not a compiled variant"), std::string::npos) << e;
}
#endif
