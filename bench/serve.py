"""Training beside serving (issue #6), in one run: GPU memory and tokens/s of livetrain's trainer against a
plain Hugging Face training loop with torch.optim.AdamW, and the engine's completion throughput with and
without a concurrent training job.

The model is Qwen3-8B-shaped (hidden 4096, 36 layers, 32 heads, 8 KV heads, head_dim 128, intermediate
12288, vocab 151936, untied), or with --shape qwen3.5-27b Qwen3.5-27B's text model (64 layers, three Gated
DeltaNet layers to one gated full-attention layer, hidden 5120, vocab 248320; 54 GB), with random bf16
weights made on the GPU (transformers' init, on the device). Each variant runs in its own process, so that
no peak mixes with another:

  engine   livetrain's reference engine (livetrain.engines.reference.Engine, exported with export_cuda: CUDA IPC,
           or export_cpu), serving /v1/completions over HTTP (build_app + uvicorn) when fastapi and
           uvicorn are importable. Its weights are created at random on the device: the only thing
           replaced is the engine's from_pretrained (by from_config), so no 16 GB file is written or read.
  trainer  livetrain.trainer.service.Trainer as `livetrain serve` runs it: attach through the manifest,
           build_hf_model on the views, gradient checkpointing, APOLLO-Mini stepped from backward hooks.
           It steps one example of each --tokens length (a prompt/completion pair tokenized by the
           trainer's own parse_job) directly, then serves its job socket; the concurrent job is a real
           POST /train. With --checkpoint the engine first writes the weights as the model's files and
           creates its checkpoint store, and the trainer times its saves: the first after opening the store
           (page-locks its host copy), and one after exactly one step, against the floor (the largest of
           the GPU scan, the delta over PCIe and the delta to disk at bandwidths measured in the run).
           On a GPU it then times an APOLLO-Mini step over every trained parameter against its floor
           (8 bytes per parameter at the measured device copy bandwidth).
  adamw    the same model (from_config, bf16) in a plain HF loop: gradient checkpointing, loss from
           `labels`, torch.optim.AdamW (fused on CUDA; its states are bf16 like the weights), one process,
           no engine on the GPU. An out-of-memory error is caught and reported. Not run for 27B (four
           copies of 54 GB do not fit one GPU).

Memory of a training process beyond the weights = its peak reserved by PyTorch's caching allocator
(max_memory_reserved) + its CUDA context (and anything else allocated outside the allocator), minus the
weights where the process holds them itself (AdamW). The context is the device's memory.used from
nvidia-smi while the process is alive and idle, minus memory.used before it started, minus what its
allocator held at that moment. The target of the issue: the trainer's extra memory <= 15% of the weights.

Completion throughput: sequential greedy requests (a ~200-token prompt, --gen-tokens new tokens; over HTTP
streamed), each window at least --gen-requests requests and --gen-seconds long, each request timed (median, min
and max beside the window's rate) and split at its first text (inproc: the first event carrying text, with the
tokens made by then; HTTP: the first text chunk, counted as one token): the time to it, and the decode's time per token
after it (what a request that stops early at EOS does not change). One warm-up request (the engine's first-use
costs) while the trainer makes what it makes between jobs after its start (the guard's measures of the live
weights, on the GPU), then three windows in a row: alone, once the trainer is idle (nothing left to make); with
a /train job running, from the job's first step on (training tokens/s counts the steps that ran entirely inside
it); alone again, after the trainer stopped. The ratio is the job's window against the two alone pooled.

usage: python bench/serve.py [--shape 8b|qwen3.5-27b|tiny|qwen3.5-tiny] [--device cuda|cpu] [--layers 36,8]
                             [--tokens 2048[,8192]] [--checkpoint] [--dir DIR] [--client auto|http|inproc]
                             [--gen-seconds 15] [--gen-requests 6] [--json out.json]
Prints a markdown table; with $OUT set also writes $OUT/serve.md and $OUT/serve.json.
"""

import argparse
import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from livetrain.trainer import options, process  # noqa: E402
from livetrain.trainer.client import free_port, http, wait_ready  # noqa: E402

# Qwen3 shapes (rms_norm_eps 1e-6, untied): hidden, layers, heads, KV heads, head_dim, intermediate, vocabulary, positions.
_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
)
SHAPES = {
    name: dict(zip(_FIELDS, sizes), rms_norm_eps=1e-6, tie_word_embeddings=False)
    for name, sizes in {
        "8b": (4096, 36, 32, 8, 128, 12288, 151936, 40960),
        "tiny": (64, 2, 4, 2, 16, 128, 512, 4096),
    }.items()
}
# Qwen/Qwen3.5-27B's text model (its config.json's text_config, model_type qwen3_5_text): every 4th layer
# full attention with an output gate, the others Gated DeltaNet; ~26.9B parameters, ~54 GB in bf16.
_QWEN35 = dict(
    model_type="qwen3_5_text",
    attn_output_gate=True,
    full_attention_interval=4,
    linear_conv_kernel_dim=4,
    rms_norm_eps=1e-6,
    partial_rotary_factor=0.25,
    rope_theta=10000000.0,
    tie_word_embeddings=False,
)
SHAPES["qwen3.5-27b"] = dict(
    _QWEN35,
    hidden_size=5120,
    num_hidden_layers=64,
    num_attention_heads=24,
    num_key_value_heads=4,
    head_dim=256,
    linear_num_key_heads=16,
    linear_num_value_heads=48,
    linear_key_head_dim=128,
    linear_value_head_dim=128,
    intermediate_size=17408,
    vocab_size=248320,
    max_position_embeddings=262144,
)
# The same layer kinds at toy sizes: the 27B run's code paths on a CPU (tests/python/test_gpu_scripts.py).
SHAPES["qwen3.5-tiny"] = dict(
    _QWEN35,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    intermediate_size=128,
    vocab_size=512,
    max_position_embeddings=4096,
)
# SmolLM2-135M-Instruct's shape (livetrain's default model; Llama, tied embeddings): bench/train_memory.py.
SHAPES["smollm2-135m"] = dict(
    model_type="llama",
    hidden_size=576,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    intermediate_size=1536,
    vocab_size=49152,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
DEFAULT_LAYERS = {"smollm2-135m": "30", "8b": "36,8", "tiny": "2,1", "qwen3.5-27b": "64", "qwen3.5-tiny": "4"}
DEFAULT_TOKENS = {"qwen3.5-27b": "2048,8192"}
# Shapes whose AdamW baseline cannot fit one GPU (weights, gradients and two bf16 states: 4 x 54 GB).
NO_ADAMW = {"qwen3.5-27b": "AdamW needs weights, gradients and two states, 4 x the weights: 216 GB for 27B"}
MARK = "@@serve-bench "  # child -> orchestrator JSON lines start with this; other stdout lines pass through
GiB = 2**30
TARGET = 0.15  # the trainer's extra memory / the weights
COMPLETIONS_TARGET = 0.9  # completions' speed during a job / alone
TEXT = "The quick brown fox jumps over the lazy dog while the engine keeps answering requests. "


def log(msg: str) -> None:
    print(f"[serve bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- the model directory: config.json and a byte-level tokenizer, no weights ----
def build_tokenizer(vocab_size: int):
    """One token per byte (so n ASCII characters are n tokens), three special tokens at the end of the
    vocabulary, and placeholders `<tN>` for the ids in between, so every id the random model emits decodes."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for i in range(len(vocab), vocab_size - len(specials)):
        vocab[f"<t{i}>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    assert len(fast) == vocab_size, (len(fast), vocab_size)
    return fast


def write_model_dir(path: str, size: str, layers: int, tokenizer) -> None:
    import transformers

    os.makedirs(path, exist_ok=True)
    shape = dict(SHAPES[size], num_hidden_layers=layers)
    model_type = shape.pop("model_type", "qwen3")
    config = transformers.AutoConfig.for_model(model_type, **shape, eos_token_id=tokenizer.eos_token_id)
    # Named as the published checkpoints name it: without `architectures`, vLLM takes a config for its base
    # model class and serves it as an embedding model (no generate task, so the livetrain endpoint plugin
    # is skipped and /train is 404).
    config.architectures = [transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]]
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)


def train_example(tokens: int) -> dict:
    """A prompt/completion pair that the byte-level tokenizer makes exactly `tokens` long (the completion
    gets EOS appended): loss on the second half."""
    text = TEXT * (tokens // len(TEXT) + 2)
    half = tokens // 2
    return {"prompt": text[:half], "completion": text[half : tokens - 1]}


def prompt(i: int) -> str:
    return f"Request {i}. " + TEXT * 2  # about 200 tokens


def weights_bytes(model_dir: str) -> int:
    """Bytes of the weights of model_dir's config.json in bf16, from a model built on the meta device."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def random_model(model_dir: str, device: str, dtype=None):
    """The model of model_dir's config.json with random weights (transformers' own init), made on the device."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(0)
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype or torch.bfloat16)


# ---- memory: PyTorch's allocator in the process, the device's memory.used from outside ----
def allocator_stats(device) -> dict | None:
    import torch

    if device.type != "cuda":
        return None  # no allocator statistics for CPU memory; the table shows "-"
    torch.cuda.synchronize(device)
    return {
        "peak_allocated": torch.cuda.max_memory_allocated(device),
        "peak_reserved": torch.cuda.max_memory_reserved(device),
        "allocated": torch.cuda.memory_allocated(device),
        "reserved": torch.cuda.memory_reserved(device),
    }


def reset_peaks(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_used(device: str) -> int | None:
    """Bytes in use on the benchmark's GPU (nvidia-smi memory.used), or None on CPU / without nvidia-smi.
    Queried from the orchestrator, which never creates a CUDA context of its own."""
    if device != "cuda":
        return None
    gpu = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip() or "0"
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", gpu],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return int(out.stdout.strip().splitlines()[0]) * 2**20
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def outside_allocator(before: int | None, after: int | None, reserved: int | None) -> int | None:
    """The process's memory that its allocator does not account for (CUDA context, module images, ...)."""
    if before is None or after is None or reserved is None:
        return None
    return max(0, after - before - reserved)


# ---- children: a JSON command loop on stdin, answers on stdout ----
def reply(obj: dict) -> None:
    print(MARK + json.dumps(obj), flush=True)


def command_loop(handlers: dict) -> None:
    """Answers {"op": name, ...} lines until {"op": "quit"} or end of input."""
    for line in sys.stdin:
        msg = json.loads(line)
        op = msg.pop("op")
        if op == "quit":
            return
        try:
            reply(handlers[op](**msg))
        except Exception as e:
            traceback.print_exc()
            reply({"error": f"{op}: {type(e).__name__}: {e}"})


def spread(values: list[float]) -> dict | None:
    """Median, min and max of ``values`` (None when there are none)."""
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def spread_text(s: dict | None, unit) -> str:
    """A ``spread`` as "median (min–max)", each value through ``unit`` (e.g. rate); "-" for None."""
    return "-" if s is None else f"{unit(s['median'])} ({unit(s['min'])}–{unit(s['max'])})"


def ms(seconds: float) -> str:
    return f"{1e3 * seconds:.1f}"


def completion_loop(one, seconds: float, min_requests: int) -> dict:
    """Sequential requests, timed each, until at least ``min_requests`` have run and ``seconds`` have passed.
    one(i) -> (tokens, the time.monotonic() its first text came or None, the tokens made by then). The first
    text is the first event that carries text, not the first token: the text stream holds back partial
    characters and skipped special tokens, so it may come with more than one token made. The window's rate
    (its tokens over its wall time); each request's (its tokens over its own time, prefill included), whose
    median, min and max show the noise of the mean; and, split at the first text, the time to it (prefill and
    its tokens) and the decode's time per token after it (which a request's length does not change: a model
    that learned to stop early makes fewer tokens per prefill, not slower ones)."""
    spans, i = [], 0
    while len(spans) < min_requests or spans[-1][1] - spans[0][0] < seconds:
        t0 = time.monotonic()
        n, first, n_first = one(i)
        spans.append((t0, time.monotonic(), n, first, n_first))
        i += 1
    tokens = sum(s[2] for s in spans)
    wall = spans[-1][1] - spans[0][0]
    decoded = [(t1 - first, n - k) for _, t1, n, first, k in spans if first is not None and n > k]
    return {
        "requests": len(spans),
        "tokens": tokens,
        "seconds": wall,
        "tokens_per_s": tokens / wall,
        "per_request": [
            {
                "seconds": t1 - t0,
                "tokens": n,
                "first_token_seconds": None if first is None else first - t0,
                "first_tokens": None if first is None else k,
            }
            for t0, t1, n, first, k in spans
        ],
        "request_tokens_per_s": spread([n / max(t1 - t0, 1e-9) for t0, t1, n, _, _ in spans]),
        "first_token_seconds": spread([first - t0 for t0, _, _, first, _ in spans if first is not None]),
        "decode_seconds_per_token": spread([s / n for s, n in decoded]),
        # the window's decode: its requests' time after their first text, and the tokens made in it
        "decode": {"seconds": sum(x for x, _ in decoded), "tokens": sum(n for _, n in decoded)},
        "start": spans[0][0],
        "end": spans[-1][1],
    }


def role_engine(a) -> None:
    import torch
    import transformers

    from livetrain import safetensors as lst
    from livetrain.engines import reference as eng

    # With --checkpoint the random weights are written as the model's files, which the checkpoint store the
    # engine then creates takes as generation 0: only when the disk has room for them and a step's delta.
    files: dict = {}
    if a.checkpoint:
        need = weights_bytes(a.model)
        free = shutil.disk_usage(a.model).free
        if free < need * 1.15 + 2 * GiB:
            files["skipped"] = (
                f"{free / 1e9:.0f} GB free in {a.model}; the model files and a step's delta need "
                f"{(need * 1.15 + 2 * GiB) / 1e9:.0f} GB (--dir elsewhere, or --no-checkpoint)"
            )

    def from_pretrained(path, dtype=None, **_):
        # The one replacement: random weights made on the device instead of reading the model from disk.
        model = random_model(path, a.device, dtype)
        if a.checkpoint and "skipped" not in files:
            t = time.perf_counter()
            lst.save_model(path, dict(model.named_parameters()))
            files["seconds"] = time.perf_counter() - t
        return model

    transformers.AutoModelForCausalLM.from_pretrained = from_pretrained
    store = a.checkpoint and "skipped" not in files
    if not store:  # no files written: the random weights are the model, with no float32 values to read back
        from livetrain import layout

        layout.load_fp32_exactly = lambda tensors, model_dir: None
    t = time.perf_counter()
    engine = eng.Engine(a.model, a.manifest, a.device, "bf16", store=store)
    seconds = time.perf_counter() - t
    tensors = engine.exported.tensors
    weights = sum(x.numel() * x.element_size() for x in {x.data_ptr(): x for x in tensors.values()}.values())
    server = thread = None
    if a.port:
        import uvicorn

        server = uvicorn.Server(
            uvicorn.Config(eng.build_app(engine, a.trainer_socket), host="127.0.0.1", port=a.port, log_level="warning")
        )
        thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
        thread.start()
    stats = allocator_stats(engine.device)
    reply(
        {
            "ready": True,
            "seconds": seconds,
            "weights_bytes": weights,
            "tensors": len(tensors),
            "params": sum(x.numel() for x in tensors.values()),
            "reserved": stats and stats["reserved"],
            "device_name": torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else "cpu",
            "kernels": engine.kernels,
            "store": engine.checkpoint["store"] if engine.checkpoint else None,
            "files": files,
        }
    )

    def generate(max_tokens: int, seconds: float, min_requests: int) -> dict:
        def one(i: int) -> tuple[int, float | None, int]:
            n, first, n_first = 0, None, 0
            for _, _, n in engine.generate(engine.encode_prompt(prompt(i)), max_tokens, 0.0, 1.0, []):
                if first is None and n:
                    first, n_first = time.monotonic(), n  # the first text may come with several tokens
            return n, first, n_first

        return completion_loop(one, seconds, min_requests)

    try:
        command_loop({"generate": generate})
    finally:
        if server is not None:
            server.should_exit = True
            thread.join(30)
        engine.exported.close()


def optim_step_times(trainer, reps: int) -> dict:
    """APOLLO-Mini stepping every trained parameter once with a random gradient: batched (``step()``, the
    core's batched launches) and one parameter at a time (``step_param``, as the backward hooks do), best of
    ``reps`` after a warm-up. One gradient buffer of the largest parameter's size serves every parameter."""
    import torch

    params = [p for g in trainer.opt.param_groups for p in g["params"] if p.requires_grad]
    # A gradient has its parameter's dtype (PyTorch refuses another): Qwen3.5's Gated DeltaNet A_log is
    # served in fp32 beside bf16 weights, so there is one buffer per dtype.
    grads = {
        dt: torch.randn(max(p.numel() for p in params if p.dtype == dt), device=trainer.device, dtype=dt) * 1e-3
        for dt in {p.dtype for p in params}
    }

    # Made once, outside the timed calls (851 views and .grad assignments are ~1 ms of host time on their own).
    views = [(p, grads[p.dtype][: p.numel()].view_as(p)) for p in params]

    def batched():
        trainer.opt.step()

    def each():
        for p, g in views:
            trainer.opt.step_param(p, g)

    # The trainer's own path (Trainer.step): its backward hooks in backward's order (the model's, reversed),
    # batched by its --step-batch-mib, then the output projection, whose gradient it makes after backward.
    from livetrain.loss import output_projection

    model = getattr(trainer, "model", None)
    head = output_projection(model) if model is not None else None
    view_of = dict(views)
    backward = [p for p in reversed(list(model.parameters()) if model is not None else params) if p in view_of]
    backward = [p for p in backward if p is not head]

    def hooks():
        for p in backward:
            p.grad = view_of[p]
            trainer.opt.step_ready(p)
        trainer.opt.flush_ready()
        if head is not None and head in view_of:
            trainer.opt.step_now(head, view_of[head])

    out = {
        "params": sum(p.numel() for p in params),
        "tensors": len(params),
        "hooks_batch_bytes": getattr(trainer, "step_batch_bytes", 0),
    }
    for p, g in views:
        p.grad = g
    try:  # hooks last: it leaves every gradient freed, as the trainer's backward does
        for name, fn in (("batched_seconds", batched), ("per_parameter_seconds", each), ("hooks_seconds", hooks)):
            best = float("inf")
            for _ in range(1 + reps):
                sync(trainer.device)
                t = time.perf_counter()
                fn()
                sync(trainer.device)
                best = min(best, time.perf_counter() - t)
            out[name] = best
    finally:
        for p in params:  # the trainer's backward passes accumulate into .grad from None
            p.grad = None
    return out


def checkpoint_save(trainer, scenario: str) -> dict:
    """One save of the live weights into the trainer's checkpoint store, timed (weights only: the
    optimizer state that POST /checkpoint adds is not part of the floor), with where its time went
    (bench/save_usage.py: the store's usage, the host's CPUs and reclaim, the engine process's CPU time)."""
    import save_usage  # beside this script

    sync(trainer.device)
    pids = {"engine": trainer.engine["pid"]} if trainer.engine.get("pid") else {}
    r, seconds, host = save_usage.timed_save(
        lambda: trainer.store.save(trainer.weights, weight_version=trainer.weight_version), pids
    )
    keys = (
        "written",
        "bytes",
        "changed",
        "elements",
        "model_bytes",
        "diff_seconds",
        "encode_seconds",
        "write_seconds",
        "usage",
    )
    out = {"scenario": scenario, "seconds": seconds, **{k: r.get(k) for k in keys}, "host": host}
    if r.get("written"):  # the row as the table will print it, now: a run cut short keeps it in its log
        log("save row " + save_usage.row(scenario, seconds, out, host))
    return out


def core_settings() -> dict:
    """The core's thread count and the tuning knobs this process runs with other than their defaults
    (LIVETRAIN_TUNING, tuning_set): what its saves ran under."""
    from livetrain import _core

    knobs = {k: v["value"] for k, v in _core.tuning().items() if v["value"] != v["default"]}
    return {"threads": _core.num_threads(), "knobs": knobs, "env": os.environ.get("LIVETRAIN_TUNING", "")}


DENSITY_BINS = (0.001, 0.01, 0.03, 0.06, 0.12, 1.0)  # upper bounds of a tensor's changed fraction


def change_profile(before: dict, after: dict) -> dict:
    """How a step's changes lie (what the encoder's cost depends on besides their count): the elements in tensors
    whose changed fraction falls in each of DENSITY_BINS, and the share of the bitmaps' bytes (8 elements each)
    that are not zero (the bitmap coder's histogram skips zero bytes)."""
    import torch

    per_bin = [0] * len(DENSITY_BINS)
    elements = changed = nonzero = nbytes = 0
    for name, a in after.items():
        b = before[name]
        bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        m = a.reshape(-1).view(bits) != b.reshape(-1).view(bits)
        n, c = m.numel(), int(m.sum())
        pad = (-n) % 8
        nz = int(torch.nn.functional.pad(m, (0, pad)).view(-1, 8).any(1).sum())
        elements, changed, nonzero, nbytes = elements + n, changed + c, nonzero + nz, nbytes + (n + pad) // 8
        per_bin[next(i for i, hi in enumerate(DENSITY_BINS) if c / max(n, 1) <= hi)] += n
    return {
        "elements": elements,
        "changed": changed,
        "bitmap_bytes_nonzero": nonzero / max(nbytes, 1),
        "elements_by_density": dict(zip([str(x) for x in DENSITY_BINS], [x / max(elements, 1) for x in per_bin])),
    }


def save_probes(trainer, examples, model_dir: str) -> list[dict]:
    """--save-probe: more saves after the first step's, each of which changes one thing, to tell apart why the
    trainer's save encodes slower than bench/checkpoint.py's sweep: another step of the same example (the
    same conditions again); a step saved with the encoder before save29 (checkpoint.encoder=3); a step, with the engine process stopped (SIGSTOP) during the save (its threads off
    the CPUs); the sweep's synthetic step (bench/checkpoint.py's apollo_like_step at lr 1.3e-6, the same 4.1%
    of the elements changed) instead of a training step (the input); a step after the model files' pages were
    dropped from the page cache (posix_fadvise DONTNEED: the host's free memory). The reference is the second
    step's save (the first real save of a process may differ by being the first). A probe that fails is logged
    and the others run."""
    import signal

    import checkpoint as ck  # bench/checkpoint.py (this script's directory is on sys.path)

    out = []
    pid = trainer.engine.get("pid")

    def step() -> None:
        trainer.step(examples)
        sync(trainer.device)

    def stopped_engine() -> dict:
        step()
        os.kill(pid, signal.SIGSTOP)
        try:
            return checkpoint_save(trainer, "probe: after a step, the engine process stopped (SIGSTOP)")
        finally:
            os.kill(pid, signal.SIGCONT)

    def profiled(change, label: str) -> dict:
        """change() with a copy of the weights beside it (GPU memory for one more model, freed after): the save's
        row gets change_profile."""
        before = {n: t.clone() for n, t in trainer.weights.items()}
        change()
        sync(trainer.device)
        profile = change_profile(before, trainer.weights)
        del before
        if trainer.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()
        r = checkpoint_save(trainer, label)
        r["change_profile"] = profile
        p = profile["elements_by_density"]
        log(
            f"{label}: bitmap bytes not zero {profile['bitmap_bytes_nonzero']:.1%}; elements in tensors by changed "
            "fraction " + ", ".join(f"<= {float(k):.1%}: {v:.1%}" for k, v in p.items())
        )
        return r

    def synthetic() -> dict:
        return profiled(
            lambda: ck.apollo_like_step(trainer.weights, 1.3e-6, seed=7),
            "probe: after bench/checkpoint.py's synthetic step (lr 1.3e-6), no training",
        )

    def page_cache_dropped() -> dict:
        step()
        dropped = 0
        for name in sorted(os.listdir(model_dir)):
            if name.endswith(".safetensors"):
                fd = os.open(os.path.join(model_dir, name), os.O_RDONLY)
                try:
                    os.fdatasync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    dropped += os.fstat(fd).st_size
                finally:
                    os.close(fd)
        return checkpoint_save(
            trainer, f"probe: after a step, the model files ({dropped / 1e9:.0f} GB) dropped from the page cache first"
        )

    def encoder_before() -> dict:
        from livetrain import _core

        step()
        was = _core.tuning()["checkpoint.encoder"]["value"]  # the run's own setting (LIVETRAIN_TUNING included)
        _core.tuning_set("checkpoint.encoder", 3)
        try:
            return checkpoint_save(trainer, "probe: after a step, a record's gaps by one thread (checkpoint.encoder=3)")
        finally:
            _core.tuning_set("checkpoint.encoder", was)

    probes = [lambda: profiled(step, "probe: after a second step"), encoder_before]
    probes += [stopped_engine] if pid else []
    probes += [synthetic, page_cache_dropped]
    for probe in probes:
        try:
            out.append(probe())
        except Exception as e:  # logged; the other probes still run
            log(f"save probe {getattr(probe, '__name__', '')} failed: {type(e).__name__}: {e}")
    return out


def role_trainer(a) -> None:
    import torch

    from livetrain.trainer import protocol
    from livetrain.trainer.examples import parse_job
    from livetrain.trainer.service import Trainer

    t = time.perf_counter()
    store = ["--store", a.store] if a.store else ["--no-store"]  # the engine made one only with --checkpoint
    settings = options.parse(
        ["--state-dir", a.state_dir, *store, "--batch-size", "1", "--lr", str(a.lr), "--embeddings", a.embeddings]
    )
    trainer = Trainer(a.manifest, a.model, settings, release_cached=not a.keep_cache)
    process.freeze_startup_heap()  # as python -m livetrain.trainer does once its Trainer is made
    setup_s = time.perf_counter() - t
    dev = trainer.device
    sync(dev)
    setup = allocator_stats(dev)
    saves = []
    if trainer.store is not None:
        saves.append(checkpoint_save(trainer, "first save after open (page-locks the host copy; nothing changed)"))
    # Where the peak is: the allocator's peak at the end of the decoder's forward (the final hidden states;
    # the trainer's loss then makes the logits chunk by chunk, livetrain/loss.py), first step.
    at_logits = []

    def logits_made(*_) -> None:
        if not at_logits:
            at_logits.append(allocator_stats(dev))

    hook = trainer.model.model.register_forward_hook(logits_made)
    runs = []
    for i, tokens in enumerate(a.token_list):
        job = parse_job(trainer.tokenizer, {"examples": [train_example(tokens)]}, trainer.max_len, 1)
        examples = job["examples"]
        if len(examples[0][0]) != tokens:
            raise RuntimeError(f"the example is {len(examples[0][0])} tokens, not {tokens}")
        if i and dev.type == "cuda":
            torch.cuda.empty_cache()  # each length's peak from what the trainer keeps, not the last one's cache
        reset_peaks(dev)
        times, losses = [], []
        for k in range(1 + a.steps):  # the first step creates the optimizer state and workspaces: not timed
            t = time.perf_counter()
            loss, ntok, _ = trainer.step(examples)
            sync(dev)
            times.append(time.perf_counter() - t)
            losses.append(loss)
            if k == 0 and i == 0 and trainer.store is not None:
                saves.append(checkpoint_save(trainer, "after one step"))
                if a.save_probe:
                    saves += save_probes(trainer, examples, a.model)
        timed = times[1:]
        runs.append(
            {
                "tokens": ntok,
                "step_seconds": timed,
                "warmup_seconds": times[0],
                "tokens_per_s": ntok * len(timed) / sum(timed),
                "losses": losses,
                "memory": allocator_stats(dev),
            }
        )
    hook.remove()
    report = trainer.opt.report()
    attached = trainer.attached.tensors
    weights = sum(x.numel() * x.element_size() for x in {x.data_ptr(): x for x in attached.values()}.values())
    reply(
        {
            **runs[0],
            "runs": runs,
            "memory": runs[-1]["memory"],  # as the process is now (the orchestrator reads the device meanwhile)
            "setup_seconds": setup_s,
            "weights_bytes": weights,
            "setup_allocated": setup and setup["allocated"],
            "forward_peak_allocated": at_logits[0]["peak_allocated"] if at_logits and at_logits[0] else None,
            "optimizer_state_bytes": trainer.opt.state_bytes()["total"],
            "grad_checkpointing": trainer.grad_checkpointing,
            "skipped_nonfinite": len(report["skipped_nonfinite_grad"]) + len(report["nonfinite_update"]),
            "kernels": trainer.kernels,
            "checkpoint": saves,
            "core": core_settings(),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        }
    )

    def floors() -> dict:
        """The bandwidths the floors are made of, measured here and now, and the APOLLO-Mini step over every
        trained parameter against its floor (8 bytes per parameter at the device copy bandwidth)."""
        if dev.type != "cuda":
            return {}
        import checkpoint as ck  # bench/checkpoint.py's measurements (this script's directory is on sys.path)

        out = {"device_copy": ck.device_copy_bandwidth(), "pinned_d2h": ck.pinned_d2h_bandwidth()}
        out["disk_write"] = ck.disk_write_bandwidth(trainer.store.dir if trainer.store else a.state_dir)
        out["optim"] = optim_step_times(trainer, a.steps)
        out["optim"]["floor_seconds"] = 8 * out["optim"]["params"] / out["device_copy"]
        return out

    def floors_between_jobs() -> dict:
        """floors() on the training thread, between jobs: the guard makes its measures between jobs on that
        thread (forward passes of the model), which would otherwise share the GPU with what floors() times (the
        first 27B run timed the APOLLO-Mini step while the guard made the held-out answers' first tokens)."""
        out = trainer.between_steps(floors)
        if not isinstance(out, dict):  # an error Reply: floors() raised on the training thread
            raise RuntimeError(f"floors: {out.body}")
        return out

    # From here on the trainer runs jobs as in `livetrain serve`; each step's span is recorded.
    spans = []
    step = trainer.step

    def recorded(batch):
        t0 = time.monotonic()
        out = step(batch)
        sync(dev)
        spans.append((t0, time.monotonic(), out[1]))
        return out

    trainer.step = recorded

    # Whether the trainer has anything left to make between jobs (what "completions alone" waits for): the
    # guard's measures of the live weights (the held-out answers' first tokens, the retention answers, the
    # reference distributions, the anchor's) use the GPU for tens of seconds after a start or a job (at 27B the
    # 393 retention answers alone take ~50 s). /train/status says it: guard.between_jobs (Trainer.between_jobs).
    whys = {
        "done": "the guard's measures of the live weights are made",
        "off": "the guard makes nothing between jobs",
        "failed": "the guard's measures between jobs failed at this weight version",
    }

    def idle() -> dict:
        g = trainer.status()["guard"]
        why = whys.get(g["between_jobs"])
        return {
            "idle": why is not None and trainer.making is None and trainer.current is None,
            "why": why,
            "making": (trainer.making or {}).get("what"),
            "made": list((g["prepared"] or {}).get("made", [])),
        }

    server = protocol.Server(a.socket, trainer.handle)
    server.start()
    runner = threading.Thread(target=trainer.run, name="trainer", daemon=True)
    runner.start()

    def window(start: float, end: float) -> dict:
        inside = [s for s in spans if s[0] >= start and s[1] <= end]
        if not inside:
            return {"steps": 0, "tokens": 0, "seconds": 0.0, "tokens_per_s": 0.0}
        secs = inside[-1][1] - inside[0][0]
        return {
            "steps": len(inside),
            "tokens": sum(n for _, _, n in inside),
            "seconds": secs,
            "tokens_per_s": sum(n for _, _, n in inside) / secs,
        }

    def stop() -> dict:
        trainer.stopping.set()  # the running job stops after its current step
        runner.join(600)
        return {"stopped": not runner.is_alive(), "steps": len(spans), "weight_version": trainer.weight_version}

    try:
        command_loop(
            {
                "submit": lambda job: trainer.submit(job)._asdict(),
                "status": lambda: {"weight_version": trainer.weight_version, "steps": len(spans)},
                "window": window,
                "idle": idle,
                "stop": stop,
                "floors": floors_between_jobs,
            }
        )
    finally:
        trainer.stopping.set()
        runner.join(600)
        server.close()


def role_adamw(a) -> None:
    import torch
    import transformers

    from livetrain.trainer.examples import encode_example

    device = torch.device(a.device)
    tok = transformers.AutoTokenizer.from_pretrained(a.model)
    [(ids, mask, _)] = encode_example(tok, train_example(a.tokens), "example")
    result: dict = {"device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    phase, times, losses = "model", [], []

    def enter(name: str) -> None:
        nonlocal phase
        phase = name
        if a.simulate_oom == name:  # exercises the OOM report on machines where none happens
            raise torch.cuda.OutOfMemoryError(f"simulated out of memory in {name} (--simulate-oom)")

    try:
        enter("model")
        model = random_model(a.model, a.device)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        result["weights_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        result["fused"] = device.type == "cuda"
        opt = torch.optim.AdamW(model.parameters(), lr=a.lr, fused=result["fused"])
        x = torch.tensor([ids], device=device)
        labels = torch.tensor([[t if m else -100 for t, m in zip(ids, mask)]], device=device)
        reset_peaks(device)
        for _ in range(1 + a.steps):
            t = time.perf_counter()
            enter("forward")
            loss = model(input_ids=x, labels=labels, use_cache=False).loss
            enter("backward")
            loss.backward()
            enter("optimizer step")
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            sync(device)
            times.append(time.perf_counter() - t)
        phase = "done"
    except torch.cuda.OutOfMemoryError as e:
        result["oom"] = {"phase": phase, "step": len(times), "message": str(e).strip().splitlines()[0][:300]}
    result["memory"] = allocator_stats(device)
    if phase == "done":
        timed = times[1:]
        result.update(
            tokens=len(ids),
            step_seconds=timed,
            warmup_seconds=times[0],
            losses=losses,
            tokens_per_s=len(ids) * len(timed) / sum(timed),
        )
    reply(result)
    command_loop({})  # alive and idle until the orchestrator has read the device's memory


# ---- the orchestrator ----
class Child:
    """A bench process in another role (of ``script``, default this one), talked to through JSON lines."""

    def __init__(self, role: str, args: list[str], env: dict, script: str = __file__):
        self.role = role
        cmd = [sys.executable, os.path.abspath(script), "--role", role] + args
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                self.lines.put(json.loads(line[len(MARK) :]))
            else:
                sys.stderr.write(line)
        self.lines.put(None)

    def expect(self, timeout: float) -> dict:
        try:
            msg = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"{self.role}: no answer in {timeout:.0f} s") from None
        if msg is None:
            raise RuntimeError(f"the {self.role} process exited with status {self.proc.wait()}")
        if "error" in msg:
            raise RuntimeError(f"{self.role}: {msg['error']}")
        return msg

    def ask(self, timeout: float, op: str, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        return self.expect(timeout)

    def close(self, timeout: float = 120) -> int:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"the {self.role} process did not exit in {timeout:.0f} s; killing it")
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def wait_released(device: str, baseline: int | None, timeout: float = 20) -> int | None:
    """memory.used once the processes that exited have given their memory back (or after `timeout`)."""
    used = device_used(device)
    deadline = time.monotonic() + timeout
    while used is not None and baseline is not None and used > baseline + 256 * 2**20 and time.monotonic() < deadline:
        time.sleep(0.5)
        used = device_used(device)
    return used


def extra(mem: dict | None, context: int | None, weights_inside: int) -> dict:
    """Memory beyond the weights: allocator peaks minus the weights the process holds itself, + context."""
    if mem is None:
        return {}
    out = {
        "peak_allocated_extra": mem["peak_allocated"] - weights_inside,
        "peak_reserved_extra": mem["peak_reserved"] - weights_inside,
        "context": context,
    }
    out["total_extra"] = out["peak_reserved_extra"] + (context or 0)
    return out


def run_livetrain(a, res: dict, main_set: bool, work: str, tokenizer, env: dict, client: str) -> None:
    """Engine + trainer for res["layers"] layers (and completions for the first set); fills `res` as it goes."""
    layers = res["layers"]
    d = os.path.join(work, f"layers{layers}")
    model = os.path.join(d, "model")
    write_model_dir(model, a.shape, layers, tokenizer)
    manifest, sock = os.path.join(d, "engine.manifest.json"), os.path.join(d, "trainer.sock")
    port = free_port() if client == "http" else 0
    url = f"http://127.0.0.1:{port}"
    engine_env = dict(env)
    if "expandable_segments" in engine_env.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        engine_env.pop("PYTORCH_CUDA_ALLOC_CONF")  # CUDA IPC cannot share VMM memory (export_cuda refuses it)
        log("PYTORCH_CUDA_ALLOC_CONF with expandable_segments removed for the engine (CUDA IPC needs cudaMalloc)")

    engine = trainer = None
    try:
        before = device_used(a.device)
        log(f"{layers} layers: starting the engine ({a.device}, random bf16 weights made on the device)")
        engine = Child(
            "engine",
            child_args(a, model) + ["--manifest", manifest, "--trainer-socket", sock, "--port", str(port)],
            engine_env,
        )
        e = engine.expect(a.timeout)
        if port:
            wait_ready(url, engine.proc, 120, path="/v1/models")
        after = device_used(a.device)
        res["weights_bytes"], res["params"], res["device_name"] = e["weights_bytes"], e["params"], e["device_name"]
        res["engine"] = {
            "seconds": e["seconds"],
            "reserved": e["reserved"],
            "outside_allocator": outside_allocator(before, after, e["reserved"]),
        }
        log(
            f"{layers} layers: engine ready in {e['seconds']:.1f} s: {count(e['params'])} parameters, "
            f"{e['weights_bytes'] / GiB:.2f} GiB of weights in {e['tensors']} tensors"
            + (
                f"; allocator {gib(e['reserved'])} GiB, outside it {gib(res['engine']['outside_allocator'])} GiB"
                if e["reserved"] is not None
                else ""
            )
        )

        res["files"] = e["files"]
        if e["files"].get("skipped"):
            log(f"{layers} layers: no checkpoint measurement: {e['files']['skipped']}")
        elif "seconds" in e["files"]:
            log(f"{layers} layers: model files written in {e['files']['seconds']:.1f} s; checkpoint store {e['store']}")
        log(f"{layers} layers: starting the trainer; 1 + {a.steps} steps of each of {a.token_list} tokens")
        trainer = Child(
            "trainer",
            child_args(a, model)
            + ["--manifest", manifest, "--socket", sock, "--state-dir", os.path.join(d, "state")]
            + (["--store", e["store"]] if e["store"] else []),
            process.environment(env),
        )
        t = trainer.expect(a.timeout)
        during = device_used(a.device)
        mem = t["memory"]
        context = outside_allocator(after, during, mem and mem["reserved"])
        if t["weights_bytes"] != e["weights_bytes"]:
            raise RuntimeError(
                f"the trainer attached {t['weights_bytes']} bytes, the engine shares {e['weights_bytes']}"
            )
        res["livetrain"] = {
            **{
                k: t[k]
                for k in (
                    "setup_seconds",
                    "tokens",
                    "step_seconds",
                    "warmup_seconds",
                    "tokens_per_s",
                    "losses",
                    "setup_allocated",
                    "forward_peak_allocated",
                    "optimizer_state_bytes",
                    "grad_checkpointing",
                    "skipped_nonfinite",
                    "kernels",
                    "checkpoint",
                    "core",
                )
            },
            "memory": t["runs"][0]["memory"],
            **extra(t["runs"][0]["memory"], context, 0),
            # every length stepped, each with its own peaks and the process's one context
            "runs": [{**r, **extra(r["memory"], context, 0)} for r in t["runs"]],
        }
        lt = res["livetrain"]
        steps = ", ".join(f"{x:.2f}" for x in t["step_seconds"])
        log(
            f"{layers} layers: trainer {rate(t['tokens_per_s'])} tokens/s (steps {steps} s, warm-up "
            f"{t['warmup_seconds']:.2f} s), loss {t['losses'][0]:.3f} -> {t['losses'][-1]:.3f}"
            + (
                f", extra memory {lt['total_extra'] / GiB:.2f} GiB = {lt['total_extra'] / t['weights_bytes']:.1%} "
                "of the weights"
                if mem
                else ""
            )
        )

        if a.device == "cuda":
            log(f"{layers} layers: bandwidths for the floors, APOLLO-Mini step over every trained parameter")
            res["floors"] = trainer.ask(a.timeout, "floors")
        if main_set and a.gen_seconds > 0:
            res["completions"] = {}
            completions(a, res["completions"], engine, trainer, client, url, layers)
    finally:
        for child in (trainer, engine):
            if child is not None:
                child.close()


def run_adamw(a, res: dict, work: str, env: dict, idle: int | None) -> None:
    """The plain HF loop with torch AdamW for res["layers"] layers, alone on the device."""
    layers = res["layers"]
    model = os.path.join(work, f"layers{layers}", "model")
    log(f"{layers} layers: plain HF loop with torch AdamW, alone on the device")
    before = wait_released(a.device, idle)
    adamw = Child("adamw", child_args(a, model), env)
    try:
        r = adamw.expect(a.timeout)
        during = device_used(a.device)
    finally:
        adamw.close()
    mem = r["memory"]
    context = outside_allocator(before, during, mem and mem["reserved"])
    res["adamw"] = {**r, **extra(mem, context, r.get("weights_bytes", 0))}
    if "oom" in r:
        log(
            f"{layers} layers: AdamW out of memory in {r['oom']['phase']} of step {r['oom']['step'] + 1}"
            + (f" ({mem['peak_reserved'] / GiB:.1f} GiB reserved at the peak)" if mem else "")
        )
    else:
        log(
            f"{layers} layers: AdamW {rate(r['tokens_per_s'])} tokens/s, loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}"
            + (f", extra memory {res['adamw']['total_extra'] / GiB:.2f} GiB" if mem else "")
        )
    wait_released(a.device, idle)


def child_args(a, model: str) -> list[str]:
    return (
        [
            "--model",
            model,
            "--device",
            a.device,
            "--tokens",
            ",".join(map(str, a.token_list)),
            "--steps",
            str(a.steps),
            "--lr",
            str(a.lr),
            "--embeddings",
            a.embeddings,
        ]
        + (["--simulate-oom", a.simulate_oom] if a.simulate_oom else [])
        + (["--keep-cache"] if a.keep_cache else [])
        + (["--checkpoint"] if a.checkpoint else [])
        + (["--save-probe"] if a.save_probe else [])
    )


def completions(a, out: dict, engine: Child, trainer: Child, client: str, url: str, layers: int) -> None:
    """Completion throughput alone, while a /train job runs, and alone again after the job (the trainer stopped);
    fills `out` as it goes. "Alone" is the trainer idle: the first window waits until the trainer has nothing
    left to make between jobs (the guard's measures of the live weights, which would share the GPU with it);
    the second runs after the trainer stopped. Each window has at least --gen-requests requests and
    --gen-seconds seconds."""

    def measure(seconds: float, requests: int) -> dict:
        if client == "inproc":
            return engine.ask(
                seconds + a.timeout,
                "generate",
                max_tokens=a.gen_tokens,
                seconds=seconds,
                min_requests=requests,
            )

        def one(i: int) -> tuple[int, float | None, int]:
            # The stream does not say how many tokens its first text chunk took: counted as one.
            return (*stream_completion(url, prompt(i), a.gen_tokens), 1)

        return completion_loop(one, seconds, requests)

    def noise(r: dict) -> str:
        out = f"per request tokens/s median (min–max) {spread_text(r['request_tokens_per_s'], rate)}"
        if r["decode_seconds_per_token"]:
            out += f", decode ms/token {spread_text(r['decode_seconds_per_token'], ms)}"
        return out

    # The engine's first request takes its first-use costs (~47 s at 27B on the H200 with the trainer idle): taken
    # while the trainer makes its measures between jobs, which the windows wait for anyway.
    log(f"{layers} layers: one warm-up request, then waiting for the trainer to be idle (the guard's measures)")
    t0 = time.monotonic()
    measure(0, 1)
    out["warmup_seconds"] = time.monotonic() - t0
    while True:
        state = trainer.ask(60, "idle")
        if state["idle"]:
            break
        if time.monotonic() - t0 > a.timeout:
            raise TimeoutError(f"the trainer was not idle after {a.timeout:.0f} s (making {state['making']})")
        time.sleep(0.5)
    out["waited"] = {"seconds": time.monotonic() - t0, "why": state["why"], "made": state["made"]}
    log(
        f"{layers} layers: warm-up request {out['warmup_seconds']:.1f} s; trainer idle after "
        f"{out['waited']['seconds']:.1f} s ({state['why']}; measures of the live weights: "
        f"{', '.join(state['made']) or 'nothing'}); completions alone ({client}), at least {a.gen_requests} "
        f"requests and {a.gen_seconds:g} s of {a.gen_tokens}-token requests"
    )
    out["alone"] = measure(a.gen_seconds, a.gen_requests)
    log(
        f"{layers} layers: alone {rate(out['alone']['tokens_per_s'])} tokens/s over {out['alone']['requests']} "
        f"requests, {noise(out['alone'])}"
    )

    job = {"examples": [train_example(a.tokens)], "steps": 100_000, "batch_size": 1, "lr": a.lr, "guard": False}
    if client == "http":
        code, body = http(url + "/train", job, timeout=600)
    else:
        r = trainer.ask(60, "submit", job=job)
        code, body = r["code"], r["body"]
    if code != 202:
        raise RuntimeError(f"/train answered {code}: {body}")
    first = trainer.ask(60, "status")["steps"]
    deadline = time.monotonic() + a.timeout
    while trainer.ask(60, "status")["steps"] <= first:  # the window starts once the job is stepping
        if time.monotonic() > deadline:
            raise TimeoutError("the training job made no step")
        time.sleep(0.1)
    log(f"{layers} layers: completions while the /train job runs")
    out["training"] = measure(a.gen_seconds, a.gen_requests)
    out["concurrent_training"] = trainer.ask(60, "window", start=out["training"]["start"], end=out["training"]["end"])
    stopped = trainer.ask(a.timeout, "stop")
    out["training"]["job_steps"] = stopped["steps"]
    ct = out["concurrent_training"]
    log(
        f"{layers} layers: with training {rate(out['training']['tokens_per_s'])} tokens/s, {noise(out['training'])}; "
        f"training meanwhile {rate(ct['tokens_per_s'])} tokens/s ({ct['steps']} steps in the window)"
    )
    if not stopped["stopped"]:
        raise RuntimeError("the trainer did not stop: no second window alone")
    out["alone_after"] = measure(a.gen_seconds, a.gen_requests)
    log(
        f"{layers} layers: alone again (trainer stopped) {rate(out['alone_after']['tokens_per_s'])} tokens/s, "
        f"{noise(out['alone_after'])}"
    )


def stream_completion(url: str, text: str, max_tokens: int) -> tuple[int, float | None]:
    """One greedy /v1/completions request, streamed (server-sent events, the usage in a last chunk): (tokens
    made, time.monotonic() when the first chunk with text or a finish reason came)."""
    import urllib.request

    body = {"prompt": text, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    req = urllib.request.Request(
        url + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    first, usage = None, None
    with urllib.request.urlopen(req, timeout=600) as r:  # an error status raises HTTPError, with its body
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if "error" in chunk:
                raise RuntimeError(f"/v1/completions failed while streaming: {chunk}")
            if first is None and any(c.get("text") or c.get("finish_reason") for c in chunk.get("choices", [])):
                first = time.monotonic()
            usage = chunk.get("usage") or usage
    if usage is None:
        raise RuntimeError("/v1/completions streamed no usage chunk (stream_options.include_usage)")
    return usage["completion_tokens"], first


def pooled(*windows: dict) -> float:
    """Tokens per second over several windows together (their tokens over their summed wall time)."""
    return sum(w["tokens"] for w in windows) / sum(w["seconds"] for w in windows)


def count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def rate(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def ratio(x: float, y: float) -> str:
    return f"{x / y:.2f}x" if y else "-"


def gib(x) -> str:
    return "-" if x is None else f"{x / GiB:.2f}"


def render_floors(results: dict) -> list[str]:
    """The checkpoint saves and the APOLLO-Mini step against their floors, measured in the same run."""
    lines = []
    for s in results["sets"]:
        f, lt = s.get("floors") or {}, s.get("livetrain") or {}
        saves = lt.get("checkpoint") or []
        if s.get("files", {}).get("skipped"):
            lines += ["", f"{s['layers']} layers: checkpoint not measured: {s['files']['skipped']}."]
        if saves and f:
            bw = (
                f"device copy {f['device_copy'] / 1e9:.0f} GB/s, pinned device-to-host {f['pinned_d2h'] / 1e9:.1f} "
                f"GB/s, disk write + fsync {f['disk_write'] / 1e9:.2f} GB/s"
            )
            lines += [
                "",
                f"Checkpoint saves of the live weights by the trainer ({s['layers']} layers; the model files written "
                f"in {s['files'].get('seconds', 0):.0f} s first). Floor: the largest of the GPU scan of now + old at "
                f"device bandwidth, the delta over PCIe and the delta to disk, at the bandwidths measured in this run "
                f"({bw}).",
                "",
                "| save | wall s | diff / encode / write s | bytes written | % of model | elements changed | floor s "
                "| wall / floor |",
                "|---|---:|---|---:|---:|---:|---:|---:|",
            ]
            for r in saves:
                model = r["model_bytes"] or s["weights_bytes"]
                delta = r["bytes"] if r["written"] else 0
                floor = max(2 * model / f["device_copy"], delta / f["pinned_d2h"], delta / f["disk_write"])
                phases = " / ".join(f"{r[k]:.2f}" for k in ("diff_seconds", "encode_seconds", "write_seconds"))
                share = f"{r['changed'] / r['elements']:.1%}" if r.get("elements") else "-"
                lines.append(
                    f"| {r['scenario']} | {r['seconds']:.2f} | {phases} | {delta:,} | {delta / model:.1%} | {share} | "
                    f"{floor:.3f} | {r['seconds'] / floor:.2f}x |"
                )
        used = [r for r in saves if r.get("usage") and r.get("written")]
        if used:
            import save_usage  # beside this script

            core = lt.get("core") or {}
            knobs = ", ".join(f"{k}={v}" for k, v in (core.get("knobs") or {}).items()) or "none (the shipped defaults)"
            lines += [
                "",
                f"Where the trainer's saves' time went ({s['layers']} layers; the trainer's core: "
                f"{core.get('threads', '?')} threads, knobs set: {knobs}): {save_usage.LEGEND}",
                "",
                save_usage.HEADER,
            ]
            lines += [save_usage.row(r["scenario"], r["seconds"], r, r["host"]) for r in used]
            for r in used:
                p = r.get("change_profile")
                if p:
                    bins = ", ".join(f"<= {float(k):.1%}: {v:.1%}" for k, v in p["elements_by_density"].items())
                    lines.append(
                        f"\n{r['scenario']}: {p['changed'] / max(p['elements'], 1):.2%} of the elements changed; bitmap "
                        f"bytes not zero {p['bitmap_bytes_nonzero']:.1%}; the elements in tensors by their changed "
                        f"fraction: {bins}."
                    )
        o = f.get("optim")
        if o:
            floor = o["floor_seconds"]
            lines += [
                "",
                f"APOLLO-Mini step over every trained parameter ({s['layers']} layers: {count(o['params'])} in "
                f"{o['tensors']} tensors, random bf16 gradients), best of {results['steps']} after a warm-up. Floor: 8 "
                f"bytes per parameter at the device copy bandwidth measured in this run "
                f"({f['device_copy'] / 1e9:.0f} GB/s).",
                "",
                "| step | ms | floor ms | x floor |",
                "|---|---:|---:|---:|",
                f"| batched (`step()`) | {1e3 * o['batched_seconds']:.1f} | {1e3 * floor:.1f} | "
                f"{o['batched_seconds'] / floor:.2f} |",
                f"| per parameter (`step_param`, as from backward hooks) | {1e3 * o['per_parameter_seconds']:.1f} | "
                f"{1e3 * floor:.1f} | {o['per_parameter_seconds'] / floor:.2f} |",
            ]
            if o.get("hooks_seconds"):
                lines.append(
                    f"| the trainer's backward hooks, batched by {o['hooks_batch_bytes'] / 2**20:.0f} MiB "
                    f"(`--step-batch-mib`) | {1e3 * o['hooks_seconds']:.1f} | {1e3 * floor:.1f} | "
                    f"{o['hooks_seconds'] / floor:.2f} |"
                )
    return lines


def render(results: dict) -> str:
    if results["device"] == "cuda":
        how = "context = nvidia-smi memory.used delta minus the process's reserved bytes"
    else:
        how = "on CPU: no memory figures"
    lengths = ", ".join(f"{n:,}" for n in results.get("token_list", [results["tokens"]]))
    lines = [
        f"{results['device_name']}; torch {results['torch']}, transformers {results['transformers']}; "
        f"{results['shape']}-shaped model, random bf16 weights; one sequence of {lengths} tokens per step, "
        f"1 warm-up + {results['steps']} timed steps; {how}",
        "",
        "| layers | params | weights GiB | method | tokens | peak alloc. beyond weights GiB "
        "| peak reserved beyond weights GiB | context GiB | extra GiB | extra / weights | train tokens/s |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for s in results["sets"]:
        w = s.get("weights_bytes")
        head = f"| {s['layers']} | {count(s['params'])} | {gib(w)} |" if w else f"| {s['layers']} | - | - |"
        adamw = s.get("adamw") or {}
        lt = s.get("livetrain")
        trainer = (
            f"livetrain trainer (APOLLO-Mini, hooks, grad. ckpt, embeddings {results.get('embeddings', 'apollo')}"
            f"{', cache kept' if results.get('keep_cache') else ''})"
        )
        rows = [(trainer, r) for r in (lt.get("runs") or [lt])] if lt else []
        rows.append((f"HF loop, torch AdamW{' (fused)' if adamw.get('fused') else ''}, grad. ckpt", s.get("adamw")))
        for name, r in rows:
            if r is None:
                continue
            tokens = f"{r.get('tokens', results['tokens']):,}"
            if "oom" in r:
                peak = r["memory"]["peak_reserved"] if r.get("memory") else None
                total = f"{gib(peak)} reserved in all" if peak is not None else "-"
                lines.append(f"{head} {name} | {tokens} | OOM in {r['oom']['phase']} | {total} | | | | - |")
                continue
            share = f"{r['total_extra'] / w:.1%}" if r.get("total_extra") is not None and w else "-"
            cells = [gib(r.get(k)) for k in ("peak_allocated_extra", "peak_reserved_extra", "context", "total_extra")]
            lines.append(f"{head} {name} | {tokens} | {' | '.join(cells)} | {share} | {rate(r['tokens_per_s'])} |")
        if results.get("adamw_skipped"):
            notes.append(f"{s['layers']} layers: no AdamW baseline: {results['adamw_skipped']}.")
        eng = s.get("engine") or {}
        if eng.get("reserved") is not None:
            notes.append(
                f"{s['layers']} layers: the engine process holds {gib(eng['reserved'])} GiB in its allocator "
                f"(the weights) and {gib(eng['outside_allocator'])} GiB outside it (its context)."
            )
        if lt and lt.get("total_extra") is not None and w:
            ok = "met" if lt["total_extra"] <= TARGET * w else "not met"
            notes.append(
                f"{s['layers']} layers: at {lt['tokens']:,} tokens the trainer's extra memory is "
                f"{lt['total_extra'] / w:.1%} of the weights (target <= {TARGET:.0%}: {ok}); APOLLO-Mini state "
                f"{lt['optimizer_state_bytes'] / 2**20:.1f} MiB; allocated after set-up "
                f"{gib(lt.get('setup_allocated'))} GiB, peak by the end of the first forward (hidden states made) "
                f"{gib(lt.get('forward_peak_allocated'))} GiB, peak of the steps {gib(lt['memory']['peak_allocated'])} GiB"
                + ("; the context includes the checkpoint store's GPU buffers." if lt.get("checkpoint") else ".")
            )
        if lt and lt.get("kernels"):
            notes.append(
                f"{s['layers']} layers: kernels of the trainer's layers: "
                + ", ".join(f"{k} = {v}" for k, v in lt["kernels"].items())
                + "."
            )
        if lt and adamw and "oom" not in adamw and adamw.get("total_extra") and lt.get("total_extra"):
            notes.append(
                f"{s['layers']} layers: AdamW's extra memory is {ratio(adamw['total_extra'], lt['total_extra'])} the "
                f"trainer's; the trainer's tokens/s are {ratio(lt['tokens_per_s'], adamw['tokens_per_s'])} AdamW's."
            )
        if "oom" in adamw:
            notes.append(
                f"{s['layers']} layers: AdamW ran out of memory ({adamw['oom']['message']}); weights, gradients "
                f"and its two bf16 states alone are 4 x {gib(w)} GiB."
            )
        for err in s.get("errors", []):
            notes.append(f"{s['layers']} layers: FAILED: {err}")
    if notes:
        lines += [""] + notes
    lines += render_floors(results)
    gen = [s for s in results["sets"] if s.get("completions")]
    if gen:
        via = "HTTP /v1/completions" if results["client"] == "http" else "Engine.generate in the engine process"
        first_text = "first text chunk" if results["client"] == "http" else "first text"
        lines += [
            "",
            f"Completions ({via}): "
            f"sequential greedy requests, ~200-token prompt, {results['gen_tokens']} new tokens each; each "
            f"measurement at least {results.get('gen_requests', 2)} requests and {results['gen_seconds']:g} s, "
            "in the order of the rows. Alone = the trainer idle: the first window waits until the trainer has "
            "nothing left to make between jobs (the guard's measures of the live weights), the last runs after "
            "the trainer stopped. Per request: its tokens over its own time (prefill included); split at its "
            + (
                "first text chunk (streamed; the text stream holds back partial characters and skipped special "
                "tokens, so the chunk may take more than one token, counted as one): the time to that chunk and "
                "the decode's time per token after it."
                if results["client"] == "http"
                else "first text (the first event carrying text; the text stream holds back partial characters "
                "and skipped special tokens): the time to it and the decode's time per token after it, over the "
                "tokens made after those that came with it."
            ),
            "",
            "| layers | engine | requests | tokens | completion tokens/s | per request tokens/s median (min–max) "
            f"| ms/token | decode ms/token median (min–max) | {first_text} ms median | training tokens/s meanwhile |",
            "|---:|---|---:|---:|---:|---|---:|---|---:|---:|",
        ]
        for s in gen:
            c = s["completions"]
            waited = c.get("waited")
            first = "alone (trainer idle" + (f": waited {waited['seconds']:.0f} s for it)" if waited else ")")
            for name, key in (
                (first, "alone"),
                ("with a /train job running", "training"),
                ("alone again (trainer stopped)", "alone_after"),
            ):
                r = c.get(key)
                if r is None:
                    continue
                train = "-"
                if key == "training" and "concurrent_training" in c:
                    train = rate(c["concurrent_training"]["tokens_per_s"])
                each = spread_text(r.get("request_tokens_per_s"), rate)
                decode = spread_text(r.get("decode_seconds_per_token"), ms)
                f = r.get("first_token_seconds")
                first_ms = f"{1e3 * f['median']:.0f}" if f else "-"
                lines.append(
                    f"| {s['layers']} | {name} | {r['requests']} | {r['tokens']} | {rate(r['tokens_per_s'])} | "
                    f"{each} | {1e3 * r['seconds'] / max(r['tokens'], 1):.1f} | {decode} | {first_ms} | {train} |"
                )
            if waited:
                made = ", ".join(waited["made"]) or "nothing"
                warm = c.get("warmup_seconds")
                lines.append(
                    f"\n{s['layers']} layers: before the first window alone the trainer made {made} between jobs "
                    f"({waited['seconds']:.1f} s, the engine's warm-up request "
                    + (f"{warm:.1f} s of them" if warm is not None else "in them")
                    + f"; then idle: {waited['why']})."
                )
            if c.get("concurrent_training", {}).get("steps", 2) < 2:
                lines.append(
                    f"\n{s['layers']} layers: only {c['concurrent_training']['steps']} training steps ran entirely "
                    "inside the window: lengthen --gen-seconds for a training rate."
                )
            if "alone" in c and "concurrent_training" in c:
                windows = [c[k] for k in ("alone", "alone_after") if k in c]
                alone = pooled(*windows)
                share = c["training"]["tokens_per_s"] / alone
                both = (
                    f" (the two windows alone: {rate(c['alone']['tokens_per_s'])} and "
                    f"{rate(c['alone_after']['tokens_per_s'])} tokens/s, pooled {rate(alone)})"
                    if len(windows) == 2
                    else ""
                )
                decode = ""
                decodes_alone = [w.get("decode") for w in windows]
                decode_job = c["training"].get("decode")
                if decode_job and decode_job["tokens"] and all(x and x["tokens"] for x in decodes_alone):
                    alone_s = sum(x["seconds"] for x in decodes_alone) / sum(x["tokens"] for x in decodes_alone)
                    job_s = decode_job["seconds"] / decode_job["tokens"]
                    decode = (
                        f"; the decode alone {ms(alone_s)} ms/token, during the job {ms(job_s)}: "
                        f"{alone_s / job_s:.2f}x its speed alone"
                    )
                lines.append(
                    f"\n{s['layers']} layers: with training, completions run at {share:.2f}x their speed alone{both} "
                    f"(target >= {COMPLETIONS_TARGET}x: {'met' if share >= COMPLETIONS_TARGET else 'not met'}){decode}; "
                    f"training at {ratio(c['concurrent_training']['tokens_per_s'], s['livetrain']['tokens_per_s'])} "
                    "its speed alone."
                )
    lines.append(f"\nTotal run time {results['seconds']:.0f} s.")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--shape",
        "--size",
        dest="shape",
        default="8b",
        choices=sorted(SHAPES),
        help="model shape (default 8b: Qwen3-8B; qwen3.5-27b: Qwen3.5-27B's text model; tiny and qwen3.5-tiny: "
        "toy sizes of the same layer kinds for a CPU run); --size is the same option under its earlier name",
    )
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument(
        "--layers",
        default=None,
        help="comma-separated layer counts, each a full run; the first also "
        "measures completions (default 36,8 for 8b, 64 for qwen3.5-27b, 2,1 for tiny)",
    )
    ap.add_argument(
        "--tokens",
        default=None,
        help="tokens per training step (one sequence); comma-separated: each length stepped by the same "
        "trainer, the first also used by AdamW and the concurrent job (default 2048; 2048,8192 for qwen3.5-27b)",
    )
    ap.add_argument("--steps", type=int, default=3, help="timed training steps after one warm-up step")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--embeddings", default="apollo", choices=options.EMBEDDINGS, help="as livetrain serve's")
    ap.add_argument(
        "--client",
        default="auto",
        choices=["auto", "http", "inproc"],
        help="completions over HTTP (needs fastapi and uvicorn) or Engine.generate in the engine process",
    )
    ap.add_argument(
        "--gen-seconds", type=float, default=15.0, help="shortest completion measurement (0: no completions)"
    )
    ap.add_argument(
        "--gen-requests",
        type=int,
        default=6,
        help="fewest timed requests of a completion measurement (each window runs until both this many and "
        "--gen-seconds)",
    )
    ap.add_argument("--gen-tokens", type=int, default=64, help="max_tokens of each completion request")
    ap.add_argument("--no-adamw", action="store_true", help="skip the AdamW baseline (always skipped for 27B)")
    ap.add_argument(
        "--checkpoint",
        action="store_true",
        help="write the random weights as the model's files, let the engine create its checkpoint store, and "
        "time the trainer's saves: the first after opening the store, and after one step (against its floor)",
    )
    ap.add_argument(
        "--save-probe",
        action="store_true",
        help="with --checkpoint: after the first step's save, saves that each change one thing (another step, the "
        "encoder of before (checkpoint.encoder=3), the engine process stopped, the checkpoint sweep's synthetic step, "
        "the model files out of the page cache), "
        "each with where its time went (bench/save_usage.py); their steps are not timed",
    )
    ap.add_argument("--dir", default=None, help="work directory (model files with --checkpoint; default: a temp dir)")
    ap.add_argument(
        "--keep-cache",
        action="store_true",
        help="the trainer keeps its allocator's free pages before the vocabulary-sized gradients "
        "(Trainer(release_cached=False)): what releasing them saves and costs",
    )
    ap.add_argument("--timeout", type=float, default=300.0, help="longest wait for one answer from a process")
    ap.add_argument("--json", help="also write the numbers here")
    ap.add_argument("--role", default=None, help=argparse.SUPPRESS)
    for hidden in ("--model", "--manifest", "--trainer-socket", "--socket", "--state-dir", "--simulate-oom", "--store"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    try:
        a.token_list = [int(x) for x in (a.tokens or DEFAULT_TOKENS.get(a.shape, "2048")).split(",")]
    except ValueError:
        ap.error(f"--tokens must be comma-separated integers, not {a.tokens!r}")
    a.tokens = a.token_list[0]
    if a.role:
        {"engine": role_engine, "trainer": role_trainer, "adamw": role_adamw}[a.role](a)
        return 0

    import torch
    import transformers

    t_start = time.monotonic()
    layer_sets = [int(x) for x in (a.layers or DEFAULT_LAYERS[a.shape]).split(",")]
    if a.steps < 1:
        ap.error("--steps must be >= 1")
    if a.gen_requests < 1:
        ap.error("--gen-requests must be >= 1")
    if any(n < 4 or n > SHAPES[a.shape]["max_position_embeddings"] for n in a.token_list):
        ap.error(f"--tokens must be in [4, {SHAPES[a.shape]['max_position_embeddings']}]")
    if a.shape in NO_ADAMW and not a.no_adamw:
        log(f"no AdamW baseline for {a.shape}: {NO_ADAMW[a.shape]}")
        a.no_adamw = True
    try:  # imported, not just found: a package whose own dependencies are missing counts as absent
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401

        has_http = True
    except ImportError as e:
        has_http = False
        log(f"no HTTP server ({e}): completions are measured with Engine.generate in the engine process")
    client = a.client if a.client != "auto" else ("http" if has_http else "inproc")
    if client == "http" and not has_http:
        ap.error("--client http needs fastapi and uvicorn")
    if a.device == "cuda" and shutil.which("nvidia-smi") is None:
        log("nvidia-smi not found: the CUDA context of each process is not measured (reported as -)")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if a.dir:
        os.makedirs(a.dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="livetrain-serve-bench-", dir=a.dir)
    log(
        f"{a.shape}-shaped model, layers {layer_sets}, {a.token_list} tokens per step, device {a.device}, "
        f"completions via {client}, in {work}"
    )
    tokenizer = build_tokenizer(SHAPES[a.shape]["vocab_size"])
    idle = device_used(a.device)
    results = {
        "shape": a.shape,
        "embeddings": a.embeddings,
        "keep_cache": a.keep_cache,
        "device": a.device,
        "tokens": a.tokens,
        "token_list": a.token_list,
        "adamw_skipped": NO_ADAMW.get(a.shape),
        "checkpoint": a.checkpoint,
        "steps": a.steps,
        "lr": a.lr,
        "client": client,
        "gen_tokens": a.gen_tokens,
        "gen_seconds": a.gen_seconds,
        "gen_requests": a.gen_requests,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device_name": a.device,
        "idle_used": idle,
        "sets": [],
    }
    failed = False

    def write(final: bool) -> None:
        """The table and the numbers so far: rewritten after every part, so a run cut short keeps them."""
        results["seconds"] = time.monotonic() - t_start
        table = render(results)
        if final:
            print("\n" + table)
        outputs = [(a.json, None)] if a.json else []
        if os.environ.get("OUT"):
            os.makedirs(os.environ["OUT"], exist_ok=True)
            outputs += [
                (os.path.join(os.environ["OUT"], "serve.json"), None),
                (os.path.join(os.environ["OUT"], "serve.md"), table),
            ]
        for path, text in outputs:
            with open(path, "w") as f:
                f.write(text + "\n" if text is not None else json.dumps(results, indent=2))

    try:
        for i, layers in enumerate(layer_sets):
            s = {"layers": layers}
            results["sets"].append(s)
            parts = [lambda: run_livetrain(a, s, i == 0, work, tokenizer, env, client)]
            if not a.no_adamw:
                parts.append(lambda: run_adamw(a, s, work, env, idle))
            for part in parts:
                try:
                    part()
                except Exception as e:  # keep what the other parts measure
                    traceback.print_exc()
                    log(f"{layers} layers: failed: {type(e).__name__}: {e}")
                    s.setdefault("errors", []).append(f"{type(e).__name__}: {e}")
                    failed = True
                results["device_name"] = s.get("device_name", results["device_name"])
                write(final=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write(final=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
