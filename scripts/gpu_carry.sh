#!/usr/bin/env bash
# Carries to the GPU machine the Python packages it lacks (requirements/gpu-machine.txt: vLLM 0.26.0 and what it
# imports, fastapi/uvicorn, flash-linear-attention). That machine has no network and each call of the device tool
# carries at most 64 MiB, so the packages travel as one compressed tree cut into pieces, one piece per call, over
# consecutive calls to the same (warm) machine:
#
#   here:   bash scripts/gpu_carry.sh pack             download (pip checks every sha256), install for CPython 3.12
#                                                      x86_64 into a staging tree, tar + xz it, cut it into
#                                                      .gpu-carry/partNN/ (git-ignored), print the plan
#   there:  bash scripts/gpu_carry.sh receive          in each call that carries .gpu-carry/partNN: keep its piece
#                                                      in $CARRY_HOME (default /root/livetrain-carry)
#           bash scripts/gpu_carry.sh install [DIR]    once every piece is there: join, check the sha256, unpack
#                                                      into DIR (default /tmp/site); then PYTHONPATH=DIR
#
# The staging tree leaves out two of vLLM's kernel libraries that these runs never load, 161 MB of the 288 MB
# wheel (compressed): FlashAttention 2 (`_vllm_fa2_C`; on Hopper vLLM uses FlashAttention 3, `_vllm_fa3_C`) and the
# fused-MoE kernels (`_moe_C_stable_libtorch`; livetrain trains dense models only). vLLM imports both inside
# try/except (vllm/vllm_flash_attn/flash_attn_interface.py, vllm/platforms/cuda.py), so their absence only removes
# those paths. Result: ~125 MB in three pieces.
#
# GPU_CARRY_SET=triton (for every step above) carries another set instead, kept apart from the first:
# requirements/gpu-triton.txt (Triton 3.7.1, which flash-linear-attention's Gated DeltaNet backward needs on Hopper:
# it refuses Triton >= 3.4 and < 3.7.1 there, and the GPU machine's torch 2.11 brings an older one), in .gpu-carry-triton/partNN, unpacked into
# /tmp/triton-site by default. Put that directory BEFORE /tmp/site and the system's packages for a run that should
# use it (PYTHONPATH=/tmp/triton-site bash scripts/gpu.sh bench-gdn); vLLM's runs keep torch's own Triton. Left out
# of its tree: CUPTI and the Proton profiler's library (profiling only) and the Blackwell ptxas (sm_100 only).
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-}
piece_bytes=${GPU_CARRY_PIECE_BYTES:-62000000}
case "${GPU_CARRY_SET:-vllm}" in
vllm)
  requirements=requirements/gpu-machine.txt carry_dir=.gpu-carry default_dest=/tmp/site
  carry_home=${CARRY_HOME:-/root/livetrain-carry}
  left_out=(vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so vllm/_moe_C_stable_libtorch.abi3.so)
  ;;
triton)
  requirements=requirements/gpu-triton.txt carry_dir=.gpu-carry-triton default_dest=/tmp/triton-site
  carry_home=${CARRY_HOME:-/root/livetrain-carry}/triton
  left_out=(triton/backends/nvidia/lib/cupti triton/_C/libproton.so triton/backends/nvidia/bin/ptxas-blackwell
    triton/instrumentation)
  ;;
*)
  echo "gpu_carry: GPU_CARRY_SET must be vllm or triton, not '$GPU_CARRY_SET'" >&2
  exit 2
  ;;
esac

case "$what" in
pack)
  py=${PYTHON:-.venv/bin/python}
  stage=$(mktemp -d /tmp/livetrain-gpu-carry.XXXXXX)
  trap 'rm -rf "$stage"' EXIT
  plat=()
  for p in manylinux_2_{5,17,24,26,27,28,31}_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do plat+=(--platform "$p"); done
  echo "== download + install for cp312 ($requirements, hash-checked)"
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
    --require-hashes -r "$requirements" -d "$stage/wheels"
  "$py" -m pip install -q --no-deps --no-compile --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" --target "$stage/site" "$stage"/wheels/*.whl
  for f in "${left_out[@]}"; do rm -rf "${stage:?}/site/$f"; done
  echo "== tar + xz ($(du -sh "$stage/site" | cut -f1) unpacked)"
  rm -rf "$carry_dir" && mkdir -p "$carry_dir"
  tar -cf - -C "$stage/site" . | xz -T0 -6 > "$stage/site.tar.xz"
  sha256sum "$stage/site.tar.xz" | cut -d' ' -f1 > "$carry_dir/site.sha256"
  split -b "$piece_bytes" -d "$stage/site.tar.xz" "$stage/site.tar.xz.part"
  n=0
  for f in "$stage"/site.tar.xz.part*; do
    d=$carry_dir/part$(printf %02d $n)
    mkdir -p "$d" && mv "$f" "$d/" && n=$((n + 1))
  done
  cp "$carry_dir/site.sha256" "$carry_dir/part00/"
  echo "$n pieces; carry $carry_dir/partNN in consecutive calls (run: bash scripts/gpu_carry.sh receive),"
  echo "then: bash scripts/gpu_carry.sh install && export PYTHONPATH=$default_dest"
  ls -l "$carry_dir"/part*/
  ;;
receive)
  mkdir -p "$carry_home"
  found=0
  for d in "$carry_dir"/part*; do
    [ -d "$d" ] || continue
    cp "$d"/* "$carry_home"/ && found=1 && echo "gpu_carry: kept $(ls "$d" | tr '\n' ' ')in $carry_home"
  done
  [ $found = 1 ] || { echo "gpu_carry: no $carry_dir/partNN in this call" >&2; exit 1; }
  ;;
install)
  dest=${2:-$default_dest}
  if [ -f "$dest/.livetrain-carry-done" ]; then echo "gpu_carry: $dest already installed"; exit 0; fi
  want=$(cat "$carry_home/site.sha256")
  got=$(cat "$carry_home"/site.tar.xz.part* | sha256sum | cut -d' ' -f1)
  if [ "$want" != "$got" ]; then
    echo "gpu_carry: the joined pieces in $carry_home do not match site.sha256 (missing a piece? have: $(ls "$carry_home"))" >&2
    exit 1
  fi
  mkdir -p "$dest"
  cat "$carry_home"/site.tar.xz.part* | xz -d | tar -xf - -C "$dest"
  touch "$dest/.livetrain-carry-done"
  echo "gpu_carry: unpacked into $dest ($(du -sh "$dest" | cut -f1)); export PYTHONPATH=$dest"
  ;;
*)
  sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
  ;;
esac
