"""How a /train job runs: its options resolved against the trainer's defaults into a ``Plan`` (a fixed
number of steps, or "until every example is learned" within a step budget; learning rate and warm-up;
replayed retention examples; the guard), and each example's loss as the steps measure it (``Losses``),
which says when an adaptive job has learned its examples. Plain Python: no torch, testable alone.

The defaults (``options.py``) and the measurements that chose them are in docs/learning.md.
"""

from __future__ import annotations

import collections
import dataclasses
import math

from livetrain.trainer.options import MAX_STEPS, REPLAY_SELECT
from livetrain.trainer.protocol import Invalid

# A job's states; the last four are final.
STATES = ("queued", "running", "done", "failed", "cancelled", "rolled_back")
FINAL = ("done", "failed", "cancelled", "rolled_back")
# Why a job stopped (``stop_reason`` in /train/status).
STOP_REASONS = {
    "until_loss": "every example's loss fell below until_loss",
    "max_steps": "the step budget max_steps ran out before every example's loss fell below until_loss",
    "steps": "the fixed number of steps (steps or epochs) was taken",
    "cancelled": "cancelled (DELETE /train/{job_id} or POST /train/{job_id}/cancel)",
    "nonfinite": "the loss or a gradient became non-finite",
    "shutdown": "the trainer was stopped",
    "error": "an error (see error)",
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """A job's resolved settings.

    ``steps``: the number of steps when fixed (``steps`` or ``epochs`` given), else None: the job stops as
    soon as every example's loss is below ``until_loss``, or after ``max_steps``. ``until_loss`` may also
    end a fixed job early when the job gave it. ``lr`` is the rate after a linear warm-up of ``warmup``
    steps. ``replay`` retention examples are trained on at every step (0: none): as examples with the model's
    own answers (``anchor`` 0), or, with ``anchor`` > 0, as ``anchor`` × the KL divergence from the starting
    model's next-token distributions on them; ``replay_select`` says which (``Replayed``). ``reword``: the model rewords each example's question once and
    the job trains those too (trainer.augment). ``restate``: each chat example's answer is also trained as
    plain text (trainer.augment.restated). ``train``: which parameters the job trains (options.TRAIN). ``guard``: measure retention and roll the job back when it
    drops too far (docs/learning.md).
    """

    batch_size: int
    lr: float
    warmup: int
    steps: int | None
    max_steps: int
    until_loss: float | None
    replay: int
    anchor: float
    reword: bool
    guard: bool
    replay_select: str = "cycle"
    restate: bool = False
    train: str = "all"

    @property
    def budget(self) -> int:
        """The most steps the job may take."""
        return self.steps if self.steps is not None else self.max_steps

    def lr_at(self, step: int) -> float:
        """The learning rate of step ``step`` (0-based): linear warm-up to ``lr`` over the first ``warmup``
        steps (step k of them at lr·(k+1)/(warmup+1)), then constant."""
        if step < self.warmup:
            return self.lr * (step + 1) / (self.warmup + 1)
        return self.lr

    def describe(self) -> dict:
        """The plan as /train/status shows it under ``plan``."""
        return dataclasses.asdict(self)


def plan(options: dict, defaults, examples: int) -> Plan:
    """The plan of a job whose checked options (``examples.parse_job``) are ``options``, on a trainer whose
    parsed settings (``trainer.options``) are ``defaults``. ``Invalid`` for combinations that contradict."""
    if "steps" in options and "epochs" in options:
        raise Invalid("epochs", "steps and epochs both fix the number of steps a job takes: send one of them")
    bs = options.get("batch_size", defaults.batch_size)
    fixed = None
    if "steps" in options:
        fixed = options["steps"]
    elif "epochs" in options:
        fixed = options["epochs"] * math.ceil(examples / bs)
        if fixed > MAX_STEPS:  # as many as steps may give: 1000 epochs of 10,000 rows one a step were 10 million
            raise Invalid(
                "epochs",
                f"epochs {options['epochs']} × ⌈{examples} rows / batch size {bs}⌉ = {fixed:,} steps, over the "
                f"{MAX_STEPS:,} a job may take: fewer epochs or a larger batch_size",
            )
    if fixed is not None and "max_steps" in options:
        raise Invalid(
            "max_steps",
            "max_steps is the budget of a job that trains until its examples are learned; "
            "with steps or epochs the job takes exactly that many steps (leave one of them out)",
        )
    if fixed is None:
        until = options.get("until_loss", defaults.until_loss)
    else:
        until = options.get("until_loss")  # a fixed job stops early only when asked to
    guard = options.get("guard", not defaults.no_guard)
    return Plan(
        batch_size=bs,
        lr=options.get("lr", defaults.lr),
        warmup=options.get("warmup", defaults.warmup),
        steps=fixed,
        max_steps=options.get("max_steps", defaults.max_steps),
        until_loss=until,
        replay=options.get("replay", defaults.replay if guard else 0),
        anchor=float(options.get("anchor", defaults.anchor)),
        reword=options.get("reword", defaults.reword),
        guard=guard,
        replay_select=options.get("replay_select", defaults.replay_select),
        restate=options.get("restate", defaults.restate),
        train=options.get("train", defaults.train),
    )


class Losses:
    """Each example's mean loss over its trained tokens, from the forward of the steps that trained it:
    the first value (``before``: measured before that step's update, so before any update for the examples
    of the first batch) and the latest (``after``: measured before the latest update of that example).

    ``aside``: indices of examples trained but neither waited for nor summarized (a job's restated answers,
    trainer.augment.restated: plain text whose first tokens no context predicts, so its loss need not fall
    below a job's ``until_loss``)."""

    def __init__(self, n: int, aside=()):
        self.first: list[float | None] = [None] * n
        self.last: list[float | None] = [None] * n
        aside = set(aside)
        self.counted = [i for i in range(n) if i not in aside]

    def record(self, indices: list[int], losses: list[float]) -> None:
        for i, v in zip(indices, losses):
            if self.first[i] is None:
                self.first[i] = v
            self.last[i] = v

    def seen_all(self) -> bool:
        return all(self.last[i] is not None for i in self.counted)

    def below(self, target: float) -> int:
        """How many examples' latest loss is below ``target``."""
        return sum(1 for i in self.counted if self.last[i] is not None and self.last[i] < target)

    def learned(self, target: float | None) -> bool:
        """Whether every example has been trained and its latest loss is below ``target``."""
        return target is not None and self.seen_all() and self.below(target) == len(self.counted)

    def summary(self, target: float | None) -> dict:
        """``{"before", "after", "max_after", "below"}``: the mean of the first and of the latest losses,
        the largest latest one, and how many examples are below ``target`` (None without one)."""

        def mean(xs):
            xs = [x for x in xs if x is not None]
            return sum(xs) / len(xs) if xs else None

        first, last = [self.first[i] for i in self.counted], [self.last[i] for i in self.counted]
        seen = [x for x in last if x is not None]
        return {
            "before": _round(mean(first)),
            "after": _round(mean(last)),
            "max_after": _round(max(seen)) if seen else None,
            "below": None if target is None else self.below(target),
            "counted": len(self.counted),
        }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 5)


def batches(n: int, batch_size: int):
    """The examples' indices, batch after batch, cycling in order: every example once per
    ⌈n / batch_size⌉ steps (a batch wraps around to the start)."""
    size, i = min(batch_size, n), 0
    while True:
        yield [(i + k) % n for k in range(size)]
        i = (i + size) % n


class Replayed:
    """Which replayed retention rows join each step (a job's ``replay_select``).

    ``cycle``: the next ``k`` rows in order, cycling. ``similar``: half of them (rounded up) are the rows
    whose prompts share the most with the prompts of the step's examples, the rest the next ones in the
    cycle. The forgetting that a job causes is mostly interference on prompts of the same form as its
    own (a made-up "the capital of Velmora" turning "the capital of France" wrong: docs/learning.md), so
    the rows that hold what the model does on such prompts are the ones to keep it there while the job
    trains them; the cycled half keeps the rest covered. Prompts are compared by their tokens weighted by
    inverse document frequency over the replayed prompts (log(rows / rows holding the token)): the chat
    template's tokens, in every prompt, weigh nothing, a word few prompts hold ("capital") most. Among
    rows of equal weight, the one picked longest ago. Token ids in, row indices out.
    """

    def __init__(self, prompts: list[list[int]], how: str = "cycle"):
        if how not in REPLAY_SELECT:
            raise ValueError(f"replay_select must be cycle or similar, not {how!r}")
        self.how, self.n = how, len(prompts)
        self.tokens = [set(p) for p in prompts]
        df = collections.Counter(t for s in self.tokens for t in s)
        self.idf = {t: math.log(self.n / c) for t, c in df.items()}
        self.next = 0  # the cycle's position
        self.last = [-1] * self.n  # the step each row was last picked at
        self.steps = 0

    def weights(self, prompts: list[list[int]]) -> list[float]:
        """Each row's similarity to ``prompts``: the summed weights of the tokens it shares with them."""
        query = set().union(*map(set, prompts)) if prompts else set()
        return [sum(self.idf[t] for t in s & query) for s in self.tokens]

    def pick(self, k: int, prompts: list[list[int]]) -> list[int]:
        """The ``k`` rows of the step whose examples' prompts are ``prompts`` (repeating rows only when
        ``k`` exceeds them)."""
        chosen: list[int] = []
        if self.how == "similar" and self.n:
            # Greedy cover: each pick the row whose tokens weigh most among those of the step's prompts that
            # no row picked before holds, so that a step of several forms ("the capital of", "who invented")
            # gets a row of each rather than all of the likeliest one.
            query = set().union(*map(set, prompts)) if prompts else set()
            while len(chosen) < min((k + 1) // 2, self.n):
                w = [sum(self.idf[t] for t in s & query) for s in self.tokens]
                best = min((i for i in range(self.n) if i not in chosen), key=lambda i: (-w[i], self.last[i], i))
                chosen.append(best)
                query -= self.tokens[best]
        while len(chosen) < k and self.n:
            i, self.next = self.next, (self.next + 1) % self.n
            if i not in chosen or len(set(chosen)) == self.n:
                chosen.append(i)
        for i in chosen:
            self.last[i] = self.steps
        self.steps += 1
        return chosen
