"""How much a job's first few steps change the model's general answers: the first N facts of
bench/learning_data.json (two chat phrasings each) taught for a few fixed steps without the guard or replay,
at given learning rates and warm-ups, each from the same starting weights; after each, the general questions
are asked again. Prints, per setting: the examples' loss after, the general answers kept (of those right
before) and the largest change of any weight. On the CPU in minutes (it ranks settings; the whole jobs are
bench/learning_sweep.py's).

usage: python bench/learning_first_steps.py [--facts 1] [--runs 5e-5:1:0,5e-5:3:20]   (lr:steps:warmup each)
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import learning_questions as lq  # noqa: E402
from learning_sweep import cpu_probe  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--facts", type=int, default=1)
    p.add_argument("--runs", default="1e-6:1:0,5e-5:1:0,5e-5:3:0,5e-5:3:20,5e-5:10:20,5e-5:10:0")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    ip, facts, general, examples = cpu_probe(a)
    asked = [("general", g["q"], i) for i, g in enumerate(general)]
    base = lq.score(asked, ip.ask([q for _, q, _ in asked], 24), facts, general)
    print(f"# {len(examples)} examples; before: {sum(base['general'])}/{len(general)} general answers right")
    print("| lr | steps | warm-up | loss after | general kept | max weight change | s |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for run in a.runs.split(","):
        lr, steps, warmup = float(run.split(":")[0]), int(run.split(":")[1]), int(run.split(":")[2])
        body = {"examples": examples, "steps": steps, "lr": lr, "warmup": warmup, "guard": False}
        info, got, seconds = ip.taught(body, asked, facts, general)
        kept, right = lq.kept(base["general"], got["general"])
        moved = max((ip.trainer.weights[n] - ip.start[n]).abs().max().item() for n in ip.start)
        print(
            f"| {lr:g} | {steps} | {warmup} | {info['loss_after']} | {kept}/{right} | {moved:.2e} | {seconds:.0f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
