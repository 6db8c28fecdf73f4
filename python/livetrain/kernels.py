"""Which implementation a model's optional fused kernels got: the trainer and the reference engine say it
at start and in /train/status, and warn when a GPU runs the slow PyTorch reference path instead.

transformers (>= 5.17) decorates the Gated DeltaNet functions of Qwen3-Next and Qwen3.5 with
``use_kernel_func_from_hub_with_fallback(func_name, package)`` (transformers/integrations/hub_kernels.py):
when the modeling module is imported it takes ``func_name`` from the package if that imports
(flash-linear-attention's ``fla`` for the delta rule, ``causal_conv1d`` for the short convolution), else
keeps its own torch function; the choice is frozen in the wrapper's closure. This module reads it from
there, so what it reports is what the layers call, not a guess from what is installed.
"""

from __future__ import annotations

import importlib.metadata
import sys
from typing import Callable

__all__ = ["PACKAGES", "kernel_functions", "report", "warnings"]

# The packages transformers takes those kernels from: pip's name for each, and what running without it
# costs on a GPU (bench/gdn.py measures the first). causal-conv1d has no wheel for torch 2.11 / CUDA 13 on
# PyPI (a source build needs nvcc and the torch headers), and flash-linear-attention's own Triton
# convolution takes [B, T, D] and returns a tuple where transformers passes [B, D, T] and expects a
# tensor, so the convolution stays torch's F.conv1d (cuDNN) unless causal-conv1d is built.
PACKAGES = {
    "fla": (
        "flash-linear-attention",
        "the Gated DeltaNet layers' delta rule runs as PyTorch reference code, many times slower "
        "in training (bench/gdn.py)",
    ),
    "causal_conv1d": (
        "causal-conv1d",
        "the Gated DeltaNet layers' short convolution runs as torch's F.conv1d (cuDNN); no wheel for "
        "torch 2.11 / CUDA 13 exists, it builds from source",
    ),
}


def _closure(fn: Callable) -> dict | None:
    """The variables ``use_kernel_func_from_hub_with_fallback``'s wrapper closes over, or None when ``fn``
    is not such a wrapper."""
    code = getattr(fn, "__code__", None)
    cells = getattr(fn, "__closure__", None)
    if code is None or cells is None or not hasattr(fn, "__wrapped__"):
        return None
    names = code.co_freevars
    if not {"implementation", "torch_function", "package", "func_name"} <= set(names):
        return None
    try:
        return {n: c.cell_contents for n, c in zip(names, cells)}
    except ValueError:  # a cell not filled yet
        return None


def kernel_functions(model) -> dict[str, dict]:
    """The kernel-backed functions of the modeling modules ``model``'s layers come from:
    ``{func_name: {"package", "implementation", "fallback", "module", "attribute"}}``: ``fallback`` is
    transformers' torch function, and the layers call ``getattr(module, attribute)``."""
    out: dict[str, dict] = {}
    modules = sorted({type(m).__module__ for m in model.modules()})
    for name in modules:
        mod = sys.modules.get(name)
        if mod is None:
            continue
        for attribute, value in vars(mod).items():
            c = _closure(value) if callable(value) else None
            if c is not None:
                out[c["func_name"]] = {
                    "package": c["package"],
                    "implementation": c["implementation"],
                    "fallback": c["torch_function"],
                    "module": mod,
                    "attribute": attribute,
                }
    return dict(sorted(out.items()))


def _version(package: str) -> str:
    dist = PACKAGES.get(package, (package,))[0]
    version = getattr(sys.modules.get(package), "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = "?"
    return f"{package} {version}"


def report(model) -> dict[str, str]:
    """``{func_name: "fla 0.6.0" | "torch (install flash-linear-attention)"}`` for every kernel-backed
    function of ``model``'s layers (empty for models without any, e.g. Llama)."""
    out = {}
    for name, f in kernel_functions(model).items():
        if f["implementation"] is f["fallback"]:
            out[name] = f"torch (install {PACKAGES.get(f['package'], (f['package'],))[0]})"
        else:
            top = (getattr(f["implementation"], "__module__", None) or f["package"]).split(".")[0]
            out[name] = _version(top)
    return out


def warnings(model, device) -> list[str]:
    """One message per missing package whose functions ``model`` would run as torch code on a GPU (none on
    CPU, where the torch path is the only one), naming the package, the functions and the cost."""
    if getattr(device, "type", str(device)) != "cuda":
        return []
    missing: dict[str, list[str]] = {}
    for name, f in kernel_functions(model).items():
        if f["implementation"] is f["fallback"]:
            missing.setdefault(f["package"], []).append(name)
    out = []
    for package, names in sorted(missing.items()):
        dist, cost = PACKAGES.get(package, (package, "the PyTorch reference path is slower"))
        out.append(f"{dist} is not installed: {', '.join(names)} run as PyTorch code, so {cost}")
    return out
