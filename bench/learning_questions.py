"""The questions of bench/learning.py and bench/learning_sweep.py (bench/learning_data.json) and how their
answers are scored: a fact's answer counts when it contains the fact's made-up keyword; a general answer
when one of its keywords appears in it as a word (not inside a longer word or number: "0" does not match
"-18.0")."""

from __future__ import annotations

import json
import os
import re

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "learning_data.json")


def load(path: str = DATA, facts: int | None = None) -> tuple[list[dict], list[dict]]:
    """(facts, general questions); the first ``facts`` facts when given."""
    with open(path) as f:
        d = json.load(f)
    return d["facts"][:facts] if facts else d["facts"], d["general"]


def examples(facts: list[dict]) -> list[dict]:
    """The /train examples that teach ``facts``: both phrasings of each, as chats."""
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for f in facts
        for q, a in f["train"]
    ]


def fact_ok(answer: str, fact: dict) -> bool:
    return fact["keyword"].lower() in answer.lower()


def general_ok(answer: str, question: dict) -> bool:
    return any(re.search(r"(?<![\w.])" + re.escape(k) + r"(?!\w)", answer, re.IGNORECASE) for k in question["keywords"])


def questions(facts: list[dict], general: list[dict], both_phrasings: bool = True) -> list[tuple[str, str, int]]:
    """Everything to ask, as (kind, question, index): kind "trained", "reworded" or "general"."""
    out = []
    for i, f in enumerate(facts):
        for q, _ in f["train"] if both_phrasings else f["train"][:1]:
            out.append(("trained", q, i))
        out.append(("reworded", f["reworded"], i))
    out += [("general", g["q"], i) for i, g in enumerate(general)]
    return out


def score(asked: list[tuple[str, str, int]], answers: list[str], facts: list[dict], general: list[dict]) -> dict:
    """Per kind, which answers are right: {"trained": [bool], "reworded": [bool], "general": [bool]} in the
    order asked (a fact's trained question counts once per phrasing)."""
    out: dict[str, list[bool]] = {"trained": [], "reworded": [], "general": []}
    for (kind, _, i), a in zip(asked, answers):
        out[kind].append(general_ok(a, general[i]) if kind == "general" else fact_ok(a, facts[i]))
    return out


def kept(before: list[bool], after: list[bool]) -> tuple[int, int]:
    """(how many answers right before are still right, how many were right before)."""
    right = [i for i, ok in enumerate(before) if ok]
    return sum(1 for i in right if after[i]), len(right)


def lost(before: list[bool], after: list[bool]) -> list[int]:
    """The indices of the answers right before and wrong after: what a job lost."""
    return [i for i, ok in enumerate(before) if ok and not after[i]]


def lost_answers(asked: list[tuple[str, str, int]], answers: list[str], before: dict, after: dict) -> dict[int, str]:
    """The general answers lost (``lost`` of the ``score`` dicts ``before`` and ``after``), each general question's
    index with what it answered after (``answers`` in the order of ``asked``)."""
    general = {i: a for (kind, _, i), a in zip(asked, answers) if kind == "general"}
    return {i: general[i] for i in lost(before["general"], after["general"])}
