"""What the default model makes of rewording's prompt (trainer.augment, issue #14): for the training questions
of bench/learning_data.json, each prompt form's greedy replies (guard.greedy, as augment.reworded makes them)
are read by each reply check, and a table gives how many are usable: a question (the check returns one), not
the original, and keeping the question's entity (its made-up name: the original's capitalized words after
its first, else its last word). Forms: ``old``, the instruction alone (before this bench); ``varied-examples``,
three example rewordings worded in varied ways first; ``current``, augment.messages (augment.EXAMPLES first).
Checks: ``old check``, augment.question before this bench; ``current check``, augment.question. Then the
first replies of each form. CPU-sized (fp32, batches of 16).

usage: python bench/reword.py [--facts 32] [--both] [--forms old,varied-examples,current] [--examples 3]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import learning_questions as lq  # noqa: E402
import torch  # noqa: E402

# The instruction of before this bench (a single user message), compared against the current one.
OLD_INSTRUCTION = "Rewrite the following question using different words. Reply with the rewritten question only.\n\n{q}"


# Examples whose rewordings are worded in varied ways (the model then mostly repeats the question or changes
# its names), against augment.EXAMPLES (every rewording starts with "Which").
VARIED_EXAMPLES = (
    ("What is the capital of France?", "Which city is France's capital?"),
    ("Who wrote the play Hamlet?", "Hamlet was written by which playwright?"),
    ("What is the largest ocean on Earth?", "What is the name of the biggest ocean on Earth?"),
)


def old_question(reply: str, original: str) -> str | None:
    """augment.question before this bench: the reply's first line, unquoted, when a question other than the
    original."""
    lines = reply.strip().splitlines()
    text = lines[0].strip().strip('"').strip() if lines else ""
    norm = lambda s: re.sub(r"[^a-z0-9]+", " ", s.lower()).strip()  # noqa: E731
    return text if text.endswith("?") and norm(text) != norm(original) else None


def entity(q: str) -> list[str]:
    """The made-up name of a bench question: its capitalized words after the first but "The", else its last
    word ("glimmerwheel", "vantium")."""
    words = re.findall(r"[A-Za-z]+", q)
    names = [w for w in words[1:] if w[0].isupper() and w != "The"]
    return names or [words[-1]]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--facts", type=int, default=32)
    p.add_argument("--both", action="store_true", help="both training phrasings of each fact (else the first)")
    p.add_argument("--forms", default="old,varied-examples,current")
    p.add_argument("--examples", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from livetrain import default_model
    from livetrain.trainer import augment, guard
    from livetrain.trainer.examples import prompt_ids

    path = default_model.ensure(dtype="fp32")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    facts, _ = lq.load(facts=a.facts)
    qs = [q for f in facts for q, _ in (f["train"] if a.both else f["train"][:1])]

    forms = {
        "old": lambda q: [{"role": "user", "content": OLD_INSTRUCTION.format(q=q)}],
        "varied-examples": lambda q: [
            *[m for o, r in VARIED_EXAMPLES for m in augment.messages(o)[-1:] + [{"role": "assistant", "content": r}]],
            augment.messages(q)[-1],
        ],
        "current": augment.messages,
    }
    checks = {"old check": old_question, "current check": augment.question}
    print(f"# {len(qs)} questions, {a.facts} facts; default model fp32 on the CPU", flush=True)
    replies = {}
    for name in a.forms.split(","):
        t0 = time.monotonic()
        ids = [prompt_ids(tok, forms[name](q)) for q in qs]
        out = guard.greedy(model, ids, augment.REPLY_TOKENS, guard.stop_ids(tok, model), pad, 16)
        replies[name] = [tok.decode(r, skip_special_tokens=True) for r in out]
        print(f"# {name}: {time.monotonic() - t0:.0f} s", flush=True)
    print("| form | check | usable | rejected by the check | kept by it, the same question | kept by it, name lost |")
    print("|---|---|---|---|---|---|")
    for name, got in replies.items():
        for cname, check in checks.items():
            n = {"usable": 0, "none": 0, "same": 0, "lost": 0}
            for q, r in zip(qs, got):
                text = check(r, q)
                if text is None:
                    n["none"] += 1
                elif text.strip().lower() == q.strip().lower():
                    n["same"] += 1
                elif not all(w.lower() in text.lower() for w in entity(q)):
                    n["lost"] += 1
                else:
                    n["usable"] += 1
            print(f"| {name} | {cname} | {n['usable']}/{len(qs)} | {n['none']} | {n['same']} | {n['lost']} |")
    for name, got in replies.items():
        print(f"\n## {name}")
        for q, r in list(zip(qs, got))[: a.examples]:
            print(f"- {q!r} -> {r!r} -> {augment.question(r, q)!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
