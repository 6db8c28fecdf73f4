"""Completion throughput of the reference engine under concurrent clients (issue #13), in one run:
continuous batching (``--max-batch 16``, the default) against one request at a time (``--max-batch 1``,
what the engine did before batching: one request decoded alone, the next waiting), at 1, 4 and 16 clients;
batches written ``16:masked`` run with ``--batch-attention masked`` (one attention call per layer over the
padded batch instead of one per request: engines/batching.py), ``16:static`` with ``--batch-attention static``
(a preallocated KV cache, decode steps replayed from CUDA graphs on a GPU, eager on CPU: engines/static.py):
the default runs all four, one at a time and three batched decodes, in the same run.

Each variant is a real engine process (``python -m livetrain.engines.reference``: the shared-memory or
CUDA IPC export, the HTTP app, the scheduler) on the same model; clients are threads of this process,
each sending ``--requests`` greedy /v1/completions one after the other (every client its own prompts, of
different lengths) after a warm-up. Aggregate completion tokens/s = the ``usage.completion_tokens`` of
every answer, over the time from the first request to the last answer. A fraction ``--stream`` of the clients
stream their answers (SSE), the rest do not.

``--model random`` (for machines without the default model's file): a SmolLM2-135M-shaped Llama (hidden 576,
30 layers, 9 heads, 3 KV heads, intermediate 1536) with random bf16 weights and a word-level tokenizer over
this file's words (tests/python/tiny_model.py), written to a temporary directory.

usage: python bench/engine.py [--model default|random|DIR] [--device cpu|cuda] [--dtype bf16] [--clients 1,4,16]
                              [--batches 1,16,16:masked,16:static] [--requests 8] [--max-tokens 32] [--stream 0.33]
                              [--in-process [--profile]]
Prints a markdown table; with $OUT set also writes $OUT/engine.md and $OUT/engine.json. ``--in-process``
measures the scheduler alone in this process instead (no HTTP: where each decode step's time goes, and
whether the answers equal one-at-a-time decoding's), written to $OUT/engine-in-process.{md,json}.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

PYTHON_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python")
sys.path.insert(0, PYTHON_DIR)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "python"))

from livetrain.engines import options as engine_options  # noqa: E402
from livetrain.serve import engine_command  # noqa: E402
from livetrain.trainer.client import free_port, http, wait_ready  # noqa: E402

import tiny_model  # noqa: E402  (the random model, the --model option)

WORDS = (
    "the quick brown fox jumps over the lazy dog while a small bird sings in the old oak tree near the river "
    "and children play football in the park on a sunny afternoon in early spring"
).split()


def prompt(client: int, i: int) -> str:
    """A prompt of 8 to 40 words, different for every client and request."""
    n = 8 + (client * 7 + i * 5) % 33
    start = (client * 3 + i) % len(WORDS)
    return " ".join(WORDS[(start + k) % len(WORDS)] for k in range(n))


def streamed(url: str, body: dict, timeout: float) -> int:
    """Completion tokens of one streaming request, from its last chunk (``stream_options.include_usage``)."""
    req = urllib.request.Request(
        url + "/v1/completions",
        json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}).encode(),
        {"Content-Type": "application/json"},
    )
    n = None
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for line in r:
            if line.startswith(b"data: {"):
                chunk = json.loads(line[len(b"data: ") :])
                if "error" in chunk:
                    raise RuntimeError(f"stream error: {chunk['error']}")
                n = chunk.get("usage", {}).get("completion_tokens", n)
    if n is None:
        raise RuntimeError("the stream ended without its usage chunk")
    return n


class Engine:
    """One engine process with ``--max-batch batch`` and ``--batch-attention attention``."""

    def __init__(self, a, batch: int, tmp: str, attention: str = "rows"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        run = tempfile.mkdtemp(prefix=f"engine-b{batch}-", dir=tmp)
        self.log = open(os.path.join(run, "engine.log"), "w")
        # The engine's command line as `livetrain serve` builds it (serve.engine_command), without a store.
        parser = argparse.ArgumentParser()
        engine_options.add_options(parser)
        ns = parser.parse_args(["--max-batch", str(batch), "--batch-attention", attention, "--max-queue", "256"])
        ns.model, ns.device, ns.dtype, ns.host, ns.port = a.model, a.device, a.dtype, "127.0.0.1", self.port
        ns.no_store, ns.store = True, None
        cmd = engine_command(ns, os.path.join(run, "engine.manifest.json"), os.path.join(run, "trainer.sock"))
        self.p = subprocess.Popen(
            cmd,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            # The repo's python/ before the caller's path, which may hold uvicorn/fastapi (the GPU machine's
            # carried packages): replacing it made the engine fail there with "No module named 'uvicorn'".
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [PYTHON_DIR, os.environ.get("PYTHONPATH")]))},
        )
        try:
            wait_ready(self.url, self.p, 600, path="/v1/models")
        except (RuntimeError, TimeoutError):
            self.stop()
            raise RuntimeError(f"engine --max-batch {batch} did not start: {open(self.log.name).read()[-2000:]}")

    def stop(self) -> None:
        self.p.terminate()
        try:
            self.p.wait(60)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        self.log.close()


def measure(url: str, clients: int, a) -> dict:
    """Aggregate completion tokens/s of ``clients`` threads sending ``a.requests`` requests each: every
    token answered over the time from the first request to the last answer (a fixed amount of work, so a
    slow step cannot leave a window without finished requests)."""
    lock = threading.Lock()
    tokens, answers, errors, latencies = [0], [0], [], []
    n_stream = round(clients * a.stream) if clients > 1 else 0
    go = threading.Event()

    def client(c: int):
        go.wait()
        for i in range(a.requests):
            t0 = time.monotonic()
            body = {"prompt": prompt(c, i), "max_tokens": a.max_tokens, "temperature": 0}
            try:
                if c < n_stream:
                    n = streamed(url, body, 3600)
                else:
                    code, reply = http(url + "/v1/completions", body, timeout=3600)
                    if code != 200:
                        raise RuntimeError(f"HTTP {code}: {reply}")
                    n = reply["usage"]["completion_tokens"]
            except Exception as e:  # counted and reported, not lost in a thread
                with lock:
                    errors.append(repr(e)[:200])
                return
            with lock:
                tokens[0] += n
                answers[0] += 1
                latencies.append(time.monotonic() - t0)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    go.set()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    latencies.sort()
    return {
        "clients": clients,
        "streaming": n_stream,
        "answers": answers[0],
        "tokens": tokens[0],
        "seconds": elapsed,
        "tokens_per_s": tokens[0] / elapsed,
        "p50_s": latencies[len(latencies) // 2] if latencies else None,
        "errors": errors,
    }


def measure_in_process(model, tokenizer, batch: int, attention: str, clients: int, a) -> dict:
    """The scheduler alone (no HTTP, no shared-memory export): ``clients`` threads submitting ``a.requests``
    greedy requests each to a ``batching.Scheduler`` on ``model``; where the scheduler thread's time went, and
    every answer's tokens (to compare with one-at-a-time decoding's)."""
    from livetrain.engines import batching

    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    sched = batching.Scheduler(model, eos, max_batch=batch, max_queue=clients * a.requests, attention=attention)
    answers: dict = {}
    errors: list = []

    def one(c: int, i: int) -> None:
        done, toks = threading.Event(), []

        def sink(tok, finish, error):
            if tok is not None:
                toks.append(tok)
            if error is not None:
                errors.append(error)
            if finish is not None:
                done.set()

        ids = tokenizer(prompt(c, i))["input_ids"]
        sched.submit(batching.Sequence(ids, a.max_tokens, 0.0, 1.0, None, sink))
        done.wait()
        answers[(c, i)] = toks

    profiler = None
    try:
        one(0, 99)  # warm-up
        base = sched.load()
        threads = [threading.Thread(target=lambda c=c: [one(c, i) for i in range(a.requests)]) for c in range(clients)]
        if a.profile:
            profiler = profile_decode_steps(sched, a.device)
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
        load = sched.load()
    finally:
        sched.close()
        if profiler is not None and profiler["done"]:
            write_profile(profiler["profile"], f"engine-profile-b{batch}-{attention}-c{clients}")
    answers.pop((0, 99), None)
    steps = load["steps"] - base["steps"]
    spent = {k: load["seconds"][k] - base["seconds"][k] for k in load["seconds"]}
    tokens = sum(len(t) for t in answers.values())
    return {
        "clients": clients,
        "streaming": 0,
        "answers": len(answers),
        "tokens": tokens,
        "seconds": elapsed,
        "tokens_per_s": tokens / elapsed,
        "steps": steps,
        "rows_per_step": (tokens - len(answers)) / steps if steps else 0.0,  # each prefill gives one token
        "ms_per_step": 1e3 * spent["decode"] / steps if steps else 0.0,
        "forward_ms_per_step": 1e3 * spent["forward"] / steps if steps else 0.0,
        "sample_ms_per_step": 1e3 * spent["sample"] / steps if steps else 0.0,
        "attention_ms_per_step": 1e3 * spent["attention"] / steps if steps else 0.0,
        "prefill_s": spent["prefill"],
        "errors": errors,
        "answer_tokens": {f"{c},{i}": t for (c, i), t in sorted(answers.items())},
    }


def profile_decode_steps(sched, device: str, skip: int = 5, steps: int = 20) -> dict:
    """torch.profiler over decode steps ``skip`` to ``skip + steps`` of ``sched`` (or up to the last one before
    its batch empties), started and stopped in the scheduler's thread (the profiler records the ops of the
    thread that starts it)."""
    import torch

    kinds = [torch.profiler.ProfilerActivity.CPU]
    if str(device).startswith("cuda"):
        kinds.append(torch.profiler.ProfilerActivity.CUDA)
    state = {"n": 0, "profile": None, "done": False}
    decode = sched._decode

    def profiled():
        if state["n"] == skip:
            state["profile"] = torch.profiler.profile(activities=kinds)
            state["profile"].start()
        decode()
        state["n"] += 1
        if state["profile"] is not None and not state["done"] and (state["n"] == skip + steps or not sched._rows):
            state["profile"].stop()
            state["done"] = True

    sched._decode = profiled
    return state


def write_profile(profiler, name: str) -> None:
    """The ops of a profiled row, by total host time and by count (stderr; $OUT/NAME.txt when $OUT is set)."""
    averages = profiler.key_averages()
    text = "\n\n".join(
        averages.table(sort_by=key, row_limit=30) for key in ("cpu_time_total", "self_cpu_time_total", "count")
    )
    if any(getattr(e, "device_time_total", 0) for e in averages):
        text += "\n\n" + averages.table(sort_by="device_time_total", row_limit=30)
    print(f"---- {name}\n{text}", file=sys.stderr)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, f"{name}.txt"), "w") as f:
            f.write(text + "\n")


def in_process(a, batches, clients) -> list[dict]:
    """``--in-process``: every (batch, clients) row on one model loaded here."""
    import torch
    import transformers

    from livetrain.safetensors import DTYPES

    tokenizer = transformers.AutoTokenizer.from_pretrained(a.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=DTYPES[a.dtype]).to(a.device).eval()
    rows = []
    for batch, attention in batches:
        for c in clients:
            r = measure_in_process(model, tokenizer, batch, attention, c, a)
            r["max_batch"], r["attention"] = batch, attention
            rows.append(r)
            print(
                f"max_batch {batch} ({attention}), {c} clients: {r['tokens_per_s']:.1f} tokens/s, "
                f"{r['rows_per_step']:.1f} rows/step, {r['ms_per_step']:.1f} ms/step",
                file=sys.stderr,
            )
        if hasattr(torch, "cuda") and torch.cuda.is_available():
            torch.cuda.synchronize()
    return rows


def in_process_table(a, rows: list[dict]) -> list[str]:
    one: dict = {}  # the first --max-batch 1 row of each client count: one at a time, as the engine was
    for r in rows:
        if r["max_batch"] == 1:
            one.setdefault(r["clients"], r)
    lines = [
        f"Reference engine's scheduler in process (no HTTP), {os.path.basename(os.path.normpath(a.model))} "
        f"{a.dtype} on {a.device}, greedy, {a.max_tokens} completion tokens per request, {a.requests} requests "
        "per client",
        "",
        "| --max-batch (attention) | clients | completion tokens/s | vs one at a time | rows/step | ms/step | "
        "forward ms/step | of which row attention | sample ms/step | prefill s | answers as one at a time | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = one.get(r["clients"])
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        same = "-"
        if base:
            same = f"{sum(base['answer_tokens'].get(k) == v for k, v in r['answer_tokens'].items())}/{r['answers']}"
        lines.append(
            f"| {r['max_batch']} ({r['attention']}) | {r['clients']} | {r['tokens_per_s']:.1f} | {ratio} | "
            f"{r['rows_per_step']:.1f} | {r['ms_per_step']:.1f} | {r['forward_ms_per_step']:.1f} | "
            f"{r['attention_ms_per_step']:.1f} | "
            f"{r['sample_ms_per_step']:.1f} | {r['prefill_s']:.2f} | {same} | {len(r['errors'])} |"
        )
    return lines


def random_model(path: str) -> str:
    """A SmolLM2-135M-shaped model with random weights under ``path`` (see the module's docstring)."""
    tiny_model.make_model_dir(
        path,
        [" ".join(WORDS)],
        intermediate_size=1536,
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
    )
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    tiny_model.add_model_option(p, "random", "its shape, random weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--clients", default="1,4,16", help="comma-separated client counts")
    p.add_argument(
        "--batches",
        default="1,16,16:masked,16:static",
        help="comma-separated --max-batch values (1: one at a time), each with ':masked' or ':static' for that "
        "--batch-attention",
    )
    p.add_argument("--requests", type=int, default=8, help="requests per client in each row")
    p.add_argument("--max-tokens", type=int, default=32, help="completion tokens per request")
    p.add_argument("--stream", type=float, default=1 / 3, help="fraction of clients that stream (default a third)")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="measure the scheduler alone in this process (no engine process, no HTTP): where a decode step's "
        "time goes (the model's forward call, the sampling) and whether answers equal one-at-a-time decoding's",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="with --in-process: torch.profiler over 20 decode steps of each row (from the 6th); its op tables (host time, count, "
        "and device time on a GPU) to stderr and $OUT/engine-profile-b<batch>-<attention>-c<clients>.txt",
    )
    a = p.parse_args()
    if a.profile and not a.in_process:
        p.error("--profile needs --in-process")
    clients = [int(c) for c in a.clients.split(",")]
    batches = []
    for b in a.batches.split(","):
        size, _, attention = b.partition(":")
        batches.append((int(size), attention or "rows"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        a.model = tiny_model.resolve_model(
            a.model, "random", lambda: random_model(os.path.join(tmp, "random-smollm2-135m")), a.dtype
        )
        for batch, attention in [] if a.in_process else batches:
            engine = Engine(a, batch, tmp, attention)
            try:
                http(engine.url + "/v1/completions", {"prompt": "warm up", "max_tokens": 4}, timeout=600)
                for c in clients:
                    r = measure(engine.url, c, a)
                    r["max_batch"], r["attention"] = batch, attention
                    rows.append(r)
                    print(
                        f"max_batch {batch} ({attention}), {c} clients: {r['tokens_per_s']:.1f} tokens/s",
                        file=sys.stderr,
                    )
            finally:
                engine.stop()
        if a.in_process:
            rows = in_process(a, batches, clients)
    if a.in_process:
        return report(a, rows, in_process_table(a, rows), "engine-in-process")
    base: dict = {}  # the first --max-batch 1 row of each client count
    for r in rows:
        if r["max_batch"] == 1:
            base.setdefault(r["clients"], r["tokens_per_s"])
    lines = [
        f"Reference engine, {os.path.basename(os.path.normpath(a.model))} {a.dtype} on {a.device}, greedy, "
        f"{a.max_tokens} completion tokens per request, {a.requests} requests per client, a fraction "
        f"{a.stream:.2f} of the clients streaming",
        "",
        "| --max-batch (attention) | clients (streaming) | answers | seconds | completion tokens/s | p50 latency s | vs one at a time | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["tokens_per_s"] / base[r["clients"]] if base.get(r["clients"]) else None
        lines.append(
            f"| {r['max_batch']} ({r['attention']}) | {r['clients']} ({r['streaming']}) | {r['answers']} | {r['seconds']:.1f} | {r['tokens_per_s']:.1f} | "
            f"{r['p50_s']:.2f} | {f'{ratio:.2f}x' if ratio else '-'} | {len(r['errors'])} |"
            if r["p50_s"] is not None
            else f"| {r['max_batch']} ({r['attention']}) | {r['clients']} ({r['streaming']}) | 0 | - | 0 | - | - | {len(r['errors'])} |"
        )
    return report(a, rows, lines, "engine")


def report(a, rows: list[dict], lines: list[str], name: str) -> int:
    """Prints the table (and writes $OUT/NAME.md and NAME.json when $OUT is set); 1 when a row had errors."""
    table = "\n".join(lines)
    print(table)
    for r in rows:
        for e in r["errors"][:3]:
            print(f"error (max_batch {r['max_batch']}, {r['clients']} clients): {e}", file=sys.stderr)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, f"{name}.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(out, f"{name}.json"), "w") as f:
            json.dump({"args": vars(a), "rows": rows}, f, indent=1)
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
