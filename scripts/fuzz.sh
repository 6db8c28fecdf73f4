#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (ASan + UBSan) in build-fuzz/ and runs each for
# LIVETRAIN_FUZZ_SECONDS (default 60) from the seed corpus in fuzz/corpus/. Exits non-zero on a finding.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${LIVETRAIN_FUZZ_SECONDS:-60}
if [ ! -f build-fuzz/CMakeCache.txt ]; then
  .venv/bin/cmake -S . -B build-fuzz -G Ninja -DCMAKE_MAKE_PROGRAM="$PWD/.venv/bin/ninja" \
    -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo -DLIVETRAIN_FUZZ=ON \
    -DLIVETRAIN_TESTS=OFF -DLIVETRAIN_PYTHON=OFF -DLIVETRAIN_CUDA=OFF >/dev/null
fi
.venv/bin/cmake --build build-fuzz --target fuzz_safetensors_header
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp fuzz/corpus/* "$work/"
echo "fuzzing the safetensors header parser for ${seconds}s (ASan + UBSan)"
rc=0
build-fuzz/fuzz/fuzz_safetensors_header -max_total_time="$seconds" -max_len=4096 -timeout=10 \
  -dict=fuzz/safetensors.dict -print_final_stats=1 "$work" >"$work/log" 2>&1 || rc=$?
if [ "$rc" != 0 ]; then
  echo "fuzz: FINDING (exit code $rc):"
  tail -60 "$work/log"
  mkdir -p fuzz/findings && cp crash-* leak-* timeout-* oom-* fuzz/findings/ 2>/dev/null || true
  exit 1
fi
runs=$(awk '/stat::number_of_executed_units/ {print $2}' "$work/log")
echo "fuzz: ${runs} executions in ${seconds}s, 0 findings"
