// The knob table behind tuning.hpp: names, defaults, allowed values, and the LIVETRAIN_TUNING parser.
#include "livetrain/tuning.hpp"

#include <algorithm>
#include <array>
#include <atomic>
#include <charconv>
#include <cstdlib>
#include <set>

#include "livetrain/error.hpp"
#include "optim/apollo_update.hpp"

namespace livetrain::tuning {

namespace {

struct Spec {
  const char* name;
  int64_t def;
  std::vector<int64_t> choices;
  int64_t min, max;
  const char* help;
};

// Defaults are what ships, the best of the first H200 sweep (docs/tuning.md): for APOLLO split projections
// with two loads in flight (bit-identical to the H100-tuned shapes before them), for the checkpoint the
// pipelined one-pass diff with digests (byte-identical files; the only setting under 0.1 s per 10 GB after
// no change); for the APOLLO update the best of the H200 update probe (docs/tuning.md, Phase 4): APOLLO-Mini's
// kernel for Mini's batches, 128 threads per block (bit-identical).
const std::array<Spec, kNumKnobs>& specs() {
  static const std::array<Spec, kNumKnobs> s = {{
      {"apollo.batch", 64, {}, 1, 64, "rank-1 matrices per batched launch"},
      {"apollo.streams", 1, {1, 2}, 0, 0, "streams the batches alternate over"},
      {"apollo.split_projection",
       1,
       {0, 1},
       0,
       0,
       "1: tall and wide projections as two kernels, each with its own registers (any variant of theirs implies it)"},
      {"apollo.tall_threads", 256, {128, 256, 512}, 0, 0, "threads per block, tall projection"},
      {"apollo.tall_rows", 2, {1, 2, 4}, 0, 0, "rows per warp, tall projection"},
      {"apollo.tall_loads",
       2,
       {2, 4, 8},
       0,
       0,
       "16-byte loads in flight per row and lane, tall projection (rows x loads <= 16)"},
      {"apollo.wide_blocks",
       1024,
       {},
       16,
       1024,
       "target blocks per wide matrix (chunks x strips; chunks stay within the workspace's)"},
      {"apollo.wide_loads", 2, {2, 4, 8}, 0, 0, "rows in flight per thread, wide projection"},
      {"apollo.moments_blocks_per_sm", 4, {}, 1, 32, "moments grid cap per multiprocessor"},
      {"apollo.update_threads", 128, {128, 256, 512}, 0, 0, "threads per block, update"},
      {"apollo.update_blocks_per_sm", 16, {}, 1, 64, "update grid cap per matrix and multiprocessor"},
      {"apollo.fused_step",
       0,
       {0, 1},
       0,
       0,
       "1: one matrix's rank-1 step (backward hooks) as one cooperative kernel with grid-wide barriers"},
      {"apollo.update_rounds",
       10,
       {10, 7},
       0,
       0,
       "Philox rounds of the APOLLO update's stochastic-rounding offsets, CPU and CUDA alike "
       "(7: other bits, the same distribution)"},
      {"apollo.update_loads_first",
       0,
       {0, 1},
       0,
       0,
       "batched update of bf16 weights and gradients: 1 issues a group's loads before its rounding bits"},
      {"apollo.update_probe",
       0,
       {0, 1},
       0,
       0,
       "1: the batched update of bf16 weights and gradients writes W + G bitwise instead of the step: a bandwidth "
       "probe for bench/optim.py --probe, the weights are garbage"},
      {"apollo.update_mini",
       1,
       {0, 1},
       0,
       0,
       "1: a batch of APOLLO-Mini steps of bf16 weights and gradients updates in a kernel with Mini's choices (tensor "
       "scaling, stochastic rounding, whole tensors) compiled in (same bits); other batches, and 0: the generic "
       "kernel"},
      {"apollo.update_resident",
       0,
       {0, 2, 3, 4, 5, 6, 8},
       0,
       0,
       "at most this many blocks of the batched update per multiprocessor, through unused dynamic shared memory, so "
       "that variants compare at one occupancy (0: what registers allow)"},
      {"apollo.update_fast_round",
       1,
       {0, 1},
       0,
       0,
       "with apollo.update_mini: 1 rounds a group of 8 weights as (bits + offset) >> 16 unless one value is not "
       "finite or >= 2^127 in magnitude, which takes the full path; 0: every group the full path (same bits)"},
      {"checkpoint.pipeline", 1, {0, 1}, 0, 0, "1: encode records while the GPU diff runs, group by group"},
      {"checkpoint.diff",
       2,
       {0, 1, 2},
       0,
       0,
       "GPU diff: 0 two passes reading the head copy in mapped memory; 1 one pass over DMA-staged groups on two "
       "streams (each stream's copies in and out one after the other); 2 one pass, the copies in on one stream, the "
       "kernels on a second, the copies out on a third (both directions at once)"},
      {"checkpoint.group_mib", 128, {}, 1, 2048, "device scratch per group of the GPU diff, MiB"},
      {"checkpoint.digests",
       1,
       {0, 1},
       0,
       0,
       "1: skip chunks whose device-resident 64-bit digest matches the head copy's"},
      {"checkpoint.encode_batch", 8, {}, 1, 256, "blocks of records per encode batch, per CPU thread"},
      {"checkpoint.writeback_mib",
       16,
       {},
       0,
       1024,
       "start the delta's disk writes every this many MiB written (0: leave them all to the final fsync)"},
      {"checkpoint.early_writer",
       1,
       {0, 1},
       0,
       0,
       "1: a thread writes the delta from the first encoded record on (the header's record count last) instead of "
       "once the diff is over"},
      {"checkpoint.encoder",
       4,
       {0, 1, 2, 3, 4},
       0,
       0,
       "4: as 3, a record's gaps (where measured) measured and written block by block on the pool's threads; 3: as "
       "2, the gap encoding's size measured only for a record it could win (a gap takes a byte or more), and its "
       "gaps written, by the one thread that assembles the record; 2: "
       "byte planes histogrammed 8 bytes per load and coded 4 symbols per branch-free flush, a record's blocks "
       "handed to the writer as they are, its checksum the writer's, the gap sizes measured per block for every "
       "record with at most 1/8 of its elements changed; 1: that coder, each record copied into one string and "
       "hashed by the encoder; 0: the coder before, records copied and hashed (all: the same bytes)"},
      {"checkpoint.pin_chunk_mib",
       256,
       {},
       2,
       1048576,
       "prepare_gpu page-locks the head copy in cudaHostRegister calls of whole tensors of at least this many "
       "MiB (each holds the driver's lock for less time than one call over the whole copy)"},
      {"checkpoint.diff_slots",
       4,
       {},
       2,
       16,
       "with checkpoint.diff 2: groups in flight, each with its own device stage, values and bitmap buffers"},
  }};
  return s;
}

bool allowed(const Spec& s, int64_t v) {
  if (!s.choices.empty()) return std::find(s.choices.begin(), s.choices.end(), v) != s.choices.end();
  return v >= s.min && v <= s.max;
}

std::string allowed_text(const Spec& s) {
  if (s.choices.empty()) return "[" + std::to_string(s.min) + ", " + std::to_string(s.max) + "]";
  std::string out = "one of";
  for (size_t i = 0; i < s.choices.size(); ++i) out += (i ? ", " : " ") + std::to_string(s.choices[i]);
  return out;
}

int find(std::string_view name) {
  for (int k = 0; k < kNumKnobs; ++k) {
    if (name == specs()[k].name) return k;
  }
  std::string known;
  for (const Spec& s : specs()) known += std::string(known.empty() ? "" : ", ") + s.name;
  throw Error(ErrorCode::kInvalidArg, "tuning: unknown knob \"" + std::string(name) + "\" (knobs: " + known + ")");
}

void set_checked(int k, int64_t v, std::string_view source) {
  const Spec& s = specs()[k];
  if (!allowed(s, v)) {
    throw Error(ErrorCode::kInvalidArg, std::string(source) + "tuning knob " + s.name + " = " + std::to_string(v) +
                                            " is not allowed (" + allowed_text(s) + ")");
  }
}

using Values = std::array<std::atomic<int64_t>, kNumKnobs>;

// "name=value,name=value" from LIVETRAIN_TUNING, checked like set().
void parse_env(Values& v) {
  const char* env = std::getenv("LIVETRAIN_TUNING");
  if (!env) return;
  std::string_view rest(env);
  while (!rest.empty()) {
    const size_t comma = rest.find(',');
    std::string_view item = rest.substr(0, comma);
    rest = comma == std::string_view::npos ? std::string_view() : rest.substr(comma + 1);
    if (item.empty()) continue;
    const size_t eq = item.find('=');
    if (eq == std::string_view::npos) {
      throw Error(ErrorCode::kInvalidArg, "LIVETRAIN_TUNING: \"" + std::string(item) + "\" is not name=value");
    }
    const int k = find(item.substr(0, eq));
    std::string_view text = item.substr(eq + 1);
    int64_t value = 0;
    auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
    if (ec != std::errc() || end != text.data() + text.size()) {
      throw Error(ErrorCode::kInvalidArg, "LIVETRAIN_TUNING: value of " + std::string(item.substr(0, eq)) + " (\"" +
                                              std::string(text) + "\") is not an integer");
    }
    set_checked(k, value, "LIVETRAIN_TUNING: ");
    v[k].store(value, std::memory_order_relaxed);
  }
}

Values& values() {
  static Values v;
  // Defaults, then the environment, once; a bad variable throws on every use until it is fixed.
  static const bool initialized = [] {
    for (int k = 0; k < kNumKnobs; ++k) v[k].store(specs()[k].def, std::memory_order_relaxed);
    parse_env(v);
    return true;
  }();
  (void)initialized;
  return v;
}

}  // namespace

int64_t get(Knob knob) { return values()[knob].load(std::memory_order_relaxed); }

void set(std::string_view name, int64_t value) {
  const int k = find(name);
  set_checked(k, value, "");
  values()[k].store(value, std::memory_order_relaxed);
}

void reset() {
  Values& v = values();
  for (int k = 0; k < kNumKnobs; ++k) v[k].store(specs()[k].def, std::memory_order_relaxed);
}

std::vector<KnobInfo> list() {
  std::vector<KnobInfo> out;
  for (int k = 0; k < kNumKnobs; ++k) {
    const Spec& s = specs()[k];
    out.push_back(KnobInfo{s.name, get(static_cast<Knob>(k)), s.def, s.choices, s.min, s.max, s.help});
  }
  return out;
}

std::vector<std::vector<std::pair<std::string, int64_t>>> apollo_update_variants() {
  using optim::detail::UpdateKnobs;
  std::vector<std::vector<std::pair<std::string, int64_t>>> out;
  std::set<std::pair<int, int>> seen;
  for (int probe = 0; probe < 2; ++probe)
    for (int rounds : {10, 7})
      for (int mini = 1; mini >= 0; --mini)
        for (int loads_first = 0; loads_first < 2; ++loads_first)
          for (int fast = 1; fast >= 0; --fast) {
            const UpdateKnobs k{loads_first == 1, probe == 1, rounds, mini == 1, fast == 1};
            const int a = optim::detail::update_variant_bits(k, true), b = optim::detail::update_variant_bits(k, false);
            if (!seen.insert({a, b}).second) continue;
            out.push_back({{"apollo.update_loads_first", loads_first},
                           {"apollo.update_probe", probe},
                           {"apollo.update_rounds", rounds},
                           {"apollo.update_mini", mini},
                           {"apollo.update_fast_round", fast}});
          }
  return out;
}

}  // namespace livetrain::tuning
