#!/usr/bin/env bash
# Everything that needs a GPU, in one go (for the GPU machine): build the core and the Python module for
# this machine's Python and torch (sm_80/sm_90a/sm_100 + PTX), run the whole pytest suite (the CUDA tests
# run here instead of skipping), then the benchmarks. Results land in $OUT (default ./gpu-out):
# pytest.log, bench-{optim,attach,convergence,checkpoint}.{txt,json}.
#
# The serve tests need fastapi and uvicorn (requirements/dev.txt); on a machine without a registry, bring
# their wheels and put them on PYTHONPATH first (they skip themselves otherwise).
#
# sweep (docs/tuning.md): builds for this GPU only (sm_90a), then times the APOLLO-Mini step and the
# checkpoint save under grids of their internal tuning knobs, 8B and 27B shapes, each bench in its own
# process with a time limit (SWEEP_OPTIM_S, default 150 s; SWEEP_CHECKPOINT_S, default 270 s; SWEEP_GIB,
# default 6): sweep-{optim,checkpoint}.{txt,json}. A failing setting is reported in its row and the sweep
# goes on; progress lines come as each setting finishes (the JSON is rewritten after each), tables at the
# end of each bench.
#
# usage: bash scripts/gpu.sh [tests|bench|all|none|sweep]   (default all; none only builds)
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
out=${OUT:-gpu-out}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/device.txt"

echo "== build (build-gpu/)"
arch=(-DLIVETRAIN_CUDA_GENCODE=)  # every architecture CMakeLists.txt names
if [ "$what" = sweep ]; then arch=(-DLIVETRAIN_CUDA_GENCODE="-gencode=arch=compute_90a,code=sm_90a"); fi
cmake -S . -B build-gpu -G Ninja -DPython_EXECUTABLE="$(command -v $py)" -DLIVETRAIN_TESTS=OFF \
  -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_FLAGS="--threads=0" "${arch[@]}" > "$out/build.log" 2>&1 &&
  cmake --build build-gpu -j 16 >> "$out/build.log" 2>&1
rc=$?
if [ $rc != 0 ]; then tail -50 "$out/build.log"; exit $rc; fi
build-gpu/livetrain devices | tee -a "$out/device.txt"

status=0
if [ "$what" = sweep ]; then
  echo "== bench/optim.py --sweep (8b, 27b; limit ${SWEEP_OPTIM_S:-150} s)"
  timeout "${SWEEP_OPTIM_S:-150}" $py bench/optim.py --sweep --json "$out/sweep-optim.json" 2>&1 | tee "$out/sweep-optim.txt"
  echo "== bench/checkpoint.py --sweep (8b, 27b at ${SWEEP_GIB:-6} GiB; limit ${SWEEP_CHECKPOINT_S:-270} s)"
  timeout "${SWEEP_CHECKPOINT_S:-270}" $py bench/checkpoint.py --sweep --gib "${SWEEP_GIB:-6}" \
    --json "$out/sweep-checkpoint.json" 2>&1 | tee "$out/sweep-checkpoint.txt"
fi
if [ "$what" = tests ] || [ "$what" = all ]; then
  echo "== pytest"
  LIVETRAIN_CLI=$PWD/build-gpu/livetrain $py -m pytest -q -ra -p no:cacheprovider tests/python 2>&1 | tee "$out/pytest.log" | tail -40
  status=${PIPESTATUS[0]}
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  echo "== bench/optim.py"
  $py bench/optim.py --json "$out/bench-optim.json" 2>&1 | tee "$out/bench-optim.txt" | tail -20
  echo "== bench/attach.py"
  $py bench/attach.py --json "$out/bench-attach.json" 2>&1 | tee "$out/bench-attach.txt" | tail -8
  echo "== bench/convergence.py"
  $py bench/convergence.py --json "$out/bench-convergence.json" 2>&1 | tee "$out/bench-convergence.txt" | tail -8
  echo "== bench/checkpoint.py"
  $py bench/checkpoint.py --json "$out/bench-checkpoint.json" 2>&1 | tee "$out/bench-checkpoint.txt" | tail -10
fi
exit $status
