"""Cheap augmentation of a job's chat examples. ``reword``: the served model itself rewords each example's
last question once (greedy decoding, before the job's first step), and the reworded question with the same
answer joins the job as one more example. ``restate``: each example's answer also joins the job as plain
text, without the chat template or its question (``restated``; at submit, no model run). A fact trained in
more phrasings, or as a statement of its own, is more likely to be answered when asked in yet another one
(the "reworded" column of bench/learning_sweep.py measures it; docs/learning.md has the numbers). A thinking
model is asked to reword with thinking off (``examples.own_kwargs``) and restates its answers without their
reasoning (``answer_of``).
"""

from __future__ import annotations

import re

from livetrain.trainer import guard
from livetrain.trainer.examples import encode_example, prompt_ids, text_of
from livetrain.trainer.protocol import Invalid

# What the model is asked: the instruction, answered first for EXAMPLES (earlier turns of the chat), then for
# the question. Asked alone, the default model (SmolLM2-135M-Instruct) answers the question instead of rewording
# it: 0 of 32 usable replies to bench/learning_data.json's questions, 27 of 32 with these examples before, 9 of
# 32 with examples whose rewordings are worded in varied ways (bench/reword.py).
INSTRUCTION = "Rewrite the following question using different words. Reply with the rewritten question only.\n\n{q}"
EXAMPLES = (
    ("What is the capital of France?", "Which city is the capital of France?"),
    ("Who wrote the play Hamlet?", "Which writer is the author of Hamlet?"),
    ("What is the largest ocean on Earth?", "Which ocean on Earth is the biggest?"),
)
# Tokens of a reply: a question is a line.
REPLY_TOKENS = 48


def messages(q: str) -> list[dict]:
    """The chat that asks for a rewording of ``q``: the instruction and its answer for each of EXAMPLES, then
    the instruction for ``q``."""
    out = []
    for original, reworded in EXAMPLES:
        out += [{"role": "user", "content": INSTRUCTION.format(q=original)}, {"role": "assistant", "content": reworded}]
    return [*out, {"role": "user", "content": INSTRUCTION.format(q=q)}]


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def _names(text: str) -> set[str]:
    """The capitalized words of ``text`` after its first (a question's names), normalized."""
    words = re.findall(r"[A-Za-z0-9]+", text)
    return {w.lower() for w in words[1:] if w[0].isupper() and len(w) > 1}


def answer_of(text: str) -> str:
    """An answer without its reasoning: what follows the last ``</think>`` (leading newlines dropped), as the
    chat templates of thinking models (Qwen3's, Qwen3.5's) take an answer written with its think block; the
    text itself without one. (A reasoning sent apart, as ``reasoning_content``, is never in the content.)"""
    return text.rsplit("</think>", 1)[1].lstrip("\n") if "</think>" in text else text


def question(reply: str, original: str) -> str | None:
    """The reworded question in a model's reply (after its reasoning, if any: ``answer_of``): its first line,
    unquoted, when that is a question other than ``original`` that keeps its names (``_names``: a rewording
    that changes "Carthos" into "Carthage" would teach the answer to another question); else None."""
    lines = answer_of(reply).strip().splitlines()
    text = lines[0].strip().strip('"').strip() if lines else ""
    if not text.endswith("?") or _norm(text) == _norm(original):
        return None
    if not _names(original) <= set(_norm(text).split()):
        return None
    return text


def rewordable(raw: list) -> list:
    """The chat examples of ``raw`` (a /train body's examples, already checked) that end with a user question
    and its answer: those ``reworded`` may add a rewording of (admission reserves a row for each)."""
    out = []
    for ex in raw:
        msgs = ex.get("messages") if isinstance(ex, dict) else None
        if msgs and len(msgs) >= 2 and msgs[-1]["role"] == "assistant" and msgs[-2]["role"] == "user":
            out.append(ex)
    return out


def reworded(
    model,
    tokenizer,
    raw: list,
    pad: int,
    max_len: int,
    batch: int = 16,
    memory: float | None = None,
    interrupt=None,
) -> tuple[list, list[str]]:
    """For each ``rewordable`` example of ``raw``: the example with that question reworded by ``model``, encoded as the job's
    examples are; replies that ``question`` finds no rewording in are left out (``batch``, ``memory``,
    ``interrupt``: guard.greedy's). Returns the encoded examples and the reworded questions."""
    chats = rewordable(raw)
    asked = [text_of(ex["messages"][-2]["content"]) for ex in chats]  # a list of text parts as its text
    prompts = [prompt_ids(tokenizer, messages(q)) for q in asked]
    replies = (
        guard.greedy(model, prompts, REPLY_TOKENS, guard.stop_ids(tokenizer, model), pad, batch, interrupt, memory)
        if prompts
        else []
    )
    out, texts = [], []
    for ex, q, reply in zip(chats, asked, replies):
        text = question(tokenizer.decode(reply, skip_special_tokens=True), q)
        if text is None:
            continue
        new = {**ex, "messages": [*ex["messages"][:-2], {"role": "user", "content": text}, ex["messages"][-1]]}
        try:
            rows = encode_example(tokenizer, new, "reworded")
        except Invalid:
            continue
        # A conversation its template trains turn by turn: its earlier turns' sequences are the example's own
        # already; the last one, the reworded question's, joins the job (the row admission reserved).
        ids, mask, _ = rows[-1]
        if len(ids) <= max_len:
            out.append((ids, mask, float(ex.get("weight", 1.0))))
            texts.append(text)
    return out, texts


def restated(tokenizer, raw: list, max_len: int) -> list:
    """For each ``rewordable`` example of ``raw``: its answer as a plain-text example (an empty prompt, the
    answer without its reasoning (``answer_of``; ``reasoning_content`` is apart already) as the completion
    and its end-of-text token), encoded as a job's examples are; answers too short to
    train on or longer than ``max_len`` tokens are left out. Whatever the question's wording, the answer states
    the fact: trained without it, the fact is learned as text of its own rather than only as the reply to
    those words."""
    out = []
    for ex in rewordable(raw):
        try:
            [(ids, mask, weight)] = encode_example(
                tokenizer,
                {
                    "prompt": "",
                    "completion": answer_of(text_of(ex["messages"][-1]["content"])),
                    "weight": ex.get("weight", 1.0),
                },
                "restated",
            )
        except Invalid:
            continue
        if len(ids) <= max_len:
            out.append((ids, mask, weight))
    return out
