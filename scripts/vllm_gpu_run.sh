#!/usr/bin/env bash
# The vLLM plugin on a GPU, end to end, from the installed package (for the GPU machine; docs/vllm.md):
# installs livetrain's wheel with pip into LIVETRAIN_SITE, on sys.path beside vLLM's SITE, the way a vLLM user
# installs a plugin (vLLM finds the plugin through the wheel's own entry points; the source tree is not on
# sys.path, which the script checks), checks that pip accepts the wheel's requirements against what is
# installed (torch, vLLM, fastapi, ...), then runs scripts/vllm_gpu_run.py: a tiny model served by `vllm
# serve` with the plugin (--arch llama, or qwen3_5: a multimodal Qwen3.5 checkpoint served text-only), /train
# changes the answer, the weights are checkpointed, vLLM restarts and serves the trained weights. Results:
# $OUT (default gpu-out)/vllm-run.json and vllm-{1,2}.log.
#
# The wheel: WHEEL, else the newest dist/livetrain-*.whl this Python can install, unless a source file is
# newer than it; else one built here with `scripts/wheel.sh --python python3 --no-isolation` (the machine's
# nvcc and build tools, no network; incremental in build/<wheel tag>). Python 3.12 like the GPU machine's
# gives one cp312-abi3 wheel.
#
# vLLM must be importable: vLLM 0.26.0 is the release built for torch 2.11 (CUDA 13). The packages the GPU
# machine lacks (requirements/gpu-machine.txt) reach it through scripts/gpu_carry.sh, unpacked into SITE
# (default /tmp/site), whose bin/ goes on PATH. livetrain goes into its own directory, LIVETRAIN_SITE
# (default /tmp/livetrain-site, emptied first; its bin/ first on PATH, for the console script `livetrain`):
# pip --target --upgrade replaces whole top-level directories, so installing into SITE would replace
# SITE/bin, vLLM's commands included.
#
# usage: [WHEEL=FILE] bash scripts/vllm_gpu_run.sh [--arch llama|qwen3_5] [--checkpoint http|api] [--vllm-args "..."]
#                                                  [--tensor-parallel 2]  (two GPUs: the plugin's trainer ranks)
#        [WHEEL=FILE] bash scripts/vllm_gpu_run.sh SCRIPT.py [ARGS...]   another script in the same environment
#                                                    (e.g. bench/vllm_transfer.py), $OUT passed on
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
site=${SITE:-/tmp/site}
lt_site=${LIVETRAIN_SITE:-/tmp/livetrain-site}
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$lt_site:$site${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$lt_site/bin:$site/bin:$PATH"

wheel=${WHEEL:-}
if [ -z "$wheel" ]; then
  # The newest wheel in dist/ whose tags this Python accepts.
  wheel=$($py - <<'PY'
import glob, os
from packaging.tags import sys_tags
from packaging.utils import parse_wheel_filename
ok = set(sys_tags())
found = [w for w in glob.glob("dist/livetrain-*.whl") if ok & set(parse_wheel_filename(os.path.basename(w))[3])]
print(max(found, key=os.path.getmtime) if found else "")
PY
)
  # A wheel older than the sources it would stand for is rebuilt (incrementally) rather than tested.
  if [ -n "$wheel" ] && [ -n "$(find python src bindings include CMakeLists.txt pyproject.toml -newer "$wheel" \
      \( -name '*.py' -o -name '*.cpp' -o -name '*.cu' -o -name '*.hpp' -o -name '*.h' -o -name '*.txt' \
      -o -name '*.toml' \) -print -quit)" ]; then
    echo "== $wheel is older than the sources: rebuilding it"
    wheel=
  fi
fi
if [ -z "$wheel" ]; then
  echo "== no current wheel for $($py --version) in dist/: building one here"
  wheel=$(bash scripts/wheel.sh --python "$py" --no-isolation) || exit 1
fi
echo "== installing $wheel into $lt_site"
rm -rf "$lt_site"
$py -m pip install -q --no-index --no-deps --no-compile --target "$lt_site" "$wheel" || exit 1
# pip's resolver on the wheel's requirements and its [vllm] extra against what is installed (no network):
# torch in range, vLLM in the supported range, fastapi/uvicorn/transformers new enough.
# A conflict there is recorded, not fatal: the GPU machine's own torch and setuptools come with the image
# (measured 2026-11-30: torch 2.11.0 wants setuptools<82, vLLM 0.26.0 setuptools<81, and the image has a newer
# one), which says nothing about livetrain's requirements; the run itself is what this script checks.
if ! $py -m pip install --dry-run --no-index "$wheel[vllm]" > "$out/pip-check.txt" 2>&1; then
  echo "vllm_gpu_run: pip cannot resolve livetrain[vllm] against this machine's packages (pip-check.txt):"
  grep -A3 "conflict is caused by" "$out/pip-check.txt" || tail -3 "$out/pip-check.txt"
fi
# vLLM's sampler imports flashinfer unless told not to use it; the GPU machine has no flashinfer.
$py -c "import flashinfer" 2>/dev/null || export VLLM_USE_FLASHINFER_SAMPLER=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
$py -c "import torch, importlib.metadata as m; print('torch', torch.__version__, 'vllm', m.version('vllm'))" \
  | tee -a "$out/device.txt" || exit 1
# livetrain from the installed wheel, not the source tree; its CUDA code for this GPU; vLLM's view of the plugin.
(cd /tmp && $py - "$(realpath "$lt_site")" <<'PY') 2>&1 | tee -a "$out/device.txt" || exit 1
import importlib.metadata as md
import os, sys
import livetrain
from livetrain import _core
print("livetrain", md.version("livetrain"), "from", livetrain.__file__)
where, site = os.path.realpath(livetrain.__file__), sys.argv[1]
assert where.startswith(site + os.sep), f"livetrain was imported from {where}, not from the installed wheel in {site}"
print(_core.cuda_support())
for d in _core.cuda_devices()[0]:
    print(f"GPU {d['ordinal']} {d['name']}: runs {d['code'] or 'nothing: ' + d['code_problem']}")
for group in ("vllm.general_plugins", "vllm.endpoint_plugins"):
    print(group, [f"{ep.name} = {ep.value}" for ep in md.entry_points(group=group)])
PY
# The console script pip put in LIVETRAIN_SITE/bin: the C++ CLI inside the package, run by this environment's Python.
echo "livetrain command: $(command -v livetrain)" | tee -a "$out/device.txt"
livetrain devices | tee -a "$out/device.txt" || exit 1
echo "== the installed vLLM against livetrain's contract"
$py -m livetrain.vllm.contract | tee "$out/vllm-contract.txt" || exit 1
if [[ "${1:-}" == *.py ]]; then
  script=$1
  shift
  echo "== $script"
  OUT=$out $py "$script" "$@"
else
  echo "== vllm serve with the plugin"
  $py scripts/vllm_gpu_run.py --out "$out" "$@"
fi
