#!/usr/bin/env bash
# Runs every livetrain test on a fresh machine: setup (system packages, .venv, build), the C++ suite
# (ctest), the parser fuzzers for LIVETRAIN_FUZZ_SECONDS in total (default 120), then the Python suite
# (pytest), whose summary is the last line. GPU tests skip when no GPU is visible.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
printf '\n== C++ tests (ctest)\n'
(cd build && ctest --output-on-failure -j "$(nproc)")
printf '\n== fuzzing\n'
bash scripts/fuzz.sh
printf '\n== Python tests (pytest)\n'
exec .venv/bin/python -m pytest -ra
