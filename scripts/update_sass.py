"""Instructions per group of 8 weights on the hot path of each compiled variant of the batched APOLLO update
(update_many_kernel for bf16 weights and gradients, src/optim/apollo.cu), from the
machine code of an sm_90a build, without a GPU. Prints a table (docs/tuning.md, Phase 4, has the numbers).

    nvcc -DLIVETRAIN_WITH_CUDA=1 -Iinclude -Isrc -Ithird_party -O3 -DNDEBUG -std=c++20 \\
        -gencode=arch=compute_90a,code=sm_90a -cubin -o /tmp/apollo.cubin src/optim/apollo.cu
    python scripts/update_sass.py /tmp/apollo.cubin      # needs cuobjdump (CUDA toolkit, or pip
                                                          # nvidia-cuda-cuobjdump: its nvidia/cu13/bin)

The hot path is APOLLO-Mini's: tensor scaling, stochastic rounding, a row of whole 16-byte groups. It is counted
as the cheapest path through the kernel's loop (from the target of its back-edge to the back-edge) that passes,
for the iteration's group of 8 weights, a block with the stochastic rounding's offset extraction
("LOP3.LUT ..., 0xffff, RZ, 0xc0") and a block with the group's 16-byte store, and that avoids the scalar
fallback (16-bit loads) and the per-channel scale loads (32-bit loads); a block's cost is its instruction count.
A heuristic read of the control flow, not a profile: it is exact where the path is straight-line (the Mini
kernels) and matched a path followed by hand for the shipped kernel (315).
"""

from __future__ import annotations

import heapq
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

KERNEL = re.compile(r"update_many_kernelIttLi(\d+)E")
# The variant bits, read from the header that defines them (src/optim/apollo_update.hpp), so they cannot drift.
HEADER = Path(__file__).resolve().parent.parent / "src" / "optim" / "apollo_update.hpp"
NAMES = {"kLoadsFirst": "loads first", "kProbe": "probe", "kSevenRounds": "Philox4x32-7", "kMini": "Mini's",
         "kFastRound": "short rounding"}  # fmt: skip
BITS = {name: int(v) for name, v in re.findall(r"constexpr int (k\w+) = (\d+);", HEADER.read_text()) if name in NAMES}
VARIANT_BITS = {BITS[name]: text for name, text in NAMES.items()}


def functions(sass: str) -> dict[str, list[tuple[int, str]]]:
    out, cur = {}, None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = m.group(1)
            out[cur] = []
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m and cur:
            out[cur].append((int(m.group(1), 16), m.group(2)))
    return out


def hot_path(ins: list[tuple[int, str]]) -> int | None:
    addrs = [a for a, _ in ins]
    target, leaders = {}, {addrs[0]}
    for i, (a, t) in enumerate(ins):
        m = re.search(r"BRA (?:!?P\d, )?(0x[0-9a-f]+)", t)
        if m:
            target[a] = int(m.group(1), 16)
            leaders.add(target[a])
        if (m or "EXIT" in t) and i + 1 < len(ins):
            leaders.add(addrs[i + 1])
    starts = sorted(x for x in leaders if x in set(addrs))
    blocks = {s: [(a, t) for a, t in ins if s <= a < (starts[j + 1] if j + 1 < len(starts) else 1 << 62)]
              for j, s in enumerate(starts)}  # fmt: skip
    succ = defaultdict(list)
    for j, s in enumerate(starts):
        last_a, last = blocks[s][-1]
        if last_a in target:
            succ[s].append(target[last_a])
        if not (last.startswith("BRA") or last.startswith("EXIT")) and j + 1 < len(starts):
            succ[s].append(starts[j + 1])
    back_a, head = max(((a, t) for a, t in target.items() if t < a), key=lambda x: x[0] - x[1])
    end = max(s for s in blocks if s <= back_a)

    def has(s, pattern):
        return any(re.search(pattern, t) for _, t in blocks[s])

    def avoided(s):
        return has(s, r"LDG\.E\.U16") or has(s, r"^(@!?P\d )?LDG\.E R")

    stages = [r"0xffff, RZ, 0xc0", r"STG\.E(\.\w+)*\.128"]

    def advance(s, k):  # both stages may be in one block
        for _ in range(2):
            if k < len(stages) and has(s, stages[k]):
                k += 1
        return k

    start = (head, advance(head, 0))
    dist = {start: len(blocks[head])}
    queue = [(dist[start], start)]
    while queue:
        d, (u, k) = heapq.heappop(queue)
        if d > dist.get((u, k), 1 << 62):
            continue
        if u == end and k == len(stages):
            return d
        for v in succ[u]:
            if v not in blocks or not head <= v <= end or avoided(v):
                continue
            state = (v, advance(v, k))
            if d + len(blocks[v]) < dist.get(state, 1 << 62):
                dist[state] = d + len(blocks[v])
                heapq.heappush(queue, (dist[state], state))
    return None


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    tool = shutil.which("cuobjdump") or sys.exit("cuobjdump not found (CUDA toolkit, or pip nvidia-cuda-cuobjdump)")
    sass = subprocess.run([tool, "-sass", sys.argv[1]], capture_output=True, text=True, check=True).stdout
    usage = subprocess.run([tool, "-res-usage", sys.argv[1]], capture_output=True, text=True, check=True).stdout
    regs = dict(re.findall(r"Function (\S+):\s*REG:(\d+)", usage.replace("\n", " ")))
    rows = []
    for name, ins in functions(sass).items():
        m = KERNEL.search(name)
        if not m:
            continue
        variant = int(m.group(1))
        n = hot_path(ins) if not variant & BITS["kProbe"] else None
        rows.append((variant, regs.get(name, "?"), n))
    print("| variant | registers | instructions per group |")
    print("|---|---:|---:|")
    for variant, reg, n in sorted(rows):
        what = ", ".join(v for bit, v in VARIANT_BITS.items() if variant & bit) or "generic"
        print(f"| {what} | {reg} | {n or '-'} |")


if __name__ == "__main__":
    main()
