"""A CPU-sized probe of ``restate`` (trainer.augment.restated): the first N facts of bench/learning_data.json
taught in a fixed number of full-batch steps, without the guard, three ways from the same starting weights:
``plain`` (the two chat phrasings of each fact), ``restate`` (the same, and each answer as plain text: twice
the rows) and ``dup`` (the chat examples twice: the same rows as ``restate``, no new form). After each job it
prints the mean negative log-likelihood per token of each fact's first answer after its *reworded* question
(never trained on; teacher-forced, so it moves before the greedy answer does), and the greedy recall of the
reworded and trained questions. Small enough for a loaded 2-core CPU; it ranks, it does not replace
bench/learning_sweep.py.

usage: python bench/learning_restate.py [--facts 6] [--steps 10] [--lr 2e-4] [--ways plain,restate,dup]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from learning_sweep import cpu_probe  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--facts", type=int, default=6)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--ways", default="plain,restate,dup")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    from livetrain.trainer import guard
    from livetrain.trainer.examples import prompt_ids

    ip, facts, general, examples = cpu_probe(a)
    t = ip.trainer

    def nll(pairs) -> float:
        rows = []
        for q, answer in pairs:
            prompt = prompt_ids(t.tokenizer, [{"role": "user", "content": q}])
            c = t.tokenizer(answer, add_special_tokens=False)["input_ids"] + [t.tokenizer.eos_token_id]
            rows.append((prompt + c, [False] * len(prompt) + [True] * len(c), 1.0))
        with torch.no_grad():
            logits = guard.answer_logits(t.model, rows, t.pad)
        target = torch.tensor([i for ids, m, _ in rows for i, k in zip(ids[1:], m[1:]) if k])
        return -torch.log_softmax(logits, -1).gather(1, target[:, None]).mean().item()

    reworded = [(f["reworded"], f["train"][0][1]) for f in facts]
    asked = [("reworded", f["reworded"], i) for i, f in enumerate(facts)]
    asked += [("trained", f["train"][0][0], i) for i, f in enumerate(facts)]
    print(f"# {len(facts)} facts; before: reworded answer NLL {nll(reworded):.3f}", flush=True)
    print("| way | examples | steps | lr | loss after | reworded answer NLL | reworded | trained | s |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for way in a.ways.split(","):
        body = {"examples": examples * (2 if way == "dup" else 1), "steps": a.steps, "lr": a.lr, "guard": False}
        body.update(batch_size=64, restate=way == "restate")
        info, got, seconds = ip.taught(body, asked, facts, general)
        print(
            f"| {way} | {info['examples']} | {a.steps} | {a.lr:g} | {info['loss_after']} | {nll(reworded):.3f} "
            f"| {sum(got['reworded'])}/{len(facts)} | {sum(got['trained'])}/{len(facts)} "
            f"| {seconds:.0f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
