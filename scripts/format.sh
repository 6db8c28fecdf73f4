#!/usr/bin/env bash
# Applies livetrain's C++/CUDA style (.clang-format: Google's, 120 columns) to every C++ and CUDA file of the
# tree in one step, or with --check only reports the files that differ from it (exit 1; scripts/test.sh runs
# it first). third_party/ stays as released. The formatter is clang-format 14.0.6, pinned in
# requirements/dev.txt (another version formats some constructs differently, so the check would flap); the
# first of CLANG_FORMAT, .venv/bin/clang-format, clang-format-14, clang-format that is 14.0.6 is used.
#
# usage: bash scripts/format.sh [--check]
set -euo pipefail
cd "$(dirname "$0")/.."
check=0
case "${1:-}" in
"") ;;
--check) check=1 ;;
*) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
want=14.0.6
cf=
for c in ${CLANG_FORMAT:-} .venv/bin/clang-format clang-format-14 clang-format; do
  if command -v "$c" >/dev/null && "$c" --version | grep -q "version $want"; then cf=$c; break; fi
done
if [ -z "$cf" ]; then
  echo "format.sh: no clang-format $want (pip install clang-format==$want, as requirements/dev.txt pins it)" >&2
  exit 1
fi
mapfile -t files < <(git ls-files 'include/*' 'src/*' 'bindings/*' 'tests/cpp/*' 'fuzz/*' 'bench/*' |
  grep -E '\.(hpp|h|cpp|cc|cu|cuh)$')
if [ $check = 1 ]; then
  # One clang-format for every file; it names each place that differs ("FILE:LINE:COL: error: ...").
  out=$("$cf" --dry-run --Werror "${files[@]}" 2>&1) && rc=0 || rc=$?
  if [ $rc != 0 ]; then
    bad=$(grep -oE '^[^: ]+:[0-9]+:[0-9]+: error' <<< "$out" | cut -d: -f1 | sort -u)
    [ -n "$bad" ] || { echo "$out" >&2; exit 1; }  # clang-format failed otherwise: say how
    echo "format.sh: $(wc -l <<< "$bad") of ${#files[@]} C++/CUDA files differ from .clang-format" \
      "(bash scripts/format.sh fixes them):" >&2
    sed 's/^/  /' <<< "$bad" >&2
    exit 1
  fi
  echo "format: ${#files[@]} C++/CUDA files follow .clang-format ($("$cf" --version | sed 's/.*version \([0-9.]*\).*/\1/'))"
else
  "$cf" -i "${files[@]}"
  echo "format: ${#files[@]} C++/CUDA files formatted with $("$cf" --version | sed 's/.*version \([0-9.]*\).*/\1/')"
fi
