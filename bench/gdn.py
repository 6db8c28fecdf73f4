"""Gated DeltaNet training speed (issue #15 item 2): tokens/s of forward + backward through a stack of
Qwen3.5-27B-shaped linear-attention layers, with the delta rule from flash-linear-attention (what
transformers calls when that package is installed) against transformers' PyTorch reference path, in one run
on the same weights and inputs, after checking that the two agree.

The layers are transformers' own (``Qwen3_5DecoderLayer`` with every layer "linear_attention", bf16, random
weights made on the device). The path is switched the way the layers see it: the modeling module's function
(``torch_chunk_gated_delta_rule``, decorated by transformers with the package's kernel) is set to the kernel
or to transformers' torch function (livetrain.kernels finds both). The short convolution runs whatever
transformers chose for both rows (causal-conv1d when installed, else torch's F.conv1d), reported above the
table. Two units per sequence length: the token mixer alone (``Qwen3_5GatedDeltaNet``: projections,
convolution, delta rule, gated norm, output projection) and the whole decoder layer (the mixer plus two
RMSNorms and the MLP, the same work on both paths). Gradients flow to the inputs and every weight, as in
training; no gradient checkpointing. Agreement: the relative L2 error of the output and of the input's
gradient, fused path against torch path, on the first sequence length (bf16: <= 2e-2 expected).

usage: python bench/gdn.py [--shape 27b|tiny] [--device cuda|cpu] [--layers 4] [--tokens 2048,8192]
                           [--reps 3] [--json out.json]
Prints a markdown table; with $OUT set also writes $OUT/gdn.md and $OUT/gdn.json. Exits 1 when the paths
disagree.
"""

import argparse
import contextlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import serve  # noqa: E402  (bench/serve.py, beside this file: the Qwen3.5 shapes, written once)

from livetrain import kernels  # noqa: E402

# Qwen/Qwen3.5-27B's text config (its linear-attention layers and MLP are what this builds); "tiny", the same
# layer kinds at toy sizes, runs anywhere, for tests.
SHAPES = {"27b": serve.SHAPES["qwen3.5-27b"], "tiny": serve.SHAPES["qwen3.5-tiny"]}
RULE = "chunk_gated_delta_rule"  # what training calls (the recurrent one is for one-token decoding)
TOLERANCE = 2e-2
GiB = 2**30


def log(msg: str) -> None:
    print(f"[gdn bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_layers(shape: str, layers: int, device: torch.device) -> torch.nn.ModuleList:
    import transformers
    from transformers.models.qwen3_5 import modeling_qwen3_5

    fields = {k: v for k, v in SHAPES[shape].items() if k not in ("model_type", "num_hidden_layers")}
    config = transformers.Qwen3_5TextConfig(
        **fields, num_hidden_layers=layers, layer_types=["linear_attention"] * layers
    )
    torch.manual_seed(0)
    with torch.device(device):
        stack = torch.nn.ModuleList(modeling_qwen3_5.Qwen3_5DecoderLayer(config, i) for i in range(layers))
    return stack.to(torch.bfloat16).train()


@contextlib.contextmanager
def rule(stack, path: str):
    """The layers call the package's kernel ("fused") or transformers' torch function ("torch")."""
    f = kernels.kernel_functions(stack)[RULE]
    wrapper = getattr(f["module"], f["attribute"])
    setattr(f["module"], f["attribute"], wrapper if path == "fused" else f["fallback"])
    try:
        yield
    finally:
        setattr(f["module"], f["attribute"], wrapper)


def run(stack, unit: str, x: torch.Tensor, gy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward + backward through the stack; (output, the input's gradient)."""
    x = x.detach().requires_grad_(True)
    h = x
    for layer in stack:
        h = layer.linear_attn(hidden_states=h) if unit == "mixer" else layer(h, position_embeddings=None)
    h.backward(gy)
    for p in stack.parameters():
        p.grad = None
    return h.detach(), x.grad


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(stack, unit: str, x, gy, reps: int) -> dict:
    device = x.device
    run(stack, unit, x, gy)  # warm-up: Triton compiles and autotunes its kernels on the first call per shape
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        run(stack, unit, x, gy)
        sync(device)
        times.append(time.perf_counter() - t)
    best = min(times)
    peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None
    return {"seconds": times, "best_s": best, "tokens_per_s": x.shape[1] / best, "peak_extra_bytes": peak}


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def render(r: dict) -> str:
    lines = [
        f"{r['device_name']}; torch {r['torch']}, transformers {r['transformers']}; {r['shape']}-shaped Qwen3.5 "
        f"linear-attention layers (hidden {r['hidden_size']}, {r['value_heads']} value / {r['key_heads']} key "
        f"heads of {r['head_dim']}), {r['layers']} layers, bf16, batch 1; best of {r['reps']} after a warm-up",
        "",
        "kernels transformers chose: " + ", ".join(f"{k} = {v}" for k, v in r["kernels"].items()),
        "",
        "| tokens | unit | delta rule | fwd+bwd ms | tokens/s | × torch path | peak extra GiB | rel. error vs torch |",
        "|---:|---|---|---:|---:|---:|---:|---|",
    ]
    for row in r["rows"]:
        for path in ("fused", "torch"):
            m = row.get(path)
            name = r["fused_name"] if path == "fused" else "torch (transformers' reference)"
            if m is None:
                lines.append(f"| {row['tokens']} | {row['unit']} | {name} | - | - | - | - | {row.get('skipped', '')} |")
                continue
            speed = f"{m['tokens_per_s'] / row['torch']['tokens_per_s']:.2f}x" if "torch" in row else "-"
            peak = "-" if m["peak_extra_bytes"] is None else f"{m['peak_extra_bytes'] / GiB:.2f}"
            err = "-"
            if path == "fused" and "error" in row:
                err = f"out {row['error']['output']:.1e}, grad {row['error']['grad']:.1e}"
            lines.append(
                f"| {row['tokens']} | {row['unit']} | {name} | {1e3 * m['best_s']:.1f} | {m['tokens_per_s']:.0f} | "
                f"{speed} | {peak} | {err} |"
            )
    for row in r["rows"]:
        if "fused" in row and "torch" in row and row["unit"] == "mixer":
            ratio = row["fused"]["tokens_per_s"] / row["torch"]["tokens_per_s"]
            lines.append(
                f"\n{row['tokens']} tokens: the Gated DeltaNet mixer trains at {ratio:.1f}x the torch path's tokens/s "
                f"(target >= 5x: {'met' if ratio >= 5 else 'not met'})."
            )
    if r.get("mismatch"):
        lines.append(f"\nMISMATCH: {r['mismatch']}")
    lines.append(f"\nTotal run time {r['seconds']:.0f} s.")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="27b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--layers", type=int, default=4, help="linear-attention layers in the stack")
    ap.add_argument("--tokens", default="2048,8192", help="comma-separated sequence lengths")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions after one warm-up")
    ap.add_argument("--units", default="mixer,layer", help="mixer (GatedDeltaNet alone), layer (decoder layer)")
    ap.add_argument("--json", help="also write the numbers here")
    a = ap.parse_args()
    import transformers

    t_start = time.monotonic()
    device = torch.device(a.device)
    lengths = [int(t) for t in a.tokens.split(",")]
    units = a.units.split(",")
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device (use --device cpu --shape tiny)")
    stack = build_layers(a.shape, a.layers, device)
    # The trainer's start-up check: a kernel that fails or disagrees on this GPU is not used (the report
    # then says why, and the rows measure the torch path alone).
    for message in kernels.verify(stack, device, backward=True) if device.type == "cuda" else []:
        log(f"warning: {message}")
    report = kernels.report(stack)
    f = kernels.kernel_functions(stack)[RULE]
    fused = f["implementation"] is not f["fallback"]
    shape = SHAPES[a.shape]
    r = {
        "shape": a.shape,
        "layers": a.layers,
        "reps": a.reps,
        "hidden_size": shape["hidden_size"],
        "value_heads": shape["linear_num_value_heads"],
        "key_heads": shape["linear_num_key_heads"],
        "head_dim": shape["linear_key_head_dim"],
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "kernels": report,
        "fused_name": report[RULE] if fused else f"fused: not used, {report[RULE]}",
        "rows": [],
    }
    log(f"{a.layers} layers on {r['device_name']}; {RULE}: {report[RULE]}")
    g = torch.Generator(device=device).manual_seed(1)
    for i, tokens in enumerate(lengths):
        x = torch.randn(1, tokens, shape["hidden_size"], generator=g, device=device, dtype=torch.bfloat16)
        gy = torch.randn(x.shape, generator=g, device=device, dtype=torch.bfloat16) * 1e-2
        for unit in units:
            row = {"tokens": tokens, "unit": unit}
            r["rows"].append(row)
            with rule(stack, "torch"):
                row["torch"] = timed(stack, unit, x, gy, a.reps)
                reference = run(stack, unit, x, gy) if fused and i == 0 else None
            log(f"{tokens} tokens, {unit}: torch path {row['torch']['tokens_per_s']:.0f} tokens/s")
            if not fused:
                row["skipped"] = report[RULE]
                continue
            with rule(stack, "fused"):
                if reference is not None:
                    out, grad = run(stack, unit, x, gy)
                    row["error"] = {"output": rel_error(out, reference[0]), "grad": rel_error(grad, reference[1])}
                    worst = max(row["error"].values())
                    if not worst <= TOLERANCE:
                        r["mismatch"] = f"{tokens} tokens, {unit}: relative error {worst:.2e} > {TOLERANCE}"
                row["fused"] = timed(stack, unit, x, gy, a.reps)
            log(
                f"{tokens} tokens, {unit}: fused {row['fused']['tokens_per_s']:.0f} tokens/s "
                f"({row['fused']['tokens_per_s'] / row['torch']['tokens_per_s']:.1f}x)"
            )
    r["seconds"] = time.monotonic() - t_start
    table = render(r)
    print(table)
    outputs = [(a.json, json.dumps(r, indent=2))] if a.json else []
    if os.environ.get("OUT"):
        os.makedirs(os.environ["OUT"], exist_ok=True)
        outputs += [(os.path.join(os.environ["OUT"], "gdn.json"), json.dumps(r, indent=2))]
        outputs += [(os.path.join(os.environ["OUT"], "gdn.md"), table)]
    for path, text in outputs:
        with open(path, "w") as fh:
            fh.write(text + "\n")
    return 1 if r.get("mismatch") else 0


if __name__ == "__main__":
    sys.exit(main())
