#!/usr/bin/env bash
# The main job: set up (scripts/setup.sh), then serve the embedded default model (SmolLM2-135M-Instruct)
# with `livetrain serve` on CPU, ask it about a made-up fact, teach the fact through POST /train while it
# serves, show /train/status until the job is done, ask again, and stop the server (scripts/main_job.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
printf '\n== livetrain serve --model default: teach the served model a made-up fact\n'
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
exec .venv/bin/python scripts/main_job.py "$@"
