// Internal performance knobs: launch shapes, batch sizes and pipeline choices of the optimizer step and the
// checkpoint save, settable without rebuilding so that a benchmark can compare candidate code paths in one
// run (`bench/optim.py --sweep`, `bench/checkpoint.py --sweep`, docs/tuning.md). Not an API: knobs come
// and go as defaults are measured, and every knob's default is the behaviour that ships.
//
// Values come from the environment variable LIVETRAIN_TUNING ("name=value,name=value", read once, on
// first use; a bad entry is an Error naming it) and from set() (bound as _core.tuning_set). A knob is read
// when a step or a save starts: changing one between calls is safe, changing one during a call is not
// (the call may see either value). No knob changes a result's bytes except where its help says so (the
// projection's summation order), nor any buffer size a caller allocates.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace livetrain::tuning {

enum Knob : int {
  // APOLLO rank-1 steps (src/optim/apollo.cu)
  kApolloBatch = 0,        // matrices per batched launch (apollo_step_many_cuda)
  kApolloStreams,          // streams the batches alternate over (2: one batch's update overlaps the next's projection)
  kApolloSplitProjection,  // 1: tall and wide projections as separate kernels (implied by their variants)
  kApolloTallThreads,      // threads per block of the tall projection (rows >= cols)
  kApolloTallRows,         // rows per warp in the tall projection
  kApolloTallLoads,        // 16-byte loads in flight per row and lane in the tall projection
  kApolloWideBlocks,       // blocks per wide matrix in the projection (row chunks × column strips)
  kApolloWideLoads,        // rows in flight per thread in the wide projection
  kApolloMomentsBlocksPerSm,  // cap of the moments stage's grid, per multiprocessor
  kApolloUpdateThreads,       // threads per block of the update
  kApolloUpdateBlocksPerSm,   // cap of the update's grid (per matrix), per multiprocessor
  kApolloFusedStep,  // 1: a single rank-1 step (apollo_step_cuda) as one cooperative kernel, grid-wide barriers between
                     // stages
  kApolloUpdateRounds,      // Philox rounds of the APOLLO update's stochastic-rounding offsets, CPU and CUDA (10 or 7:
                            // 7 changes the rounded bits, not their distribution)
  kApolloUpdateLoadsFirst,  // 1: the batched bf16 update issues a group's loads before its rounding bits
  kApolloUpdateProbe,       // 1: the batched bf16 update writes W + G bitwise, no step math: a bandwidth probe only
  kApolloUpdateMini,        // 1: batches of APOLLO-Mini steps (bf16) update in a kernel compiled for Mini's choices
  kApolloUpdateResident,    // at most this many blocks of the batched update per multiprocessor (0: no limit)
  kApolloUpdateFastRound,   // 1: with update_mini, a group's rounding skips the per-element guards unless needed
  // checkpoint save (src/checkpoint/)
  kCheckpointPipeline,  // 1: records are encoded while the GPU diff runs, tensor group by group
  kCheckpointDiff,      // 0: two passes over the head copy in mapped host memory; 1: one pass over DMA-staged groups,
                        // two streams; 2: one pass, copies in, kernels and copies out on three streams (overlapped)
  kCheckpointGroupMib,  // device scratch per group of the GPU diff, MiB
  kCheckpointDigests,   // 1: chunks whose device-resident digest matches the head copy's are not read over PCIe
  kCheckpointEncodeBatch,   // blocks of records encoded per batch, per CPU thread
  kCheckpointWritebackMib,  // the delta's disk writes start every this many MiB written (0: all at the final fsync)
  kCheckpointEarlyWriter,   // 1: the delta file is written from the first encoded record on, during the GPU diff
  kCheckpointEncoder,       // 4: as 3, a record's gaps measured and written per block on the pool; 3: as 2, gap sizes
                            // measured only where gaps could win, by one thread; 2: the word-wise Huffman coder,
                            // records handed on as pieces, checksummed by the writer, gap sizes measured per block;
                            // 1: that coder, records copied whole; 0: the coder before, records copied (same bytes)
  kCheckpointPinChunkMib,  // Store::prepare_gpu page-locks the head copy in registrations of whole tensors, >= this MiB
  kCheckpointDiffSlots,    // checkpoint.diff 2: groups in flight (each a stage, values and bitmap buffer of group_mib)
  kNumKnobs
};

struct KnobInfo {
  std::string name;
  int64_t value = 0;
  int64_t default_value = 0;
  std::vector<int64_t> choices;  // the allowed values, or empty for [min, max]
  int64_t min = 0, max = 0;
  std::string help;
};

// The knob's current value (from LIVETRAIN_TUNING or set(), else its default).
int64_t get(Knob knob);
// Sets a knob by name; Error(kInvalidArg) naming the knob and its allowed values for an unknown name or a
// value out of range.
void set(std::string_view name, int64_t value);
// Every knob back to its default (the environment is not read again).
void reset();
std::vector<KnobInfo> list();

// One setting of the knobs that choose the batched APOLLO update's kernel (apollo.update_loads_first, _probe,
// _rounds, _mini, _fast_round) per distinct pair of kernels it launches (for a batch of APOLLO-Mini steps,
// for any other batch), the defaults first: from the table of compiled kernels that the CUDA dispatcher uses, so
// that tests cover every kernel and name none that is missing. A setting not listed launches the kernels of one
// that is.
std::vector<std::vector<std::pair<std::string, int64_t>>> apollo_update_variants();

}  // namespace livetrain::tuning
