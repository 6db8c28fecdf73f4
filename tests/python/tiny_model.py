"""A tiny random model directory for the tests that serve or train (test_serve, test_vllm_plugin, test_trainer_step): a 2-layer
bf16 Llama or Qwen3 and an offline word-level tokenizer with a chat template, saved as Hugging Face files."""

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


def make_model_dir(
    path: Path, corpus: list[str], model_type: str = "llama", tied: bool = False, intermediate_size: int = 96, **sizes
) -> dict:
    """Writes the model and tokenizer (vocabulary: the special tokens and the corpus's words) under
    ``path``; returns the config as saved. Same weights for the same arguments (seeded). ``sizes``
    overrides the sizes (``hidden_size``, ``max_position_embeddings``, ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=SPECIALS[4:],
    )
    fast.chat_template = TEMPLATE
    fast.save_pretrained(path)
    torch.manual_seed(0)
    common = dict(
        hidden_size=64,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(fast),
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    common.update(sizes)
    config = (
        transformers.Qwen3Config(head_dim=16, **common) if model_type == "qwen3" else transformers.LlamaConfig(**common)
    )
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(path)
    return json.loads((Path(path) / "config.json").read_text())
