#!/usr/bin/env bash
# The vLLM plugin on a GPU, end to end (for the GPU machine; docs/vllm.md): builds the core for this
# machine if needed, makes livetrain's vLLM entry points visible, then runs scripts/vllm_gpu_run.py:
# a tiny model served by `vllm serve` with the plugin (--arch llama, or qwen3_5: a multimodal Qwen3.5
# checkpoint served text-only), /train changes the answer, the weights are checkpointed, vLLM restarts and
# serves the trained weights. Results: $OUT (default gpu-out)/vllm-run.json and vllm-{1,2}.log.
#
# vLLM must be importable: vLLM 0.26.0 is the release built for torch 2.11 (CUDA 13). The packages the GPU
# machine lacks (requirements/gpu-machine.txt) reach it through scripts/gpu_carry.sh, unpacked into SITE
# (default /tmp/site).
#
# usage: bash scripts/vllm_gpu_run.sh [--arch llama|qwen3_5] [--checkpoint http|api] [--vllm-args "..."]
#        bash scripts/vllm_gpu_run.sh SCRIPT.py [ARGS...]   another script in the same environment (e.g.
#                                                          bench/vllm_transfer.py), $OUT passed on

set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
site=${SITE:-/tmp/site}
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

# The core module for this Python (scripts/gpu.sh builds it in place).
suffix=$($py -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
if [ ! -f "python/livetrain/_core$suffix" ]; then
  OUT=$out bash scripts/gpu.sh build || exit $?
fi

# vLLM finds plugins through installed packages' entry points. livetrain runs from the source tree here,
# so give it the .dist-info an install would write (name, version, entry_points.txt from pyproject.toml).
ep=$(mktemp -d /tmp/livetrain-ep.XXXXXX)
$py - "$ep" <<'PY' || exit $?
import sys, tomllib, pathlib
meta = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]
d = pathlib.Path(sys.argv[1]) / f"livetrain-{meta['version']}.dist-info"
d.mkdir()
(d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: livetrain\nVersion: {meta['version']}\n")
(d / "entry_points.txt").write_text("".join(
    f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n"
    for group, eps in meta["entry-points"].items()))
PY
export PYTHONPATH="$PWD/python:$ep:$site${PYTHONPATH:+:$PYTHONPATH}"
# vLLM's sampler imports flashinfer unless told not to use it; the GPU machine has no flashinfer.
$py -c "import flashinfer" 2>/dev/null || export VLLM_USE_FLASHINFER_SAMPLER=0
export PATH="$site/bin:$PATH"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
$py -c "import torch, importlib.metadata as m; print('torch', torch.__version__, 'vllm', m.version('vllm'))" \
  | tee -a "$out/device.txt" || exit 1
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
status=$?
rm -rf "$ep"
exit $status
