#!/usr/bin/env bash
# The main job, as far as livetrain goes today: build everything, write a sample sharded bf16 model,
# and inspect it with the C++ CLI (strict validation of every shard). `livetrain serve` replaces this
# once the trainer and servers exist.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
printf '\n== writing a sample model (sample-model/)\n'
.venv/bin/python scripts/sample_model.py sample-model
printf '\n== livetrain inspect sample-model\n'
build/livetrain inspect sample-model
printf '\n== livetrain devices\n'
build/livetrain devices
