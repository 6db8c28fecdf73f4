"""How long the forgetting guard's retention answers take (``guard.greedy``: 393 prompts x 40 tokens on a GPU),
in the trainer's batches (at most ``guard.GREEDY_ROWS`` rows within half of a step's memory: ``Trainer.greedy``)
against fixed batches of 16 rows (the trainer before) and 64 (bench/learning_sweep.py's): the trainer in
process on the default model (learning_sweep.InProcess), the ways interleaved round by round so that a busy
machine slows each alike. Prints a markdown table: the ways' largest batch, batches, median seconds, ratio to
16's, the peak of CUDA memory allocated above what was held before (the batches' caches and activations), and
how many answers equal 16's (batched bf16 greedy decoding may differ in near-ties across batch shapes).

usage: python bench/guard_answers.py [--device cuda --dtype bf16] [--rounds 2] [--prompts N] [--threads 0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from learning_sweep import InProcess  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--prompts", type=int, default=0, help="the first N retention prompts (0: all of them)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from livetrain.trainer import admission, guard
    from livetrain.trainer.examples import prompt_ids

    ip = InProcess(a.dtype, a.device, 8)
    t = ip.trainer
    prompts = t.retention.prompts[: a.prompts or None]
    ids = [prompt_ids(t.tokenizer, q) for q in prompts]
    stop = guard.stop_ids(t.tokenizer, t.model)
    per_token, per_row = admission.cache_bytes(t.model.config, next(t.model.parameters()).element_size())
    ways = {
        "16 rows": {"batch": 16, "memory": None},
        "64 rows": {"batch": 64, "memory": None},
        "trainer's": dict(t.greedy),
    }
    print(
        f"# {len(ids)} retention prompts, {guard.ANSWER_TOKENS} tokens each, on {t.device} ({a.dtype}); the "
        f"trainer's bound: {t.greedy['batch']} rows, {t.greedy['memory'] / 2**20:.0f} MiB of cache (a step's token "
        f"budget {t.max_batch_tokens}; cache {per_token} B a token, {per_row} B a row)",
        flush=True,
    )
    cuda = t.device.type == "cuda"
    seconds = {w: [] for w in ways}
    peak, answers = {}, {}
    for r in range(a.rounds):
        for w, kw in ways.items():
            if cuda:
                torch.cuda.synchronize(t.device)
                torch.cuda.reset_peak_memory_stats(t.device)
                held = torch.cuda.memory_allocated(t.device)
            t0 = time.perf_counter()
            answers[w] = guard.greedy(t.model, ids, guard.ANSWER_TOKENS, stop, t.pad, **kw)
            if cuda:
                torch.cuda.synchronize(t.device)
                peak[w] = max(peak.get(w, 0), torch.cuda.max_memory_allocated(t.device) - held)
            seconds[w].append(time.perf_counter() - t0)
            print(f"# round {r + 1}: {w} {seconds[w][-1]:.1f} s", flush=True)
    lengths = [len(x) for x in ids]
    base = statistics.median(seconds["16 rows"])
    print("| way | largest batch | batches | median s | vs 16 rows | peak MiB above held | answers as 16's |")
    print("|---|---|---|---|---|---|---|")
    for w, kw in ways.items():
        memory = kw["memory"] if kw["memory"] is not None else float("inf")
        batches = admission.generation_batches(lengths, guard.ANSWER_TOKENS, kw["batch"], memory, per_token, per_row)
        med = statistics.median(seconds[w])
        same = sum(x == y for x, y in zip(answers[w], answers["16 rows"]))
        print(
            f"| {w} | {max(map(len, batches))} | {len(batches)} | {med:.2f} | {base / med:.2f}x | "
            f"{peak[w] / 2**20:.0f} | {same}/{len(ids)} |"
            if cuda
            else f"| {w} | {max(map(len, batches))} | {len(batches)} | {med:.2f} | {base / med:.2f}x | - | "
            f"{same}/{len(ids)} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
