"""The forgetting guard: what the served model already does, kept while a job teaches it something new.

The retention set is a list of chat prompts (the built-in general ones in ``retention.json``, plus the
user's own: ``--retention FILE`` or ``PUT /train/retention``; rendered by ``examples.prompt_ids``: the chat
template's, with thinking off where it has the switch, or plain text for a model without one) with the model's
own greedy answers, made by
the trainer on the live weights once per weight version: between jobs, or at the start of a guarded job
that finds them not made (trainer.service ``Trainer._prepare``). The prompts alternate between two halves:

- the *replay* half (even positions) is trained on during the job, so that training keeps what the model
  does there: either as ordinary examples (prompt + the model's own answer, one-hot cross-entropy), or,
  with an ``anchor`` weight, by a KL divergence to the starting model's next-token distributions
  (``Reference``: its top-``TOP_K`` log-probs at each answer token, stored once per weight version: between jobs or at the job's start);
- the *held-out* half (odd positions) is never trained on. After the job two measures say whether the
  model still does what it did there: the **KL divergence** (nats per answer token) from the starting
  model's next-token distributions to the new ones (one forward pass), and the share of **answers kept**
  (each prompt's greedy answer, made before and after the job: the same first ``KEPT_TOKENS`` tokens). A job that moves either
  past its threshold is rolled back (trainer.service).

No second copy of the weights is kept: the answers are token ids and the reference is TOP_K (id,
log-prob) pairs per answer token (kilobytes). docs/learning.md has the definitions and the
measurements behind the defaults.
"""

from __future__ import annotations

import functools
import json
import math
import os

import torch

from livetrain.loss import output_projection
from livetrain.trainer import admission
from livetrain.trainer.examples import check_messages, own_rendering, prompt_ids, text_of
from livetrain.trainer.protocol import Invalid

BUILTIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "retention.json")
# Tokens of each retention answer: enough to hold what a model does with a prompt, short enough that
# making the answers costs a few seconds (docs/learning.md).
ANSWER_TOKENS = 40
# Next-token log-probs of the starting model kept per answer token (``Reference``): the mass a small
# model's next-token distribution spreads beyond its 32 likeliest tokens is mostly well under 5%, and the
# rest is kept as one bucket, so the KL measured is a lower bound of the full one that moves with it.
TOP_K = 32
BATCH = 8  # rows per forward of the reference's measures, at most
# An answer counts as kept when its first KEPT_TOKENS tokens are the same as before the job: where a short
# factual answer says what it says ("The capital of Spain is Madrid."), without counting changes of
# wording late in a long answer.
KEPT_TOKENS = 16
# Rows of one batch of ``greedy`` at most, by device: 64 on a GPU, as bench/learning_sweep.py makes the 393
# retention answers (15 s on the H200, where the server's batches of 16 took 54 s for the guard's measures
# between jobs); 16 on a CPU, the sweep's there. Within the memory a step may take (``greedy``'s ``memory``).
GREEDY_ROWS = {"cuda": 64, "cpu": 16}
# Most retention prompts a user may give (PUT /train/retention, --retention FILE), besides the built-in ones
# (retention.json), which are a fixed number: a user's limit that does not move with --builtin-retention.
MAX_PROMPTS = 1000
TOO_MANY = f"at most {MAX_PROMPTS} (the built-in retention prompts are not counted)"


class Interrupted(Exception):
    """A measure made between jobs given up because a job or a request arrived (``interrupt``): the job's
    start makes it again when it needs it."""


def _check(interrupt) -> None:
    if interrupt is not None and interrupt():
        raise Interrupted()


def check_prompt(item, where: str, tokenizer=None, max_len: int | None = None) -> list[dict]:
    """One retention prompt, a string (one user message) or ``{"messages": [...]}`` ending with a user
    message (checked as an example's: no null content), as a message list; ``Invalid`` naming ``where``
    (``prompts[2].messages``). Its question, the last message, has text, in either form. With ``tokenizer``,
    it leaves room for an answer within ``max_len`` tokens (``check_room``)."""
    if isinstance(item, str):
        if not item.strip():
            raise Invalid(where, f"{where} is an empty prompt")
        messages = [{"role": "user", "content": item}]
    else:
        if not isinstance(item, dict) or set(item) != {"messages"}:
            raise Invalid(where, f"{where} must be a string or an object with messages (and nothing else)")
        messages = check_messages(item["messages"], where, null_content=False)
        last = len(messages) - 1
        if messages[last]["role"] != "user":
            raise Invalid(f"{where}.messages", f"{where}.messages must end with a user message")
        if not text_of(messages[last]["content"]).strip():
            field = f"{where}.messages[{last}].content"
            raise Invalid(field, f"{field} is empty: a retention prompt ends with a question")
    if tokenizer is not None:
        check_room(tokenizer, messages, max_len, where)
    return messages


def check_room(tokenizer, messages: list[dict], max_len: int, where: str) -> None:
    """``Invalid`` naming ``where`` when the prompt, rendered as its answers are made (``prompt_ids``), leaves
    no room for an answer within ``max_len`` tokens: the trainer's limit of a sequence, /train's for its
    examples. Such a prompt was taken, and every guarded job then failed generating its answer (a prompt of
    200,000 tokens: its attention's memory grows with the square of its length), or it left the set silently."""
    n = len(prompt_ids(tokenizer, messages))
    if n >= max_len:
        raise Invalid(
            where,
            f"{where} is {n} tokens as the trainer renders it: no room for an answer within the trainer's limit "
            f"of {max_len} tokens a sequence (--max-seq-len, else the model's context), as for /train's examples",
        )


def check_prompts(items, field: str = "prompts", tokenizer=None, max_len: int | None = None) -> list[list[dict]]:
    """A list of retention prompts (``check_prompt``)."""
    if not isinstance(items, list):
        raise Invalid(field, f"{field} must be a list of strings or {{messages}} objects")
    if len(items) > MAX_PROMPTS:
        raise Invalid(field, f"{field} has {len(items)} prompts; {TOO_MANY}")
    return [check_prompt(item, f"{field}[{i}]", tokenizer, max_len) for i, item in enumerate(items)]


@functools.cache
def _builtin() -> dict[str, list[list[dict]]]:
    """retention.json's two lists, read and checked once per process."""
    with open(BUILTIN) as f:
        data = json.load(f)
    return {key: check_prompts(data[key], key) for key in ("prompts", "replay")}


def builtin_prompts() -> list[list[dict]]:
    """The built-in prompts that alternate between the replayed and the held-out half."""
    return list(_builtin()["prompts"])


def builtin_replay() -> list[list[dict]]:
    """The built-in prompts that are replayed only: many question forms, several of each, for
    ``replay_select`` "similar" to find rows of a job's own forms (the held-out half stays as it is)."""
    return list(_builtin()["replay"])


def read_prompts(path: str, tokenizer=None, max_len: int | None = None) -> list[list[dict]]:
    """``--retention FILE``: JSON lines, each a prompt as ``check_prompt`` takes it (``tokenizer``,
    ``max_len``: as it takes them). ValueError naming the file and line."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(check_prompt(json.loads(line), f"{path}:{n}", tokenizer, max_len))
            except ValueError as e:  # not JSON, or Invalid (a ValueError) naming the line
                raise ValueError(str(e) if isinstance(e, Invalid) else f"{path}:{n}: not JSON: {e}") from None
    if len(out) > MAX_PROMPTS:
        raise ValueError(f"{path}: {len(out)} prompts; {TOO_MANY}")
    return out


def stop_ids(tokenizer, model) -> list[int]:
    """The token ids that end an answer: the tokenizer's EOS and the model's generation config's."""
    ids = set()
    for x in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        ids.update(x if isinstance(x, list) else [] if x is None else [x])
    return sorted(ids)


@torch.no_grad()
def greedy(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop: list[int],
    pad: int,
    batch: int = 16,
    interrupt=None,
    memory: float | None = None,
):
    """Each prompt's greedy continuation (token ids, ending with the stop token when one was made) by
    ``model`` (transformers ``generate``, left-padded batches of at most ``batch`` rows whose cache stays
    within ``memory`` bytes: admission.generation_batches; None: rows alone), in eval mode; the model's mode
    is restored afterwards. ``interrupt``: a function asked before each batch and after each new token;
    ``Interrupted`` when it says true."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Asked(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), bool(interrupt()), dtype=torch.bool, device=input_ids.device)

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[list[int]] = []
    per_token, per_row = admission.cache_bytes(model.config, next(model.parameters()).element_size())
    lengths = [len(p) for p in prompts]
    try:
        results: dict[int, list[int]] = {}
        for idx in admission.generation_batches(
            lengths, max_new_tokens, batch, math.inf if memory is None else memory, per_token, per_row
        ):
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            attn = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                attn[r, width - len(prompts[i]) :] = 1
            _check(interrupt)
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=attn.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stop or None,
                pad_token_id=pad,
                **({"stopping_criteria": StoppingCriteriaList([Asked()])} if interrupt is not None else {}),
            )
            _check(interrupt)  # stopped early by it: the batch's answers are cut
            for r, i in enumerate(idx):
                toks = gen[r, width:].tolist()
                cut = next((k + 1 for k, t in enumerate(toks) if t in stop), len(toks))
                results[i] = toks[:cut]
        out = [results[i] for i in range(len(prompts))]
    finally:
        model.train(was_training)
    return out


def answer_positions(examples, width: int, device) -> torch.Tensor:
    """[len(examples), width - 1] bool: the positions of right-padded rows of ``width`` tokens whose
    next-token prediction is an answer token of (ids, mask, weight) ``examples`` (mask shifted by one)."""
    sel = torch.zeros((len(examples), width - 1), dtype=torch.bool)
    for i, (t, m, _) in enumerate(examples):
        sel[i, : len(t) - 1] = torch.tensor(m[1:], dtype=torch.bool)
    return sel.to(device)


def _answer_batch(examples, pad: int, device):
    """Right-padded ``ids``/``attn`` of (ids, mask, weight) examples, and their ``answer_positions``."""
    width = max(len(t) for t, _, _ in examples)
    ids = torch.full((len(examples), width), pad, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (t, _, _) in enumerate(examples):
        ids[i, : len(t)] = torch.tensor(t)
        attn[i, : len(t)] = 1
    return ids.to(device), attn.to(device), answer_positions(examples, width, device)


def answer_logits(model, examples, pad: int, detach_head: bool = False) -> torch.Tensor:
    """fp32 logits [answer tokens of all ``examples``, vocabulary] that predict each answer token, in the
    examples' order; only those rows of the vocabulary-sized product are made. ``detach_head``: no
    gradient reaches the output projection through them (the trainer defers that projection's gradient,
    livetrain.loss.OutputGradient, and steps it once per step)."""
    device = next(model.parameters()).device
    ids, attn, sel = _answer_batch(examples, pad, device)
    head = output_projection(model)
    if head is None:
        return model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1][sel].float()
    hidden = model.model(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
    return hidden_logits(hidden, sel, head, detach_head)


def hidden_logits(hidden: torch.Tensor, sel: torch.Tensor, head: torch.Tensor, detach_head: bool) -> torch.Tensor:
    """``answer_logits`` from final hidden states [rows, width, hidden] already made, and their
    ``answer_positions`` [rows, width - 1]: only the answer positions' rows of the product with ``head``."""
    return (hidden[:, :-1][sel] @ (head.detach() if detach_head else head).t()).float()


def topk_kl(logits: torch.Tensor, ref_ids: torch.Tensor, ref_lp: torch.Tensor) -> torch.Tensor:
    """Per row, KL(reference || now) over the reference's top-k tokens plus one bucket for the rest of the
    vocabulary: a true KL divergence of the two distributions so coarsened (>= 0, <= the full one).
    ``logits`` [n, vocab]; ``ref_ids``/``ref_lp`` [n, k]: the reference's token ids and log-probs."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    now = lp.gather(1, ref_ids.long())
    p_ref = ref_lp.exp()
    rest_ref = (1 - p_ref.sum(1)).clamp_min(1e-12)
    rest_now = (1 - now.exp().sum(1)).clamp_min(1e-12)
    return (p_ref * (ref_lp - now)).sum(1) + rest_ref * (rest_ref.log() - rest_now.log())


class Reference:
    """The starting model's top-``k`` next-token log-probs at every answer token of some retention
    examples (made once per weight version of the starting model: between jobs or at a job's start), and the KL divergence of the live model from them:
    measured (``kl``, the guard) or as a loss term with its gradient (``anchor``, training)."""

    def __init__(
        self,
        model,
        examples: list,
        pad: int,
        k: int = TOP_K,
        batch: int = BATCH,
        max_tokens: int | None = None,
        interrupt=None,
    ):
        self.examples, self.pad = list(examples), pad
        # Forwards of at most ``batch`` rows and ``max_tokens`` padded tokens (the trainer's step budget; a
        # longer row goes alone), here and in ``kl``.
        lengths = [len(ids) for ids, _, _ in self.examples]
        self.chunks = admission.chunks(lengths, batch, max_tokens or max(lengths, default=0) * batch)
        self.ids: list[torch.Tensor] = []  # per example, [answer tokens, k] int32
        self.lps: list[torch.Tensor] = []  # per example, [answer tokens, k] fp32
        with torch.no_grad(), _eval(model):
            for b, e in self.chunks:
                _check(interrupt)  # ``Interrupted`` between two forwards when it says true
                chunk = self.examples[b:e]
                logits = answer_logits(model, chunk, pad)
                lp, ids = torch.log_softmax(logits, dim=-1).topk(min(k, logits.shape[1]), dim=-1)
                counts = [sum(m[1:]) for _, m, _ in chunk]
                self.ids += list(ids.to(torch.int32).split(counts))
                self.lps += list(lp.split(counts))

    def __len__(self) -> int:
        return len(self.examples)

    def _kl(self, model, indices: list[int], detach_head: bool = False) -> torch.Tensor:
        logits = answer_logits(model, self.rows(indices), self.pad, detach_head)
        return topk_kl(logits, *self._reference(indices))

    def _reference(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored top-k token ids and log-probs of examples ``indices``' answer tokens, in order."""
        return torch.cat([self.ids[i] for i in indices]), torch.cat([self.lps[i] for i in indices])

    def anchor(self, model, indices: list[int], detach_head: bool = False) -> torch.Tensor:
        """The mean per answer token of the KL divergence over examples ``indices``, with its gradient, from
        a forward of their own (``anchor_hidden`` takes a forward shared with the job's rows)."""
        return self._kl(model, indices, detach_head).mean()

    def rows(self, indices: list[int]) -> list:
        """Examples ``indices`` as (ids, mask, weight) rows, to join a forward shared with other rows."""
        return [self.examples[i] for i in indices]

    def anchor_hidden(self, hidden: torch.Tensor, indices: list[int], head: torch.Tensor, detach_head: bool = False):
        """``anchor`` from the final hidden states of ``rows(indices)`` ([rows, width, hidden], right-padded,
        made by a forward that also held the job's rows) and the output projection ``head``: the same value
        and gradient, without a forward of their own."""
        sel = answer_positions(self.rows(indices), hidden.shape[1], hidden.device)
        return topk_kl(hidden_logits(hidden, sel, head, detach_head), *self._reference(indices)).mean()

    @torch.no_grad()
    def kl(self, model) -> float:
        """The mean per answer token of the KL divergence over every example (eval mode, no gradient)."""
        return self.kl_spread(model)[0]

    @torch.no_grad()
    def kl_spread(self, model) -> tuple[float, float]:
        """``kl`` and its standard error as a sample of prompts: the examples' answers are clusters of
        tokens, so the error of the per-token mean m = sum(s_i) / sum(n_i) (s_i, n_i: example i's KL sum
        and tokens) is that of a ratio estimator, sqrt(k / (k - 1) * sum((s_i - m n_i)^2)) / sum(n_i) over
        the k examples (nan for fewer than two)."""
        sums, counts = [], []
        with _eval(model):
            for b, e in self.chunks:
                per_token = self._kl(model, list(range(b, e))).double()
                n = [len(self.ids[i]) for i in range(b, e)]
                sums += [float(x.sum()) for x in per_token.split(n)]
                counts += n
        total, k = sum(counts), len(counts)
        if not total:
            return math.nan, math.nan
        m = sum(sums) / total
        if k < 2:
            return m, math.nan
        return m, math.sqrt(k / (k - 1) * sum((s - m * n) ** 2 for s, n in zip(sums, counts))) / total


class _eval:
    """The model in eval mode inside the block; its mode restored after."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was)


def kept(before: list[list[int]], after: list[list[int]], tokens: int = KEPT_TOKENS) -> list[bool]:
    """Per answer, whether its first ``tokens`` tokens are the same before and after."""
    return [a[:tokens] == b[:tokens] for a, b in zip(before, after)]


class Retention:
    """The retention set and the model's answers to it (see the module's docstring). ``version``: the
    weight version the answers were made at (None: not made yet, or the prompts changed since).

    ``prompts`` is the built-in alternating prompts, the built-in replay-only ones, then the user's. The
    built-in alternating prompts and the user's, in that order, alternate between the replayed half (even
    positions) and the held-out half (odd); the built-in replay-only prompts are all replayed."""

    def __init__(
        self, tokenizer, user: list[list[dict]] | None = None, builtin: bool = True, with_replay_only: bool = True
    ):
        self.tokenizer = tokenizer
        self.with_replay_only = with_replay_only  # the built-in replay-only prompts too (--builtin-retention)
        self._use_builtin(builtin)
        self.user = list(user or [])
        self.version: int | None = None
        self.answers: list[list[int]] = []
        self.seconds = 0.0  # how long the last answers took to make

    @property
    def prompts(self) -> list[list[dict]]:
        return self.builtin + self.builtin_replay + self.user

    def uses(self) -> list[str]:
        """Per prompt of ``prompts``, "replay" or "held_out"."""
        alternating = ["replay" if i % 2 == 0 else "held_out" for i in range(len(self.builtin) + len(self.user))]
        return (
            alternating[: len(self.builtin)] + ["replay"] * len(self.builtin_replay) + alternating[len(self.builtin) :]
        )

    def held_out_prompts(self) -> list[list[dict]]:
        """The held-out half's prompts, in order."""
        return [p for p, u in zip(self.prompts, self.uses()) if u == "held_out"]

    def set_user(self, prompts: list[list[dict]], builtin: bool = True) -> None:
        """Replaces the user's prompts (and keeps or drops the built-in ones); the answers are made again
        at the next guarded job. At least two prompts in all (the caller checks)."""
        self.user = list(prompts)
        self._use_builtin(builtin)
        self.version, self.answers = None, []

    def _use_builtin(self, builtin: bool) -> None:
        self.builtin = builtin_prompts() if builtin else []
        self.builtin_replay = builtin_replay() if builtin and self.with_replay_only else []

    def refresh(
        self, model, version: int, pad: int, batch: int = 16, interrupt=None, memory: float | None = None
    ) -> bool:
        """Makes the answers on ``model`` unless they were made at ``version``; True when it made them.
        ``batch``, ``memory``, ``interrupt``: as ``greedy`` takes them (nothing kept when it interrupts)."""
        import time

        if self.version == version and len(self.answers) == len(self.prompts):
            return False
        t0 = time.perf_counter()
        ids = [prompt_ids(self.tokenizer, p) for p in self.prompts]
        answers = greedy(model, ids, ANSWER_TOKENS, stop_ids(self.tokenizer, model), pad, batch, interrupt, memory)
        self.answers = answers
        self.version, self.seconds = version, time.perf_counter() - t0
        return True

    def _examples(self, use: str) -> list[tuple[list[int], list[bool], float]]:
        out = []
        for p, a, u in zip(self.prompts, self.answers, self.uses()):
            if u != use:
                continue
            p = prompt_ids(self.tokenizer, p)
            if len(a) >= 1:  # an empty answer (the model stopped at once) teaches and measures its stop token
                out.append((p + a, [False] * len(p) + [True] * len(a), 1.0))
        return out

    def replay(self) -> list[tuple[list[int], list[bool], float]]:
        """The replay half as training examples: (prompt + the model's answer, loss on the answer, 1)."""
        return self._examples("replay")

    def held_out(self) -> list[tuple[list[int], list[bool], float]]:
        """The held-out half, as the same kind of examples, for the guard's measures (KL to the starting model, answers kept)."""
        return self._examples("held_out")

    def describe(self) -> dict:
        """What GET /train/retention shows: each prompt, where it comes from, its half, and the answer."""
        items = []
        builtin = len(self.builtin) + len(self.builtin_replay)
        for i, (p, use) in enumerate(zip(self.prompts, self.uses())):
            answer = self.tokenizer.decode(self.answers[i], skip_special_tokens=True) if self.answers else None
            items.append({"messages": p, "source": "builtin" if i < builtin else "user", "use": use, "answer": answer})
        return {
            "builtin": builtin,
            "user": len(self.user),
            "answers_version": self.version,
            "answers_seconds": round(self.seconds, 3),
            "rendering": own_rendering(self.tokenizer),
            "prompts": items,
        }
