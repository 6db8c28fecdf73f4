"""What a /train job says, checked and tokenized: chat ``messages`` or ``prompt``/``completion`` examples
become token ids with the mask of the tokens that carry loss, tokenized exactly as the engine tokenizes a
request: one sequence each, or one per assistant turn of a conversation its template renders otherwise once
a later turn follows (Qwen3's, Qwen3.5's: ``encode_example``), each turn trained as it was served. The chat
messages check and a chat prompt's token ids (``prompt_ids``: the chat template's, or a plain-text rendering
for a tokenizer without one, a base model's) live here once; the reference engine uses
them for its chat route too, the forgetting guard and rewording for their prompts. The template is the
tokenizer's, or the one given with ``--chat-template``, rendered with ``--default-chat-template-kwargs`` and
``--chat-template-content-format`` (``use_chat``), as vLLM renders a chat request with the same options.
Every error is a ``protocol.Invalid`` naming the field (``examples[3].messages[1].role``).
"""

from __future__ import annotations

import json
import math
import re

import jinja2

from livetrain.trainer.options import RANGES, REPLAY_SELECT, TRAIN, Chat
from livetrain.trainer.protocol import Invalid
from livetrain.trainer.routes import JOB_IDS_TAKEN

ROLES = ("system", "user", "assistant")
# The fields of one example: chat ``messages``, or ``prompt`` and ``completion``; ``weight`` with either.
EXAMPLE_FIELDS = ("messages", "prompt", "completion", "weight")
# What to send instead of chat examples to a model whose tokenizer has no chat template.
PLAIN_EXAMPLES = 'send prompt/completion examples (an empty "prompt" trains plain text)'
# A job's options: name → (JSON types, check, what a valid value is). docs/serve.md and docs/learning.md.
JOB_OPTIONS = {
    "lr": ((int, float), *RANGES["lr"]),
    "steps": (int, *RANGES["max_steps"]),  # the same bound as max_steps
    "epochs": (int, lambda v: 1 <= v <= 1000, "an integer from 1 to 1000"),
    "batch_size": (int, *RANGES["batch_size"]),
    "until_loss": ((int, float), *RANGES["until_loss"]),
    "max_steps": (int, *RANGES["max_steps"]),
    "warmup": (int, *RANGES["warmup"]),
    "replay": (int, *RANGES["replay"]),
    "anchor": ((int, float), *RANGES["anchor"]),
    "reword": (bool, lambda v: True, "true or false"),
    "restate": (bool, lambda v: True, "true or false"),
    "replay_select": (str, lambda v: v in REPLAY_SELECT, " or ".join(f'"{v}"' for v in REPLAY_SELECT)),
    "train": (str, lambda v: v in TRAIN, " or ".join(f'"{v}"' for v in TRAIN)),
    "guard": (bool, lambda v: True, "true or false"),
}
# A job id a client chooses (``"id"``): retries with the same id get the same job.
JOB_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def job_id(job: dict) -> str | None:
    """The client's job id of a /train body (``"id"``), checked; None when it has none."""
    v = job.get("id")
    if v is None:
        return None
    if not isinstance(v, str) or not JOB_ID.fullmatch(v):
        raise Invalid("id", "id must be 1 to 64 characters of A-Z a-z 0-9 . _ : -")
    if v in JOB_IDS_TAKEN:
        taken = ", ".join(repr(x) for x in sorted(JOB_IDS_TAKEN))
        raise Invalid("id", f"id {v!r} cannot be a job's: /train/{v} does not reach a job (taken: {taken})")
    return v


# The content parts vLLM (0.26, entrypoints/chat_utils.py ``_parse_chat_message_content_part``) takes as text,
# each with the field that holds its text; besides these, a plain string in the list is a text part. A part of
# type "text" or "refusal" without its text (missing or null) is skipped, as vLLM skips it. Every other part
# (images, audio, video, embeddings) is for a multimodal model: refused, the model is served text-only.
TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal", "thinking": "thinking"}
SKIPPED_WITHOUT_TEXT = ("text", "refusal")


def _content(content, field: str) -> str | list[dict]:
    """A message's content as vLLM takes it for a text-only model: a string, or a list of text parts (each
    kept as ``{"type": "text", "text": ...}``: ``TEXT_PARTS``, a string in the list), ``null`` or missing as
    an empty list (vLLM's empty content). How it reaches the template depends on the content format
    (``chat_text``)."""
    if isinstance(content, str):
        return content
    if content is None:
        return []
    if not isinstance(content, list):
        raise Invalid(field, f"{field} must be a string, a list of text parts or null")
    parts = []
    for k, part in enumerate(content):
        where = f"{field}[{k}]"
        if isinstance(part, str):
            parts.append({"type": "text", "text": part})
            continue
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS:
            named = f'of type "{kind}" ' if isinstance(kind, str) else ""
            raise Invalid(
                where,
                f"{where}: a part {named}is not text; the model is served text-only: a part is a string or has "
                f"type {', '.join(TEXT_PARTS)}",
            )
        text = part.get(TEXT_PARTS[kind])
        if text is None and kind in SKIPPED_WITHOUT_TEXT:
            continue
        if not isinstance(text, str):
            raise Invalid(where, f'{where}.{TEXT_PARTS[kind]} must be a string (a part of type "{kind}")')
        parts.append({"type": "text", "text": text})
    return parts


def text_of(content: str | list[dict]) -> str:
    """A checked content as one string: a list of text parts joined with newlines, as vLLM joins them for a
    template of the "string" content format (vLLM 0.26 ``_parse_chat_message_content_parts``)."""
    return content if isinstance(content, str) else "\n".join(p["text"] for p in content)


def _reasoning(m: dict, field: str) -> str | None:
    """An assistant message's reasoning: vLLM's ``reasoning``, else OpenAI's older ``reasoning_content``
    (vLLM 0.26 renames the second to the first when the first is absent); None without either."""
    for name in ("reasoning", "reasoning_content"):
        v = m.get(name)
        if v is not None:
            if not isinstance(v, str):
                raise Invalid(f"{field}.{name}", f"{field}.{name} must be a string")
            return v
    return None


def check_messages(messages, where: str = "", null_content: bool = True) -> list[dict]:
    """``messages`` as ``[{"role", "content"}]`` (``_content``: a string or a list of text parts; other keys
    dropped), an assistant message's reasoning (``_reasoning``) kept under both ``reasoning`` and
    ``reasoning_content``, as vLLM gives it to the template (Qwen's templates read the second); ``where``
    prefixes the field names. ``null_content``: a chat request's rule (vLLM takes a null or missing content
    as an empty one); False for the messages the trainer keeps (a /train example, a retention prompt): OpenAI's
    rule, a null (or missing) content only for an assistant message (with tool calls, which these cannot
    carry), so that a client that lost a text is told, not trained or measured on an empty one."""
    field = f"{where}.messages" if where else "messages"
    if not isinstance(messages, list) or not messages:
        raise Invalid(field, f"{field} must be a non-empty list of {{role, content}}")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise Invalid(f"{field}[{j}]", f"{field}[{j}] must be an object {{role, content}}")
        if m.get("role") not in ROLES:
            raise Invalid(f"{field}[{j}].role", f"{field}[{j}].role must be one of {', '.join(ROLES)}")
        if not null_content and m["role"] != "assistant" and m.get("content") is None:
            raise Invalid(
                f"{field}[{j}].content",
                f"{field}[{j}].content is null or missing: a {m['role']} message needs a content (a string, or a "
                'list of text parts; "" or [] for an empty one)',
            )
        checked = {"role": m["role"], "content": _content(m.get("content"), f"{field}[{j}].content")}
        if m["role"] == "assistant":
            reasoning = _reasoning(m, f"{field}[{j}]")
            if reasoning is not None:
                checked["reasoning"] = checked["reasoning_content"] = reasoning
        out.append(checked)
    return out


def use_chat(tokenizer, chat: Chat) -> None:
    """Makes ``chat`` (the chat-template options, ``options.chat``) how every rendering here renders with
    ``tokenizer`` (chat examples, the guard's and rewording's prompts, the reference engine's chat route): its
    template in place of the one in the model's tokenizer files, if any (a base model served with a template,
    or a template other than the files'), its variables and its content format, as vLLM renders a chat request
    with the same options (the plugin passes vLLM's on)."""
    if chat.template is not None:
        tokenizer.chat_template = chat.template
    tokenizer.livetrain_chat = chat


def has_chat_template(tokenizer) -> bool:
    """Whether ``tokenizer`` has a chat template (a base model's tokenizer most often has none)."""
    return bool(getattr(tokenizer, "chat_template", None))


def chat_text(
    tokenizer,
    messages: list[dict],
    field: str,
    generation_prompt: bool = True,
    instead: str = PLAIN_EXAMPLES,
    kwargs: dict | None = None,
) -> str:
    """``messages`` rendered by the tokenizer's chat template (with the generation prompt when asked) as
    ``use_chat`` set it up, ``kwargs`` (a chat request's own ``chat_template_kwargs``) over its variables;
    ``Invalid`` naming ``field`` when the tokenizer has none (chat examples and chat requests need it),
    saying what to send ``instead``."""
    if not has_chat_template(tokenizer):
        raise Invalid(field, f"{field}: the served model's tokenizer has no chat template: {instead}")
    chat = getattr(tokenizer, "livetrain_chat", None) or Chat()
    if chat.content_format == "openai":  # as vLLM passes contents then: a list of text parts (a string as one)
        messages = [
            {
                **m,
                "content": [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"],
            }
            for m in messages
        ]
    else:  # "string" (and "auto", which vLLM resolves from the template: the plugin passes what it found)
        messages = [{**m, "content": text_of(m["content"])} for m in messages]
    variables = {**chat.kwargs, **(kwargs or {})}
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, **variables
        )
    except jinja2.TemplateError as e:  # the template's raise_exception (roles out of order, ...) or its mistake
        raise Invalid(field, f"{field}: the chat template cannot render them ({e})") from None


# The template variable that turns a thinking model's reasoning off, as Qwen3's and Qwen3.5's templates (and vLLM's
# chat_template_kwargs for them) name it; Qwen3.5's generation prompt is then "<think>\n\n</think>\n\n", else
# "<think>\n". A switch of another name (DeepSeek-V3.1's `thinking`) is not tried: such a template renders as served.
THINKING_OFF = {"enable_thinking": False}
# What ``own_kwargs`` renders to find whether the template has that switch: any template renders a user question.
_PROBE = [{"role": "user", "content": "?"}]


def own_kwargs(tokenizer) -> dict:
    """The template variables, over the served ones, that the trainer's own generations render their prompts
    with (``prompt_ids``: the guard's retention answers, rewording), and that a chat example's answer without
    reasoning is trained after (``_sequences_chat``): ``THINKING_OFF`` when the template's
    generation prompt renders otherwise with it than as served (a thinking model served thinking, as
    Qwen3.5-27B's template does by default), else none. Served thinking, every greedy answer begins with
    reasoning: the guard's first tokens would be the same think tokens before and after a job, replay would
    train on fragments of reasoning, and a rewording would be reasoning rather than a question. Found by
    rendering, never by the model's name; kept per ``use_chat``."""
    if not has_chat_template(tokenizer):
        return {}
    chat = getattr(tokenizer, "livetrain_chat", None)
    found = getattr(tokenizer, "livetrain_own", None)
    if found is not None and found[0] is chat:
        return found[1]
    try:
        switch = chat_text(tokenizer, _PROBE, "messages") != chat_text(
            tokenizer, _PROBE, "messages", kwargs=THINKING_OFF
        )
    except Invalid:  # a template that cannot render the probe, or not with the variable: rendered as served
        switch = False
    kwargs = dict(THINKING_OFF) if switch else {}
    tokenizer.livetrain_own = (chat, kwargs)
    return kwargs


def own_rendering(tokenizer) -> dict:
    """How the trainer's own generations render their prompts (``own_kwargs``), as /train/status and GET
    /train/retention say it: the template variables over the served ones, and why."""
    if not has_chat_template(tokenizer):
        return {"chat_template_kwargs": {}, "why": "plain text: the served model's tokenizer has no chat template"}
    kwargs = own_kwargs(tokenizer)
    why = (
        "thinking off: the chat template renders a thinking generation prompt as served, where every greedy "
        "answer would begin with reasoning"
        if kwargs
        else "as chat requests are served (the template renders the same generation prompt with enable_thinking false)"
    )
    return {"chat_template_kwargs": kwargs, "why": why}


def plain_text(messages: list[dict]) -> str:
    """A chat prompt for a model without a chat template: its messages' contents one per line, with a final
    newline (the roles are left out: a base model was never taught their markers)."""
    return "".join(text_of(m["content"]) + "\n" for m in messages)


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """A chat prompt's token ids, the one rendering of the trainer's own generations: the forgetting guard's
    retention prompts and rewording's instruction. With a chat template: its text with the generation prompt
    (with thinking off where the template has the switch: ``own_kwargs``), without added special tokens, as
    the engines tokenize a chat request. Without one: ``plain_text``, tokenized as the engines tokenize a
    completion prompt (with them)."""
    if not has_chat_template(tokenizer):
        return tokenizer(plain_text(messages))["input_ids"]
    text = chat_text(tokenizer, messages, "messages", kwargs=own_kwargs(tokenizer))
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _sequences_chat(tokenizer, messages, where: str) -> list[list[tuple[str, bool]]]:
    """The sequences a chat example trains as, each cut into (text, trained) pieces. Each assistant turn is
    trained on what the template renders for it as the conversation's last message, after the generation
    prompt of the conversation before it: the tokens the engine had to generate, after the prompt it served.
    Turns whose prompt begins with the rendering so far (a template that renders a conversation
    incrementally: most do) share one sequence; a turn whose prompt renders the earlier turns otherwise
    (Qwen3's and Qwen3.5's templates drop an answer's reasoning once a later user turn follows) starts a
    sequence of its own, with that prompt as its context. On a template served thinking, an answer without
    reasoning is trained after the thinking-off prompt (``own_kwargs``): its empty think block is prompt, not
    a trained answer."""
    msgs = check_messages(messages, where, null_content=False)
    if not any(m["role"] == "assistant" for m in msgs):
        raise Invalid(f"{where}.messages", f"{where}.messages has no assistant message to learn")
    for j, m in enumerate(msgs):
        # A chat request may carry an empty answer (vLLM takes null content); a job would teach the model
        # to answer that question with nothing, as a client that lost the text would never mean.
        if m["role"] == "assistant" and not text_of(m["content"]).strip():
            raise Invalid(
                f"{where}.messages[{j}].content",
                f"{where}.messages[{j}] is an assistant message with no text: training on it teaches the model "
                "to answer with nothing; give the answer's text",
            )

    def render(ms: list[dict], gen: bool, kwargs: dict | None = None) -> str:
        return chat_text(tokenizer, ms, f"{where}.messages", gen, kwargs=kwargs)

    off = own_kwargs(tokenizer)  # thinking off, where the template is served thinking and has the switch
    sequences, pieces, done = [], [], ""
    for j, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt, full = render(msgs[:j], True) if j else "", render(msgs[: j + 1], False)
        if j and off:
            # Served thinking, the template writes an answer without reasoning after an empty think block (Qwen3's
            # and Qwen3.5's): the thinking-off generation prompt. Trained, that block taught the model to close
            # its reasoning at once, to stop thinking, which no example means; it is the prompt's, as the engine
            # serves the conversation with thinking off, and the answer alone is trained.
            quiet = render(msgs[:j], True, off)
            if len(quiet) > len(prompt) and full.startswith(quiet):
                prompt = quiet
        if not full.startswith(prompt):
            raise Invalid(
                f"{where}.messages[{j}]",
                f"the chat template renders {where}.messages[{j}] otherwise than as an answer to the generation "
                "prompt before it, so the served model could not have generated it: send the answer as the model "
                "is served to give it (with thinking off: without reasoning)",
            )
        if not prompt.startswith(done):  # the earlier turns render otherwise now: a sequence of its own
            sequences.append(pieces)
            pieces, done = [], ""
        pieces += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    rest = render(msgs, False)
    if len(rest) > len(done) and rest.startswith(done):
        pieces.append((rest[len(done) :], False))
    return [*sequences, pieces]


def _tokens(tokenizer, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    """(ids, mask) of (text, trained) pieces, each tokenized as the engine tokenizes a chat request."""
    ids, mask = [], []
    for text, trained in pieces:
        t = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += t
        mask += [trained] * len(t)
    return ids, mask


def encode_example(tokenizer, ex, where: str) -> list[tuple[list[int], list[bool], float]]:
    """The sequences one example trains as, each (token ids, which tokens carry loss, weight), tokenized
    exactly as the engine tokenizes a request (chat: template text without added specials; prompt: with
    them). One sequence, but for a chat example whose template does not render it incrementally
    (``_sequences_chat``): then each of its sequences carries the example's weight times its share of the
    example's trained tokens, so that the example weighs what it would as one sequence."""
    if not isinstance(ex, dict):
        raise Invalid(where, f"{where} must be an object with messages, or prompt and completion")
    for k in ex:
        if k not in EXAMPLE_FIELDS:  # a misspelt "weight" or "completion" is not silently dropped
            raise Invalid(f"{where}.{k}", f"unknown field '{where}.{k}' (allowed: {', '.join(EXAMPLE_FIELDS)})")
    if "messages" in ex and ("prompt" in ex or "completion" in ex):
        raise Invalid(where, f"{where} has both messages and prompt/completion: send one of the two forms")
    weight = ex.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (0 <= weight < math.inf):
        raise Invalid(f"{where}.weight", f"{where}.weight must be a finite number >= 0")
    if "messages" in ex:
        rows = [_tokens(tokenizer, pieces) for pieces in _sequences_chat(tokenizer, ex["messages"], where)]
    elif "prompt" in ex or "completion" in ex:
        for k in ("prompt", "completion"):
            if not isinstance(ex.get(k), str) or (k == "completion" and not ex[k]):
                raise Invalid(
                    f"{where}.{k}", f"{where}.{k} must be a {'non-empty ' if k == 'completion' else ''}string"
                )
        p = tokenizer(ex["prompt"])["input_ids"]
        c = tokenizer(ex["completion"], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            c = c + [tokenizer.eos_token_id]
        rows = [(p + c, [False] * len(p) + [True] * len(c))]
    else:
        raise Invalid(where, f"{where} needs messages, or prompt and completion")
    # The first token is never predicted; a loss token needs one before it.
    if not all(any(mask[1:]) for _, mask in rows):
        raise Invalid(where, f"{where} has no tokens to learn after tokenization")
    if len(rows) == 1:
        return [(*rows[0], float(weight))]
    trained = [sum(mask[1:]) for _, mask in rows]
    return [(ids, mask, float(weight) * t / sum(trained)) for (ids, mask), t in zip(rows, trained)]


# How many messages a job's chat examples may render in all (``_sequences_chat`` renders each assistant turn's
# conversation twice, so a conversation of n messages costs about n per message before each of its answers:
# quadratic in its length). ~2 µs a message with the default model's template: a few seconds for the
# largest jobs, where one body of 16 MiB holding a single conversation of 400,000 messages would take days.
MAX_RENDERED_MESSAGES = 4_000_000


def _rendered_messages(examples: list) -> int:
    """The messages ``_sequences_chat`` will render for ``examples`` (before any of them is checked)."""
    total = 0
    for ex in examples:
        msgs = ex.get("messages") if isinstance(ex, dict) else None
        if isinstance(msgs, list):
            turns = sum(1 for m in msgs if isinstance(m, dict) and m.get("role") == "assistant")
            total += len(msgs) * (2 * turns + 1)
    return total


def parse_job(tokenizer, job, max_len: int, max_examples: int) -> dict:
    """A /train body → ``{"examples": [(ids, mask, weight)], and the options given}``: the sequences of its
    examples (``encode_example``: one per example, or one per assistant turn of a chat example whose template
    does not render it incrementally), each at most ``max_len`` tokens; at most ``max_examples`` examples as
    sent."""
    if not isinstance(job, dict):
        raise Invalid("body", "request body must be a JSON object")
    unknown = set(job) - set(JOB_OPTIONS) - {"examples", "id"}
    for k in ("chat_template", "chat_template_kwargs"):  # a chat request may bring them; a job may not
        if k in unknown:
            raise Invalid(
                k,
                f"{k}: a job cannot bring its own; its chat examples render as a chat request without one does "
                "(the server's --chat-template and --default-chat-template-kwargs): the weights serve every request",
            )
    if unknown:
        raise Invalid(
            sorted(unknown)[0],
            f"unknown field {sorted(unknown)[0]!r} (allowed: examples, id, {', '.join(sorted(JOB_OPTIONS))})",
        )
    job_id(job)
    examples = job.get("examples")
    if not isinstance(examples, list) or not examples:
        raise Invalid("examples", "examples must be a non-empty list")
    if len(examples) > max_examples:
        raise Invalid("examples", f"examples has {len(examples)} items; at most {max_examples} per job")
    rendered = _rendered_messages(examples)
    if rendered > MAX_RENDERED_MESSAGES:
        raise Invalid(
            "examples",
            f"the job's conversations are too long to render: each assistant turn renders the conversation "
            f"before it, {rendered:,} messages in all, at most {MAX_RENDERED_MESSAGES:,} a job: send long "
            "multi-turn conversations in several jobs, or cut them",
        )
    encoded = []
    for i, ex in enumerate(examples):
        rows = encode_example(tokenizer, ex, f"examples[{i}]")
        for k, (ids, _, _) in enumerate(rows):
            if len(ids) > max_len:
                of = f" (its sequence {k + 1} of {len(rows)}: a chat turn trained apart)" if len(rows) > 1 else ""
                raise Invalid(f"examples[{i}]", f"examples[{i}] is {len(ids)} tokens{of}, over the limit of {max_len}")
        encoded += rows
    return {"examples": encoded, **parse_options(job)}


def parse_options(job: dict) -> dict:
    """The job options present in ``job``, each checked (``Invalid`` naming it)."""
    opts = {}
    for k, (kind, ok, what) in JOB_OPTIONS.items():
        if k in job:
            v = job[k]
            if (isinstance(v, bool) and kind is not bool) or not isinstance(v, kind) or not ok(v):
                raise Invalid(k, f"{k} must be {what}, got {json.dumps(v, allow_nan=True)[:40]}")
            opts[k] = v
    return opts
