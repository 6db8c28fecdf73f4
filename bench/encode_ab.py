"""bench/encode_phases.cpp built with the entropy coder of a base revision and with the working tree's (twice:
as built, and with -DLIVETRAIN_ENTROPY_BASELINE, its baseline x86-64 code alone, what a CPU without BMI2 and
AVX-512 VBMI2 runs), run in turns in one invocation: per phase, the best of the rounds of each and the ratios
(base / tree; > 1: the tree is faster). Everything but src/checkpoint/entropy.{hpp,cpp} is the working tree's
in all builds.

    .venv/bin/python bench/encode_ab.py [--base main] [--rounds 5] [--threads 1 2] [--blocks 16] [--lr 1.3e-6]

Needs g++ (C++20); builds from the sources into a temporary directory (no CMake build). The base must be a
revision whose entropy.hpp declares entropy::histogram (7090a83 on: the phase bench times it), e.g. 8550f09; on
a machine without the git history (a device machine) give a directory holding that revision's two files
(`git show 8550f09:src/checkpoint/entropy.cpp > DIR/entropy.cpp`, the same for entropy.hpp). Prints one markdown
table per thread count. Results: bench/RESULTS.md, "Seventh session of 2026-12-01", huff28.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [
    "bench/encode_phases.cpp",
    "src/checkpoint/delta.cpp",
    "src/checkpoint/hash.cpp",
    "src/checkpoint/region.cpp",
    "src/common/parallel.cpp",
    "src/common/tuning.cpp",
    "src/common/error.cpp",
    "src/common/dtype.cpp",
]
ROW = re.compile(r"^\| (.+?) \| [0-9]+ \| ([0-9.]+) \|")
THREADS = re.compile(r"encode_records of the whole tensor at ([0-9]+) threads: ([0-9.]+) us per block")


def compile_one(args: tuple[list[str], str, str]) -> None:
    flags, src, obj = args
    subprocess.run(["g++", *flags, "-c", src, "-o", obj], check=True)


VARIANTS = ("base", "tree", "tree-baseline")


def build(tmp: Path, base: str) -> dict[str, Path]:
    """The binaries: 'base' (entropy.{hpp,cpp} at `base`), 'tree' and 'tree-baseline'."""
    overlay = tmp / "base_include" / "checkpoint"
    overlay.mkdir(parents=True)
    for name in ("entropy.hpp", "entropy.cpp"):
        if Path(base).is_dir():  # a copy of the base's two files (a machine without the git history)
            text = (Path(base) / name).read_text()
        else:
            text = subprocess.run(
                ["git", "show", f"{base}:src/checkpoint/{name}"], cwd=ROOT, check=True, capture_output=True, text=True
            ).stdout
        (overlay / name).write_text(text)
    common = ["-O2", "-std=c++20", f"-I{ROOT / 'include'}", f"-I{ROOT / 'third_party'}"]
    tree_flags = [*common, f"-I{ROOT / 'src'}"]
    base_flags = [*common, f"-I{tmp / 'base_include'}", f"-I{ROOT / 'src'}"]
    jobs = []
    for variant, flags in (("base", base_flags), ("tree", tree_flags)):
        (tmp / variant).mkdir()
        for src in SOURCES:
            jobs.append((flags, str(ROOT / src), str(tmp / variant / (Path(src).stem + ".o"))))
    (tmp / "tree-baseline").mkdir()
    jobs.append((base_flags, str(overlay / "entropy.cpp"), str(tmp / "base" / "entropy.o")))
    tree_entropy = str(ROOT / "src/checkpoint/entropy.cpp")
    jobs.append((tree_flags, tree_entropy, str(tmp / "tree" / "entropy.o")))
    jobs.append(([*tree_flags, "-DLIVETRAIN_ENTROPY_BASELINE"], tree_entropy, str(tmp / "tree-baseline" / "entropy.o")))
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(compile_one, jobs))
    out = {}
    for variant in VARIANTS:
        exe = tmp / variant / "encode_phases"
        objs = [str(tmp / "tree" / (Path(src).stem + ".o")) for src in SOURCES] if variant == "tree-baseline" else []
        objs = sorted(objs + [str(p) for p in (tmp / variant).glob("*.o")])
        subprocess.run(["g++", *objs, "-lpthread", "-o", str(exe)], check=True)
        out[variant] = exe
    return out


def run(exe: Path, blocks: int, lr: float, threads: int) -> dict[str, float]:
    """One run's us per block, by phase (the multi-thread line as 'encode_records at N threads')."""
    text = subprocess.run([str(exe), str(blocks), str(lr), str(threads)], check=True, capture_output=True, text=True)
    rows = {}
    for line in text.stdout.splitlines():
        if m := ROW.match(line):
            rows[m.group(1)] = float(m.group(2))
        elif m := THREADS.search(line):
            rows[f"encode_records of the whole tensor at {m.group(1)} threads"] = float(m.group(2))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--base",
        default="main",
        help="the revision whose entropy coder is the base (default main), or a directory holding that "
        "revision's entropy.hpp and entropy.cpp (where the checkout has no git history, e.g. a device machine)",
    )
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1.3e-6)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="encode-ab-") as tmp_name:
        exes = build(Path(tmp_name), a.base)
        for threads in a.threads:
            best: dict[str, dict[str, float]] = {v: {} for v in VARIANTS}
            order: list[str] = []
            for r in range(a.rounds):
                for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                    for phase, us in run(exes[variant], a.blocks, a.lr, threads).items():
                        if phase not in order:
                            order.append(phase)
                        best[variant][phase] = min(us, best[variant].get(phase, float("inf")))
            print(
                f"\n--threads {threads}, {a.blocks} blocks, lr {a.lr}: us per block, best of {a.rounds} runs each "
                f"(base {a.base}, the working tree, the tree's baseline x86-64 code, in turns)\n"
            )
            print(f"| phase | base {a.base} | tree | tree, baseline x86-64 | base / tree | base / tree baseline |")
            print("|---|---:|---:|---:|---:|---:|")
            for phase in order:
                b, t, tb = (best[v].get(phase) for v in VARIANTS)
                if b is None or t is None or tb is None:
                    continue
                print(f"| {phase} | {b:.1f} | {t:.1f} | {tb:.1f} | {b / t:.2f} | {b / tb:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
