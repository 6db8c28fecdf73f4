"""Which implementation a model's optional fused kernels got: the trainer and the reference engine say it
at start and in /train/status, and warn when a GPU runs the slow PyTorch reference path instead.

transformers (>= 5.17) decorates the Gated DeltaNet functions of Qwen3-Next and Qwen3.5 with
``use_kernel_func_from_hub_with_fallback(func_name, package)`` (transformers/integrations/hub_kernels.py):
when the modeling module is imported it takes ``func_name`` from the package if that imports
(flash-linear-attention's ``fla`` for the delta rule, ``causal_conv1d`` for the short convolution), else
keeps its own torch function; the choice is frozen in the wrapper's closure. This module reads it from
there, so what it reports is what the layers call, not a guess from what is installed.

The trainer's fused layer operations (fuse(), below: Liger-Kernel's RMSNorm, rotary embedding and SiLU-gated
MLP) are chosen here too, and reported apart (fused_report(); /train/status "fused_ops"): the engine runs
transformers' operations.
"""

from __future__ import annotations

import importlib.metadata
import sys
import weakref
from typing import Callable

__all__ = [
    "PACKAGES",
    "fuse",
    "fuse_off",
    "fuse_with",
    "fused_report",
    "kernel_functions",
    "prepare",
    "report",
    "verify",
    "warnings",
]

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
    any, e.g. Llama). The trainer's fused layer operations: fused_report()."""
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


# --- Fused layer operations (Liger-Kernel) -------------------------------------------------------------------
#
# On a GPU a training step of a Llama-family model spends much of its device time, and most of its kernel
# launches, in small element-wise operations around the matrix products: each RMSNorm is ~6 kernels forward
# and ~12 backward, the rotary embedding ~10 per layer, the SiLU-gated MLP's activation 3; under gradient
# checkpointing the forward ones run twice. Liger-Kernel (pip: liger-kernel, Triton) has each as one fused
# kernel forward and one backward, keeping for backward what the lean norms of tensor_parallel keep (the
# input and each row's 1/rms) and, for the MLP, the two projections without the activation (its backward
# writes their gradients over them: nothing else keeps a projection's output for backward). fuse() puts them
# on the trainer's model, after checking each against the PyTorch operations on inputs of the model's own
# sizes; on CPU, without the package, or when a check fails, the PyTorch operations stay (bench/tp.py
# compares both: --fused-ops off).

FUSED_PACKAGE = ("liger_kernel", "liger-kernel")
# transformers' RMSNorm classes whose forward is weight * (x.float() * rsqrt(mean(x²) + eps)).to(x.dtype)
# (Llama's, copied into the others); Qwen3.5's (1 + weight) and gated norms are other formulas.
LLAMA_RMS_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm")
# Modeling modules whose module-level apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1) is Llama's
# rotate-half form over the whole head (Qwen3.5's rotates part of it: not here).
ROTARY_MODULES = tuple(f"transformers.models.{m}.modeling_{m}" for m in ("llama", "qwen2", "qwen3", "mistral"))
# MLP classes whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x)): with a SiLU act_fn, fused.
SILU_MLPS = ("LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP", "Qwen3NextMLP", "Qwen3_5MLP")
FUSED_OPS = ("rms_norm", "rotary", "silu_mul")
# Liger picks other RMSNorm kernels for many narrow rows (q_norm / k_norm over a step's heads x tokens): the
# check runs that many rows of a norm this narrow, as a step does.
_NARROW, _MANY_ROWS = 256, 32768

# Models whose rotary embedding runs fused (by modeling module): the module's function is given back when
# the last of them is switched off. The rotary embedding is a module-level function of transformers, so
# while one model of a process has it fused, every model of that modeling module does on CUDA tensors.
_rotary_users: dict[str, weakref.WeakSet] = {}


def _fused_sites(model) -> dict[str, list]:
    """Where ``model`` has each operation fuse() can replace: {"rms_norm": [modules], "silu_mul": [MLP
    modules], "rotary": [attention modules of ROTARY_MODULES]} (an operation the model lacks: [])."""
    sites = {op: [] for op in FUSED_OPS}
    for m in model.modules():
        name = type(m).__name__
        if name in LLAMA_RMS_NORMS and hasattr(m, "variance_epsilon"):
            sites["rms_norm"].append(m)
        if name in SILU_MLPS and _is_silu(getattr(m, "act_fn", None)):
            sites["silu_mul"].append(m)
        if type(m).__module__ in ROTARY_MODULES and name.endswith("Attention") and hasattr(m, "head_dim"):
            sites["rotary"].append(m)
    return sites


def _is_silu(fn) -> bool:
    import torch

    return isinstance(fn, torch.nn.SiLU) or type(fn).__name__ == "SiLUActivation"


def _probe_shapes(op: str, where: list) -> list[dict]:
    """The inputs the check runs ``op`` on, from the model's own modules: each distinct width and dtype of
    its norms (a narrow one over _MANY_ROWS rows), each MLP width, each attention's heads and head size."""
    shapes = []
    for m in where:
        w = next(m.parameters(), None)
        dtype = w.dtype if w is not None else None
        if op == "rms_norm":
            width = m.weight.shape[-1]
            shape = {"rows": _MANY_ROWS if width <= _NARROW else 14, "width": width, "dtype": dtype}
        elif op == "silu_mul":
            shape = {"rows": 14, "width": m.gate_proj.weight.shape[0], "dtype": dtype}
        else:
            d = m.head_dim
            heads = m.q_proj.weight.shape[0] // d
            kv = m.k_proj.weight.shape[0] // d
            shape = {"heads": heads, "kv_heads": kv, "head_dim": d, "dtype": dtype}
        if shape not in shapes:
            shapes.append(shape)
    return shapes


def _fused_probe(op: str, impl, device, generator, shape: dict):
    """Outputs and gradients of ``impl`` (the fused or the torch form of ``op``) on random inputs of
    ``shape`` (_probe_shapes) as the model makes them: q and k transposed views of a projection's output,
    cos and sin of batch 1. Raises when ``impl`` wrote into the incoming gradients."""
    import torch

    dtype = shape["dtype"]

    def rand(*size, scale=1.0):
        t = torch.randn(*size, generator=generator) * scale
        return t.to(device=device, dtype=dtype).requires_grad_()

    if op == "rms_norm":
        x, w = rand(shape["rows"], shape["width"]), rand(shape["width"], scale=0.5)
        out, inputs = [impl(x, w, 1e-6)], [x, w]
    elif op == "silu_mul":
        a, b = rand(2, shape["rows"] // 2, shape["width"]), rand(2, shape["rows"] // 2, shape["width"])
        out, inputs = [impl(a, b)], [a, b]
    else:
        d, t = shape["head_dim"], 7
        qp, kp = rand(2, t, shape["heads"] * d), rand(2, t, shape["kv_heads"] * d)
        q = qp.view(2, t, shape["heads"], d).transpose(1, 2)
        k = kp.view(2, t, shape["kv_heads"], d).transpose(1, 2)
        angle = torch.arange(float(t))[:, None] / (10000.0 ** (torch.arange(0, d, 2) / d))[None, :]
        emb = torch.cat([angle, angle], -1)[None]
        cos, sin = (f(emb).to(device=device, dtype=dtype) for f in (torch.cos, torch.sin))
        out, inputs = list(impl(q, k, cos, sin)), [qp, kp]
    upstream = [torch.randn(o.shape, generator=generator).to(device=device, dtype=o.dtype) for o in out]
    kept = [g.clone() for g in upstream]
    grads = torch.autograd.grad(out, inputs, grad_outputs=upstream)
    if not all(torch.equal(g, c) for g, c in zip(upstream, kept)):
        raise RuntimeError("its backward wrote into the incoming gradient")
    return [t.detach().float() for t in (*out, *grads)]


def _torch_ops():
    """The PyTorch form of each fused operation, as transformers computes it."""
    import torch

    def rms_norm(x, w, eps):
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def silu_mul(a, b):
        return torch.nn.functional.silu(a) * b

    def rotary(q, k, cos, sin):
        def half(x):
            return torch.cat((-x[..., x.shape[-1] // 2 :], x[..., : x.shape[-1] // 2]), -1)

        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * cos + half(q) * sin, k * cos + half(k) * sin

    return {"rms_norm": rms_norm, "silu_mul": silu_mul, "rotary": rotary}


def _liger_ops():
    """Liger-Kernel's form of each fused operation (its autograd functions), arguments by name."""
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    from liger_kernel.ops.rope import LigerRopeFunction
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    return {
        # casting "llama": 1/rms in fp32, the normalized rows cast to x's dtype, then times the weight, as
        # transformers does; not in place (its in-place backward would write into the incoming gradient,
        # which the residual branch shares).
        "rms_norm": lambda x, w, eps: LigerRMSNormFunction.apply(
            x, w, eps, offset=0.0, casting_mode="llama", in_place=False
        ),
        "silu_mul": lambda a, b: LigerSiLUMulFunction.apply(a, b),
        # q, k: [batch, heads, tokens, head_dim]; cos, sin: [batch or 1, tokens, head_dim] (unsqueeze_dim 1).
        "rotary": lambda q, k, cos, sin: LigerRopeFunction.apply(q, k, cos, sin),
    }


def fuse(model, device, tolerance: float = 0.02) -> list[str]:
    """On a GPU with Liger-Kernel installed, ``model``'s Llama-formula RMSNorms, SiLU-gated MLPs and (for
    the modeling modules of ROTARY_MODULES, on CUDA tensors) rotary embedding run as its fused kernels; each
    operation is first run fused and as PyTorch operations on inputs of the model's own sizes and dtype
    (_probe_shapes), forward and backward, and stays PyTorch when that raises, writes into the incoming
    gradient, or any output or gradient differs by more than ``tolerance`` (relative; bf16 rounding is
    ~4e-3). Returns the warnings: one per operation left to PyTorch on a GPU, or one when the package does
    not import (none on another device: the kernels are Triton). fused_report() then names the choices."""
    sites = _fused_sites(model)
    wanted = [op for op in FUSED_OPS if sites[op]]
    kind = getattr(device, "type", str(device))
    if kind != "cuda":
        _record(model, {op: f"torch (on {kind})" for op in wanted})
        return []
    try:
        fused = _liger_ops()
        version = f"{FUSED_PACKAGE[0]} {importlib.metadata.version(FUSED_PACKAGE[1])}"
    except Exception as e:  # noqa: BLE001 - not installed, or an import that fails: the PyTorch operations
        missing = isinstance(e, (ImportError, importlib.metadata.PackageNotFoundError))
        why = (
            f"install {FUSED_PACKAGE[1]}"
            if missing
            else f"{FUSED_PACKAGE[1]} failed to import: {type(e).__name__}: {e}"[:300]
        )
        _record(model, {op: f"torch ({why})" for op in wanted})
        if not wanted:
            return []
        first = f"{FUSED_PACKAGE[1]} is not installed" if missing else why
        return [
            f"{first}: {', '.join(wanted)} run as PyTorch operations, so a training step takes longer (1.21x at "
            "8B on the H200 at TP 1, bench/RESULTS.md)"
        ]
    return fuse_with(model, device, fused, version, tolerance)


def fuse_with(model, device, fused: dict, version: str, tolerance: float = 0.02) -> list[str]:
    """fuse()'s check and installation with the given implementations ({op: function}, named ``version``),
    on any device: each of ``model``'s operations whose implementation agrees with the PyTorch one on every
    probe input replaces it; the others stay, one message each."""
    import torch

    reference = _torch_ops()
    sites = _fused_sites(model)
    messages, choices = [], {}
    for op in [op for op in FUSED_OPS if sites[op]]:
        problem = None
        try:
            for shape in _probe_shapes(op, sites[op]):
                got = _fused_probe(op, fused[op], device, torch.Generator().manual_seed(0), shape)
                want = _fused_probe(op, reference[op], device, torch.Generator().manual_seed(0), shape)
                errors = [_relative_error(a, b) for a, b in zip(got, want)]
                if not all(e <= tolerance for e in errors):  # NaN fails it too
                    problem = f"differs from the PyTorch operations (relative error {max(errors):.3g} > {tolerance})"
                    break
        except Exception as e:  # noqa: BLE001 - any failure of an optional kernel means: do not use it
            problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        if problem is not None:
            choices[op] = f"torch ({version} failed on {device}: {problem})"
            messages.append(f"{op}: {version} failed on {device}: {problem}; the PyTorch operations are used")
            continue
        choices[op] = version
        _install_fused(model, op, sites[op], fused[op])
    _record(model, choices)
    return messages


def fuse_off(model) -> list[str]:
    """``model``'s fusable operations as PyTorch operations, by request (--fused-ops off): recorded for
    fused_report(); a rotary embedding this model had fused is given back to its modeling module once no
    other live model of the process uses it fused. Nothing to warn about: returns []."""
    sites = _fused_sites(model)
    _record(model, {op: "torch (--fused-ops off)" for op in FUSED_OPS if sites[op]})
    for name in sorted({type(m).__module__ for m in sites["rotary"]}):
        users = _rotary_users.get(name)
        if users is not None:
            users.discard(model)
            if not users:
                mod = sys.modules[name]
                mod.apply_rotary_pos_emb = getattr(
                    mod.apply_rotary_pos_emb, "__livetrain_torch__", mod.apply_rotary_pos_emb
                )
    return []


def _record(model, choices: dict) -> None:
    """fused_report()'s answer for ``model``: kept on the model itself (each model its own choices)."""
    model.__dict__["_livetrain_fused_ops"] = dict(choices)


def _install_fused(model, op: str, where: list, fn) -> None:
    if op == "rms_norm":
        for module in where:
            module.forward = lambda x, module=module: fn(x, module.weight, module.variance_epsilon)
    elif op == "silu_mul":
        for module in where:
            module.forward = lambda x, m=module: m.down_proj(fn(m.gate_proj(x), m.up_proj(x)))
    else:
        for name in sorted({type(m).__module__ for m in where}):
            _rotary_users.setdefault(name, weakref.WeakSet()).add(model)
            mod = sys.modules[name]
            original = getattr(mod.apply_rotary_pos_emb, "__livetrain_torch__", mod.apply_rotary_pos_emb)

            def rotary(q, k, cos, sin, *args, original=original, **kwargs):
                # The fused form takes CUDA tensors in transformers' layout (q, k [B, H, T, D], cos and sin
                # [B or 1, T, D], unsqueeze_dim 1); any other call (an engine on CPU in the same process, another
                # layout) runs the modeling module's own function.
                if (
                    q.is_cuda
                    and not args
                    and kwargs.get("unsqueeze_dim", 1) == 1
                    and set(kwargs) <= {"unsqueeze_dim"}
                    and q.dim() == 4
                    and cos.dim() == 3
                    and cos.shape[-1] == q.shape[-1]
                ):
                    return fn(q, k, cos, sin)
                return original(q, k, cos, sin, *args, **kwargs)

            rotary.__livetrain_torch__ = original
            mod.apply_rotary_pos_emb = rotary


def fused_report(model) -> dict[str, str]:
    """``{op: "liger_kernel 0.8.5" | "torch (why)"}`` for the fusable operations ``model`` has, as fuse() or
    fuse_off() decided for it ({} before either)."""
    return dict(model.__dict__.get("_livetrain_fused_ops", {}))
