#!/usr/bin/env bash
# Runs every livetrain test on a fresh machine: setup (system packages, .venv, build), the C++ suite
# (ctest), the parser fuzzers for LIVETRAIN_FUZZ_SECONDS in total (default 120), the wheel as pip users get
# it (scripts/wheel_test.sh: built, installed into a new venv, served from; LIVETRAIN_WHEEL_TEST=0 skips it),
# then the Python suite (pytest), whose summary is the last line. GPU tests skip when no GPU is visible.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
printf '\n== C++ tests (ctest)\n'
(cd build && ctest --output-on-failure -j "$(nproc)")
printf '\n== fuzzing\n'
bash scripts/fuzz.sh
if [ "${LIVETRAIN_WHEEL_TEST:-1}" != 0 ]; then
  printf '\n== the wheel (scripts/wheel_test.sh)\n'
  bash scripts/wheel_test.sh
fi
printf '\n== Python tests (pytest)\n'
exec .venv/bin/python -m pytest -ra
