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

__all__ = ["PACKAGES", "kernel_functions", "prepare", "report", "verify", "warnings"]

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
    """``{func_name: "fla 0.6.0" | "torch (install flash-linear-attention)" | "torch (fla 0.6.0 failed on
    cuda:0: ...)"}`` for every kernel-backed function of ``model``'s layers (empty for models without
    any, e.g. Llama)."""
    out = {}
    for name, f in kernel_functions(model).items():
        if name in _refused:
            out[name] = f"torch ({_refused[name]})"
        elif f["implementation"] is f["fallback"]:
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
        if f["implementation"] is f["fallback"] and name not in _refused:
            missing.setdefault(f["package"], []).append(name)
    out = []
    for package, names in sorted(missing.items()):
        dist, cost = PACKAGES.get(package, (package, "the PyTorch reference path is slower"))
        out.append(f"{dist} is not installed: {', '.join(names)} run as PyTorch code, so {cost}")
    return out


# Functions whose package is installed but failed verify() on this process's GPU: func_name -> why.
_refused: dict[str, str] = {}

# The delta-rule functions verify() can call with a small made-up input, and whether a backward pass
# through them is part of training (the recurrent form only serves decoding with a cache).
_PROBES = {"chunk_gated_delta_rule": True, "fused_recurrent_gated_delta_rule": False}


def _probe_inputs(device, generator):
    """A small Gated DeltaNet input (one sequence of 64 tokens, 2 heads of 64), bf16 as the layers run."""
    import torch

    def rand(*shape):
        return torch.randn(*shape, generator=generator, device="cpu").to(device=device, dtype=torch.bfloat16)

    q, k, v = rand(1, 64, 2, 64), rand(1, 64, 2, 64), rand(1, 64, 2, 64)
    g = torch.nn.functional.logsigmoid(rand(1, 64, 2).float()).to(torch.bfloat16)
    beta = torch.sigmoid(rand(1, 64, 2).float()).to(torch.bfloat16)
    return [t.requires_grad_() for t in (q, k, v, g, beta)]


def _run(fn, inputs, backward: bool):
    q, k, v, g, beta = inputs
    out, _ = fn(q, k, v, g=g, beta=beta, initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=True)
    if not backward:
        return [out.float()]
    grads = [t.float() for t in __import__("torch").autograd.grad(out.float().square().sum(), inputs)]
    return [out.float(), *grads]


def _relative_error(a, b) -> float:
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-12))


def _use_fallback(wrapper: Callable) -> None:
    """Makes transformers' wrapper call its torch function: its closure's ``implementation`` (and the
    parameter names it filters keyword arguments by) are set to the torch function's, so every layer that
    calls the wrapper runs the torch path, and kernel_functions() still finds the wrapper."""
    cells = dict(zip(wrapper.__code__.co_freevars, wrapper.__closure__))
    fallback = cells["torch_function"].cell_contents
    cells["implementation"].cell_contents = fallback
    if "applicable_params" in cells:
        import inspect

        cells["applicable_params"].cell_contents = tuple(inspect.signature(fallback).parameters)


def verify(model, device, backward: bool = True, tolerance: float = 0.05) -> list[str]:
    """Runs each installed delta-rule kernel of ``model``'s layers once on ``device`` with a small input
    (forward, and backward when ``backward`` and the function is trained through) and compares it with
    transformers' torch function. A kernel that raises or disagrees (relative error above ``tolerance``:
    bf16 noise is ~1e-2) is replaced by the torch function inside transformers' wrapper, so the layers run the torch path;
    one message per replaced function says why. Example: flash-linear-attention 0.6.0 refuses its chunked
    backward on Hopper with Triton < 3.7.1 (wrong results there, its issue #640), which torch 2.11 ships."""
    import torch

    messages = []
    for name, f in kernel_functions(model).items():
        if f["implementation"] is f["fallback"] or name not in _PROBES:
            continue
        with_backward = backward and _PROBES[name]
        top = (getattr(f["implementation"], "__module__", None) or f["package"]).split(".")[0]
        try:
            got = _run(f["implementation"], _probe_inputs(device, torch.Generator().manual_seed(0)), with_backward)
            want = _run(f["fallback"], _probe_inputs(device, torch.Generator().manual_seed(0)), with_backward)
            errors = [_relative_error(a, b) for a, b in zip(got, want)]
            problem = None
            if not all(e <= tolerance for e in errors):  # also catches NaN
                problem = f"differs from the torch path (relative error {max(errors):.3g} > {tolerance})"
        except Exception as e:  # noqa: BLE001 - any failure of an optional kernel means: do not use it
            problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        if problem is None:
            continue
        why = f"{_version(top)} failed on {device}: {problem}"
        _refused[name] = why
        _use_fallback(getattr(f["module"], f["attribute"]))
        messages.append(f"{name}: {why}; the torch path is used instead (slower; see docs/serve.md)")
    return messages


def prepare(model, device, backward: bool = True) -> list[str]:
    """What the trainer and the engine run at start: on a GPU, verify() the installed kernels there, then
    the messages about kernels that run as torch code (verify's and warnings'). On CPU the packages have
    no path of their own (flash-linear-attention is Triton), so nothing is run or said."""
    if getattr(device, "type", str(device)) != "cuda":
        return []
    return verify(model, device, backward) + warnings(model, device)
