"""Optimizer step time and memory on Llama-shaped matrix sets (GPU), in one run:

  livetrain APOLLO-Mini and APOLLO (rank 256) | the same algorithm in plain PyTorch ops, structured like the
  official apollo-torch code | torch.optim.AdamW(fused=True) | the HBM floor of 8 bytes per parameter

All parameters and gradients are bf16 (the serving dtype). The floor uses the device-to-device copy
bandwidth measured in the same run. Prints a table; --json FILE also writes the numbers.

--sweep instead times livetrain's APOLLO-Mini step under a grid of launch settings (the internal tuning
knobs, docs/tuning.md) on the 8B and 27B matrix sets ("27b": Qwen3.5-27B's text model), one table per set,
each row against the floor of the same run and against the H100-tuned shapes that shipped before, every
setting checked against those on a smaller set of the same shapes (bit-identical, or the relative
difference of the weights' change), then the settings that won combined, and the one-by-one path the
trainer's backward hooks take (with the host time it spends per matrix), including the one-kernel step.

--probe instead asks what bounds the update stage (6 bytes per parameter: read G and W, write W): per set, the
update kernels' GPU time per step (torch.profiler) under variants of the update (the apollo.update_* knobs,
docs/tuning.md), as bandwidth against the copy bandwidth of the same run: a 2-read-1-write probe with the
update's exact access pattern and no math (its ceiling), torch's w.add_(g) over the same matrices (the same
bytes through torch's elementwise kernel), nearest rounding (no Philox: the cost of the random bits), fewer
Philox rounds, loads in flight, block sizes, the generic kernel against APOLLO-Mini's. Every variant's weights
are checked against the shipped step on a smaller set of the same shapes: bit-identical, or labelled as
differing by design where the variant rounds otherwise (nearest, Philox4x32-7).

--full instead times the step over EVERY trained parameter of a model (bench/serve.py's shapes: 8b = Qwen3-8B,
qwen3.5-27b), grouped as the trainer groups them (matrices, embedding and lm_head on APOLLO-Mini; norms, biases,
conv1d weights, A_log in fp32, dt_bias on AdamW), each with a gradient of its own, against the floor of 8 bytes per
parameter at the copy bandwidth of the same run: the shipped step, the step as it was before (the full rounding
path, the AdamW tensors one at a time), each change alone, each part alone, and the trainer's own path: its
backward hooks played in backward order, one parameter at a time (step_param) and batched by bytes of waiting
gradients (the trainer's default, --step-batch-mib auto, and other sizes), with the host time of each call.
--families picks rows. Weights and gradients of qwen3.5-27b take ~108 GB.

usage: python bench/optim.py [--sizes 1b,8b] [--steps 10] [--json out.json]
       python bench/optim.py --sweep [--sizes 8b,27b] [--steps 5] [--json out.json]
       python bench/optim.py --probe [--sizes 8b,27b] [--steps 5] [--rows LABEL|LABEL] [--json out.json]
       python bench/optim.py --full [--shapes 8b,qwen3.5-27b] [--steps 5] [--device cuda|cpu] [--families F,..]
                             [--json out.json]
"""

import argparse
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
sys.path.insert(0, HERE)  # result_json and serve beside this file, also when it is loaded as a module
from result_json import write_result  # noqa: E402  (bench/result_json.py, beside this file)

from livetrain.optim import Apollo, ApolloMini  # noqa: E402

# (hidden, intermediate, layers, kv_dim, vocab): Llama-3.2-1B and Llama-3.1-8B.
SIZES = {"1b": (2048, 8192, 16, 512, 128256), "8b": (4096, 14336, 32, 1024, 128256)}


def qwen35_27b_shapes(embeddings: bool):
    """The 2-D weights of Qwen3.5-27B's text model (bench/serve.py's "qwen3.5-27b" shape), in model order
    (APOLLO's matrices): every 4th layer full attention (query with its output gate, keys, values, output), the
    others Gated DeltaNet (in_proj_qkv, in_proj_z, in_proj_b, in_proj_a, out_proj), each with its MLP."""
    import serve  # bench/serve.py, beside this file: the model shapes, written once

    c = serve.SHAPES["qwen3.5-27b"]
    h, hd, ld = c["hidden_size"], c["head_dim"], c["linear_key_head_dim"]
    heads, kv, interval = c["num_attention_heads"], c["num_key_value_heads"], c["full_attention_interval"]
    k_heads, v_heads, vd = c["linear_num_key_heads"], c["linear_num_value_heads"], c["linear_value_head_dim"]
    inter, vocab = c["intermediate_size"], c["vocab_size"]
    out = [(vocab, h)] if embeddings else []
    for layer in range(c["num_hidden_layers"]):
        if layer % interval == interval - 1:  # full attention
            out += [(2 * heads * hd, h), (kv * hd, h), (kv * hd, h), (h, heads * hd)]
        else:  # Gated DeltaNet
            out += [
                (2 * k_heads * ld + v_heads * vd, h),
                (v_heads * vd, h),
                (v_heads, h),
                (v_heads, h),
                (h, v_heads * vd),
            ]
        out += [(inter, h), (inter, h), (h, inter)]
    if embeddings:
        out.append((vocab, h))
    return out


def shapes(size: str, embeddings: bool):
    if size == "27b":
        return qwen35_27b_shapes(embeddings)
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


def time_steps(step, steps: int) -> float:
    """Median GPU time of ``step()`` (an optimizer's step, or a loop of per-matrix steps; bench/loss.py's losses
    too) in ms, between CUDA events, after two warm-up calls."""
    for _ in range(2):  # warm-up: state allocation, first projection, module load
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        step()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return sorted(times)[len(times) // 2]


def run(size: str, steps: int, bw: float, methods: list[str], embeddings: bool = False) -> list[dict]:
    torch.manual_seed(0)
    params = []
    for r, c in shapes(size, embeddings=embeddings):
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
        ms = time_steps(opt.step, steps)
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
        t0 = time.perf_counter()
        opt.step()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if kernels:
        busy_ms = sum(e.time_range.elapsed_us() for e in kernels) / 1e3
        span_ms = (max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)) / 1e3
        print(
            f"profile {size}: {len(kernels)} kernels, GPU busy {busy_ms:.2f} ms over a span of {span_ms:.2f} ms "
            "(first kernel start to last kernel end: the rest is the GPU waiting for launches), step wall "
            f"{wall_ms:.2f} ms under the profiler"
        )
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


# ---- --sweep: the APOLLO-Mini step under launch settings (internal tuning knobs) ----
# (family, label, knobs); the first is the reference the others are compared with (the H100-tuned shapes
# that shipped before the first H200 sweep), the second the shipped defaults. A family's best setting
# joins the combination measured at the end. Only what the first H200 sweep left undecided is here
# (docs/tuning.md has its numbers); the one-matrix-at-a-time rows follow.
H100_SHAPES = {"apollo.split_projection": 0, "apollo.tall_loads": 4, "apollo.wide_loads": 4}
SWEEP_GRID = [
    ("before", "H100-tuned shapes (the defaults before)", H100_SHAPES),
    ("shipped", "shipped defaults", {}),
    ("tall", "tall rows 1, loads 4", {"apollo.tall_rows": 1, "apollo.tall_loads": 4}),
    ("update", "update 256 threads (the default before)", {"apollo.update_threads": 256}),
    ("update", "update 8 blocks/SM", {"apollo.update_blocks_per_sm": 8}),
    ("launch", "2 streams", {"apollo.streams": 2}),
]
# The path the trainer's backward hooks take: one launch sequence (or one kernel) per matrix.
# (label, knobs, MiB of gradients per batched step of attach_hooks(batch_bytes=...); 0: one at a time)
HOOK_GRID = [
    ("H100-tuned shapes, one matrix at a time", H100_SHAPES, 0),
    ("shipped, one matrix at a time", {}, 0),
    ("one kernel per matrix (fused step), one at a time", {"apollo.fused_step": 1}, 0),
    ("hooks batched by 256 MiB of gradients", {}, 256),
    ("hooks batched by 1 GiB of gradients", {}, 1024),
]


def set_knobs(knobs: dict) -> None:
    from livetrain import _core

    _core.tuning_reset()
    for name, value in knobs.items():
        _core.tuning_set(name, value)


def knob_text(knobs: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(knobs.items())) or "-"


def make_params(shape_list, seed: int):
    torch.manual_seed(seed)
    params = []
    for r, c in shape_list:
        p = torch.nn.Parameter((torch.randn(r, c, device="cuda") * 0.02).to(torch.bfloat16))
        p.grad = (torch.randn(r, c, device="cuda") * 1e-3).to(torch.bfloat16)
        params.append(p)
    return params


class SweepCheck:
    """A few matrices of the set's shapes (one of each kind, capped in size), stepped twice from the same
    start under each setting; compared with the shipped setting's result."""

    def __init__(self, shape_list):
        picked, seen = [], set()
        for r, c in shape_list:
            kind = (r >= c, c % 8 == 0, min(r, c) < 64)
            if kind not in seen and r * c <= 120_000_000:
                seen.add(kind)
                picked.append((r, c))
        self.params = make_params(picked, seed=1)
        self.w0 = [p.detach().clone() for p in self.params]
        self.reference = None

    def run(self, one_by_one: bool = False, **opt_kwargs):
        for p, w in zip(self.params, self.w0):
            p.data.copy_(w)
        opt = ApolloMini(self.params, lr=1e-3, seed=3, **opt_kwargs)
        for _ in range(2):
            if one_by_one:
                for p in self.params:
                    opt.step_param(p)
            else:
                opt.step()
        torch.cuda.synchronize()
        out = [p.detach().clone() for p in self.params]
        del opt
        return out

    def compare(self, result, by_design: bool | None = None) -> str:
        """The check column: "bit-identical", or the relative difference of the weights' change. by_design None
        (the sweep: summation orders differ): FAILED from 1e-2 on; False: FAILED unless bit-identical; True (other
        rounding bits by design): labelled so, never FAILED (two steps' rounding noise is of the change's size)."""
        if self.reference is None:
            self.reference = result
            return "reference"
        if all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(result, self.reference)):
            return "bit-identical"
        num = den = 0.0
        for a, b, w in zip(result, self.reference, self.w0):
            da, db = (a.float() - w.float()), (b.float() - w.float())
            num += float(((da - db) ** 2).sum())
            den += float((db**2).sum())
        rel = math.sqrt(num / den) if den else float("inf")
        if by_design:
            return f"differs (other rounding bits, by design): rel. diff {rel:.1e}"
        if by_design is False:
            return f"rel. diff {rel:.1e} FAILED (must be bit-identical)"
        return f"rel. diff {rel:.1e}" + (" FAILED" if not rel < 1e-2 else "")


def sweep_set(size: str, steps: int, bw: float, embeddings: bool, on_row=lambda rows: None) -> list[dict]:
    """The sweep on one matrix set; on_row(rows so far) after each setting (the caller saves them, so a run
    cut short keeps what it measured)."""
    shape_list = shapes(size, embeddings)
    params = make_params(shape_list, seed=0)
    n = sum(p.numel() for p in params)
    floor_ms = 8 * n / bw * 1e3
    check = SweepCheck(shape_list)
    print(
        f"\n== sweep {size}: {len(params)} matrices, {n / 1e9:.2f}B parameters, floor {floor_ms:.2f} ms "
        f"(embeddings {'in' if embeddings else 'out'})",
        flush=True,
    )
    rows = []

    def measure(family: str, label: str, knobs: dict, one_by_one: bool = False, hook_batch_mib: int = 0) -> dict:
        row = {"size": size, "params": n, "family": family, "setting": label, "knobs": knobs, "floor_ms": floor_ms}
        grads = [p.grad for p in params]  # batched hooks free them: put back after the row
        try:
            set_knobs(knobs)
            row["check"] = check.compare(check.run(one_by_one))
            opt = ApolloMini(params, lr=1e-3)
            host = []

            def hooks_batched():
                # What attach_hooks(batch_bytes=...) does as gradients arrive, in model order (no hooks
                # are registered: the loop plays them; it puts back the gradients a step frees).
                t0 = time.perf_counter()
                for p, g in zip(params, grads):
                    p.grad = g
                    opt.step_ready(p)
                opt.flush_ready()
                host.append(time.perf_counter() - t0)

            def hooks_one_by_one():  # what the backward hooks do: one launch sequence per matrix
                t0 = time.perf_counter()
                for p in params:
                    opt.step_param(p)
                host.append(time.perf_counter() - t0)

            if one_by_one:  # both kinds of one-at-a-time rows: hooks batched by bytes, or none
                if hook_batch_mib:
                    opt.attach_hooks(params=[], batch_bytes=hook_batch_mib << 20)
                ms = time_steps(hooks_batched if hook_batch_mib else hooks_one_by_one, steps)
                # Host time to issue one matrix's step (Python + binding + launches): when it exceeds the
                # GPU time of the small matrices, the GPU waits for the host.
                row["host_us_per_matrix"] = sorted(host)[len(host) // 2] / len(params) * 1e6
            else:
                ms = time_steps(opt.step, steps)
            row.update(step_ms=ms, x_floor=ms / floor_ms)
            opt = None  # its state goes before empty_cache below
        except Exception as e:  # a failing setting is reported and the sweep goes on
            row.update(step_ms=None, x_floor=None, error=f"{type(e).__name__}: {e}"[:200])
        finally:
            for p, g in zip(params, grads):
                p.grad = g
            torch.cuda.empty_cache()
        shown = f"{row['step_ms']:.2f} ms ({row['x_floor']:.2f}x floor)" if row.get("step_ms") else row.get("error")
        if row.get("host_us_per_matrix"):
            shown += f", host {row['host_us_per_matrix']:.1f} us per matrix"
        print(f"  {size} {label}: {shown}; {row.get('check', '-')}", flush=True)
        rows.append(row)
        on_row(rows)
        return row

    for family, label, knobs in SWEEP_GRID:
        measure(family, label, knobs)
    shipped = rows[1]["step_ms"] or float("inf")
    best = {}
    for r in rows[2:]:
        ok = r.get("step_ms") and "FAILED" not in r.get("check", "")
        if (
            ok
            and r["step_ms"] < 0.99 * shipped
            and (r["family"] not in best or r["step_ms"] < best[r["family"]]["step_ms"])
        ):
            best[r["family"]] = r
    combined = {}
    for r in best.values():
        combined.update(r["knobs"])
    if len(best) > 1:
        measure("combined", "best of each family combined", combined)
    for label, knobs, mib in HOOK_GRID:
        measure("hooks", label, knobs, one_by_one=True, hook_batch_mib=mib)
    if combined:
        measure("hooks", "combined, one matrix at a time", combined, one_by_one=True)
    set_knobs({})
    params.clear()  # the matrices and the check's copies go before empty_cache (measure holds both names)
    check = None
    torch.cuda.empty_cache()
    return rows


def print_sweep(rows: list[dict]) -> None:
    for size in dict.fromkeys(r["size"] for r in rows):
        mine = [r for r in rows if r["size"] == size]
        before = mine[0].get("step_ms")
        print(
            f"\n### APOLLO-Mini step, {size} ({mine[0]['params'] / 1e9:.2f}B parameters), floor {mine[0]['floor_ms']:.2f} ms\n"
        )
        print("| setting | knobs | step ms | × floor | vs H100-tuned | host µs / matrix | check |")
        print("|---|---|---:|---:|---:|---:|---|")
        for r in mine:
            host = f"{r['host_us_per_matrix']:.1f}" if r.get("host_us_per_matrix") else "-"
            if r.get("step_ms"):
                vs = f"{before / r['step_ms']:.2f}x" if before else "-"
                print(
                    f"| {r['setting']} | {knob_text(r['knobs'])} | {r['step_ms']:.2f} | {r['x_floor']:.2f} | {vs} | {host} | "
                    f"{r.get('check', '-')} |"
                )
            else:
                print(f"| {r['setting']} | {knob_text(r['knobs'])} | - | - | - | - | {r.get('error', 'failed')} |")
        good = [r for r in mine if r.get("step_ms") and r["family"] != "hooks" and "FAILED" not in r.get("check", "")]
        if good:
            b = min(good, key=lambda r: r["step_ms"])
            shipped = next((r for r in mine if r["family"] == "shipped"), mine[0])
            print(
                f"\nbest ({size}): {b['setting']} [{knob_text(b['knobs'])}]: {b['step_ms']:.2f} ms = {b['x_floor']:.2f}x floor "
                f"(shipped {shipped.get('x_floor') or float('nan'):.2f}x; target <= 1.3x)"
            )
        hooks = [r for r in mine if r.get("step_ms") and r["family"] == "hooks"]
        if hooks:
            b = min(hooks, key=lambda r: r["step_ms"])
            print(
                f"best one matrix at a time ({size}): {b['setting']}: {b['step_ms']:.2f} ms = {b['x_floor']:.2f}x floor"
            )


# ---- --probe: what bounds the update stage ----
# (family, label, knobs, ApolloMini keyword arguments). "shipped" first: the reference of every check. Rows
# that round otherwise by design (nearest rounding, Philox4x32-7) are labelled so in the check column
# (differs_by_design); any other row must be bit-identical.
PROBE_GRID = [
    ("shipped", "shipped update (APOLLO-Mini's kernel, its short rounding path, 128 threads per block)", {}, {}),
    ("before", "full rounding path (shipped before)", {"apollo.update_fast_round": 0}, {}),
    ("before", "generic kernel, 256 threads per block (shipped before that)", {"apollo.update_mini": 0, "apollo.update_threads": 256}, {}),
    ("probe", "2-read-1-write probe: W += G bitwise, the update's loads and stores", {"apollo.update_probe": 1}, {}),
    ("probe", "probe at 4 blocks/SM (32 warps: the generic update's occupancy at 256 threads)", {"apollo.update_probe": 1, "apollo.update_resident": 4, "apollo.update_threads": 256}, {}),
    ("probe", "torch w.add_(g) over the same matrices (torch's elementwise kernel)", None, {}),
    ("rng", "nearest rounding (no Philox; the generic kernel)", {}, {"rounding": "nearest"}),
    ("rng", "Philox4x32-7 (other rounding bits)", {"apollo.update_rounds": 7}, {}),
    ("flight", "loads before the rounding bits", {"apollo.update_loads_first": 1}, {}),
    ("block", "Mini's kernel, 256 threads per block", {"apollo.update_threads": 256}, {}),
    ("block", "generic kernel, 128 threads per block", {"apollo.update_mini": 0}, {}),
    ("block", "at most 4 blocks/SM resident", {"apollo.update_resident": 4}, {}),
    ("mini", "full rounding path, loads first", {"apollo.update_fast_round": 0, "apollo.update_loads_first": 1}, {}),
    ("mini", "full rounding path, Philox4x32-7", {"apollo.update_fast_round": 0, "apollo.update_rounds": 7}, {}),
    ("mini", "Philox4x32-7, loads first", {"apollo.update_rounds": 7, "apollo.update_loads_first": 1}, {}),
    ("shipped", "shipped update (again: drift within the run)", {}, {}),
]  # fmt: skip


def differs_by_design(knobs: dict, kwargs: dict) -> bool:
    """A probe row whose rounding bits differ from the shipped step's by design: nearest rounding, 7 rounds."""
    return kwargs.get("rounding") == "nearest" or knobs.get("apollo.update_rounds") == 7


def kernel_ms(fn, steps: int) -> dict:
    """GPU time per call of fn() by kernel kind, from torch.profiler: the update, the projection, everything."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    out = {"update": 0.0, "project": 0.0, "all": 0.0}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = e.time_range.elapsed_us()
        out["all"] += us
        if "update_many" in e.name or "update_kernel" in e.name:  # update_many_kernel, update_kernel
            out["update"] += us
        elif "project_" in e.name:
            out["project"] += us
    return {k: v / 1e3 / steps for k, v in out.items()}


def probe_set(size: str, steps: int, bw: float, labels, on_row=lambda rows: None) -> list[dict]:
    shape_list = shapes(size, False)
    params = make_params(shape_list, seed=0)
    n = sum(p.numel() for p in params)
    check = SweepCheck(shape_list)
    print(f"\n== probe {size}: {len(params)} matrices, {n / 1e9:.2f}B parameters, update floor "
          f"{6 * n / bw * 1e3:.2f} ms (6 bytes per parameter at the copy bandwidth)", flush=True)  # fmt: skip
    rows = []
    for family, label, knobs, kwargs in PROBE_GRID:
        if labels and label not in labels and family != "shipped":
            continue
        row = {"size": size, "params": n, "family": family, "setting": label, "knobs": knobs, "opt": kwargs}
        try:
            if knobs is None:  # torch's elementwise add over the same bytes
                set_knobs({})
                row["check"] = "not a step"

                def add():
                    for p in params:
                        p.data.add_(p.grad)

                k = kernel_ms(add, steps)
                row.update(step_ms=time_steps(add, steps), update_ms=k["all"], project_ms=None)
            else:
                set_knobs(knobs)
                probe = knobs.get("apollo.update_probe") == 1
                row["check"] = (
                    "not a step" if probe else check.compare(check.run(**kwargs), differs_by_design(knobs, kwargs))
                )
                opt = ApolloMini(params, lr=1e-3, **kwargs)
                k = kernel_ms(opt.step, steps)
                row.update(step_ms=time_steps(opt.step, steps), update_ms=k["update"], project_ms=k["project"])
                opt = None
            row["update_tbs"] = 6 * n / (row["update_ms"] / 1e3) / 1e12
            row["of_copy"] = row["update_tbs"] * 1e12 / bw
        except Exception as e:  # a failing variant is reported and the probe goes on
            row.update(step_ms=None, update_ms=None, error=f"{type(e).__name__}: {e}"[:200])
        finally:
            if knobs is None or (knobs or {}).get("apollo.update_probe") == 1:
                with torch.no_grad():  # the probe and the add leave arbitrary bits: fresh weights
                    for p in params:
                        p.normal_(0, 0.02)
            set_knobs({})
            torch.cuda.empty_cache()
        if row.get("update_ms"):
            print(f"  {size} {label}: update {row['update_ms']:.2f} ms = {row['update_tbs']:.2f} TB/s "
                  f"({row['of_copy']:.0%} of copy), step {row['step_ms']:.2f} ms; {row['check']}", flush=True)  # fmt: skip
        else:
            print(f"  {size} {label}: {row.get('error')}", flush=True)
        rows.append(row)
        on_row(rows)
    params.clear()
    check = None
    torch.cuda.empty_cache()
    return rows


def print_probe(rows: list[dict], bw: float) -> None:
    for size in dict.fromkeys(r["size"] for r in rows):
        mine = [r for r in rows if r["size"] == size]
        n = mine[0]["params"]
        shipped = next((r for r in mine if r["family"] == "shipped" and r.get("update_ms")), None)
        print(f"\n### APOLLO-Mini update stage, {size} ({n / 1e9:.2f}B parameters): update floor "
              f"{6 * n / bw * 1e3:.2f} ms at the copy bandwidth {bw / 1e12:.2f} TB/s, step floor {8 * n / bw * 1e3:.2f} ms\n")  # fmt: skip
        print("| variant | knobs | update ms | TB/s | of copy | vs shipped update | step ms | × step floor | check |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---|")
        for r in mine:
            knobs = "torch" if r["knobs"] is None else knob_text(r["knobs"])
            if r["opt"]:
                knobs += " " + ",".join(f"{k}={v}" for k, v in r["opt"].items())
            if not r.get("update_ms"):
                print(f"| {r['setting']} | {knobs} | - | - | - | - | - | - | {r.get('error', 'failed')} |")
                continue
            vs = f"{shipped['update_ms'] / r['update_ms']:.2f}x" if shipped else "-"
            print(
                f"| {r['setting']} | {knobs} | {r['update_ms']:.2f} | {r['update_tbs']:.2f} | {r['of_copy']:.0%} | {vs} | "
                f"{r['step_ms']:.2f} | {r['step_ms'] / (8 * n / bw * 1e3):.2f} | {r['check']} |"
            )


# ---- --full: the step over every trained parameter of a model, against its floor (issue #15's measure) ----
# (family, label, knobs, how): "shipped" first; "before" is the step as it was before the short rounding path
# became the default and the AdamW tensors were batched; the other rows take one change or one part at a time.
# how: "step" (step()), "adamw one at a time" (the AdamW tensors by step_param, then step(), as step() did
# before), "each" (every parameter by step_param: the backward hooks' path). A row's "part" limits the set.
FULL_GRID = [
    ("shipped", "shipped: step() over every trained parameter", {}, "step", "all"),
    ("before", "before: full rounding path, AdamW tensors one at a time", {"apollo.update_fast_round": 0}, "adamw one at a time", "all"),
    ("change", "full rounding path only (apollo.update_fast_round=0)", {"apollo.update_fast_round": 0}, "step", "all"),
    ("change", "AdamW tensors one at a time only", {}, "adamw one at a time", "all"),
    ("change", "loads first too (off: within drift in the probe)", {"apollo.update_loads_first": 1}, "step", "all"),
    ("part", "matrices only (the probe's kind of set)", {}, "step", "matrices"),
    ("part", "embedding and lm_head only", {}, "step", "embeddings"),
    ("part", "AdamW tensors only (norms, biases, conv1d, A_log, dt_bias), batched", {}, "step", "adamw"),
    ("part", "AdamW tensors only, one at a time", {}, "adamw one at a time", "adamw"),
    ("hooks", "backward hooks, one parameter at a time (step_param: the trainer before)", {}, "each", "all"),
    ("trainer", "backward hooks batched, the trainer's default (--step-batch-mib auto)", {}, "hooks:auto", "all"),
    ("hooks", "backward hooks batched by 256 MiB", {}, "hooks:256", "all"),
    ("hooks", "backward hooks batched by 512 MiB", {}, "hooks:512", "all"),
    ("hooks", "backward hooks batched by 2048 MiB", {}, "hooks:2048", "all"),
    ("hooks", "backward hooks batched by 4096 MiB", {}, "hooks:4096", "all"),
]  # fmt: skip
# The hooks rows play the trainer's backward pass (livetrain.trainer.service: Trainer.step) without the model:
# each parameter's gradient arrives in the reverse of the model's order (Apollo.step_ready, as its hook would
# call it; the batches step when their gradients hold the batch's bytes, the rest at the end, flush_ready),
# then the output projection, whose gradient the trainer makes after backward (Apollo.step_now).


def full_set(shape: str) -> list[tuple[str, dict, list]]:
    """The trained parameters of bench/serve.py's model `shape` (its SHAPES, built on the meta device by
    transformers), grouped as the trainer groups them (livetrain.optim.param_groups, embeddings on APOLLO), in
    the dtypes the engines serve (livetrain.layout: Qwen3.5's A_log in fp32): [(part, group options, [(name,
    shape, dtype)])], part "matrices", "embeddings" or "adamw"."""
    import serve  # bench/serve.py, beside this file: the model shapes, written once
    import transformers

    from livetrain import layout, optim

    cfg = dict(serve.SHAPES[shape])
    config = transformers.AutoConfig.for_model(cfg.pop("model_type", "qwen3"), **cfg)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for g in optim.param_groups(model, embeddings="apollo"):
        params = [(names[id(p)], tuple(p.shape), torch.float32 if layout.served_in_fp32(names[id(p)]) else p.dtype)
                  for p in g["params"]]  # fmt: skip
        embeddings = any(n.endswith(("embed_tokens.weight", "lm_head.weight")) for n, _, _ in params)
        part = "adamw" if g["algo"] == "adamw" else "embeddings" if embeddings else "matrices"
        out.append((part, {k: v for k, v in g.items() if k != "params"}, params))
    return out


def step_and_host_ms(fn, steps: int, device: str = "cuda") -> tuple[float, float]:
    """As time_steps (median GPU time between CUDA events, after two warm-up calls), with the median host
    time of the call itself (Python, bindings, launches): near the step's time, the GPU waits for the host.
    On the CPU (--device cpu: the code paths, not a measure) both are the call's time."""
    for _ in range(2):
        fn()
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
    gpu, host = [], []
    for _ in range(steps):
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
        t = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t) * 1e3)
        if cuda:
            e.record()
            e.synchronize()
        gpu.append(s.elapsed_time(e) if cuda else host[-1])
    return sorted(gpu)[len(gpu) // 2], sorted(host)[len(host) // 2]


def model_order(shape: str) -> list[str]:
    """The names of bench/serve.py's model `shape`'s parameters in the model's order (meta device)."""
    import serve  # bench/serve.py, beside this file: the model shapes, written once
    import transformers

    cfg = dict(serve.SHAPES[shape])
    config = transformers.AutoConfig.for_model(cfg.pop("model_type", "qwen3"), **cfg)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return [n for n, _ in model.named_parameters()]


def full_run(
    shape: str, steps: int, bw: float, on_row=lambda rows: None, device: str = "cuda", families=None
) -> list[dict]:
    from livetrain.trainer import admission

    groups = full_set(shape)
    torch.manual_seed(0)
    made = []  # (part, options, [parameters]), each with a bf16 (or fp32) gradient of its own
    by_name = {}
    for part, options, params in groups:
        ps = []
        for name, shape_, dt in params:
            p = torch.nn.Parameter(torch.empty(shape_, device=device, dtype=dt).normal_(0, 0.02))
            p.grad = torch.empty_like(p).normal_(0, 1e-3)
            ps.append(p)
            by_name[name] = p
        made.append((part, options, ps))
    # The trainer's order: backward's (the model's, reversed), the output projection after it.
    names = [n for n in reversed(model_order(shape)) if n in by_name]
    names.sort(key=lambda n: n == "lm_head.weight")
    backward = [by_name[n] for n in names]
    head = by_name.get("lm_head.weight")
    trained_bytes = sum(p.numel() * p.element_size() for p in by_name.values())
    auto_bytes = admission.step_batch_bytes("auto", trained_bytes, "cuda")
    count = {part: (len(ps), sum(p.numel() for p in ps)) for part, _, ps in made}
    total = sum(n for _, n in count.values())
    print(f"\n== full {shape}: {total / 1e9:.2f}B parameters in {sum(t for t, _ in count.values())} tensors ("
          + ", ".join(f"{part} {t} tensors {n / 1e9:.3f}B" for part, (t, n) in count.items())
          + f"), floor {8 * total / bw * 1e3:.2f} ms (8 bytes per parameter at the copy bandwidth)", flush=True)  # fmt: skip
    rows = []
    for family, label, knobs, how, part in FULL_GRID:
        if families and family not in families:
            continue
        chosen = [(pt, o, ps) for pt, o, ps in made if part == "all" or pt == part]
        params = [p for _, _, ps in chosen for p in ps]
        n = sum(p.numel() for p in params)
        row = {"shape": shape, "family": family, "setting": label, "knobs": knobs, "how": how, "part": part,
               "tensors": len(params), "params": n, "floor_ms": 8 * n / bw * 1e3}  # fmt: skip
        if how.startswith("hooks:"):
            mib = how.split(":")[1]
            row["batch_mib"] = auto_bytes / 2**20 if mib == "auto" else int(mib)
        adamw = [p for pt, _, ps in chosen if pt == "adamw" for p in ps]
        held = {}
        try:
            set_knobs(knobs)
            opt = ApolloMini([{**o, "params": ps} for _, o, ps in chosen], lr=1e-3)
            if how == "each":  # the backward hooks without batches: step_param as each gradient arrives

                def fn():
                    for p in backward:
                        opt.step_param(p)

            elif how.startswith("hooks:"):
                mib = how.split(":")[1]
                opt.attach_hooks(params=[], batch_bytes=auto_bytes if mib == "auto" else int(mib) << 20)
                held = {p: p.grad for p in params}  # the hooks free each gradient: put back for the next step
                order = [p for p in backward if p in held and p is not head]

                def fn():
                    for p in order:
                        p.grad = held[p]
                        opt.step_ready(p)
                    opt.flush_ready()
                    if head is not None and head in held:
                        opt.step_now(head, held[head])

            elif how == "adamw one at a time":  # as step() did before: AdamW by step_param, the batches after
                held = {p: p.grad for p in adamw}
                for p in adamw:
                    p.grad = None

                def fn():
                    for p, g in held.items():
                        opt.step_param(p, g)
                    opt.step()

            else:
                fn = opt.step
            ms, host = step_and_host_ms(fn, steps, device)
            row.update(step_ms=ms, host_ms=host, x_floor=ms / row["floor_ms"])
        except Exception as e:  # a failing row is reported and the run goes on
            row.update(step_ms=None, error=f"{type(e).__name__}: {e}"[:200])
        finally:
            for p, g in held.items():
                p.grad = g
            opt = fn = None
            set_knobs({})
            if device == "cuda":
                torch.cuda.empty_cache()
        if row.get("step_ms"):
            print(f"  {shape} {label}: {row['step_ms']:.2f} ms = {row['x_floor']:.2f}x its floor, host "
                  f"{row['host_ms']:.2f} ms", flush=True)  # fmt: skip
        else:
            print(f"  {shape} {label}: {row.get('error')}", flush=True)
        rows.append(row)
        on_row(rows)
    made.clear()
    by_name.clear()
    backward.clear()
    head = None
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def print_full(rows: list[dict], bw: float) -> None:
    for shape in dict.fromkeys(r["shape"] for r in rows):
        mine = [r for r in rows if r["shape"] == shape]
        first = mine[0]
        before = next((r for r in mine if r["family"] == "before" and r.get("step_ms")), None)
        print(f"\n### APOLLO-Mini step over every trained parameter, {shape} ({first['params'] / 1e9:.2f}B in "
              f"{first['tensors']} tensors; bench/serve.py's shape): floor 8 bytes per parameter at the copy bandwidth "
              f"{bw / 1e12:.2f} TB/s\n")  # fmt: skip
        print("| step | knobs | part | tensors | params | step ms | floor ms | × floor | host ms | vs before |")
        print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in mine:
            head = (
                f"| {r['setting']} | {knob_text(r['knobs'])} | {r['part']} | {r['tensors']} | {r['params'] / 1e9:.3f}B"
            )
            if not r.get("step_ms"):
                print(f"{head} | - | {r['floor_ms']:.2f} | - | - | - | {r.get('error', 'failed')} |")
                continue
            vs = f"{before['step_ms'] / r['step_ms']:.2f}x" if before and r["part"] == "all" else "-"
            print(
                f"{head} | {r['step_ms']:.2f} | {r['floor_ms']:.2f} | {r['x_floor']:.2f} | {r['host_ms']:.2f} | {vs} |"
            )
        shipped = next((r for r in mine if r["family"] == "shipped" and r.get("step_ms")), None)
        if shipped:
            print(f"\n{shape}: shipped step {shipped['step_ms']:.2f} ms = {shipped['x_floor']:.2f}x its floor "
                  f"(target <= 1.3x: {'met' if shipped['x_floor'] <= 1.3 else 'not met'})"
                  + (f"; before {before['step_ms']:.2f} ms = {before['x_floor']:.2f}x" if before else ""))  # fmt: skip
        trainer = next((r for r in mine if r["family"] == "trainer" and r.get("step_ms")), None)
        alone = next((r for r in mine if r["how"] == "each" and r.get("step_ms")), None)
        if trainer:
            print(f"{shape}: the trainer's step (backward hooks batched by {trainer['batch_mib']:.0f} MiB, its default) "
                  f"{trainer['step_ms']:.2f} ms = "
                  f"{trainer['x_floor']:.2f}x its floor (target <= 1.3x: "
                  f"{'met' if trainer['x_floor'] <= 1.3 else 'not met'})"
                  + (f"; one parameter at a time {alone['step_ms']:.2f} ms = {alone['x_floor']:.2f}x" if alone else ""))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=None, help="matrix sets: 1b, 8b, 27b (default 1b,8b; with --sweep 8b,27b)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per row, median taken (default 10; --sweep 5)")
    ap.add_argument(
        "--sweep",
        action="store_true",
        help="time livetrain APOLLO-Mini under a grid of launch settings (internal tuning knobs) instead",
    )
    ap.add_argument(
        "--probe",
        action="store_true",
        help="what bounds the update stage: its GPU time under variants (apollo.update_* knobs) and a bandwidth probe",
    )
    ap.add_argument(
        "--rows", default="", help="--probe: only these variants (labels separated by |), the shipped rows always"
    )
    ap.add_argument("--embeddings", action="store_true", help="include the embedding and output matrices in the sets")
    ap.add_argument(
        "--full",
        action="store_true",
        help="time the step over every trained parameter of bench/serve.py's model shapes (--shapes) against the 8 "
        "bytes per parameter floor: shipped, before, each change and each part",
    )
    ap.add_argument("--shapes", default="8b,qwen3.5-27b", help="--full: bench/serve.py shapes (default 8b,qwen3.5-27b)")
    ap.add_argument(
        "--families",
        default="",
        help="--full: only the rows of these families, comma-separated (shipped, trainer, hooks, before, change, part)",
    )
    ap.add_argument(
        "--device", default="cuda", choices=["cuda", "cpu"], help="--full: cpu runs its code paths, timing nothing"
    )
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
    sizes = (a.sizes or ("8b,27b" if a.sweep or a.probe else "1b,8b")).split(",")
    for size in sizes:
        if size not in SIZES and size != "27b":
            ap.error(f"--sizes: unknown set {size!r} (1b, 8b, 27b)")
    steps = a.steps or (5 if a.sweep or a.probe else 10)
    if a.full:
        import serve  # bench/serve.py, beside this file: the model shapes

        shapes_ = a.shapes.split(",")
        unknown = [x for x in shapes_ if x not in serve.SHAPES]
        if unknown:
            ap.error(f"--shapes: unknown {unknown} (bench/serve.py has {sorted(serve.SHAPES)})")
        if a.device == "cuda" and not torch.cuda.is_available():
            sys.exit("bench/optim.py --full needs a CUDA GPU (or --device cpu for its code paths)")
        bw = copy_bandwidth() if a.device == "cuda" else 1e10  # the CPU run times nothing: any floor will do
        if a.device == "cuda":
            print(f"{torch.cuda.get_device_name()}: device-to-device copy {bw / 1e12:.2f} TB/s (read + write)")
        rows = []
        for shape in shapes_:
            rows += full_run(
                shape,
                steps,
                bw,
                on_row=lambda part: write_result(a.json, {"copy_bandwidth": bw, "full": rows + part}),
                device=a.device,
                families={x for x in a.families.split(",") if x},
            )
            if a.device == "cuda":
                torch.cuda.empty_cache()  # the set's tensors, now free, go back before the next set's (27b: ~108 GB)
        if a.device == "cuda":
            write_result(a.json, {"copy_bandwidth": bw, "full": rows})
        print_full(rows, bw)
        return
    if not torch.cuda.is_available():
        sys.exit("bench/optim.py needs a CUDA GPU")
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {bw / 1e12:.2f} TB/s (read + write)")
    if a.probe:
        labels = {x for x in a.rows.split("|") if x}
        unknown = labels - {g[1] for g in PROBE_GRID}
        if unknown:
            ap.error(f"--rows: unknown variants {sorted(unknown)}")
        rows = []
        for size in sizes:
            rows += probe_set(
                size,
                steps,
                bw,
                labels,
                on_row=lambda part: write_result(a.json, {"copy_bandwidth": bw, "probe": rows + part}),
            )
        write_result(a.json, {"copy_bandwidth": bw, "probe": rows})
        print_probe(rows, bw)
        return
    if a.sweep:
        rows = []

        def save(partial: list) -> None:
            write_result(a.json, {"copy_bandwidth": bw, "sweep": rows + partial})

        for size in sizes:
            rows += sweep_set(size, steps, bw, a.embeddings, on_row=save)
        save([])
        print_sweep(rows)
        return
    rows = []
    for size in sizes:
        rows += run(size, steps, bw, a.methods.split(","), a.embeddings)
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
    write_result(a.json, {"copy_bandwidth": bw, "rows": rows})


if __name__ == "__main__":
    main()
