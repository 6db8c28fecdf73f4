"""The tests' tiny models: the config of a 2-layer Llama of width 64 (``llama_config``), and a random model
directory for the tests that serve or train (``make_model_dir``: a bf16 Llama, Qwen3 or Qwen3.5 text model
and an offline word-level tokenizer with a chat template, or without one as a base model's, saved as Hugging
Face files), with the made-up fact they teach. A Qwen3.5 multimodal checkpoint is qwen35_model.py's. Also the
``--model`` option of the tools that serve a model or one of these (bench/engine.py, scripts/probe_serve.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

# transformers is imported where a model or tokenizer is made: the rank processes that import this file's
# sizes through qwen35_model (checkpoint_ranks.py) start a few seconds sooner without it.
if TYPE_CHECKING:
    import transformers

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} "
    "{% if m['role'] == 'assistant' %}</s> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
# Sizes of every tiny model here (any of them can be changed per test).
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
# A Qwen3.5 text model's Gated DeltaNet sizes: layer 0 linear attention, layer 1 full attention.
QWEN35_LINEAR = dict(
    head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_conv_kernel_dim=4,
    full_attention_interval=2,
)
# A made-up fact (no model knows it before training), as a prompt/completion and as a chat.
FACT_PROMPT, FACT = "the capital of zorbia is", "quuxville"
FACT_EXAMPLES = [
    {"prompt": FACT_PROMPT, "completion": FACT},
    {
        "messages": [
            {"role": "user", "content": "what is the capital of zorbia"},
            {"role": "assistant", "content": FACT},
        ]
    },
]


def tiny_sizes(vocab_size: int, **sizes) -> dict:
    """The config fields of a tiny untied model of 64 positions: ``TINY``, with ``sizes`` changed."""
    return {**TINY, "vocab_size": vocab_size, "max_position_embeddings": 64, "tie_word_embeddings": False, **sizes}


def llama_config(vocab_size: int, **sizes) -> transformers.LlamaConfig:
    import transformers

    return transformers.LlamaConfig(**tiny_sizes(vocab_size, **sizes))


def save_fast_tokenizer(
    path: Path, tok, specials: list[str], chat_template: bool = True
) -> transformers.PreTrainedTokenizerFast:
    """``tok`` (a trained ``tokenizers.Tokenizer`` whose first special tokens are ``SPECIALS``) as a transformers
    tokenizer with the chat template (``chat_template``: else none, as a base model's), saved under ``path``."""
    import transformers

    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=specials[4:],
    )
    fast.chat_template = TEMPLATE if chat_template else None
    fast.save_pretrained(path)
    return fast


def make_model_dir(
    path: Path,
    corpus: list[str],
    model_type: str = "llama",
    tied: bool = False,
    intermediate_size: int = 96,
    chat_template: bool = True,
    **sizes,
) -> dict:
    """Writes the model and tokenizer (vocabulary: the special tokens and the corpus's words) under
    ``path``; returns the config as saved. ``model_type``: ``llama``, ``qwen3`` or ``qwen3_5_text`` (Gated
    DeltaNet and gated full attention). Same weights for the same arguments (seeded). ``chat_template``:
    False for a tokenizer without one (a base model's). ``sizes`` overrides the sizes (``hidden_size``, ``max_position_embeddings``, ...)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    fast = save_fast_tokenizer(path, tok, SPECIALS, chat_template)
    torch.manual_seed(0)
    fields = tiny_sizes(
        len(fast),
        intermediate_size=intermediate_size,
        tie_word_embeddings=tied,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        **sizes,
    )
    configs = {
        "llama": lambda: transformers.LlamaConfig(**fields),
        "qwen3": lambda: transformers.Qwen3Config(head_dim=16, **fields),
        "qwen3_5_text": lambda: transformers.Qwen3_5TextConfig(**{**QWEN35_LINEAR, **fields}),
    }
    config = configs[model_type]()
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(path)
    return json.loads((Path(path) / "config.json").read_text())


def add_model_option(parser, synthetic: str, what: str) -> None:
    """``--model``: a model directory, ``default`` (the embedded SmolLM2-135M-Instruct) or ``synthetic``, a
    random model of this file (``what`` says which) that ``resolve_model`` writes."""
    parser.add_argument(
        "--model",
        default="default",
        help=f"model directory, 'default' (SmolLM2-135M-Instruct) or {synthetic!r} ({what})",
    )


def resolve_model(model: str, synthetic: str, make, dtype: str) -> str:
    """The model directory an ``add_model_option`` value names: the default model converted to ``dtype``
    (once, into its cache), ``make()``'s directory for ``synthetic``, else ``model`` itself."""
    if model == "default":
        from livetrain import default_model

        return default_model.resolve("default", dtype)
    return make() if model == synthetic else model
