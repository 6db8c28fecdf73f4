"""Optimizer step time and memory on Llama-shaped matrix sets (GPU), in one run:

  livetrain APOLLO-Mini and APOLLO (rank 256) | the same algorithm in plain PyTorch ops, structured like the
  official apollo-torch code | torch.optim.AdamW(fused=True) | the HBM floor of 8 bytes per parameter

All parameters and gradients are bf16 (the serving dtype). The floor uses the device-to-device copy
bandwidth measured in the same run. Prints a table; --json FILE also writes the numbers.

usage: python bench/optim.py [--sizes 1b,8b] [--steps 10] [--json out.json]
"""

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
from livetrain.optim import Apollo, ApolloMini  # noqa: E402

# (hidden, intermediate, layers, kv_dim, vocab): Llama-3.2-1B and Llama-3.1-8B.
SIZES = {"1b": (2048, 8192, 16, 512, 128256), "8b": (4096, 14336, 32, 1024, 128256)}


def shapes(size: str, embeddings: bool):
    h, inter, layers, kv, vocab = SIZES[size]
    per_layer = [(h, h), (kv, h), (kv, h), (h, h), (inter, h), (inter, h), (h, inter)]
    out = per_layer * layers
    if embeddings:
        out = [(vocab, h)] + out + [(vocab, h)]
    return out


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (median of 20)."""
    n = 2 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    a.random_(0, 255)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * n / sorted(times)[len(times) // 2]


class OfficialStyleApolloMini:
    """APOLLO-Mini exactly as the official code structures it: a stored projection, one torch op per
    line, the limiter's Python max() on a tensor (a host sync per parameter)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, rank=1, scale=128.0, gap=200):
        self.params, self.lr, self.betas, self.eps, self.rank, self.scale, self.gap = (
            params,
            lr,
            betas,
            eps,
            rank,
            scale,
            gap,
        )
        self.state = {}

    @torch.no_grad()
    def step(self):
        b1, b2 = self.betas
        for i, p in enumerate(self.params):
            g = p.grad
            st = self.state.setdefault(i, {"step": 0, "seed": i + 1})
            tall = g.shape[0] >= g.shape[1]
            if "P" not in st or st["step"] % self.gap == 0:
                gen = torch.Generator(device=g.device).manual_seed(st["seed"])
                shape = (self.rank, g.shape[1]) if tall else (g.shape[0], self.rank)
                st["P"] = torch.randn(shape, generator=gen, device=g.device, dtype=g.dtype) / math.sqrt(self.rank)
                st["seed"] += 1
            R = g @ st["P"].t() if tall else st["P"].t() @ g
            if "M" not in st:
                st["M"], st["V"] = torch.zeros_like(R), torch.zeros_like(R)
            st["step"] += 1
            st["M"].mul_(b1).add_(R, alpha=1 - b1)
            st["V"].mul_(b2).addcmul_(R, R, value=1 - b2)
            denom = st["V"].sqrt().add_(self.eps)
            step = self.lr * math.sqrt(1 - b2 ** st["step"]) / (1 - b1 ** st["step"])
            norm_grad = st["M"] / denom
            factor = torch.norm(norm_grad) / (torch.norm(R) + 1e-8)
            scaled = p.grad * factor
            if "prev" in st:
                n = torch.norm(scaled)
                lim = max(n / (st["prev"] + 1e-8), 1.01) / 1.01
                scaled = scaled / lim
                st["prev"] = n / lim
            else:
                st["prev"] = torch.norm(scaled)
            scaled *= math.sqrt(self.scale)
            p.add_(scaled, alpha=-step)


def state_bytes(opt) -> int:
    total = 0
    states = opt.state.values() if hasattr(opt.state, "values") else []
    for st in states:
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.device.type == "cuda":
                total += v.numel() * v.element_size()
    return total


def time_steps(opt, steps: int) -> float:
    for _ in range(2):  # warm-up: state allocation, first projection, module load
        opt.step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        opt.step()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return sorted(times)[len(times) // 2]


def run(size: str, steps: int, bw: float, methods: list[str]) -> list[dict]:
    torch.manual_seed(0)
    params = []
    for r, c in shapes(size, embeddings=False):
        p = torch.nn.Parameter((torch.randn(r, c, device="cuda") * 0.02).to(torch.bfloat16))
        p.grad = (torch.randn(r, c, device="cuda") * 1e-3).to(torch.bfloat16)
        params.append(p)
    n = sum(p.numel() for p in params)
    floor_ms = 8 * n / bw * 1e3
    rows = []
    for method in methods:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        if method == "livetrain APOLLO-Mini":
            opt = ApolloMini(params, lr=1e-3)
        elif method == "livetrain APOLLO r256":
            opt = Apollo(params, lr=1e-3, rank=256)
        elif method == "PyTorch APOLLO-Mini (official style)":
            opt = OfficialStyleApolloMini(params, lr=1e-3)
        elif method == "torch AdamW fused":
            opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
        else:
            raise ValueError(method)
        t0 = time.time()
        ms = time_steps(opt, steps)
        st = state_bytes(opt)
        peak = torch.cuda.max_memory_allocated() - base
        rows.append(
            {
                "size": size,
                "params": n,
                "method": method,
                "step_ms": ms,
                "floor_ms": floor_ms,
                "x_floor": ms / floor_ms,
                "state_bytes": st,
                "peak_extra_bytes": peak,
                "wall_s": time.time() - t0,
            }
        )
        print(f"  {size} {method}: {ms:.2f} ms", flush=True)
        del opt
        torch.cuda.empty_cache()
    adamw_state = next((r["state_bytes"] for r in rows if r["method"] == "torch AdamW fused"), None)
    for r in rows:
        r["state_vs_adamw"] = r["state_bytes"] / adamw_state if adamw_state else None
    return rows


def profile(size: str) -> None:
    """GPU time per kernel of one APOLLO-Mini step, to see which stage is off its floor."""
    params = []
    for r, c in shapes(size, embeddings=False):
        p = torch.nn.Parameter((torch.randn(r, c, device="cuda") * 0.02).to(torch.bfloat16))
        p.grad = (torch.randn(r, c, device="cuda") * 1e-3).to(torch.bfloat16)
        params.append(p)
    opt = ApolloMini(params, lr=1e-3)
    for _ in range(3):
        opt.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        opt.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1b,8b")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--json")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also print the GPU time per kernel of one livetrain APOLLO-Mini step (torch.profiler)",
    )
    ap.add_argument(
        "--methods",
        default="livetrain APOLLO-Mini,livetrain APOLLO r256,PyTorch APOLLO-Mini (official style),torch AdamW fused",
    )
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/optim.py needs a CUDA GPU")
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {bw / 1e12:.2f} TB/s (read + write)")
    rows = []
    for size in a.sizes.split(","):
        rows += run(size, a.steps, bw, a.methods.split(","))
        if a.profile:
            profile(size)
    print()
    print("| set | params | method | step ms | floor ms | × floor | state MiB | state / AdamW | peak extra MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['state_vs_adamw']:.4f}" if r["state_vs_adamw"] is not None else "-"
        print(
            f"| {r['size']} | {r['params'] / 1e9:.2f}B | {r['method']} | {r['step_ms']:.2f} | {r['floor_ms']:.2f} | "
            f"{r['x_floor']:.2f} | {r['state_bytes'] / 2**20:.1f} | {ratio} | {r['peak_extra_bytes'] / 2**20:.0f} |"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_bandwidth": bw, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
