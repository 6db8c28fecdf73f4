"""What the forgetting guard's KL anchor costs per training step (docs/learning.md): the trainer in process on
the default model, one step after another over the same batch of bench/learning_data.json's examples, in
three ways, interleaved round by round so that a busy machine slows each alike:

- ``none``: the job's rows alone (a job without the anchor);
- ``separate``: the anchor's retention rows in a forward of their own, the same backward (the trainer
  before the anchor joined the batch's forward; still its path for a model without a plain output layer);
- ``shared``: the anchor's rows in the batch's own forward (``Trainer.loss``: what a step does now).

Prints a markdown table: the median step seconds of each way, and each one's ratio to ``none``. The
anchor's rows are the retention replay rows as a guarded job prepares them (``Trainer._guard_start``:
the model's own answers, cut to their share of the step's token budget), ``--replay`` of them per step.

usage: python bench/learning_step.py [--facts 4] [--replay 2] [--rounds 6] [--device cuda --dtype bf16]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import learning_questions as lq  # noqa: E402
import torch  # noqa: E402
from learning_sweep import InProcess  # noqa: E402

WAYS = ("none", "separate", "shared")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--facts", type=int, default=4, help="the first N facts (2 examples each) make the batch")
    p.add_argument("--replay", type=int, default=2, help="anchor rows per step (the job's replay)")
    p.add_argument("--rounds", type=int, default=6, help="timed steps of each way (after one untimed)")
    p.add_argument("--lr", type=float, default=1e-6, help="the steps' learning rate (small: the weights barely move)")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from livetrain.trainer import admission, schedule
    from livetrain.trainer.examples import parse_job

    facts, _ = lq.load(facts=a.facts)
    t0 = time.perf_counter()
    ip = InProcess(a.dtype, a.device, batch_size=2 * a.facts)
    t = ip.trainer
    batch = parse_job(t.tokenizer, {"examples": lq.examples(facts)}, t.max_len, 10_000)["examples"]
    plan = schedule.plan({"replay": a.replay, "anchor": 1.0, "guard": False}, t.settings, len(batch))
    width = admission.replay_width(t.max_batch_tokens, len(batch), a.replay)
    watch = t._guard_start(plan, width)
    reference = watch["anchor"]
    print(
        f"# {a.device} {a.dtype}: loaded and prepared in {time.perf_counter() - t0:.0f} s; batch of {len(batch)} "
        f"examples (longest {max(len(x) for x, _, _ in batch)} tokens), {a.replay} anchor rows per step of "
        f"{len(reference)} (longest {max(len(x) for x, _, _ in reference.examples)} tokens)",
        flush=True,
    )
    for group in t.opt.param_groups:
        group["lr"] = a.lr
    cycle = itertools.cycle(range(len(reference)))
    times: dict[str, list[float]] = {w: [] for w in WAYS}

    def step(way: str) -> float:
        anchor = None if way == "none" else (reference, [next(cycle) for _ in range(a.replay)], 1.0)
        if t.device.type == "cuda":
            torch.cuda.synchronize(t.device)
        s = time.perf_counter()
        t.step(batch, anchor, separate_anchor={"separate": True, "shared": False}.get(way))
        if t.device.type == "cuda":
            torch.cuda.synchronize(t.device)
        return time.perf_counter() - s

    for way in WAYS:  # untimed: first-call costs
        step(way)
    for r in range(a.rounds):
        for way in WAYS[r % 3 :] + WAYS[: r % 3]:  # each way first in turn
            times[way].append(step(way))
    base = statistics.median(times["none"])
    print("| way | step s (median) | min | max | vs none |\n|---|---|---|---|---|")
    for way in WAYS:
        m = statistics.median(times[way])
        print(f"| {way} | {m:.3f} | {min(times[way]):.3f} | {max(times[way]):.3f} | {m / base:.2f}x |")
    sep, shared = statistics.median(times["separate"]), statistics.median(times["shared"])
    print(
        f"# the anchor's extra time per step: separate {sep - base:+.3f} s, shared {shared - base:+.3f} s "
        f"({(shared - base) / (sep - base):.0%} of separate's)"
        if sep > base
        else "# separate was not slower than none here: the machine's noise exceeds the anchor's cost"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
