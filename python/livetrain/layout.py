"""HF parameters as zero-copy views of an inference engine's tensors (the core computes the layout).

``build`` asks the core where every HF parameter of a model lies inside the engine's tensors (vLLM's
merged tensor-parallel layout, or HF names unchanged); ``views`` turns that into torch tensors with
``torch.as_strided`` over the engine's own storage, so writes through a view change the served weights.
``merge`` does the inverse with copies, from the same plan: it builds one rank's engine tensors from HF
tensors (for tests, tools and the reference engine, never for the live path).
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import torch

from livetrain import _core
from livetrain.safetensors import dtype_name, torch_dtype

__all__ = ["check", "build", "views", "plan", "merge", "engine_layout", "served_in_fp32", "load_fp32_exactly"]

# Parameters the engines keep in float32 whatever the model's dtype: vLLM's GatedDeltaNetAttention (Qwen3-Next,
# Qwen3.5) creates A_log in float32 and widens the files' bf16 into it, while transformers keeps the files'
# dtype. The reference engine serves them as vLLM does (so the CPU path meets vLLM's case), the trainer's
# model takes them as served, and the checkpoint store keeps their deltas in float32 (CheckpointStore.set_served).
FP32_PARAMETER_SUFFIXES = (".linear_attn.A_log",)


def served_in_fp32(name: str) -> bool:
    """Whether the engines serve parameter ``name`` (any prefix) in float32 whatever the model's dtype."""
    return name.endswith(FP32_PARAMETER_SUFFIXES)


def load_fp32_exactly(tensors: Mapping[str, torch.Tensor], model_dir: str | os.PathLike) -> None:
    """Writes into the float32 tensors the engines serve in float32 (``served_in_fp32``; ``tensors`` under the
    model files' names, in place) the files' values converted exactly, as vLLM's loader does (it copies the
    files' values into its float32 parameter). transformers' ``from_pretrained(dtype=torch.bfloat16)`` casts a
    float32 tensor of the files (published Qwen3.5's A_log, or one ``materialize`` wrote in float32) to bf16
    first, which widening afterwards does not undo."""
    from livetrain.safetensors import Model

    names = [n for n, t in tensors.items() if served_in_fp32(n) and t.dtype == torch.float32]
    if not names:
        return
    files = Model(model_dir)
    for name in names:
        if name in files:
            tensors[name].copy_(files.tensor(name, copy=False))


def engine_layout(engine: str) -> str:
    """The layout kind of a sharing manifest's engine: ``vllm`` for vLLM, whose tensors are merged, padded
    and sharded; ``hf`` for every engine livetrain runs itself (``reference``, ...), which shares its
    tensors under their Hugging Face names and shapes. The core decides (the CLI's ``diagnose`` asks it too)."""
    return _core.layout_engine_of(engine)


def _config_json(config) -> str:
    if isinstance(config, Mapping):
        return json.dumps(config)
    if isinstance(config, os.PathLike) or (isinstance(config, str) and not config.lstrip().startswith("{")):
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path, encoding="utf-8") as f:
            return f.read()
    return config


def check(config) -> None:
    """Raises livetrain.UnsupportedError, naming config.json's architecture and what is supported, for a
    checkpoint livetrain cannot train in place whatever the engine: mixture-of-experts, quantized, or a
    multimodal wrapper without a layout (docs/layouts.md). ``config``: as for ``build``. A dense model of a
    family without a layout passes (the reference engine serves it under its Hugging Face names); ``plan``
    and ``build`` refuse it too."""
    _core.layout_check(_config_json(config))


def _tensor_list(engine_tensors) -> list[tuple[str, str, list[int]]]:
    if isinstance(engine_tensors, Mapping):
        return [(n, dtype_name(t.dtype), list(t.shape)) for n, t in engine_tensors.items()]
    return [(n, d, list(s)) for n, d, s in engine_tensors]


def _rank(
    engine: str = "vllm",
    tp_rank: int = 0,
    tp_size: int = 1,
    vocab_padding: int = 64,
    prefixes: tuple[str, str] | None = None,
) -> tuple:
    """Which layout ``build``, ``plan`` and ``merge`` compute (their keyword arguments): the ``engine`` kind
    (``vllm`` or ``hf``, see ``engine_layout``), rank ``tp_rank`` of ``tp_size``, the vocabulary padding,
    and the engine's name prefixes (None: what the config implies)."""
    return engine, tp_rank, tp_size, vocab_padding, prefixes


def build(
    config, engine_tensors: Mapping[str, torch.Tensor] | Sequence[tuple[str, str, Sequence[int]]], **rank
) -> dict:
    """The layout of one rank (``rank``: see ``_rank``): ``{"info", "views", "unmapped"}``. ``config`` is a
    dict, JSON text, a config.json path or a model directory; ``engine_tensors`` maps names to tensors, or
    lists (name, safetensors dtype, shape). Missing or misshapen engine tensors raise livetrain.Error."""
    engine, tp_rank, tp_size, vocab_padding, prefixes = _rank(**rank)
    return _core.layout_build(
        _config_json(config), engine, tp_rank, tp_size, _tensor_list(engine_tensors), vocab_padding, prefixes
    )


def views(layout: dict, engine_tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF name -> a view sharing the engine tensor's storage (tied parameters are the same view)."""
    out: dict[str, torch.Tensor] = {}
    for v in layout["views"]:
        if v["tied_to"] is not None:
            out[v["hf_name"]] = out[v["tied_to"]]
            continue
        t = engine_tensors[v["engine_name"]]
        if not t.is_contiguous():
            raise _core.InvalidArgumentError(
                f"engine tensor {v['engine_name']!r} is not contiguous; layouts assume row-major"
            )
        if t.dtype != torch_dtype(v["dtype"]):
            raise _core.InvalidArgumentError(
                f"engine tensor {v['engine_name']!r} is {t.dtype}, the layout was built for {v['dtype']}"
            )
        out[v["hf_name"]] = torch.as_strided(t, v["shape"], v["strides"], t.storage_offset() + v["offset"])
    return out


def plan(config, **rank) -> dict:
    """How one rank's engine tensors are built from HF tensors (``rank``: see ``_rank``):
    ``{"info", "hf_tensors", "engine"}``."""
    return _core.layout_plan(_config_json(config), *_rank(**rank))


def merge(config, hf_tensors: Mapping[str, torch.Tensor], **kwargs) -> dict[str, torch.Tensor]:
    """One rank's engine tensors built from full HF tensors as the plan says (copies; padding rows zero)."""
    p = plan(config, **kwargs)
    out: dict[str, torch.Tensor] = {}
    for e in p["engine"]:
        first = hf_tensors[e["pieces"][0][0]]
        parts = [hf_tensors[name].narrow(e["dim"], start, length) for name, start, length in e["pieces"]]
        if e["padding"]:
            shape = list(first.shape)
            shape[e["dim"]] = e["padding"]
            parts.append(torch.zeros(shape, dtype=first.dtype))
        out[e["name"]] = torch.cat(parts, dim=e["dim"]).contiguous()
        assert tuple(out[e["name"]].shape) == tuple(e["shape"]), e["name"]
    return out
