"""The tests' tiny models: the config of a 2-layer Llama of width 64 (``llama_config``), and a random model
directory for the tests that serve or train (``make_model_dir``: a bf16 Llama, Qwen3, Qwen3.5 text model, or
Qwen3.5 multimodal checkpoint as releases ship it, and an offline word-level tokenizer with a chat template,
saved as Hugging Face files), with the made-up fact they teach."""

import json
from pathlib import Path

import torch
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
# A Qwen3.5 multimodal checkpoint's vision tower (small: vLLM's --language-model-only never builds it) and
# the multi-token-prediction head releases ship beside the model, which transformers does not load: names
# and shapes in units of the text model's hidden size ``h`` and intermediate size ``i``.
QWEN35_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, num_position_embeddings=16,
                     patch_size=4, temporal_patch_size=2, spatial_merge_size=2)
QWEN35_MTP = {
    "mtp.fc.weight": ("h", "2h"),
    "mtp.norm.weight": ("h",),
    "mtp.pre_fc_norm_embedding.weight": ("h",),
    "mtp.pre_fc_norm_hidden.weight": ("h",),
    "mtp.layers.0.mlp.down_proj.weight": ("h", "i"),
}
# The multimodal tokens a Qwen3.5 tokenizer has (their ids go into the config, inside the vocabulary).
QWEN35_SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
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
    return transformers.LlamaConfig(**tiny_sizes(vocab_size, **sizes))


def make_model_dir(
    path: Path, corpus: list[str], model_type: str = "llama", tied: bool = False, intermediate_size: int = 96, **sizes
) -> dict:
    """Writes the model and tokenizer (vocabulary: the special tokens and the corpus's words) under
    ``path``; returns the config as saved. ``model_type``: ``llama``, ``qwen3``, ``qwen3_5_text`` (Gated
    DeltaNet and gated full attention) or ``qwen3_5`` (``Qwen3_5ForConditionalGeneration``: that text model
    under ``model.language_model.``, a vision tower under ``model.visual.``, and ``mtp.*`` tensors added to
    the safetensors file). Same weights for the same arguments (seeded). ``sizes`` overrides the (text
    model's) sizes (``hidden_size``, ``max_position_embeddings``, ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    specials = SPECIALS + (QWEN35_SPECIALS if model_type == "qwen3_5" else [])
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=specials))
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=specials[4:],
    )
    fast.chat_template = TEMPLATE
    fast.save_pretrained(path)
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
    if model_type == "qwen3_5":
        return _qwen35_multimodal(path, fast, {**QWEN35_LINEAR, **fields})
    configs = {
        "llama": lambda: transformers.LlamaConfig(**fields),
        "qwen3": lambda: transformers.Qwen3Config(head_dim=16, **fields),
        "qwen3_5_text": lambda: transformers.Qwen3_5TextConfig(**{**QWEN35_LINEAR, **fields}),
    }
    config = configs[model_type]()
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(path)
    return json.loads((Path(path) / "config.json").read_text())


def _qwen35_multimodal(path: Path, tokenizer, text: dict) -> dict:
    from safetensors.torch import load_file, save_file

    ids = dict(zip(("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"),
                   tokenizer.convert_tokens_to_ids(QWEN35_SPECIALS)))
    tied = text.pop("tie_word_embeddings")
    vision = dict(QWEN35_VISION, out_hidden_size=text["hidden_size"])
    config = transformers.Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=tied, **ids)
    transformers.Qwen3_5ForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(path)
    f = Path(path) / "model.safetensors"
    tensors = load_file(f)
    g = torch.Generator().manual_seed(1)
    size = {"h": text["hidden_size"], "2h": 2 * text["hidden_size"], "i": text["intermediate_size"]}
    for name, dims in QWEN35_MTP.items():
        tensors[name] = (torch.randn([size[d] for d in dims], generator=g) * 0.02).to(torch.bfloat16)
    save_file(tensors, f, metadata={"format": "pt"})
    return json.loads((Path(path) / "config.json").read_text())
