"""safetensors files and model directories through the livetrain core, as torch tensors.

Reading validates every header as strictly as the reference library and maps the files; writing is
byte-compatible with the reference writer and atomic (temporary file, fsync, rename, fsync directory).
"""

from __future__ import annotations

import os
import warnings
from typing import Mapping

import torch

from livetrain import _core

_TO_TORCH: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "C64": torch.complex64,
    "F64": torch.float64,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn,
}
for _name, _attr in (
    ("F8_E8M0", "float8_e8m0fnu"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("F4", "float4_e2m1fn_x2"),
):
    if hasattr(torch, _attr):
        _TO_TORCH[_name] = getattr(torch, _attr)
_FROM_TORCH: dict[torch.dtype, str] = {v: k for k, v in _TO_TORCH.items()}

# The weight dtypes livetrain serves a model in, by the names its commands take (``--dtype``).
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name."""
    try:
        return _TO_TORCH[name]
    except KeyError:
        raise _core.UnsupportedError(f"safetensors dtype {name!r} has no torch equivalent") from None


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype."""
    try:
        return _FROM_TORCH[dtype]
    except KeyError:
        raise _core.UnsupportedError(f"torch dtype {dtype} has no safetensors name") from None


def _as_tensor(buf, dtype: str, shape, copy: bool) -> torch.Tensor:
    if dtype == "F4":
        # torch packs two E2M1 values per element; the file's shape counts single values.
        shape = tuple(shape[:-1]) + (shape[-1] // 2,)
    if buf.size == 0:
        return torch.empty(tuple(shape), dtype=torch_dtype(dtype))
    if copy:
        t = torch.from_numpy(buf.copy())
    else:
        with warnings.catch_warnings():  # the mapping is read-only, as the docstring says
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(buf)
    return t.view(torch_dtype(dtype)).reshape(tuple(shape))


def load_file(path: str | os.PathLike, *, copy: bool = True) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file. With ``copy=False`` they share the read-only file mapping
    (do not write to them)."""
    f = _core.SafetensorsFile.open(os.fspath(path))
    return {t["name"]: _as_tensor(f.buffer(t["name"]), t["dtype"], t["shape"], copy) for t in f.tensors()}


def read_metadata(path: str | os.PathLike) -> dict[str, str] | None:
    """The ``__metadata__`` of a safetensors file (None when it has none)."""
    return _core.SafetensorsFile.open(os.fspath(path)).metadata


class Model:
    """A model on disk: a safetensors file, or a directory with ``model.safetensors`` or shards named
    by ``model.safetensors.index.json``. Any tensor is found by name across shards."""

    def __init__(self, path: str | os.PathLike):
        self._m = _core.Model.open(os.fspath(path))

    @property
    def sharded(self) -> bool:
        return self._m.sharded

    @property
    def total_bytes(self) -> int:
        return self._m.total_bytes

    def files(self) -> list[str]:
        return self._m.files()

    def names(self) -> list[str]:
        return self._m.names()

    def __len__(self) -> int:
        return len(self._m)

    def __contains__(self, name: str) -> bool:
        return name in self._m

    def info(self, name: str) -> dict:
        return self._m.info(name)

    def tensor(self, name: str, *, copy: bool = True) -> torch.Tensor:
        info = self._m.info(name)
        return _as_tensor(self._m.buffer(name), info["dtype"], info["shape"], copy)

    def state_dict(self, *, copy: bool = True) -> dict[str, torch.Tensor]:
        return {n: self.tensor(n, copy=copy) for n in self.names()}


def _to_core(tensors: Mapping[str, torch.Tensor]):
    out = []
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor {name!r}: expected a torch.Tensor, got {type(t).__name__}")
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        dtype = dtype_name(t.dtype)
        shape = list(t.shape)
        if dtype == "F4":
            shape[-1] *= 2  # two E2M1 values per torch element
        raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        out.append((name, dtype, shape, raw.numpy()))
    return out


def save_file(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    metadata: Mapping[str, str] | None = None,
    alignment: int = 8,
) -> None:
    """Write tensors as one safetensors file, atomically. ``metadata`` defaults to ``{"format": "pt"}``
    (what transformers expects); ``alignment`` (a multiple of 8) pads the header so the data starts at a
    multiple of it, e.g. 4096."""
    md = {"format": "pt"} if metadata is None else dict(metadata)
    _core.safetensors_write(os.fspath(path), _to_core(tensors), list(md.items()), alignment)


def save_model(
    directory: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    *,
    max_shard_bytes: int = 5 * 2**30,
    metadata: Mapping[str, str] | None = None,
    alignment: int = 8,
) -> list[str]:
    """Write a model directory: ``model.safetensors``, or shards plus ``model.safetensors.index.json``
    (written last) when the tensors exceed ``max_shard_bytes``. Returns the file names written."""
    md = {"format": "pt"} if metadata is None else dict(metadata)
    return _core.safetensors_write_model(
        os.fspath(directory), _to_core(tensors), max_shard_bytes, list(md.items()), alignment
    )
