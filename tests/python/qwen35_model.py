"""A tiny random Qwen3.5 multimodal checkpoint, as the published ones are laid out: transformers' own
``Qwen3_5ForConditionalGeneration`` (text model under ``model.language_model.``, a small vision tower under
``model.visual.``) written with ``save_pretrained``, plus, optionally, ``mtp.*`` tensors added to the
safetensors file the way releases ship a multi-token-prediction head that transformers does not load.
The text model's sizes can be changed (scripts/vllm_gpu_run.py serves one with the published head shapes).
Also the deterministic "training step" the sharded-store tests apply on every rank alike."""

import json
from pathlib import Path

import torch

import tiny_model

# The text model: tiny_model's sizes and Gated DeltaNet sizes, with four layers (two of each kind).
TEXT = dict(
    tiny_model.TINY,
    **tiny_model.QWEN35_LINEAR,
    intermediate_size=128,
    num_hidden_layers=4,
    vocab_size=200,
    max_position_embeddings=128,
)
VISION = dict(
    depth=1,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    out_hidden_size=64,
    num_position_embeddings=16,
    patch_size=4,
    temporal_patch_size=2,
    spatial_merge_size=2,
)
# The multimodal tokens of a Qwen3.5 tokenizer, whose ids the config names (kept inside the vocabulary).
VISION_TOKENS = {
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
}


def mtp_shapes(hidden: int, intermediate: int) -> dict[str, list[int]]:
    """Names and shapes of an MTP head as Qwen3.5 releases ship it, for a text model of these sizes."""
    return {
        "mtp.fc.weight": [hidden, 2 * hidden],
        "mtp.norm.weight": [hidden],
        "mtp.pre_fc_norm_embedding.weight": [hidden],
        "mtp.pre_fc_norm_hidden.weight": [hidden],
        "mtp.layers.0.mlp.down_proj.weight": [hidden, intermediate],
    }


MTP = mtp_shapes(TEXT["hidden_size"], TEXT["intermediate_size"])


def save_tokenizer(path: Path, corpus: list[str]):
    """A byte-level BPE tokenizer of ``corpus`` with tiny_model's special tokens and chat template, saved under
    ``path``: transformers loads a ``qwen3_5`` checkpoint's tokenizer as ``Qwen3_5Tokenizer``, which rebuilds
    a byte-level BPE from the saved vocabulary and merges (a word-level one would lose every word)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = tiny_model.SPECIALS + list(VISION_TOKENS.values())
    tok.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=specials, initial_alphabet=alphabet)
    )
    return tiny_model.save_fast_tokenizer(path, tok, specials)


def make_qwen35_dir(path: Path, *, mtp: bool = True, corpus: list[str] | None = None, text: dict | None = None) -> dict:
    """Writes the checkpoint (bf16, one safetensors file) under ``path``, with a tokenizer of ``corpus`` when
    given (to serve it; the config then names its multimodal tokens); ``text`` changes the text model's
    sizes (``TEXT``). Returns config.json. Same bytes for the same arguments (seeded)."""
    import transformers
    from safetensors.torch import load_file, save_file

    text = {**TEXT, **(text or {})}
    ids = {}
    if corpus is not None:
        fast = save_tokenizer(path, corpus)
        text.update(bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
        text["vocab_size"] = max(text["vocab_size"], len(fast))
        ids = {k: fast.convert_tokens_to_ids(t) for k, t in VISION_TOKENS.items()}
    vision = dict(VISION, out_hidden_size=text["hidden_size"])
    config = transformers.Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    torch.manual_seed(0)
    transformers.Qwen3_5ForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(path)
    if mtp:
        f = Path(path) / "model.safetensors"
        tensors = load_file(f)
        g = torch.Generator().manual_seed(1)
        for name, shape in mtp_shapes(text["hidden_size"], text["intermediate_size"]).items():
            tensors[name] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        save_file(tensors, f, metadata={"format": "pt"})
    return json.loads((Path(path) / "config.json").read_text())


def step(tensors: dict[str, torch.Tensor], seed: int, fraction: float) -> None:
    """Flips the lowest mantissa bit of a seeded random ``fraction`` of every bf16 tensor's elements, in
    name order: the same change in every process that starts from the same tensors."""
    g = torch.Generator().manual_seed(seed)
    for name in sorted(tensors):
        t = tensors[name]
        mask = torch.rand(t.shape, generator=g) < fraction
        bits = t.view(torch.int16)
        bits ^= mask.to(torch.int16)
