#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (ASan + UBSan) in build-fuzz/ and runs each from its seed corpus
# in fuzz/. LIVETRAIN_FUZZ_SECONDS (default 120) is the TOTAL fuzzing time of one run, split evenly
# between the targets (4 targets: 30 s each), so adding a target never lengthens CI; each gets at least
# 5 s. Exits non-zero on a finding. LIVETRAIN_TOOLS names the directory holding cmake and ninja
# (default .venv/bin).
set -euo pipefail
cd "$(dirname "$0")/.."
total=${LIVETRAIN_FUZZ_SECONDS:-120}
tools=${LIVETRAIN_TOOLS:-.venv/bin}
tools=$(cd "$tools" && pwd)
targets=(fuzz_safetensors_header fuzz_manifest fuzz_checkpoint_delta fuzz_checkpoint_journal)
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

# fuzz TARGET CORPUS_DIR DICT WHAT
fuzz() {
  local target=$1 corpus=$2 dict=$3 what=$4
  mkdir -p "$work/$target"
  cp "$corpus"/* "$work/$target/"
  echo "fuzzing the $what for ${seconds}s (ASan + UBSan)"
  local rc=0
  build-fuzz/fuzz/"$target" -max_total_time="$seconds" -max_len=4096 -timeout=10 \
    -dict="$dict" -print_final_stats=1 "$work/$target" >"$work/$target.log" 2>&1 || rc=$?
  if [ "$rc" != 0 ]; then
    echo "fuzz: $target: FINDING (exit code $rc):"
    tail -60 "$work/$target.log"
    mkdir -p fuzz/findings && cp crash-* leak-* timeout-* oom-* fuzz/findings/ 2>/dev/null || true
    return 1
  fi
  local runs
  runs=$(awk '/stat::number_of_executed_units/ {print $2}' "$work/$target.log")
  echo "fuzz: $target: ${runs} executions in ${seconds}s, 0 findings"
}

status=0
fuzz fuzz_safetensors_header fuzz/corpus-safetensors fuzz/safetensors.dict "safetensors header parser" || status=1
fuzz fuzz_manifest fuzz/corpus-manifest fuzz/manifest.dict "sharing manifest parser" || status=1
fuzz fuzz_checkpoint_delta fuzz/corpus-checkpoint-delta fuzz/checkpoint.dict "checkpoint delta parser" || status=1
fuzz fuzz_checkpoint_journal fuzz/corpus-checkpoint-journal fuzz/checkpoint.dict "checkpoint journal parser" || status=1
exit $status
