#!/usr/bin/env bash
# Runs every livetrain test on a fresh machine: setup (system packages, .venv, build), the C++/CUDA
# formatting check (scripts/format.sh --check), the Python lint and formatting check (ruff, pinned in
# requirements/dev.txt; pyproject.toml [tool.ruff]), the C++ suite (ctest), the parser fuzzers for
# LIVETRAIN_FUZZ_SECONDS in total (default 120), the wheel as pip users get it (scripts/wheel_test.sh: built,
# installed into a new venv, served from; LIVETRAIN_WHEEL_TEST=0 skips it), then the Python suite (pytest),
# whose summary is the last line, after its 25 slowest tests (--durations: every CI log shows where the time
# goes). GPU tests skip when no GPU is visible. pytest runs two test files at a time (pytest-xdist,
# --dist loadfile: a file's tests stay together, in order, with its module-scoped servers): most of the suite
# waits on server and rank processes that use one core, so two files fill the two cores of CI.
# LIVETRAIN_TEST_JOBS sets how many (1: one process, without xdist).
#
# On a machine with no GPU (CI), the build's CUDA code is compiled for one architecture (sm_80) unless
# LIVETRAIN_CMAKE_ARGS names LIVETRAIN_CUDA_GENCODE: nothing runs it there, the build only has to show that it
# compiles, and the four codes of a GPU build (CMakeLists.txt) compile every kernel three times to PTX and four
# times to machine code. A GPU build (scripts/gpu.sh build) compiles its GPU's code; the release wheel
# (scripts/wheel.sh) all four.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! nvidia-smi -L >/dev/null 2>&1 && [[ "${LIVETRAIN_CMAKE_ARGS:-}" != *LIVETRAIN_CUDA_GENCODE* ]]; then
  export LIVETRAIN_CMAKE_ARGS="-DLIVETRAIN_CUDA_GENCODE=-gencode=arch=compute_80,code=sm_80 ${LIVETRAIN_CMAKE_ARGS:-}"
fi
# Each step's heading says when it starts (seconds since this script started), so a log shows where the time goes.
step() { printf '\n== %s [%d s]\n' "$1" "$SECONDS"; }
bash scripts/setup.sh
step "C++/CUDA formatting (scripts/format.sh --check)"
bash scripts/format.sh --check
step "Python lint and formatting (ruff check, ruff format --check)"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
step "C++ tests (ctest)"
(cd build && ctest --output-on-failure -j "$(nproc)")
step "fuzzing"
bash scripts/fuzz.sh
if [ "${LIVETRAIN_WHEEL_TEST:-1}" != 0 ]; then
  step "the wheel (scripts/wheel_test.sh)"
  bash scripts/wheel_test.sh
fi
step "Python tests (pytest)"
jobs=${LIVETRAIN_TEST_JOBS:-$(($(nproc) < 2 ? $(nproc) : 2))}
parallel=()
[ "$jobs" -le 1 ] || parallel=(-n "$jobs" --dist loadfile)
exec .venv/bin/python -m pytest -ra --durations=25 "${parallel[@]}"
