// Internal: the compiled variants of the batched APOLLO update of bf16 weights and gradients (tuning knobs
// apollo.update_*, docs/tuning.md): the bits of the update kernels' kVariant and which of them have a kernel.
// One table for the CUDA dispatcher (apollo.cu) and the binding that lists the variants for the tests
// (_core.apollo_update_variants), so that a test cannot name a combination that has no kernel.
#pragma once

namespace livetrain::optim::detail {

constexpr int kLoadsFirst = 1;   // apollo.update_loads_first: a group's loads before its rounding bits
constexpr int kProbe = 2;        // apollo.update_probe: W ← W + G bitwise, no step (a bandwidth probe)
constexpr int kSevenRounds = 4;  // apollo.update_rounds 7: Philox4x32-7 rounding offsets (other bits)
constexpr int kMini = 8;         // apollo.update_mini: APOLLO-Mini's choices (tensor scaling, stochastic rounding,
                                 // whole tensors) compiled in; the host picks it for batches of such steps only
constexpr int kFastRound = 16;   // apollo.update_fast_round (with kMini): a group's stochastic rounding without the
                                 // per-element guards unless one of its 8 values needs them
constexpr int kNumUpdateVariants = 32;

// Every combination but the probe's (alone, with its loads first) and the short rounding outside Mini's kernel.
// Loads of several groups per thread (apollo.update_unroll 2 and 4: 0.80x on the 8b set and 0.81x on 27b in
// the probe of the fourth session of 2026-12-01), Mini's kernel at unroll > 1, the cache hints and the register
// caps measured slower on the H200 (bench/RESULTS.md) and are gone.
constexpr bool update_compiled(int v) {
  if (v < 0 || v >= kNumUpdateVariants) return false;
  if (v & kProbe) return v == (kProbe | kLoadsFirst);
  return !(v & kFastRound) || (v & kMini);
}

// The apollo.update_* knobs that choose the batched update's kernel (read once per step).
struct UpdateKnobs {
  bool loads_first = false, probe = false;
  int rounds = 10;  // apollo.update_rounds
  bool mini = true, fast_round = true;
};

// The batched update's variant bits. `mini_batch`: every step of the batch is APOLLO-Mini's (tensor scaling,
// stochastic rounding; the batched path steps whole tensors, apollo_step_many_cuda refuses shards); only then
// does apollo.update_mini take Mini's kernel (and apollo.update_fast_round its short rounding): any other batch
// runs the generic kernel, which reads the scaling and rounding of each step. The probe ignores the other knobs.
// Every setting of the knobs names a compiled kernel (update_compiled) for either kind of batch.
constexpr int update_variant_bits(const UpdateKnobs& k, bool mini_batch) {
  if (k.probe) return kProbe | kLoadsFirst;
  const bool mini_kernel = k.mini && mini_batch;
  return (k.loads_first ? kLoadsFirst : 0) | (k.rounds == 7 ? kSevenRounds : 0) |
         (mini_kernel ? kMini | (k.fast_round ? kFastRound : 0) : 0);
}

}  // namespace livetrain::optim::detail
