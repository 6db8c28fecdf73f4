"""Completion throughput of the reference engine under concurrent clients (issue #13), in one run:
continuous batching (``--max-batch 16``, the default) against one request at a time (``--max-batch 1``,
what the engine did before batching: one request decoded alone, the next waiting), at 1, 4 and 16 clients;
batches written ``16:masked`` run with ``--batch-attention masked`` (one attention call per layer over the
padded batch instead of one per request: engines/batching.py).

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
                              [--batches 1,16,16:masked] [--requests 8] [--max-tokens 32] [--stream 0.33]
Prints a markdown table; with $OUT set also writes $OUT/engine.md and $OUT/engine.json.
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

from livetrain.engines import options as engine_options  # noqa: E402
from livetrain.serve import engine_command  # noqa: E402
from livetrain.trainer.client import free_port, http, wait_ready  # noqa: E402

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


def random_model(path: str) -> str:
    """A SmolLM2-135M-shaped model with random weights under ``path`` (see the module's docstring)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "python"))
    import tiny_model

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
    p.add_argument(
        "--model",
        default="default",
        help="model directory, 'default' (SmolLM2-135M-Instruct) or 'random' (its shape, random weights)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--clients", default="1,4,16", help="comma-separated client counts")
    p.add_argument(
        "--batches",
        default="1,16,16:masked",
        help="comma-separated --max-batch values (1: one at a time), each with ':masked' for --batch-attention masked",
    )
    p.add_argument("--requests", type=int, default=8, help="requests per client in each row")
    p.add_argument("--max-tokens", type=int, default=32, help="completion tokens per request")
    p.add_argument("--stream", type=float, default=1 / 3, help="fraction of clients that stream (default a third)")
    a = p.parse_args()
    clients = [int(c) for c in a.clients.split(",")]
    batches = []
    for b in a.batches.split(","):
        size, _, attention = b.partition(":")
        batches.append((int(size), attention or "rows"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        if a.model == "default":
            from livetrain import default_model

            a.model = default_model.resolve("default", a.dtype)
        elif a.model == "random":
            a.model = random_model(os.path.join(tmp, "random-smollm2-135m"))
        for batch, attention in batches:
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
    base = {r["clients"]: r["tokens_per_s"] for r in rows if r["max_batch"] == 1}
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
    table = "\n".join(lines)
    print(table)
    for r in rows:
        for e in r["errors"][:3]:
            print(f"error (max_batch {r['max_batch']}, {r['clients']} clients): {e}", file=sys.stderr)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "engine.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(out, "engine.json"), "w") as f:
            json.dump({"args": vars(a), "rows": rows}, f, indent=1)
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
