"""Tensor-parallel training (issue #16): the trainer at TP 2 against TP 1 on the same model and batch, in one
run: training tokens/s, per-GPU trainer memory beyond the weights, and the time a step spends in collectives.

The model is Qwen3-8B-shaped (bench/serve.py's SHAPES: hidden 4096, 36 layers, 32 heads, 8 KV heads,
intermediate 12288, vocabulary 151936, untied) with random bf16 weights. For each TP size N, in processes of
their own so that no peak mixes with another:

  engine   one per rank, on GPU r: rank r's tensors in vLLM's layout (livetrain.layout.plan: merged
           qkv_proj / gate_up_proj, vocabulary padded and split) made at random on the GPU, shared with
           export_cuda (CUDA IPC) under one group: what a TP-N engine shares, without an engine's code.
  trainer  one per rank: livetrain.trainer.service.Trainer with its trainer.ranks.Ranks (NCCL), as `python -m
           livetrain.trainer` runs each rank: attach, the rank's model on the shards, gradient
           checkpointing, APOLLO-Mini from backward hooks with its sums over ranks. Each rank steps the same
           example of --tokens tokens (the trainer's own tokenization) --steps times after one warm-up step.

Per rank: tokens/s (the batch's tokens over the step time: every rank works on the same tokens), the
trainer's peak reserved by PyTorch's allocator during the timed steps (weights excluded: they are the
engine's, mapped through IPC), the rank's weight bytes, and from torch.profiler over one more step the CUDA
time of NCCL kernels (the collectives, including any wait for the slower rank). Targets (issue #16): TP 2
tokens/s >= 1.7 x TP 1; per-GPU trainer extra memory <= 15% of that GPU's weight bytes.

GPU (two GPUs; about 3-4 minutes):  python bench/tp.py
CPU smoke run (gloo, tiny model):    python bench/tp.py --size tiny --device cpu --tokens 64 --steps 2
Prints a markdown table; with $OUT set also writes $OUT/tp.md and $OUT/tp.json.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
sys.path.insert(0, HERE)

from serve import SHAPES, allocator_stats, build_tokenizer, train_example, write_model_dir  # noqa: E402

MARK = "@@tp-bench "
GiB = 2**30
TARGET_SPEEDUP, TARGET_MEMORY = 1.7, 0.15


def log(msg: str) -> None:
    print(f"[tp bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def reply(obj: dict) -> None:
    print(MARK + json.dumps(obj), flush=True)


def role_engine(a) -> None:
    """Rank a.rank's engine tensors, random, on its device; shared until stdin closes."""
    import torch

    from livetrain import layout, sharing

    device = torch.device(f"cuda:{a.rank}" if a.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    config = json.load(open(os.path.join(a.model, "config.json")))
    plan = layout.plan(config, engine="vllm", tp_rank=a.rank, tp_size=int(a.tp))
    g = torch.Generator(device=device).manual_seed(a.rank)
    tensors = {}
    for e in plan["engine"]:
        if len(e["shape"]) == 1:
            tensors[e["name"]] = torch.ones(e["shape"], dtype=torch.bfloat16, device=device)
        else:
            t = torch.empty(e["shape"], dtype=torch.bfloat16, device=device)
            tensors[e["name"]] = t.normal_(0.0, 0.02, generator=g)
    export = sharing.export_cuda if device.type == "cuda" else sharing.export_cpu
    shared = export(
        tensors,
        a.manifest,
        model_path=a.model,
        config=config,
        engine="vllm",
        tp_rank=a.rank,
        tp_size=int(a.tp),
        group=a.group,
    )
    weights = sum(t.numel() * t.element_size() for t in tensors.values())
    reply({"ready": a.manifest, "weights_bytes": weights})
    sys.stdin.read()  # until the orchestrator closes our stdin
    shared.close()


def role_trainer(a) -> None:
    """One trainer rank (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment at TP > 1)."""
    import torch

    from livetrain.trainer import options
    from livetrain.trainer.examples import parse_job
    from livetrain.trainer.ranks import Ranks
    from livetrain.trainer.service import Trainer

    settings = options.parse(["--state-dir", a.state_dir, "--no-store", "--batch-size", "1", "--lr", "1e-5"])
    ranks = Ranks.from_env(timeout=600, state_dir=a.state_dir)
    trainer = Trainer(a.manifest, a.model, settings, ranks=ranks)
    dev = trainer.device
    examples = parse_job(trainer.tokenizer, {"examples": [train_example(a.tokens)]}, trainer.max_len, 1)["examples"]

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    trainer.step(examples)  # creates the optimizer state and workspaces: not timed
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        loss, ntok, _ = trainer.step(examples)
        sync()
        times.append(time.perf_counter() - t)
    mem = allocator_stats(dev)

    # One more step under the profiler: the device time of the collectives (NCCL kernels; gloo on CPU: the
    # host time of the c10d operations).
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        trainer.step(examples)
        sync()
        profiled = time.perf_counter() - t
    coll = 0.0
    for ev in prof.key_averages():
        name = ev.key.lower()
        if dev.type == "cuda" and "nccl" in name:
            coll += ev.device_time_total / 1e6
        elif dev.type != "cuda" and name.startswith("c10d::"):
            coll += ev.cpu_time_total / 1e6
    weights = sum(
        x.numel() * x.element_size() for x in {x.data_ptr(): x for x in trainer.attached.tensors.values()}.values()
    )
    reply(
        {
            "rank": ranks.rank if ranks else 0,
            "tokens": ntok,
            "step_seconds": times,
            "tokens_per_s": ntok * len(times) / sum(times),
            "loss": loss,
            "memory": mem,
            "weights_bytes": weights,
            "collective_seconds": coll,
            "profiled_step_seconds": profiled,
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        }
    )
    if ranks is not None:  # every rank stepped on its own here (no command loop): leave together
        import torch.distributed as dist

        dist.barrier(group=ranks.control)
    trainer.close()


class Child:
    def __init__(self, args: list[str], env: dict):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )

    def expect(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK) :])
            sys.stderr.write(line)
            if time.monotonic() > deadline:
                break
        raise RuntimeError(f"child {self.proc.args[2:5]} ended without a result (status {self.proc.poll()})")

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run_tp(a, size: int, work: str) -> dict:
    from livetrain.trainer.client import free_port

    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    # (engines must not use expandable segments: CUDA IPC cannot share that memory)
    group = f"bench-{os.getpid()}-{size}"
    engines = []
    try:
        for r in range(size):
            manifest = os.path.join(work, f"tp{size}-rank{r}.json")
            args = ["--role", "engine", "--rank", str(r), "--tp", str(size), "--manifest", manifest]
            engines.append(Child([*args, "--model", a.model_dir, "--device", a.device, "--group", group], env))
        ready = [e.expect(600) for e in engines]
        log(f"TP {size}: engines ready, {sum(x['weights_bytes'] for x in ready) / GiB:.2f} GiB of weights")
        tenv = dict(env, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")  # as trainer.process.environment
        if size > 1:
            tenv.update(WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        trainers = []
        for r in range(size):
            renv = dict(tenv, RANK=str(r), LOCAL_RANK=str(r))
            state = os.path.join(work, f"state-{size}")
            args = ["--role", "trainer", "--manifest", ready[r]["ready"], "--model", a.model_dir]
            args += ["--tokens", str(a.tokens), "--steps", str(a.steps), "--state-dir", state]
            trainers.append(Child(args, renv))
        results = [t.expect(1200) for t in trainers]
        for t in trainers:
            t.close()
        return {"size": size, "ranks": results}
    finally:
        for e in engines:
            e.close()


def table(runs: list[dict]) -> str:
    base = runs[0]["ranks"][0]["tokens_per_s"]
    lines = [
        "| TP | tokens/step | tokens/s | vs TP 1 | step s | collectives s/step | weights GiB/GPU | trainer peak reserved GiB/GPU | extra / weights |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        r0 = run["ranks"][0]
        mem = max((r["memory"] or {}).get("peak_reserved", 0) for r in run["ranks"])
        w = max(r["weights_bytes"] for r in run["ranks"])
        coll = max(r["collective_seconds"] for r in run["ranks"])
        step = sum(r0["step_seconds"]) / len(r0["step_seconds"])
        lines.append(
            f"| {run['size']} | {r0['tokens']} | {r0['tokens_per_s']:.0f} | {r0['tokens_per_s'] / base:.2f}x | {step:.3f} | "
            f"{coll:.3f} | {w / GiB:.2f} | {mem / GiB:.2f} | {mem / w:.1%} |"
        )
    lines.append("")
    lines.append(
        f"Targets: TP 2 tokens/s >= {TARGET_SPEEDUP}x TP 1; trainer extra memory <= {TARGET_MEMORY:.0%} of the GPU's weights."
    )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--role", default="orchestrator", choices=["orchestrator", "engine", "trainer"])
    p.add_argument("--size", default="8b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=0, help="decoder layers (default: the shape's)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tp", default="1,2", help="TP sizes to run, the first is the baseline (default 1,2)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens of the training example (default 4096)")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up (default 3)")
    p.add_argument("--json", default=None, help="also write the results here")
    # children
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--manifest", default="")
    p.add_argument("--model", default="")
    p.add_argument("--group", default="")
    p.add_argument("--state-dir", default="")
    a = p.parse_args()
    if a.role != "orchestrator":
        try:
            (role_engine if a.role == "engine" else role_trainer)(a)
        except Exception:
            traceback.print_exc()
            sys.exit(1)
        return
    sizes = [int(x) for x in a.tp.split(",")]
    with tempfile.TemporaryDirectory(prefix="livetrain-tp-bench-") as work:
        a.model_dir = os.path.join(work, "model")
        shape = SHAPES[a.size]
        write_model_dir(
            a.model_dir, a.size, a.layers or shape["num_hidden_layers"], build_tokenizer(shape["vocab_size"])
        )
        runs = []
        for size in sizes:
            t = time.perf_counter()
            runs.append(run_tp(a, size, work))
            log(f"TP {size}: {time.perf_counter() - t:.0f} s")
    md = table(runs)
    print(md)
    out = {"size": a.size, "tokens": a.tokens, "steps": a.steps, "device": a.device, "runs": runs}
    for path in [a.json] + ([os.path.join(os.environ["OUT"], "tp.json")] if os.environ.get("OUT") else []):
        if path:
            with open(path, "w") as f:
                json.dump(out, f, indent=1)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "tp.md"), "w") as f:
            f.write(md + "\n")


if __name__ == "__main__":
    main()
