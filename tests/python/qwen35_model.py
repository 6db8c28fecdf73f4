"""A tiny random Qwen3.5 multimodal checkpoint, as the published ones are laid out: transformers' own
``Qwen3_5ForConditionalGeneration`` (text model under ``model.language_model.``, a small vision tower under
``model.visual.``) written with ``save_pretrained``, plus, optionally, ``mtp.*`` tensors added to the
safetensors file the way releases ship a multi-token-prediction head that transformers does not load.
Also the deterministic "training step" the sharded-store tests apply on every rank alike."""

import json
from pathlib import Path

import torch

TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=200,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_conv_kernel_dim=4,
    max_position_embeddings=128,
    full_attention_interval=2,
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
# Names and shapes of an MTP head as Qwen3.5 releases ship it (hidden 64 here).
MTP = {
    "mtp.fc.weight": [64, 128],
    "mtp.norm.weight": [64],
    "mtp.pre_fc_norm_embedding.weight": [64],
    "mtp.pre_fc_norm_hidden.weight": [64],
    "mtp.layers.0.mlp.down_proj.weight": [64, 128],
}


def make_qwen35_dir(path: Path, *, mtp: bool = True) -> dict:
    """Writes the checkpoint (bf16, one safetensors file, no tokenizer) under ``path``; returns config.json.
    Same bytes for the same arguments (seeded)."""
    import transformers
    from safetensors.torch import load_file, save_file

    config = transformers.Qwen3_5Config(text_config=TEXT, vision_config=VISION, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.Qwen3_5ForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(path)
    if mtp:
        f = Path(path) / "model.safetensors"
        tensors = load_file(f)
        g = torch.Generator().manual_seed(1)
        for name, shape in MTP.items():
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
