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

Each TP size above 1 runs twice: with sequence parallelism (the trainer's default: the residual stream
between the blocks split by tokens, livetrain.tensor_parallel) and without (the plain Megatron pattern, the
residual stream replicated on every rank), so the table compares them in the same run.

Per rank: tokens/s (the batch's tokens over the step time: every rank works on the same tokens), the
trainer's peak reserved by PyTorch's allocator during the timed steps (weights excluded: they are the
engine's, mapped through IPC), the rank's weight bytes, and from torch.profiler over one more step: the
device time of NCCL kernels per rank (the collectives, including any wait for the slower rank: a rank that
is ahead waits in them, so the lower of the ranks' figures is the collectives' own time), the device time of
every other kernel (compute: when it is well below the step time, the step waits for the host), the GPU's
idle time (the profiled step's wall time minus the time some kernel ran on any stream: the step waiting on
the host, or on a slower rank before a collective's kernel starts), and the memory the trainer's allocator
holds by phase of the step (the profiler's memory events, CUDA or CPU):

  persistent   allocated before the step: optimizer state, workspaces, buffers
  forward      held when the loss is computed: the layers' checkpoints, what the loss keeps for backward
  layers       peak over the backward of the decoder layers (checkpoints, one layer's recomputed
               activations and gradients)
  vocabulary   peak from the input embeddings' gradient to the step's end (that gradient, then the output
               projection's, each the size of the rank's vocabulary rows)

beside the two figures that set them, from the shapes: the layers' checkpoints (layers x tokens x hidden,
/N with sequence parallelism) and one vocabulary-sized gradient (rows x hidden). Phase columns are MiB over
the step's start; "extra / weights" is the peak reserved over the rank's weight bytes. Targets (issue
#16): TP 2 tokens/s >= 1.7 x TP 1; per-GPU trainer extra memory <= 15% of that GPU's weight bytes.

With --rank-shape N it also runs TP 1 on a model shaped like one rank of TP N (heads, KV heads, intermediate
size and vocabulary / N): a TP-N rank's work with no collective, which needs one GPU. Its tokens/s over TP
1's estimates what TP N reaches on the machine before its collectives cost anything; what it lacks of N x
is work that splitting the model does not divide (the norms and residual additions over whole hidden rows,
which sequence parallelism would split by tokens; host time; per-step fixed costs). Not for shapes with
linear-attention heads (Qwen3.5: refused).

GPU (two GPUs; 36 layers ~2 min, then 12 layers ~1.5 min):  python bench/tp.py --layers 36,12 --rank-shape 2
One GPU (TP 1 and one TP-2 rank's shapes, no collectives):  python bench/tp.py --tp 1 --rank-shape 2 --layers 36
CPU smoke run (gloo, tiny model):  python bench/tp.py --size tiny --device cpu --tokens 64 --steps 2
CPU memory breakdown (gloo, ~5 min on 2 cores):  python bench/tp.py --size qwen3-1k --device cpu --tokens 1024 --steps 1
Prints markdown tables; with $OUT set also writes $OUT/tp.md, $OUT/tp.json and, per run and rank, the
profiled step's 25 operations with the most host time and the 25 with the most device time
($OUT/tp-ops-*.txt).
"""

import argparse
import bisect
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

# The 8B shape's proportions at hidden 1024 and a 32k vocabulary: small enough for the CPU (gloo) run of the
# memory breakdown (bf16 weights 2 x 64 MiB of vocabulary, 24 MiB a layer).
SHAPES.setdefault(
    "qwen3-1k",
    dict(
        SHAPES["8b"],
        hidden_size=1024,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=128,
        intermediate_size=3072,
        vocab_size=32768,
    ),
)
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


def _mark(name: str) -> None:
    """A zero-length event in the profiler's trace: a phase boundary of the step (see memory_phases)."""
    import torch

    with torch.profiler.record_function(f"@@phase {name}"):
        pass


def _instrument(trainer) -> None:
    """Phase marks in the trainer's step, without changing it: the loss's forward (the service module's
    causal_lm_loss), and the moment the input embeddings' gradient is about to be made."""
    from livetrain.trainer import service

    loss = service.causal_lm_loss

    def marked(*args, **kwargs):
        _mark("start")
        out = loss(*args, **kwargs)
        _mark("forward")
        return out

    service.causal_lm_loss = marked
    embeddings = trainer.model.get_input_embeddings()

    def on_output(_module, _inputs, out):
        if out.requires_grad:
            out.register_hook(lambda _g: _mark("vocabulary"))

    embeddings.register_forward_hook(on_output)


def memory_phases(trace_path: str, device) -> dict:
    """From a profiler trace with memory events: the allocated bytes of ``device`` before the step, and
    the peak over that (or the level, for "forward") in each phase between the marks of _instrument."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    marks = {}
    for e in events:
        name = e.get("name", "")
        if name.startswith("@@phase "):
            marks.setdefault(name[8:], float(e["ts"]))
    dev_type, dev_id = (1, device.index or 0) if device.type == "cuda" else (0, -1)
    mem = sorted(
        (float(e["ts"]), int(e["args"]["Total Allocated"]))
        for e in events
        if e.get("name") == "[memory]"
        and int(e["args"].get("Device Type", -9)) == dev_type
        and (dev_type == 0 or int(e["args"].get("Device Id", -9)) == dev_id)
    )
    if not mem or not {"start", "forward", "vocabulary"} <= marks.keys():
        return {}
    before = [m for t, m in mem if t < marks["start"]]
    base = before[-1] if before else mem[0][1]

    def peak(t0, t1):
        inside = [m for t, m in mem if t0 <= t < t1]
        return max(inside, default=base) - base

    level = [m for t, m in mem if t < marks["forward"]]
    end = mem[-1][0] + 1
    return {
        "base": base,
        "forward_peak": peak(marks["start"], marks["forward"]),
        "forward": (level[-1] if level else base) - base,
        "layers": peak(marks["forward"], marks["vocabulary"]),
        "vocabulary": peak(marks["vocabulary"], end),
    }


def role_trainer(a) -> None:
    """One trainer rank (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment at TP > 1)."""
    import torch

    from livetrain.trainer import options, process
    from livetrain.trainer.examples import parse_job
    from livetrain.trainer.ranks import Ranks
    from livetrain.trainer.service import Trainer

    settings = options.parse(
        ["--state-dir", a.state_dir, "--no-store", "--batch-size", "1", "--lr", "1e-5", "--fused-ops", a.fused_ops]
    )
    ranks = Ranks.from_env(timeout=600, state_dir=a.state_dir)
    if ranks is not None:
        ranks.sequence_parallel = bool(a.sp)
    trainer = Trainer(a.manifest, a.model, settings, ranks=ranks, release_cached=not a.no_release)
    process.freeze_startup_heap()  # as python -m livetrain.trainer does once its Trainer is made
    _instrument(trainer)
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
    # host time of the c10d operations) and of the other kernels, and the memory by phase.
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts, profile_memory=True) as prof:
        if ranks is not None:
            # Starting the profiler takes each rank its own time: without this, the rank that starts first
            # waits in its first collective for the other and the skew counts as collective time.
            import torch.distributed as dist

            dist.barrier(group=ranks.control)
        t = time.perf_counter()
        trainer.step(examples)
        sync()
        profiled = time.perf_counter() - t
    coll = compute = 0.0
    spans = []
    averages = prof.key_averages()
    for ev in averages:
        name = ev.key.lower()
        if dev.type != "cuda" and name.startswith("c10d::"):
            coll += ev.cpu_time_total / 1e6
    top = averages.table(sort_by="self_cpu_time_total", row_limit=25)
    if dev.type == "cuda":
        top += "\n" + averages.table(sort_by="self_device_time_total", row_limit=25)
    trace = os.path.join(a.state_dir, f"trace-{ranks.rank if ranks else 0}.json")
    os.makedirs(a.state_dir, exist_ok=True)
    prof.export_chrome_trace(trace)
    with open(trace) as f:
        events = json.load(f)["traceEvents"]
    host = [e for e in events if e.get("cat") == "cpu_op" and "dur" in e]
    for e in events:
        if e.get("cat") == "kernel":
            spans.append((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))))
            if "nccl" in e.get("name", "").lower():
                coll += float(e.get("dur", 0)) / 1e6
            else:
                compute += float(e.get("dur", 0)) / 1e6
    phases = memory_phases(trace, dev)
    os.remove(trace)
    busy = covered(spans) / 1e6
    if dev.type == "cuda":
        top += "\n" + gap_table(spans, host)
    persistent = trainer.opt.state_bytes()["total"] + sum(w.nbytes for w in trainer.opt._workspaces.values())
    weights = sum(
        x.numel() * x.element_size() for x in {x.data_ptr(): x for x in trainer.attached.tensors.values()}.values()
    )
    # What sets the phases, from the shapes: the layers' checkpoints (the residual stream at each layer's
    # input; split by tokens under sequence parallelism) and one vocabulary-sized gradient.
    model = trainer.model
    hidden = model.get_input_embeddings().weight.shape[1]
    layers = len(model.model.layers)
    size = ranks.size if ranks else 1
    rows = -(-ntok // size) if ranks is not None and ranks.sequence_parallel else ntok
    elt = model.get_input_embeddings().weight.element_size()
    analytic = {
        "checkpoints": layers * rows * hidden * elt,
        "vocab_gradient": model.get_input_embeddings().weight.numel() * elt,
    }
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
            "compute_seconds": compute,
            "gpu_busy_seconds": busy if dev.type == "cuda" else None,
            "fused_ops": trainer.fused_ops,
            "top_ops": top,
            "profiled_step_seconds": profiled,
            "phases": phases,
            "persistent_bytes": persistent,
            "analytic": analytic,
            "sequence_parallel": bool(ranks is not None and ranks.sequence_parallel),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        }
    )
    if ranks is not None:  # every rank stepped on its own here (no command loop): leave together
        import torch.distributed as dist

        dist.barrier(group=ranks.control)
    trainer.close()


def covered(spans: list[tuple[float, float]]) -> float:
    """Length of the union of intervals: the time some kernel ran, whatever the stream."""
    total, end = 0.0, float("-inf")
    for t0, t1 in sorted(spans):
        if t1 > end:
            total += t1 - max(t0, end)
            end = t1
    return total


def gap_table(spans: list[tuple[float, float]], host: list[dict], rows: int = 20) -> str:
    """Where the GPU waited in the profiled step: each gap of at least 0.1 ms between kernels (any stream),
    named by the innermost host operation that covers half of it or more ("(Python)" when none: the time
    went to Python between operations), summed by that name."""
    merged = []
    for t0, t1 in sorted(spans):
        if merged and t0 <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], t1)
        else:
            merged.append([t0, t1])
    # Host operations shorter than 50 ms, by start (the longer ones enclose whole phases and name nothing).
    window = 50_000.0
    ops = sorted((e for e in host if e["dur"] < window), key=lambda e: e["ts"])
    starts = [e["ts"] for e in ops]
    by = {}
    total = 0.0
    for (_, a), (b, _) in zip(merged, merged[1:]):
        gap = b - a
        if gap < 100:
            continue
        total += gap
        near = ops[bisect.bisect_left(starts, a - window) : bisect.bisect_right(starts, b)]
        cover = [e for e in near if min(b, e["ts"] + e["dur"]) - max(a, e["ts"]) >= 0.5 * gap]
        name = min(cover, key=lambda e: e["dur"])["name"] if cover else "(Python)"
        n, t = by.get(name, (0, 0.0))
        by[name] = (n + 1, t + gap)
    lines = [f"GPU gaps >= 0.1 ms between kernels: {total / 1e3:.1f} ms in all, by the host operation running", ""]
    lines += [f"{t / 1e3:9.2f} ms {n:6d} gaps  {name}" for name, (n, t) in sorted(by.items(), key=lambda x: -x[1][1])]
    return "\n".join(lines[: rows + 2]) + "\n"


def rank_shape(size: str, n: int) -> str:
    """Register (in SHAPES) and name the shape of one rank of TP n: attention and KV heads, intermediate size
    and vocabulary / n (KV heads at least one, as when ranks share a KV head; the vocabulary at least 512). A TP-1 run on it steps the
    work of one TP-n rank with no collective, measured on one GPU: an estimate of what TP n reaches before its
    collectives cost anything, without sequence parallelism (whose ranks also split the norms' and residual
    additions' tokens, which this shape does whole)."""
    name = f"{size}/rank-of-{n}"
    s = SHAPES[size]
    if any(k.startswith("linear_") and k.endswith("_heads") for k in s):
        raise SystemExit(f"--rank-shape: {size} has linear-attention heads, which this shape does not divide")
    SHAPES[name] = dict(
        s,
        num_attention_heads=s["num_attention_heads"] // n,
        num_key_value_heads=max(1, s["num_key_value_heads"] // n),
        intermediate_size=s["intermediate_size"] // n,
        vocab_size=max(-(-s["vocab_size"] // n), 512),  # the bench's byte tokenizer needs 259 ids
    )
    return name


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


def run_tp(a, size: int, sp: bool, work: str, model_dir: str) -> dict:
    from livetrain.trainer.client import free_port

    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    # (engines must not use expandable segments: CUDA IPC cannot share that memory)
    group = f"bench-{os.getpid()}-{size}-{int(sp)}-{os.path.basename(model_dir)}"
    engines = []
    try:
        for r in range(size):
            manifest = os.path.join(work, f"{os.path.basename(model_dir)}-tp{size}-sp{int(sp)}-rank{r}.json")
            args = ["--role", "engine", "--rank", str(r), "--tp", str(size), "--manifest", manifest]
            engines.append(Child([*args, "--model", model_dir, "--device", a.device, "--group", group], env))
        ready = [e.expect(600) for e in engines]
        log(f"TP {size}: engines ready, {sum(x['weights_bytes'] for x in ready) / GiB:.2f} GiB of weights")
        tenv = dict(env, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")  # as trainer.process.environment
        if size > 1:
            tenv.update(WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        trainers = []
        for r in range(size):
            renv = dict(tenv, RANK=str(r), LOCAL_RANK=str(r))
            state = os.path.join(work, f"state-{os.path.basename(model_dir)}-{size}-{int(sp)}")
            args = ["--role", "trainer", "--manifest", ready[r]["ready"], "--model", model_dir]
            args += ["--tokens", str(a.tokens), "--steps", str(a.steps), "--state-dir", state, "--sp", str(int(sp))]
            args += ["--no-release"] if a.no_release else []
            args += ["--fused-ops", a.fused_ops]
            trainers.append(Child(args, renv))
        results = [t.expect(1200) for t in trainers]
        if os.environ.get("OUT"):  # the profiled step's busiest operations, per rank (host and device time)
            for r in results:
                name = f"tp-ops-{os.path.basename(model_dir)}-tp{size}-sp{int(sp)}-rank{r['rank']}.txt"
                with open(os.path.join(os.environ["OUT"], name), "w") as f:
                    f.write(r.pop("top_ops"))
        for r in results:
            r.pop("top_ops", None)
        for t in trainers:
            t.close()
        return {"size": size, "sequence_parallel": sp and size > 1, "ranks": results}
    finally:
        for e in engines:
            e.close()


def _gib(x) -> str:
    return "-" if x is None else f"{x / GiB:.2f}"


def _mib(x) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"


def table(runs: list[dict], title: str) -> str:
    base = runs[0]["ranks"][0]["tokens_per_s"]
    lines = [
        f"### {title}",
        "",
        "| TP | sequence parallel | tokens/step | tokens/s | vs TP 1 | step s | compute s/step | collectives s/step (per rank) | GPU idle s/step (per rank) | weights GiB/GPU | trainer peak reserved GiB/GPU | extra / weights |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        r0 = run["ranks"][0]
        mem = max((r["memory"] or {}).get("peak_reserved", 0) for r in run["ranks"])
        w = max(r["weights_bytes"] for r in run["ranks"])
        coll = " / ".join(f"{r['collective_seconds']:.3f}" for r in run["ranks"])
        idle = " / ".join(
            "-" if r.get("gpu_busy_seconds") is None else f"{r['profiled_step_seconds'] - r['gpu_busy_seconds']:.3f}"
            for r in run["ranks"]
        )
        compute = max(r["compute_seconds"] for r in run["ranks"])
        step = sum(r0["step_seconds"]) / len(r0["step_seconds"])
        sp = "yes" if run["sequence_parallel"] else ("-" if run["size"] == 1 else "no")
        tp = f"1 on a TP-{run['rank_of']} rank's shapes" if run.get("rank_of") else run["size"]
        lines.append(
            f"| {tp} | {sp} | {r0['tokens']} | {r0['tokens_per_s']:.0f} | {r0['tokens_per_s'] / base:.2f}x | "
            f"{step:.3f} | {compute:.3f} | {coll} | {idle} | {w / GiB:.2f} | {_gib(mem if mem else None)} | "
            f"{(f'{mem / w:.1%}' if mem else '-')} |"
        )
    lines += [
        "",
        "Memory by phase of the profiled step (MiB over the step's start, the larger of the ranks; bench/tp.py's docstring):",
        "",
        "| TP | sequence parallel | persistent (optimizer state, workspaces) | forward: held | layers' backward: peak | vocabulary gradients: peak | shapes: layers' checkpoints | shapes: one vocabulary gradient |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:

        def most(key, sub="phases"):
            vals = [r[sub].get(key) for r in run["ranks"] if r.get(sub)]
            return max(vals) if vals else None

        sp = "yes" if run["sequence_parallel"] else ("-" if run["size"] == 1 else "no")
        tp = f"1 on a TP-{run['rank_of']} rank's shapes" if run.get("rank_of") else run["size"]
        persistent = max(r["persistent_bytes"] for r in run["ranks"])
        lines.append(
            f"| {tp} | {sp} | {_mib(persistent)} | {_mib(most('forward'))} | {_mib(most('layers'))} | "
            f"{_mib(most('vocabulary'))} | {_mib(most('checkpoints', 'analytic'))} | {_mib(most('vocab_gradient', 'analytic'))} |"
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
    p.add_argument(
        "--layers", default="0", help="decoder layers, a comma-separated list: one table each (default: the shape's)"
    )
    p.add_argument(
        "--no-compare", action="store_true", help="run TP > 1 with sequence parallelism only (not also without)"
    )
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tp", default="1,2", help="TP sizes to run, the first is the baseline (default 1,2)")
    p.add_argument(
        "--rank-shape",
        default="",
        help="also run TP 1 on a model shaped like one rank of TP N (heads, KV heads, intermediate size and "
        "vocabulary / N), for each N of this comma-separated list: a TP-N rank's work without collectives, "
        "on one GPU; its tokens/s over TP 1's estimates TP N before its collectives, without sequence "
        "parallelism (needs one GPU only when --tp is 1)",
    )
    p.add_argument(
        "--no-release",
        action="store_true",
        help="trainers without the allocator's release once per step (Trainer.release_cached=False): what the "
        "release costs in step time and saves in peak memory",
    )
    p.add_argument(
        "--fused-ops",
        choices=["auto", "off"],
        default="auto",
        help="the trainers' --fused-ops (auto: Liger-Kernel's fused norms, rotary embedding and MLP activation "
        "on a GPU when installed; off: the PyTorch operations); the table's title says what ran",
    )
    p.add_argument("--tokens", type=int, default=4096, help="tokens of the training example (default 4096)")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up (default 3)")
    p.add_argument("--json", default=None, help="also write the results here")
    # children
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--manifest", default="")
    p.add_argument("--model", default="")
    p.add_argument("--group", default="")
    p.add_argument("--state-dir", default="")
    p.add_argument("--sp", type=int, default=1, help="(a trainer child) 1: sequence parallelism, 0: without")
    a = p.parse_args()
    if a.role != "orchestrator":
        try:
            (role_engine if a.role == "engine" else role_trainer)(a)
        except Exception:
            traceback.print_exc()
            sys.exit(1)
        return
    sizes = [int(x) for x in a.tp.split(",")]
    shape = SHAPES[a.size]
    out = {"size": a.size, "tokens": a.tokens, "steps": a.steps, "device": a.device, "tables": []}
    tables = []
    for layers in [int(x) or shape["num_hidden_layers"] for x in a.layers.split(",")]:
        with tempfile.TemporaryDirectory(prefix="livetrain-tp-bench-") as work:
            model_dir = os.path.join(work, "model")
            write_model_dir(model_dir, a.size, layers, build_tokenizer(shape["vocab_size"]))
            runs = []
            for size in sizes:
                for sp in [True] if size == 1 or a.no_compare else [True, False]:
                    t = time.perf_counter()
                    runs.append(run_tp(a, size, sp, work, model_dir))
                    log(
                        f"{layers} layers, TP {size}{' (sequence parallel)' if sp and size > 1 else ''}: {time.perf_counter() - t:.0f} s"
                    )
            for n in [int(x) for x in a.rank_shape.split(",") if x.strip()]:
                proxy = rank_shape(a.size, n)
                proxy_dir = os.path.join(work, f"rank-of-{n}")
                write_model_dir(proxy_dir, proxy, layers, build_tokenizer(SHAPES[proxy]["vocab_size"]))
                t = time.perf_counter()
                runs.append(dict(run_tp(a, 1, True, work, proxy_dir), rank_of=n))
                log(f"{layers} layers, TP 1 on a TP-{n} rank's shapes: {time.perf_counter() - t:.0f} s")
        fused = sorted({f"{k}: {v}" for run in runs for r in run["ranks"] for k, v in r["fused_ops"].items()})
        title = f"{a.size} shape, {layers} layers, {a.tokens} tokens a step, {a.device}; {'; '.join(fused) or 'no fused ops'}"
        tables.append(table(runs, title))
        out["tables"].append({"layers": layers, "runs": runs})
        print(tables[-1], flush=True)
        save(a, out, "\n\n".join(tables))  # each table as soon as it is done


def save(a, out: dict, md: str) -> None:
    for path in [a.json] + ([os.path.join(os.environ["OUT"], "tp.json")] if os.environ.get("OUT") else []):
        if path:
            with open(path, "w") as f:
                json.dump(out, f, indent=1)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "tp.md"), "w") as f:
            f.write(md + "\n")


if __name__ == "__main__":
    main()
