"""What one training step costs in memory per token (issue #13: the per-step token budget,
``--max-batch-tokens``, must keep the trainer within the memory it has): the trainer's peak during a step
beyond what it holds between steps, at several step sizes, fitted as fixed + bytes per token, and the
budget that would fit a given share of memory.

A step of T tokens is ``rows`` examples of T/rows tokens each (the budget counts rows × the longest row,
padding included, so one row of 4096 and 8 rows of 512 are the same budget): both shapes are measured.

  --device cuda   each --shapes entry through bench/serve.py (engine and trainer in processes of their
                  own, random bf16 weights made on the GPU, `livetrain serve`'s Trainer attached through
                  CUDA IPC): the trainer's peak allocated by PyTorch's allocator during a step of each
                  length, minus what it holds after setup (optimizer state and workspaces are counted once
                  they exist: the first, untimed step creates them). One row per step (bench/serve.py
                  steps one example); shapes: default (SmolLM2-135M-Instruct's), 8b (Qwen3-8B), qwen3.5-27b.
  --device cpu    the default model (or --model DIR) in this machine's memory: one process per point,
                  the reference engine and the Trainer in it (POSIX shared memory), one warm-up step of
                  the smallest size, then the step measured: the process's peak resident memory (VmHWM)
                  after it minus before it.

usage: python bench/train_memory.py [--device cpu|cuda] [--shapes default,8b,qwen3.5-27b] [--tokens 512,...]
                                    [--rows 1,8] [--model default|DIR] [--share 0.1]
Prints a markdown table; with $OUT set also writes $OUT/train_memory.md and $OUT/train_memory.json.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
GiB = 2**30


def vm_hwm() -> int:
    """This process's peak resident memory (bytes)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def example(tokens: int, vocab: int, seed: int) -> tuple:
    """A training example of exactly ``tokens`` ids (loss on the second half), as trainer.examples makes them."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab - 10, (tokens,), generator=g).tolist()
    return ids, [i >= tokens // 2 for i in range(tokens)], 1.0


def cpu_point(a) -> None:
    """One measurement (a child process): --point ROWSxLENGTH; prints a JSON line."""
    from livetrain.engines.reference import Engine
    from livetrain.trainer import options
    from livetrain.trainer.service import Trainer

    rows, length = (int(x) for x in a.point.split("x"))
    with tempfile.TemporaryDirectory(prefix="train-memory-") as tmp:
        manifest = os.path.join(tmp, "engine.manifest.json")
        engine = Engine(a.model, manifest, "cpu", store=False)
        trainer = Trainer(manifest, a.model, options.parse(["--state-dir", os.path.join(tmp, "state"), "--no-store"]))
        try:
            vocab = engine.model.config.vocab_size
            warm = min(a.token_list)
            trainer.step([example(warm, vocab, 0)])  # optimizer state and workspaces
            before = vm_hwm()
            t0 = time.perf_counter()
            _, ntok, _ = trainer.step([example(length, vocab, 1 + r) for r in range(rows)])
            seconds = time.perf_counter() - t0
            after = vm_hwm()
        finally:
            trainer.close()
            engine.exported.close()
    print(
        json.dumps({"rows": rows, "length": length, "tokens": ntok, "peak_extra": after - before, "seconds": seconds})
    )


def run_cpu(a) -> list[dict]:
    points = []
    for tokens in a.token_list:
        for rows in a.row_list:
            if tokens % rows:
                continue
            cmd = [sys.executable, __file__, "--point", f"{rows}x{tokens // rows}", "--model", a.model]
            cmd += ["--tokens", a.tokens]
            out = subprocess.run(
                cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}
            )
            if out.returncode != 0:
                raise RuntimeError(f"point {rows}x{tokens // rows} failed: {out.stderr[-2000:]}")
            p = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"cpu {rows} x {tokens // rows}: +{p['peak_extra'] / GiB:.3f} GiB", file=sys.stderr, flush=True)
            points.append({"shape": os.path.basename(os.path.normpath(a.model)), **p})
    return points


def run_cuda(a) -> list[dict]:
    """bench/serve.py per shape (one row per step): each length's peak allocated minus the allocation
    after setup."""
    points = []
    env = {k: v for k, v in os.environ.items() if k != "OUT"}  # serve.py would write its own files there
    for shape in a.shape_list:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, os.path.join(HERE, "serve.py"), "--shape", SERVE_SHAPES.get(shape, shape)]
            cmd += ["--layers", str(LAYERS[shape]), "--tokens", a.tokens, "--steps", "1", "--gen-seconds", "0"]
            cmd += ["--no-adamw", "--json", f.name]
            t0 = time.monotonic()
            code = subprocess.run(cmd, env=env).returncode
            res = json.load(open(f.name)) if os.path.getsize(f.name) else {}
        sets = res.get("sets") or [{}]
        lt = sets[0].get("livetrain")
        if code != 0 or not lt:
            points.append({"shape": shape, "error": f"bench/serve.py exited {code}: {sets[0].get('errors')}"})
            continue
        base = lt["setup_allocated"]
        for r in lt["runs"]:
            points.append(
                {
                    "shape": shape,
                    "rows": 1,
                    "length": r["tokens"],
                    "tokens": r["tokens"],
                    "peak_extra": r["memory"]["peak_allocated"] - base,
                    "seconds": sum(r["step_seconds"]) / len(r["step_seconds"]),
                    "weights_bytes": sets[0].get("weights_bytes"),
                    "optimizer_state_bytes": lt.get("optimizer_state_bytes"),
                    "device_name": sets[0].get("device_name"),
                }
            )
        print(f"{shape}: measured in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    return points


# bench/serve.py's shapes, and the layers each is measured with (all of them: the per-token cost grows
# with the layers, whose inputs gradient checkpointing keeps).
SERVE_SHAPES = {"default": "smollm2-135m"}
LAYERS = {"default": 30, "8b": 36, "qwen3.5-27b": 64, "tiny": 2}


def fit(points: list[dict]) -> dict:
    """Least-squares fixed + per-token bytes over points of one shape (None with fewer than two sizes)."""
    xs = [p["tokens"] for p in points]
    ys = [p["peak_extra"] for p in points]
    if len(set(xs)) < 2:
        return {"per_token": None, "fixed": None}
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return {"per_token": slope, "fixed": my - slope * mx}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--shapes", default="default,8b,qwen3.5-27b", help="cuda: comma-separated shapes")
    p.add_argument("--model", default="default", help="cpu: model directory or 'default'")
    p.add_argument("--tokens", default="512,1024,2048,4096,8192", help="comma-separated tokens per step")
    p.add_argument(
        "--rows", default="1,8", help="cpu: comma-separated rows per step (a step of T tokens: rows of T/rows)"
    )
    p.add_argument("--share", type=float, default=0.1, help="memory share for the 'budget' column (default 0.1)")
    p.add_argument(
        "--memory-gib",
        type=float,
        default=None,
        help="the memory the share is of (default: the GPU's, or this machine's)",
    )
    p.add_argument("--point", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.token_list = [int(x) for x in a.tokens.split(",")]
    a.row_list = [int(x) for x in a.rows.split(",")]
    a.shape_list = [x for x in a.shapes.split(",") if x]
    if a.model == "default" and (a.device == "cpu" or a.point):
        from livetrain import default_model

        a.model = default_model.resolve("default", "bf16")
    if a.point:
        cpu_point(a)
        return 0
    points = run_cpu(a) if a.device == "cpu" else run_cuda(a)
    memory = a.memory_gib * GiB if a.memory_gib else None
    if memory is None and a.device == "cpu":
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if memory is None and a.device == "cuda":
        import torch

        memory = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    lines = [
        f"Trainer memory per step beyond what it holds between steps ({a.device}; peak "
        f"{'allocated by PyTorch' if a.device == 'cuda' else 'resident (VmHWM)'}), and the --max-batch-tokens "
        f"that fits {a.share:.0%} of {memory / GiB:.0f} GiB"
        if memory
        else "",
        "",
        "| shape | rows x length | tokens | step peak extra GiB | KiB per token | step s |",
        "|---|---|---|---|---|---|",
    ]
    fits = {}
    for p_ in points:
        if "error" in p_:
            lines.append(f"| {p_['shape']} | - | - | {p_['error']} | - | - |")
            continue
        lines.append(
            f"| {p_['shape']} | {p_['rows']} x {p_['length']} | {p_['tokens']} | {p_['peak_extra'] / GiB:.3f} | "
            f"{p_['peak_extra'] / p_['tokens'] / 1024:.1f} | {p_['seconds']:.2f} |"
        )
    lines += ["", "| shape | fixed GiB | KiB per token (fit) | --max-batch-tokens for the share |", "|---|---|---|---|"]
    for shape in dict.fromkeys(p_["shape"] for p_ in points):
        mine = [p_ for p_ in points if p_["shape"] == shape and "error" not in p_]
        f = fits[shape] = fit(mine)
        if f["per_token"]:
            budget = int((a.share * memory - max(f["fixed"], 0)) / f["per_token"]) if memory else None
            lines.append(f"| {shape} | {f['fixed'] / GiB:.3f} | {f['per_token'] / 1024:.1f} | {budget} |")
    table = "\n".join(lines)
    print(table)
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "train_memory.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(out, "train_memory.json"), "w") as f:
            json.dump({"args": {k: v for k, v in vars(a).items()}, "points": points, "fits": fits}, f, indent=1)
    return 1 if any("error" in p_ for p_ in points) else 0


if __name__ == "__main__":
    sys.exit(main())
