#!/usr/bin/env bash
# Everything that needs a GPU, as steps that each fit one 10-minute command of the GPU machine (H200):
#
#   bash scripts/gpu.sh STEP [STEP ...]        e.g.  bash scripts/gpu.sh build bench-gdn vllm-qwen35
#
# step            about (H200)  what                                                   results in $OUT/STEP/
# build           3 min         cmake + ninja into build-gpu/ for this Python and      build.log, device.txt
#                               torch (core, CLI, the Python module put in python/
#                               livetrain/); every other step needs it, once per machine
# wheel           3 min         scripts/wheel.sh: the release wheel (every GPU code    wheel.log, wheel.txt
#                               CMakeLists.txt names) in dist/, which the vllm steps
#                               install with pip; they build it themselves (adding
#                               these minutes) when it is missing or older than the
#                               sources. Needs no build step
# tests           7 min         the whole pytest suite, CUDA tests included            pytest.log
# bench-core      5 min         bench/optim.py, attach.py, convergence.py, loss.py,    bench-NAME.{txt,json}
#                               checkpoint.py (8 GiB)
# bench-gdn       2 min         bench/gdn.py: Gated DeltaNet layers, fused kernels     gdn.{md,json}
#                               (flash-linear-attention) against the torch path
# bench-serve8b   5-6 min       bench/serve.py --shape 8b (engine + trainer, AdamW     serve.{md,json}
#                               baselines, completions alone / during a job / alone
#                               again)
# bench-serve27b  5 min         bench/serve.py --shape qwen3.5-27b (54 GB, 2,048 and   serve.{md,json}
#                               8,192 tokens, checkpoint and APOLLO-Mini vs floors;
#                               no completions: bench-gen27b measures them)
# bench-gen27b    5 min         bench/serve.py --shape qwen3.5-27b --tokens 2048       serve.{md,json},
#                               --gen-seconds 30 --gen-requests 6: completions alone   serve-log.txt
#                               (once the trainer's guard has made its measures
#                               between jobs: 62 s, the engine's warm-up request
#                               meanwhile), during a /train job, and alone again
#                               after the trainer stopped, >= 6 requests and 30 s
#                               each; no model files, no checkpoint (310 s at 20 s
#                               and 5 requests with the warm-up not overlapped)
# save27b         4.5 min       why the trainer's save is slower than the sweep's:     serve.{md,json},
#                               bench/serve.py --shape qwen3.5-27b --checkpoint        serve-log.txt
#                               --save-probe at 2,048 tokens, 1 timed step, no
#                               completions: saves that each change one thing, and
#                               where their time went (SAVE_SERVE_S, default 270 s)
# vllm-llama      4 min         scripts/vllm_gpu_run.sh --arch llama                   vllm-run.json, vllm-*.log
# vllm-qwen35     5 min         scripts/vllm_gpu_run.sh --arch qwen3_5 (multimodal     vllm-run.json, vllm-*.log
#                               checkpoint served text-only, vision/MTP kept)
# vllm-transfer   4 min         bench/vllm_transfer.py: livetrain in place vs vLLM's   transfer.{md,json}
#                               IPC weight transfer, same vLLM server, 8B shape
# checks          2 min         the CUDA tests of the tuned code: the GPU diff on odd  checks.log
#                               sizes and unaligned offsets under every checkpoint
#                               variant, every APOLLO variant and the one-kernel step
#                               against the CPU (C++, when GoogleTest is installed:
#                               adds the test targets to build-gpu/; save and
#                               save_part under every GPU-save knob), and pytest's
#                               test_checkpoint_store/_shards.py and test_optim.py
# sweep           8 min         the internal tuning knobs (docs/tuning.md): bench/     sweep-{optim,checkpoint}.
#                               optim.py --sweep and bench/checkpoint.py --sweep, 8B   {txt,json}
#                               and 27B shapes, each in its own process with a time
#                               limit (SWEEP_OPTIM_S, default 150 s; SWEEP_CHECKPOINT_S,
#                               default 270 s; SWEEP_GIB, default 6); a failing setting
#                               is reported in its row and the sweep goes on
# all                           every step above but sweep, in order (several commands' worth)
#
# The vLLM steps, the serve benchmarks and bench-gdn need the packages the GPU machine lacks (vLLM 0.26.0,
# fastapi/uvicorn, flash-linear-attention; requirements/gpu-machine.txt), carried there by
# scripts/gpu_carry.sh and unpacked into $SITE (default /tmp/site), which this script puts on PYTHONPATH
# when it exists. Without them those steps skip what they cannot run and say so.
#
# Environment: OUT (default ./gpu-out), PYTHON (default python3), SITE (default /tmp/site), GPU_GENCODE
# (build: nvcc -gencode flags instead of every architecture CMakeLists.txt names, e.g.
# "-gencode=arch=compute_90a,code=sm_90a" for an H200 only, where CMake takes LIVETRAIN_CUDA_GENCODE).
# Exit status: the first failing step's.
set -uo pipefail
cd "$(dirname "$0")/.."
out_root=${OUT:-gpu-out}
py=${PYTHON:-python3}
site=${SITE:-/tmp/site}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
if [ -d "$site" ]; then export PYTHONPATH="$PYTHONPATH:$site" PATH="$site/bin:$PATH"; fi

known=(build wheel checks tests bench-core bench-gdn bench-serve8b bench-serve27b bench-gen27b vllm-llama vllm-qwen35 vllm-transfer)
# Steps run only when named (not by "all").
extra=(sweep save27b)
steps=("$@")
if [ ${#steps[@]} = 0 ]; then awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 2; fi
if [ "${steps[0]}" = all ]; then steps=("${known[@]}"); fi
for s in "${steps[@]}"; do
  if [[ " ${known[*]} ${extra[*]} " != *" $s "* ]]; then
    echo "gpu.sh: unknown step $s (steps: ${known[*]}, ${extra[*]}, all)" >&2
    exit 2
  fi
done

built() { [ -x build-gpu/livetrain ] && [ -f "python/livetrain/_core$($py -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")" ]; }

# One benchmark: its output in $out/NAME.txt, the tail shown; its status kept.
bench() {
  local name=$1 tail_n=$2
  shift 2
  echo "== $*"
  "$py" "$@" 2>&1 | tee "$out/$name.txt" | tail -"$tail_n"
  return "${PIPESTATUS[0]}"
}

run_step() {
  local step=$1 rc=0
  out=$out_root/$step
  mkdir -p "$out"
  export OUT=$out
  if [ "$step" != build ] && [ "$step" != wheel ] && ! built; then
    echo "gpu.sh: $step needs the build first: bash scripts/gpu.sh build $step" >&2
    return 1
  fi
  case "$step" in
  build)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
    "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/device.txt"
    local gencode=()
    if [ -n "${GPU_GENCODE:-}" ]; then gencode=(-DLIVETRAIN_CUDA_GENCODE="$GPU_GENCODE"); fi
    cmake -S . -B build-gpu -G Ninja -DPython_EXECUTABLE="$(command -v "$py")" -DLIVETRAIN_TESTS=OFF \
      -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_FLAGS="--threads=0" "${gencode[@]}" > "$out/build.log" 2>&1 &&
      cmake --build build-gpu -j "$(nproc)" >> "$out/build.log" 2>&1
    rc=$?
    if [ $rc != 0 ]; then tail -50 "$out/build.log"; return $rc; fi
    build-gpu/livetrain devices | tee -a "$out/device.txt"
    ;;
  wheel)
    # nvcc compiles the GPU codes of a file in parallel (--threads=0), as in the build step.
    CMAKE_ARGS="-DCMAKE_CUDA_FLAGS=--threads=0" bash scripts/wheel.sh --python "$py" --no-isolation \
      > "$out/wheel.txt" 2> "$out/wheel.log"
    rc=$?
    tail -"$([ $rc = 0 ] && echo 3 || echo 40)" "$out/wheel.log"
    cat "$out/wheel.txt"
    ;;
  checks)
    if ls /usr/lib/*/cmake/GTest/GTestConfig.cmake /usr/local/lib*/cmake/GTest/GTestConfig.cmake >/dev/null 2>&1; then
      {
        cmake -S . -B build-gpu -DLIVETRAIN_TESTS=ON > "$out/build-tests.log" 2>&1 &&
          cmake --build build-gpu -j "$(nproc)" --target test_checkpoint_diff test_checkpoint_store test_checkpoint_parts \
            test_tuning test_optim >> "$out/build-tests.log" 2>&1 &&
          build-gpu/tests/cpp/test_checkpoint_diff && build-gpu/tests/cpp/test_checkpoint_store &&
          build-gpu/tests/cpp/test_checkpoint_parts && build-gpu/tests/cpp/test_tuning && build-gpu/tests/cpp/test_optim
      } > "$out/checks.log" 2>&1 || rc=1
    else
      echo "C++ tests skipped: no GoogleTest on this machine" > "$out/checks.log"
    fi
    LIVETRAIN_CLI=$PWD/build-gpu/livetrain "$py" -m pytest -q -ra -p no:cacheprovider tests/python/test_checkpoint_store.py \
      tests/python/test_checkpoint_shards.py tests/python/test_optim.py >> "$out/checks.log" 2>&1 || rc=1
    grep -E "^\[  (PASSED|FAILED|SKIPPED) |passed|failed|skipped: no|error" "$out/checks.log" | tail -20
    ;;
  tests)
    LIVETRAIN_CLI=$PWD/build-gpu/livetrain "$py" -m pytest -q -ra -p no:cacheprovider tests/python 2>&1 |
      tee "$out/pytest.log" | tail -40
    rc=${PIPESTATUS[0]}
    ;;
  bench-core)
    for b in optim attach convergence loss checkpoint; do
      bench "bench-$b" 12 "bench/$b.py" --json "$out/bench-$b.json" || rc=$?
    done
    ;;
  bench-gdn)
    bench gdn-log 14 bench/gdn.py || rc=$?
    ;;
  bench-serve8b)
    bench serve-log 30 bench/serve.py --shape 8b --gen-seconds 12 || rc=$?
    ;;
  bench-serve27b)
    bench serve-log 40 bench/serve.py --shape qwen3.5-27b --checkpoint --gen-seconds 0 || rc=$?
    ;;
  bench-gen27b)
    bench serve-log 20 bench/serve.py --shape qwen3.5-27b --tokens 2048 --gen-seconds 30 --gen-requests 6 || rc=$?
    ;;
  vllm-llama)
    bash scripts/vllm_gpu_run.sh --arch llama 2>&1 | tail -25
    rc=${PIPESTATUS[0]}
    ;;
  vllm-qwen35)
    bash scripts/vllm_gpu_run.sh --arch qwen3_5 2>&1 | tail -25
    rc=${PIPESTATUS[0]}
    ;;
  vllm-transfer)
    bash scripts/vllm_gpu_run.sh bench/vllm_transfer.py 2>&1 | tee "$out/transfer-log.txt" | tail -30
    rc=${PIPESTATUS[0]}
    ;;
  save27b)
    # One time limit for the whole; the log holds each save's row as it ends (a run cut short keeps them).
    echo "== bench/serve.py --shape qwen3.5-27b --checkpoint --save-probe (limit ${SAVE_SERVE_S:-270} s)"
    timeout "${SAVE_SERVE_S:-270}" "$py" bench/serve.py --shape qwen3.5-27b --checkpoint --save-probe --tokens 2048 \
      --steps 1 --gen-seconds 0 > "$out/serve-log.txt" 2>&1 || rc=$?
    rm -rf "${TMPDIR:-/tmp}"/livetrain-serve-bench-*  # left by a run cut short
    grep -A10 "Where the trainer" "$out/serve.md" 2>/dev/null || grep "save row" "$out/serve-log.txt"
    ;;
  sweep)
    echo "== bench/optim.py --sweep (8b, 27b; limit ${SWEEP_OPTIM_S:-150} s)"
    timeout "${SWEEP_OPTIM_S:-150}" "$py" bench/optim.py --sweep --json "$out/sweep-optim.json" 2>&1 | tee "$out/sweep-optim.txt"
    echo "== bench/checkpoint.py --sweep (8b, 27b at ${SWEEP_GIB:-6} GiB; limit ${SWEEP_CHECKPOINT_S:-270} s)"
    timeout "${SWEEP_CHECKPOINT_S:-270}" "$py" bench/checkpoint.py --sweep --gib "${SWEEP_GIB:-6}" \
      --json "$out/sweep-checkpoint.json" 2>&1 | tee "$out/sweep-checkpoint.txt"
    ;;
  esac
  echo "gpu.sh: $step exited $rc"
  return $rc
}

status=0
for s in "${steps[@]}"; do
  t0=$SECONDS
  run_step "$s" || { rc=$?; [ $status = 0 ] && status=$rc; }
  echo "gpu.sh: $s took $((SECONDS - t0)) s"
done
exit $status
