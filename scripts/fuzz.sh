#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (ASan + UBSan) in build-fuzz/ and runs each from its seed corpus
# in fuzz/. LIVETRAIN_FUZZ_SECONDS (default 120) is the TOTAL fuzzing time of one run, split evenly
# between the targets (5 targets: 24 s each), so adding a target never lengthens CI; each gets at least
# 5 s. A fuzzer is one single-threaded process, so as many run at once as the machine has cores (at most
# LIVETRAIN_FUZZ_JOBS when set): each still has a core for its whole time (the same executions as one after
# the other), and the run takes the total divided by the cores (2 cores: 60 s of 120). Exits non-zero on a
# finding. LIVETRAIN_TOOLS names the directory holding cmake and ninja (default .venv/bin).
set -euo pipefail
cd "$(dirname "$0")/.."
total=${LIVETRAIN_FUZZ_SECONDS:-120}
tools=${LIVETRAIN_TOOLS:-.venv/bin}
tools=$(cd "$tools" && pwd)
targets=(fuzz_safetensors_header fuzz_manifest fuzz_checkpoint_delta fuzz_checkpoint_journal fuzz_checkpoint_commit)
seconds=$((total / ${#targets[@]}))
[ "$seconds" -ge 5 ] || seconds=5
if [ ! -f build-fuzz/CMakeCache.txt ]; then
  "$tools/cmake" -S . -B build-fuzz -G Ninja -DCMAKE_MAKE_PROGRAM="$tools/ninja" \
    -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo -DLIVETRAIN_FUZZ=ON \
    -DLIVETRAIN_TESTS=OFF -DLIVETRAIN_PYTHON=OFF -DLIVETRAIN_CUDA=OFF >/dev/null
fi
"$tools/cmake" --build build-fuzz --target "${targets[@]}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# fuzz TARGET CORPUS_DIR DICT WHAT: one fuzzer; what it says goes to $work/TARGET.out (printed in order below).
fuzz() {
  local target=$1 corpus=$2 dict=$3 what=$4
  mkdir -p "$work/$target"
  cp "$corpus"/* "$work/$target/"
  echo "fuzzing the $what for ${seconds}s (ASan + UBSan)"
  local rc=0
  build-fuzz/fuzz/"$target" -max_total_time="$seconds" -max_len=4096 -timeout=10 \
    -dict="$dict" -print_final_stats=1 -artifact_prefix="$work/$target-" "$work/$target" >"$work/$target.log" 2>&1 || rc=$?
  if [ "$rc" != 0 ]; then
    echo "fuzz: $target: FINDING (exit code $rc):"
    tail -60 "$work/$target.log"
    mkdir -p fuzz/findings && cp "$work/$target"-* fuzz/findings/ 2>/dev/null || true
    return 1
  fi
  local runs
  runs=$(awk '/stat::number_of_executed_units/ {print $2}' "$work/$target.log")
  echo "fuzz: $target: ${runs} executions in ${seconds}s, 0 findings"
}

runs=(
  "fuzz_safetensors_header fuzz/corpus-safetensors fuzz/safetensors.dict safetensors header parser"
  "fuzz_manifest fuzz/corpus-manifest fuzz/manifest.dict sharing manifest parser"
  "fuzz_checkpoint_delta fuzz/corpus-checkpoint-delta fuzz/checkpoint.dict checkpoint delta parser"
  "fuzz_checkpoint_journal fuzz/corpus-checkpoint-journal fuzz/checkpoint.dict checkpoint journal parser"
  "fuzz_checkpoint_commit fuzz/corpus-checkpoint-commit fuzz/commit.dict checkpoint COMMIT parser"
)
jobs=${LIVETRAIN_FUZZ_JOBS:-$(nproc)}
[ "$jobs" -ge 1 ] || jobs=1
status=0
# Batches of `jobs` fuzzers (all run for the same time, so a batch ends at once), each reported in order.
for ((first = 0; first < ${#runs[@]}; first += jobs)); do
  pids=()
  for ((i = first; i < first + jobs && i < ${#runs[@]}; i++)); do
    read -r target corpus dict what <<<"${runs[$i]}"
    fuzz "$target" "$corpus" "$dict" "$what" >"$work/$target.out" 2>&1 &
    pids+=($!)
  done
  for ((i = first; i < first + ${#pids[@]}; i++)); do
    read -r target _ <<<"${runs[$i]}"
    wait "${pids[$((i - first))]}" || status=1
    cat "$work/$target.out"
  done
done
exit $status
